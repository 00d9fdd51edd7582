"""Which rollouts a step trains on: the step's problems, replay of hard ones, dynamic
sampling of informative groups, and the advantages of the groups kept."""

from __future__ import annotations

import numpy as np

from mtp.config import RLConfig
from mtp.errors import UserError
from mtp.rl.advantages import ADVANTAGES, resolve_advantage
from mtp.rl.rollouts import Rollouts


class RewardError(UserError):
    """A verifier raised or returned a non-finite reward and rl.on_bad_reward='error'."""


def step_problems(task, step: int, n: int, hard: list, n_replay: int) -> list:
    """The `n` problems of an RL step: the first `n_replay` hard ones, then fresh train ones.

    Fresh problems are fixed by the step number (a resumed run sees the same)."""
    replay = hard[:n_replay]
    return replay + task.examples("train", n - len(replay), start=step * n)


def update_hard(hard: list, problems: list, scores_gn: np.ndarray, cap: int) -> list:
    """The hard-problem queue after a step: solved problems leave, unsolved go to the back.

    `problems` (G,) and `scores_gn` (G, N): a problem is solved when every one
    of its N rollouts scored 1 (NaN: a bad rollout, counts as unsolved).
    """
    unsolved = [p for p, s in zip(problems, scores_gn, strict=True) if not (s >= 1).all()]
    seen = {p.prompt for p in problems}
    return ([p for p in hard if p.prompt not in seen] + unsolved)[-cap:]


def informative_first(ro: Rollouts, group_size: int, n_groups: int) -> Rollouts:
    """`n_groups` groups of `ro`: those whose rewards differ (and have no bad rollout) first.

    Equal rewards give a group zero advantage, hence no policy gradient; with
    rl.oversample > 1 the learner decodes more groups than it trains on and keeps
    the informative ones (DAPO's dynamic sampling, Yu et al. 2025). The batch
    keeps its shape (fewer informative groups are topped up with the others).
    """
    rewards_gn = np.nan_to_num(ro.rewards).reshape(-1, group_size)
    useful_g = (rewards_gn.std(1) > 0) & ~ro.bad.reshape(-1, group_size).any(1)
    order = np.argsort(~useful_g, kind="stable")[:n_groups]
    rows = (order[:, None] * group_size + np.arange(group_size)).reshape(-1)
    return ro.select(rows)


def group_advantages(ro: Rollouts, group_size: int, rl_config: RLConfig, log=print):
    """(adv_b, keep_b) from scored rollouts; groups holding a bad rollout are dropped.

    Raises RewardError on a bad rollout when rl.on_bad_reward is 'error'.
    """
    b = len(ro.prompts)
    if b == 0 or b % group_size:
        raise UserError(f"RL batch of {b} rollouts is not a whole number of groups of {group_size}")
    if ro.bad.any():
        if rl_config.on_bad_reward == "error":
            raise RewardError(f"{ro.errors[0]}; set rl.on_bad_reward='skip' to drop such groups")
        for e in ro.errors[:3]:
            log(f"rl: skipped a group: {e}")
    bad_g = ro.bad.reshape(-1, group_size).any(1)
    rewards_gn = np.where(bad_g[:, None], 0.0, ro.rewards.reshape(-1, group_size))
    name = resolve_advantage(rl_config.advantage, rl_config.pass_price > 0)
    adv = ADVANTAGES[name](rewards_gn)
    keep = np.repeat(~bad_g, group_size)
    return np.where(keep, adv.reshape(-1), 0.0).astype(np.float32), keep
