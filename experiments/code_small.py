r"""A small code model on the bundled stdlib corpus: the CPU-sized main result.

Larger than tiny.py (2.4M-parameter main model, 6 layers, seq_len 256) and
trained longer (700 steps of 16 x 256 tokens), with a transformer drafter at
k = 4. 2 idle CPU cores: 35 min (3.0 s/step), measured 2026-11-23: eval main
loss 1.48 (tiny.py: 1.64), drafter top-1 @1..4 0.557 / 0.536 / 0.514 / 0.487
(unigram 0.247); greedy speculative decoding accepts 2.8 drafts per pass, yet
on the CPU it is 0.83x slow at batch 1 and 1.40x at batch 8 (docs/benchmarks.md).
    python -m mtp.run --config=experiments/code_small.py --workdir=runs/code_small
    python -m mtp.run --workdir=runs/code_small --mode=decode --prompt="def main("
Shows how much further main loss and drafter accuracy per offset go than in
tiny.py when the model and the budget grow; the decode command then measures
the speculative speedup it buys on the CPU.
"""

from mtp.config import default_config


def get_config(arg=None):
    del arg
    c = default_config()
    c.model.update(d_model=192, n_layers=6, n_heads=6, n_kv_heads=2, max_len=512)
    c.drafter.update(kind="transformer", k=4, n_layers=1, n_heads=6)
    c.data.update(seq_len=256, batch_size=16, max_bytes=16_000_000)
    c.train.update(
        steps=700,
        lr=2e-3,
        warmup_steps=70,
        eval_every=350,
        checkpoint_every=100,
        eval_batches=8,
        log_every=25,
    )
    return c
