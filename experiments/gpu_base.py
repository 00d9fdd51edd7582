r"""The base model for one GPU: a 139M-parameter main model, bf16 compute, k = 4.

12 layers, d_model 1024, 16 heads (8 KV heads), seq_len 1024, batch 32 x 1024
tokens; a one-layer transformer drafter (16M parameters). Parameters and
optimizer state stay float32; matmuls run in bfloat16.
    python -m mtp.run --config=experiments/gpu_base.py --workdir=runs/gpu_base
    python benchmarks/train_throughput.py --config=experiments/gpu_base.py --steps=20
    python -m mtp.run --workdir=runs/gpu_base --mode=decode --prompt="def main("
On the bundled stdlib corpus (12 MB of Python: 2,000 steps of 32K tokens are
~5 epochs, so watch the held-out loss); a model this size wants more text:
pass e.g. --config.data.corpus=tfds:NAME:train and raise train.steps.
One H100: throughput not measured yet (see docs/benchmarks.md); at 40% MFU a
step would take ~0.1 s, so ~5 min for 2,000 steps plus compile and evals. On several hosts:
MTP_DISTRIBUTED=1 on each, the same workdir (README, "Devices and hosts").
"""

from mtp.config import default_config


def get_config(arg=None):
    del arg
    c = default_config()
    c.model.update(
        d_model=1024, n_layers=12, n_heads=16, n_kv_heads=8, max_len=1024, dtype="bfloat16"
    )
    c.drafter.update(kind="transformer", k=4, n_layers=1, n_heads=16)
    c.data.update(seq_len=1024, batch_size=32, max_bytes=0)
    c.train.update(
        steps=2000,
        lr=6e-4,
        warmup_steps=200,
        weight_decay=0.1,
        eval_every=500,
        checkpoint_every=500,
        eval_batches=16,
        log_every=50,
    )
    return c
