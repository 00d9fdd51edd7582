"""Advantages by name: a group of rollouts of one prompt -> one advantage per rollout.

GRPO (Shao et al. 2024) normalises by the group's std; RLOO (Ahmadian et al.
2024) subtracts the mean of the other rollouts. Equal rewards in a group give
zero advantages under both, hence no gradient from that group.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

EPS = 1e-6
ADVANTAGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {}


def register(name: str):
    def add(fn):
        ADVANTAGES[name] = fn
        return fn

    return add


@register("grpo")
def grpo_advantages(rewards_gn: np.ndarray) -> np.ndarray:
    """(G, n) rewards of G groups of n rollouts -> (r - group mean) / (group std + eps)."""
    r = np.asarray(rewards_gn, np.float64)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + EPS)).astype(np.float32)


@register("rloo")
def rloo_advantages(rewards_gn: np.ndarray) -> np.ndarray:
    """(G, n) -> r_i minus the mean reward of the other n - 1 rollouts of its group."""
    r = np.asarray(rewards_gn, np.float64)
    n = r.shape[1]
    baseline = (r.sum(1, keepdims=True) - r) / (n - 1)
    return (r - baseline).astype(np.float32)
