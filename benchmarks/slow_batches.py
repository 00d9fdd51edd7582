r"""Slow-mode decoding cost per main pass at several batch sizes: the engine alone.

    python benchmarks/slow_batches.py --config=experiments/smollm2_drafter.py --batches=1,8,16

Each batch decodes `--max_new_tokens` after prompts of about 100 tokens, compiled
first, then timed once; prints ms per pass (the prefill's share included) and
tokens/s. Run it in two checkouts (`git worktree add DIR COMMIT`, then
`PYTHONPATH=DIR python benchmarks/slow_batches.py ...` from DIR) to compare engines
side by side on one machine. `--random`: the config's shapes with random weights
(no checkpoint is read).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time

import numpy as np

from mtp.config import resolve
from mtp.data.tokenizer import tokenizer_of
from mtp.decode.engine import Decoder
from mtp.train.pretrained import with_checkpoint_shapes
from mtp.train.steps import make_system


def _config(path: str):
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment file; its main model decodes")
    p.add_argument("--batches", default="1,8,16")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--random", action="store_true", help="random weights, no checkpoint read")
    args = p.parse_args(argv)
    run = resolve(_config(args.config))
    tok = tokenizer_of(run)
    run = with_checkpoint_shapes(run, tok)
    dec = Decoder(make_system(run, tok, pretrained=not args.random), tok.specials)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        n = min(100, run.model.max_len // 2)
        prompts = [np.arange(100, 100 + n - i % 7) % run.model.vocab_size for i in range(b)]
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
