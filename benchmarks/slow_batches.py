r"""Slow-mode decoding cost per main pass at several batch sizes: the engine alone.

    python benchmarks/slow_batches.py --config=experiments/smollm2_drafter.py --batches=1,8,16
    python benchmarks/slow_batches.py --workdir=runs/smollm2

Each batch decodes `--max_new_tokens` after prompts of about 100 tokens, compiled
first, then timed once; prints ms per pass (the prefill's share included) and
tokens/s. Run it in two checkouts (`git worktree add DIR COMMIT`, then
`PYTHONPATH=DIR python benchmarks/slow_batches.py ...` from DIR) to compare engines
side by side on one machine. The system comes as in benchmarks/pass_cost.py
(`--workdir` or `--config[:variant]`, `--dtype`); `--cache_len` decodes on shorter caches.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np
from pass_cost import add_source_args, system_from_args

from mtp.decode.engine import Decoder


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_source_args(p)
    p.add_argument("--batches", default="1,8,16")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--cache_len", type=int, default=0, help="cache slots (0: model.max_len)")
    args = p.parse_args(argv)
    system, tok = system_from_args(args)
    if args.cache_len:  # the same weights, shorter caches (`MTPSystem.with_max_len`)
        system = system.with_max_len(args.cache_len)
    dec = Decoder(system, tok.specials)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        n = min(100, system.max_len // 2)
        prompts = [np.arange(100, 100 + n - i % 7) % system.vocab_size for i in range(b)]
        dec.generate(prompts, mode="slow", max_new_tokens=2)  # compiles the loop
        start = time.perf_counter()
        res = dec.generate(prompts, mode="slow", max_new_tokens=args.max_new_tokens)
        wall = time.perf_counter() - start
        tokens = sum(res.row(i).size for i in range(b))
        passes = int(res.stats["main_passes"])
        rows.append({"batch": b, "ms_per_pass": 1e3 * wall / passes, "tokens_per_s": tokens / wall})
        print(f"batch {b}: {rows[-1]['ms_per_pass']:.1f} ms per pass ({passes} passes), "
              f"{rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)  # fmt: skip
    print("command:", shlex.join([sys.executable, *sys.argv]))
    return rows


if __name__ == "__main__":
    main()
