"""Advantages by name: a group of rollouts of one prompt -> one advantage per rollout.

GRPO (Shao et al. 2024) normalises by the group's std; RLOO (Ahmadian et al.
2024) subtracts the mean of the other rollouts; Dr. GRPO (Liu et al. 2025)
subtracts the group mean and does not divide. Equal rewards in a group give
zero advantages under all three, hence no gradient from that group.

The std division makes GRPO blind to the size of a reward difference: a group
whose rollouts are all right and differ by one main pass gets advantages of +-1
whatever the pass price. RLOO and Dr. GRPO keep the price's scale, so
`advantage='auto'` (the config's default) takes RLOO when passes are priced
(`resolve_advantage`).
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


@register("drgrpo")
def dr_grpo_advantages(rewards_gn: np.ndarray) -> np.ndarray:
    """(G, n) -> r minus the group mean (no std division: a reward gap keeps its size)."""
    r = np.asarray(rewards_gn, np.float64)
    return (r - r.mean(1, keepdims=True)).astype(np.float32)


def resolve_advantage(name: str, priced: bool) -> str:
    """'auto' -> 'rloo' where rewards carry a price (its scale matters), else 'grpo'."""
    if name != "auto":
        return name
    return "rloo" if priced else "grpo"


@register("rloo")
def rloo_advantages(rewards_gn: np.ndarray) -> np.ndarray:
    """(G, n) -> r_i minus the mean reward of the other n - 1 rollouts of its group."""
    r = np.asarray(rewards_gn, np.float64)
    n = r.shape[1]
    baseline = (r.sum(1, keepdims=True) - r) / (n - 1)
    return (r - baseline).astype(np.float32)
