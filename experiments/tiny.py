r"""Tiny main model + transformer drafter on the bundled stdlib code corpus.

The README's main job and the CPU smoke test. 2 idle CPU cores: 6.3 min.
    python -m mtp.run --config=experiments/tiny.py --workdir=runs/tiny
Measured (docs/benchmarks.md): eval main loss 1.97 -> 1.74 -> 1.64 nats/byte
at steps 200 / 400 / 600; drafter top-1 accuracy at offsets 1..4 0.53 / 0.51 /
0.47 / 0.46 against a unigram baseline of 0.25; 3.05 tokens per pass implied.
"""

from mtp.config import default_config


def get_config(arg=None):
    del arg
    c = default_config()
    c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_len=256)
    c.drafter.update(kind="transformer", k=4, n_layers=1, n_heads=4)
    c.data.update(seq_len=128, batch_size=16, max_bytes=4_000_000)
    c.train.update(
        steps=600,
        lr=3e-3,
        warmup_steps=60,
        eval_every=200,
        checkpoint_every=100,
        eval_batches=8,
        log_every=20,
    )
    return c
