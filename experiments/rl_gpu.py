r"""Joint RL on one GPU: 8-digit addition (long carry-chain thoughts), bigger model, k = 4.

    python -m mtp.run --config=experiments/rl_gpu.py --workdir=runs/rl_gpu
    python -m mtp.evals.rl_report --workdir=runs/rl_gpu --n=1024

The same three phases as `rl_arith.py` (warm-up, drafter-only RL, joint RL),
each resumable, at a size that needs an accelerator: a 6-layer d=384 main
model (~11M parameters), 256 rollouts per RL step. `:mult` switches the task
to 5-digit x 3-digit multiplication (partial products written out).
Not yet measured on a GPU (the session that wrote it had none); expect the
warm-up to take minutes and each RL phase tens of minutes on one H100.
"""

import dataclasses

from mtp.config import RLConfig, default_config

VARIANTS = ("mult",)


def get_config(arg=None):
    if arg not in (None, *VARIANTS):
        raise ValueError(f"experiments/rl_gpu.py:{arg}: the argument is one of {VARIANTS}")
    mult = arg == "mult"
    task = "multiplication:digits=5,multiplier_digits=3" if mult else "addition:digits=8"
    c = default_config()
    c.model.update(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, max_len=256,
                   dtype="bfloat16")  # fmt: skip
    c.drafter.update(kind="transformer", k=4, n_layers=1, n_heads=6)
    c.data.update(corpus=f"task:{task},n=500000", seq_len=160, batch_size=128)
    c.train.update(
        steps=6000, lr=1e-3, warmup_steps=300, eval_every=1000, checkpoint_every=500,
        eval_batches=8, log_every=100, draft_weight=1.0, draft_decay=1.0,
    )  # fmt: skip
    c.program = "rl"
    c.rl = dataclasses.asdict(RLConfig())
    c.rl.update(
        task=task,
        trainable=("drafter", "both"),
        steps=400,
        prompts_per_step=32,
        group_size=8,
        advantage="grpo",
        loss="ppo",
        ppo_epochs=2,
        lr=1e-4,
        warmup_steps=20,
        temperature=1.0,
        thought_mode="fast",
        think_budget=24,
        answer_max_tokens=12,
        log_every=10,
        eval_every=100,
        eval_prompts=512,
        checkpoint_every=50,
    )
    return c
