"""Sampling settings and the processed next-token distribution they define.

Temperature, top-k and top-p turn raw logits into the distribution a token is
drawn from. Speculative decoding compares these *processed* distributions of
the main model and the drafter, so one function, `log_probs`, serves both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtp.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax). Otherwise tokens are drawn from
    softmax(logits / temperature) restricted to the `top_k` most likely tokens
    (0: all) and to the smallest set whose probability reaches `top_p` (1: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"sampling.temperature: must be >= 0, got {self.temperature}")
        if not self.top_k >= 0:
            raise ConfigError(f"sampling.top_k: must be >= 0 (0 = all), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p: must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def log_probs(logits_xv: jax.Array, s: Sampling) -> jax.Array:
    """Log of the processed distribution over the last axis; -inf outside top-k / top-p."""
    x_xv = logits_xv.astype(jnp.float32) / s.temperature
    v = x_xv.shape[-1]
    if 0 < s.top_k < v:
        kth_x1 = jax.lax.top_k(x_xv, s.top_k)[0][..., -1:]
        x_xv = jnp.where(x_xv < kth_x1, -jnp.inf, x_xv)
    if s.top_p < 1:
        desc_xv = -jnp.sort(-x_xv, axis=-1)
        p_xv = jax.nn.softmax(desc_xv, axis=-1)
        keep_xv = jnp.cumsum(p_xv, axis=-1) - p_xv < s.top_p  # mass before it is short of top_p
        cut_x1 = jnp.min(jnp.where(keep_xv, desc_xv, jnp.inf), axis=-1, keepdims=True)
        x_xv = jnp.where(x_xv < cut_x1, -jnp.inf, x_xv)
    return jax.nn.log_softmax(x_xv, axis=-1)


def choose(logits_xv: jax.Array, s: Sampling, key: jax.Array) -> jax.Array:
    """One token per row of logits (..., V): argmax when greedy, else a processed sample."""
    if s.greedy:
        return jnp.argmax(logits_xv, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, log_probs(logits_xv, s), axis=-1).astype(jnp.int32)
