r"""Joint RL on 4-digit addition with the carry chain as thought: warm-up, then RL.

    python -m mtp.run --config=experiments/rl_arith.py --workdir=runs/rl_arith
    python -m mtp.evals.rl_report --workdir=runs/rl_arith      # table + PNG

Phases, each resumable (re-running the command skips finished ones):
1. supervised warm-up on worked examples (thought + answer; main + drafter,
   joint: the drafter's loss reaches the main model through its taps);
2. RL with the drafter only trainable (main frozen), from the warm-up;
3. RL with both trainable (joint), from the warm-up.
Rollouts think in fast mode (1 + k = 5 tokens per main pass) within a budget
of main passes, then answer in slow mode; reward = exact answer.

2 idle CPU cores: ~22 min for the pipeline (warm-up 14.5 min), 1.3 min for the
report (`:smoke` runs a minute-long pipeline). Measured 2026-11-23
(docs/benchmarks.md): slow 1.000 accuracy at 41.6 main passes per answer; fast
1.000 at 13.6 passes (33%) with the supervised drafter, after drafter-only RL
and after joint RL alike: RL has nothing to fix at this size.

Variants (`experiments/rl_arith.py:VARIANT`), measured the same day (but `mult_emit`):
- `k8`: 8 drafts per pass; fast 1.000 at 9.6 passes (23%), RL again idle.
- `medusa`: the warm-up detaches the taps (the main model never trained to talk);
  same main loss, fast 0.000, and RL (exact or partial credit) cannot start.
- `mult`: 2x2-digit multiplication with partial products, 256 rollouts per RL
  step, 90 steps (~65 min; measured 2026-11-30): slow 0.898, fast 0.570 at 31%
  of the passes with the supervised drafter, 0.592 after drafter-only RL, 0.672
  after joint RL (512 problems). At 64 rollouts per step
  (`--config.rl.prompts_per_step=8 --config.rl.steps=60`) RL did not help.
- `mult_emit`: `mult` with learned emission: joint RL of the keep head (adaptive
  thought by its sampled decisions), half the groups at urgency 0 and half at 1,
  reward = exact answer - 0.02 x urgency x main passes (RLOO advantages). Run it
  with `mult`'s `warmup/` copied into its workdir (the same warm-up); its report
  is `mtp.evals.rl_report --workdir=runs/rl_mult --also=runs/rl_mult_emit`.
  (`smoke_emit`: the same at `smoke` size.)
"""

import dataclasses

from mtp.config import RLConfig, default_config

VARIANTS = ("smoke", "medusa", "k8", "mult", "mult_emit", "smoke_emit")


def get_config(arg=None):
    if arg not in (None, *VARIANTS):
        raise ValueError(f"experiments/rl_arith.py:{arg}: the argument is one of {VARIANTS}")
    smoke = arg in ("smoke", "smoke_emit")
    c = default_config()
    c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_len=128)
    c.drafter.update(kind="transformer", k=4, n_layers=1, n_heads=4)
    c.data.update(corpus="task:addition:digits=4,n=100000", seq_len=64, batch_size=32)
    c.train.update(
        steps=1500, lr=3e-3, warmup_steps=100, eval_every=500, checkpoint_every=250,
        eval_batches=4, log_every=50, draft_weight=1.0, draft_decay=1.0,
    )  # fmt: skip
    c.program = "rl"
    c.rl = dataclasses.asdict(RLConfig())
    c.rl.update(
        task="addition:digits=4",
        trainable=("drafter", "both"),
        steps=60,
        prompts_per_step=8,
        group_size=8,
        oversample=2,  # train on the 8 of 16 groups whose rewards differ (if there are 8)
        replay=0.25,  # a quarter of the problems: earlier ones some rollout got wrong
        advantage="grpo",
        loss="ppo",
        ppo_epochs=2,
        lr=1e-4,
        kl_coef=0.02,
        warmup_steps=5,
        temperature=1.0,
        thought_mode="fast",
        think_budget=10,
        answer_max_tokens=8,
        log_every=5,
        eval_every=30,
        eval_prompts=128,
        checkpoint_every=10,
    )
    if arg == "medusa":  # warm-up with detached taps: the main model never learns to talk
        c.drafter.detach = True  # (rl.detach stays False: joint RL reaches the main model)
        c.rl.update(reward="partial", lr=3e-4, steps=100)  # exact answers: no signal at all
    if arg == "k8":  # twice the drafts per pass, same warm-up recipe
        c.drafter.k = 8
    if arg in ("mult", "mult_emit"):  # 2x2-digit multiplication, partial products in one step each
        task = "multiplication:digits=2,multiplier_digits=2"
        c.data.corpus = f"task:{task},n=100000"
        c.rl.update(task=task, prompts_per_step=32, steps=90, eval_every=30)  # 256 rollouts/step
        c.drafter.emission = True  # a keep head for learned emission (unused until RL prices)
    if arg in ("mult_emit", "smoke_emit"):  # learned emission: keep decisions priced by urgency
        c.drafter.emission = True
        c.rl.update(thought_mode="learned", urgency=True, pass_price=0.02, advantage="auto",
                    trainable=("both",), think_budget=16, keep_lr_scale=100.0)  # fmt: skip
    if smoke:
        c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1)
        c.drafter.update(k=2, n_heads=2)
        c.data.update(corpus="task:addition:digits=2,n=2000", seq_len=48, batch_size=8)
        c.train.update(steps=20, warmup_steps=2, eval_every=20, checkpoint_every=10, log_every=5)
        c.rl.update(task="addition:digits=2", steps=4, prompts_per_step=2, group_size=4,
                    eval_every=4, eval_prompts=8, checkpoint_every=2, log_every=2,
                    think_budget=8)  # fmt: skip
    return c
