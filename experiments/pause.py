r"""Pause tokens on 2-digit x 2-digit multiplication answered with no written thought.

    python -m mtp.run --config=experiments/pause.py --workdir=runs/pause
    python -m mtp.evals.pause_report --workdir=runs/pause     # the report again

Trains a plain model and a pause-trained one (M ~ U{0..16} pauses before the
answer, targets masked), then a learned-pause model (pauses as targets, then
RL on the pause decision with a pause price scaled by urgency), and writes
runs/pause/pause_report.md: accuracy against M = 0, 1, 2, 4, 8, 16, the
confidence rule and the learned model against fixed M, urgency 0 against 1,
tokens per main pass by mode. `:smoke` is a ~3-minute pipeline.

Measured on 2 idle CPU cores, 2026-11-23 (docs/benchmarks.md): 10.6 min for
the pipeline and report. 800 held-out problems: plain 0.191 at M=0 and 0.000
with any pauses; pause-trained 0.183 / 0.205 / 0.231 / 0.216 / 0.216 / 0.200
for M = 0 / 1 / 2 / 4 / 8 / 16. The confidence rule stays below the best fixed
M at equal pauses; the learned model ends with no pauses at either urgency.
"""

import dataclasses

from mtp.config import PauseConfig, RLConfig, default_config

VARIANTS = ("smoke",)


def get_config(arg=None):
    if arg not in (None, *VARIANTS):
        raise ValueError(f"experiments/pause.py:{arg}: the argument is one of {VARIANTS}")
    smoke = arg == "smoke"
    c = default_config()
    c.model.update(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_len=64,
                   use_urgency=True)  # fmt: skip
    c.drafter.update(kind="transformer", k=2, n_layers=1, n_heads=4)
    c.data.update(seq_len=32, batch_size=32)
    c.train.update(steps=3000, lr=3e-3, warmup_steps=100, log_every=50, draft_weight=0.5)
    c.program = "pause"
    task = "multiplication:digits=2,multiplier_digits=2,thought=0,n=50000"
    c.pause = dataclasses.asdict(PauseConfig())
    c.pause.update(task=task, max_pauses=16, eval_prompts=800, cap=16, emit_steps=200)
    # the learned-pause RL phase: pause rollouts, price per pause at urgency 1
    c.rl = dataclasses.asdict(RLConfig())
    c.rl.update(task=task, rollout="pause", steps=60, prompts_per_step=16, group_size=8,
                pass_price=0.02, lr=3e-4, loss="reinforce", ppo_epochs=1, temperature=1.0,
                warmup_steps=5, trainable=("both",), eval_every=60, eval_prompts=64,
                checkpoint_every=60, log_every=5)  # fmt: skip
    if smoke:
        c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1)
        c.drafter.update(k=2, n_heads=2)
        c.data.update(batch_size=8)
        c.train.update(steps=10, warmup_steps=2, log_every=5)
        task = "multiplication:digits=2,multiplier_digits=1,thought=0,n=200"
        c.pause.update(task=task, eval_ms=(0, 2), eval_prompts=16, thresholds=(0.5,), cap=4,
                       emit_steps=4)  # fmt: skip
        c.rl.update(task=task, steps=2, prompts_per_step=2, group_size=2, eval_every=2,
                    eval_prompts=8, checkpoint_every=2, log_every=1)  # fmt: skip
    return c
