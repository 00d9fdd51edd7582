"""Pure supervised steps, jitted in one place.

The train state is `nnx.split((system, optimizer))`: a graphdef (static) and
a state pytree (arrays). Steps are `(state, batch) -> (state, metrics)`, no
I/O inside; metrics are a flat dict of arrays. `jax.jit` over split/merge
costs ~1 ms of Python per call (graph-mode `nnx.jit` ~4 ms, measured on 2 CPU cores).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtp.config import Run
from mtp.data.tokenizer import Tokenizer
from mtp.model.system import MTPSystem
from mtp.train.losses import draft_accuracy, offset_weights, supervised_loss


def make_optimizer(train_config) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_config.lr,
        warmup_steps=train_config.warmup_steps,
        decay_steps=max(train_config.steps, train_config.warmup_steps + 1),
        end_value=train_config.lr * train_config.min_lr_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(
            schedule, b1=train_config.b1, b2=train_config.b2, weight_decay=train_config.weight_decay
        ),
    )


def make_system(run: Run, tok: Tokenizer, seed: int | None = None) -> MTPSystem:
    seed = run.seed if seed is None else seed
    return MTPSystem(run.model, run.drafter, pad_id=tok.specials.pad, rngs=nnx.Rngs(seed))


def make_system_and_optimizer(run: Run, tok: Tokenizer):
    system = make_system(run, tok)
    return system, nnx.Optimizer(system, make_optimizer(run.train), wrt=nnx.Param)


def init_train_state(run: Run, tok: Tokenizer, abstract: bool = False):
    """(graphdef, state) of (system, optimizer); ShapeDtypeStructs only if `abstract`."""
    build = functools.partial(make_system_and_optimizer, run, tok)
    return nnx.split(nnx.eval_shape(build) if abstract else build())


def _flatten(metrics: dict) -> dict:
    """Per-offset vectors become `name_1..name_k` scalars."""
    out = {}
    for name, v in metrics.items():
        if v.ndim:
            out.update({f"{name}_{j + 1}": v[j] for j in range(v.shape[0])})
        else:
            out[name] = v
    return out


def loss_fn(system: MTPSystem, batch, train_config):
    logits_btv, draft_btkv = system(batch["tokens"], batch.get("urgency"))
    loss, metrics = supervised_loss(
        logits_btv,
        draft_btkv,
        batch["tokens"],
        batch["loss_mask"],
        draft_weights_k=offset_weights(system.k, train_config.draft_decay),
        draft_weight=train_config.draft_weight,
        distill_weight=train_config.distill_weight,
    )
    return loss, (metrics, logits_btv, draft_btkv)


def train_step(graphdef, state, batch, *, train_config):
    system, optimizer = nnx.merge(graphdef, state)
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (_, (metrics, logits, draft)), grads = grad_fn(system, batch, train_config)
    metrics.update(draft_accuracy(logits, draft, batch["tokens"], batch["loss_mask"]))
    metrics["grad_norm"] = optax.global_norm(grads)
    optimizer.update(system, grads)
    return nnx.state((system, optimizer)), _flatten(metrics)


def eval_step(graphdef, state, batch, *, train_config):
    """Metrics of one batch plus its target count (to weight the average)."""
    system, _ = nnx.merge(graphdef, state)
    _, (metrics, logits, draft) = loss_fn(system, batch, train_config)
    metrics.update(draft_accuracy(logits, draft, batch["tokens"], batch["loss_mask"]))
    metrics["targets"] = batch["loss_mask"][:, 1:].sum()
    return _flatten(metrics)


@jax.jit
def first_nonfinite(first, step, metrics):
    """The record of the first step whose loss or grad norm is NaN/Inf: `{'step', **metrics}`.

    `first` is the record so far (None before any step; 'step' 0 while none was bad);
    `step` and `metrics` are this step's. Stays on device: the loop reads it only
    where it syncs anyway, so a bad step between two reads is still named.
    """
    if first is None:
        first = {"step": jnp.zeros((), jnp.int32)} | jax.tree.map(jnp.zeros_like, metrics)
    bad = ~(jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]))
    take = (first["step"] == 0) & bad
    now = {"step": jnp.asarray(step, jnp.int32)} | metrics
    return jax.tree.map(lambda old, new: jnp.where(take, new, old), first, now)


@jax.jit
def all_finite(state) -> jax.Array:
    """True if every float array of `state` (parameters, optimizer moments) is finite."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def jit_steps(graphdef, train_config, state_sharding=None, batch_sharding=None):
    """Jitted (train_step, eval_step); the train state is donated."""
    train = jax.jit(
        functools.partial(train_step, graphdef, train_config=train_config),
        in_shardings=(state_sharding, batch_sharding) if state_sharding else None,
        out_shardings=(state_sharding, None) if state_sharding else None,
        donate_argnums=0,
    )
    evaluate = jax.jit(functools.partial(eval_step, graphdef, train_config=train_config))
    return train, evaluate
