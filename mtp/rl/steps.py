"""Pure RL steps, jitted in one place: the update of (system, optimizer) and the reference.

The train state is `nnx.split((system, optimizer))`; `rl_step` is
`(state, batch, first_epoch) -> (state, metrics, lp_bt)` with the state
donated. Only the `rl.trainable` part of the system gets gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtp.config import RLConfig
from mtp.rl.objectives import TokenLogprob, rl_loss, token_stats

TRAINABLE = {
    "both": nnx.Param,
    "drafter": nnx.All(nnx.Param, nnx.PathContains("drafter")),
    "main": nnx.All(nnx.Param, nnx.PathContains("main")),
}


def make_rl_optimizer(rl_config: RLConfig) -> optax.GradientTransformation:
    """Clipping, then AdamW with a linear warm-up; the keep head (learned emission) at
    `rl.keep_lr_scale` times the learning rate."""
    warm = max(rl_config.warmup_steps, 1)

    def adamw(scale):
        peak = rl_config.lr * scale
        schedule = lambda count: peak * jnp.minimum(1.0, (count + 1) / warm)  # first step > 0
        return optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=rl_config.weight_decay)

    tx = adamw(1.0)
    if rl_config.keep_lr_scale != 1.0:
        tx = optax.multi_transform({"keep": adamw(rl_config.keep_lr_scale), "rest": tx}, _keep)
    return optax.chain(optax.clip_by_global_norm(rl_config.grad_clip), tx)


def _keep(params):
    """'keep' for the keep head's parameters, 'rest' for the others (same tree)."""
    is_keep = lambda path: any(getattr(p, "key", None) == "keep" for p in path)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "keep" if is_keep(path) else "rest", params
    )


def rl_optimizer(system, rl_config: RLConfig, trainable: str) -> nnx.Optimizer:
    """AdamW over the `trainable` part only ('both', 'drafter', 'main')."""
    return nnx.Optimizer(system, make_rl_optimizer(rl_config), wrt=TRAINABLE[trainable])


def rl_grads(
    system, batch, rl_config: RLConfig, trainable: str, first_epoch=True, token_logprob=None
):
    """(loss, (metrics, lp_bt)), grads w.r.t. the trainable parameters only."""
    grad_fn = nnx.value_and_grad(
        rl_loss, argnums=nnx.DiffState(0, TRAINABLE[trainable]), has_aux=True
    )
    return grad_fn(system, batch, rl_config, first_epoch, token_logprob)


def rl_step(
    graphdef, state, batch, first_epoch, *, rl_config: RLConfig, trainable: str,
    token_logprob: TokenLogprob | None = None,
):  # fmt: skip
    """One update of (system, optimizer). Returns (state, metrics, lp_bt before the update)."""
    system, optimizer = nnx.merge(graphdef, state)
    (_, (metrics, lp_bt)), grads = rl_grads(
        system, batch, rl_config, trainable, first_epoch, token_logprob
    )
    metrics["grad_norm"] = optax.global_norm(grads)
    optimizer.update(system, grads)
    return nnx.state((system, optimizer)), metrics, lp_bt


def reference_logprobs(
    graphdef, state, batch, *, temperature: float, teacher: bool = False, token_logprob=None
):
    """Per-token log-probs (B, T) under a frozen system (the KL reference), scored as the
    policy's are (`token_logprob`), and with `teacher` its main model's log-distribution
    (B, T, V) for each token (the distillation teacher)."""
    system = nnx.merge(graphdef, state)
    lp_bt, _, _, _, teacher_btv = token_stats(system, batch, temperature, token_logprob)
    return lp_bt, (teacher_btv if teacher else None)


def jit_rl_steps(graphdef, ref_graphdef, rl_config: RLConfig, trainable: str, token_logprob=None):
    """Jitted (rl_step, reference_logprobs); the train state is donated."""
    step = jax.jit(
        functools.partial(
            rl_step, graphdef, rl_config=rl_config, trainable=trainable, token_logprob=token_logprob
        ),
        donate_argnums=0,
    )
    ref = jax.jit(
        functools.partial(
            reference_logprobs,
            ref_graphdef,
            temperature=rl_config.temperature,
            teacher=rl_config.distill > 0,
            token_logprob=token_logprob,
        )
    )
    return step, ref
