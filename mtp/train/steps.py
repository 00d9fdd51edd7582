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
from mtp.model.convert.drafter_file import load_drafter
from mtp.model.system import MTPSystem
from mtp.model.taps import Past, with_noise
from mtp.train.losses import accuracy_metrics, offset_weights, supervised_terms
from mtp.train.pretrained import load_pretrained

NOISE_SEED = 0  # the tap noise of step s is drawn from fold_in(key(NOISE_SEED), s): resumable


def _adamw(train_config, scale: float = 1.0) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, its peak `scale * lr`."""
    peak = train_config.lr * scale
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=train_config.warmup_steps,
        decay_steps=max(train_config.steps, train_config.warmup_steps + 1),
        end_value=peak * train_config.min_lr_ratio,
    )
    return optax.adamw(
        schedule, b1=train_config.b1, b2=train_config.b2, weight_decay=train_config.weight_decay
    )


def _param_groups(params):
    """'main' for the main model's parameters, 'drafter' for the rest (same tree)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "main" if path[0].key == "main" else "drafter", params
    )


def make_optimizer(train_config) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; the main model's peak learning rate is
    `main_lr_scale * lr` (0: frozen, and no optimizer state is kept for it)."""
    scale = train_config.main_lr_scale
    if scale == 1.0:
        tx = _adamw(train_config)
    else:
        main = _adamw(train_config, scale) if scale else optax.set_to_zero()
        tx = optax.multi_transform({"main": main, "drafter": _adamw(train_config)}, _param_groups)
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip), tx)


def make_system(
    run: Run, tok: Tokenizer, seed: int | None = None, *, pretrained: bool = True, draft_ids=None
) -> MTPSystem:
    """The system of `run` (shapes already from `with_checkpoint_shapes`); with `pretrained`,
    the main model's weights from `model.init_from`, the drafter's blocks copied from them
    (`drafter.copy_layers`) and the drafter from a drafter file (`drafter.init_from`, its draft
    vocabulary too). `draft_ids` (N,): the trimmed draft vocabulary (`drafter.draft_vocab`)."""
    seed = run.seed if seed is None else seed
    system = MTPSystem(
        run.model, run.drafter, pad_id=tok.specials.pad, draft_ids=draft_ids, rngs=nnx.Rngs(seed)
    )
    if pretrained and run.model.init_from:
        load_pretrained(system.main, run)
    if pretrained:
        system.copy_main_layers()
    if pretrained and run.drafter.init_from:
        load_drafter(system, run.drafter.init_from)
    return system


def make_system_and_optimizer(run: Run, tok: Tokenizer, pretrained: bool = True, draft_ids=None):
    system = make_system(run, tok, pretrained=pretrained, draft_ids=draft_ids)
    return system, nnx.Optimizer(system, make_optimizer(run.train), wrt=trainable(run.train))


def init_train_state(run: Run, tok: Tokenizer, abstract: bool = False, draft_ids=None):
    """(graphdef, state) of (system, optimizer); ShapeDtypeStructs only if `abstract` (then no
    pretrained weights are read: a restore fills them)."""
    if abstract:
        build = functools.partial(make_system_and_optimizer, run, tok, False, draft_ids)
        return nnx.split(nnx.eval_shape(build))
    return nnx.split(make_system_and_optimizer(run, tok, True, draft_ids))


def _flatten(metrics: dict) -> dict:
    """Per-offset vectors become `name_1..name_k` scalars."""
    out = {}
    for name, v in metrics.items():
        if v.ndim:
            out.update({f"{name}_{j + 1}": v[j] for j in range(v.shape[0])})
        else:
            out[name] = v
    return out


def loss_fn(system: MTPSystem, batch, train_config, noise_key=None):
    """(loss, metrics): the supervised loss and the accuracy metrics of one batch; the drafter
    scored one offset at a time (`supervised_terms`). A batch's 'targets' (B, T), where given,
    are scored in place of its tokens: the frozen main model's own choices on rows it read
    teacher-forced (`mtp.train.self_distill`); the drafter still reads the tokens. With
    `noise_key` and `train.tap_noise` the drafter reads noisy taps (`taps.with_noise`); the
    distillation teacher reads them clean. 'segments' (B, T), where given, are packed rows'
    window ids (`mtp.train.losses`)."""
    tokens_bt, mask_bt = batch["tokens"], batch["loss_mask"]
    targets_bt, segments_bt = batch.get("targets", tokens_bt), batch.get("segments")
    a = train_config.tap_noise if noise_key is not None else 0.0
    row_key, past_key = jax.random.split(noise_key) if a else (None, None)
    teacher_btu = None
    if "taps" in batch:  # a frozen main model's taps, computed once: the drafter alone
        taps_btld, past_btld = batch["taps"], batch.get("past_taps")
        if a:
            taps_btld = with_noise(taps_btld, a, row_key)
            past_btld = None if past_btld is None else with_noise(past_btld, a, past_key)
        past = None if past_btld is None else Past(past_btld, batch["past_mask"] > 0)
        logits_btv, drafts = None, system.drafts_from_taps(tokens_bt, taps_btld, past)
        if train_config.distill_weight:
            teacher_btu = system.main_logits_from_taps(batch["taps"])
    else:
        augment = (lambda taps_btld: with_noise(taps_btld, a, row_key)) if a else None
        logits_btv, drafts = system.forward(tokens_bt, batch.get("urgency"), augment)
    loss, metrics, pred_btk = supervised_terms(
        logits_btv,
        drafts,
        targets_bt,
        mask_bt,
        draft_weights_k=offset_weights(system.k, train_config.draft_decay),
        draft_weight=train_config.draft_weight,
        distill_weight=train_config.distill_weight,
        teacher_btu=teacher_btu,
        segments_bt=segments_bt,
    )
    logits_btv = None if logits_btv is None else jax.lax.stop_gradient(logits_btv)
    metrics.update(accuracy_metrics(logits_btv, pred_btk, targets_bt, mask_bt, segments_bt))
    return loss, metrics


def trainable(train_config):
    """The parameters a supervised step updates: all, or the drafter's alone when the main
    model is frozen (`train.main_lr_scale` = 0: its gradient is then never computed)."""
    if train_config.main_lr_scale == 0:
        return nnx.All(nnx.Param, nnx.PathContains("drafter"))
    return nnx.Param


def train_step(graphdef, state, batch, *, train_config):
    system, optimizer = nnx.merge(graphdef, state)
    wrt = nnx.DiffState(0, trainable(train_config))
    grad_fn = nnx.value_and_grad(loss_fn, argnums=wrt, has_aux=True)
    noise_key = None  # no key, no noise: nothing drawn unless train.tap_noise asks for it
    if train_config.tap_noise:
        noise_key = jax.random.fold_in(jax.random.key(NOISE_SEED), optimizer.step[...])
    (_, metrics), grads = grad_fn(system, batch, train_config, noise_key)
    metrics["grad_norm"] = optax.global_norm(grads)
    optimizer.update(system, grads)
    return nnx.state((system, optimizer)), _flatten(metrics)


def eval_step(graphdef, state, batch, *, train_config):
    """Metrics of one batch plus its target count (to weight the average)."""
    system, _ = nnx.merge(graphdef, state)
    _, metrics = loss_fn(system, batch, train_config)
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
