r"""Pause tokens on multi-hop lookup (answered with no written thought).

    python -m mtp.run --config=experiments/pause.py --workdir=runs/pause
    python -m mtp.evals.pause_report --workdir=runs/pause     # the report again

Trains a plain model and a pause-trained one (M ~ U{0..16} pauses before the
answer, targets masked), then a learned-pause model (pauses as targets, then
RL with a pause price scaled by urgency), and writes runs/pause/pause_report.md:
accuracy against M = 0, 1, 2, 4, 8, 16, the confidence rule and the learned
model against fixed M, urgency 0 against 1, tokens per main pass by mode.
`:smoke` is a ~3-minute pipeline.

Measured (2 shared CPU cores at load 6-12, 2026-11-23): ~16 min per supervised
phase (1200 steps), so ~35 min before RL, RL ~20 s/step; over the 30-minute
aim on a busy machine. Both supervised models stayed at chance on held-out
problems (plain M=0: 0.098, pause-trained M=0..16: 0.10-0.13; chance ~1/7):
this size does not learn 2-hop lookup in 1200 steps, so the pause comparison
is not yet informative. Next: hops=1 or more steps/width before reading it.
"""

import dataclasses

from mtp.config import PauseConfig, default_config


def get_config(arg=None):
    smoke = arg == "smoke"
    c = default_config()
    c.model.update(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_len=128,
                   use_urgency=True)  # fmt: skip
    c.drafter.update(kind="transformer", k=2, n_layers=1, n_heads=4)
    c.data.update(seq_len=80, batch_size=32)
    c.train.update(steps=1200, lr=3e-3, warmup_steps=100, log_every=50, draft_weight=0.5)
    c.pause = dataclasses.asdict(PauseConfig())
    c.pause.update(task="lookup:symbols=8,hops=2,n=20000", max_pauses=16, eval_prompts=256,
                   emit_steps=200, rl_steps=60, prompts_per_step=16, group_size=8,
                   pause_price=0.05, rl_lr=1e-3)  # fmt: skip
    if smoke:
        c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1)
        c.drafter.update(k=2, n_heads=2)
        c.data.update(batch_size=8)
        c.train.update(steps=10, warmup_steps=2, log_every=5)
        c.pause.update(task="lookup:symbols=4,hops=2,n=200", eval_ms=(0, 2), eval_prompts=16,
                       thresholds=(0.5,), cap=4, emit_steps=4, rl_steps=2, prompts_per_step=2,
                       group_size=2)  # fmt: skip
    return c
