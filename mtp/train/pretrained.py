"""A pretrained main model in a run: its shapes into the config, its weights into the system.

    run = with_checkpoint_shapes(run, tok)   # once, at the edge: config.json stores the result
    system = make_system(run, tok)           # mtp.train.steps: loads the weights when asked

The checkpoint (`model.init_from`, see `mtp.config.sources`) fixes every shape
and family field of the main model; the config keeps what is a choice of the
run (max_len, taps, dtypes, registers, urgency). Specials the tokenizer added to
a pretrained vocabulary (think, pause, pad) are rows past the checkpoint's: the
loader initialises them to the mean row.
"""

from __future__ import annotations

import dataclasses

from mtp.config import Run
from mtp.config.sources import local_source
from mtp.data.tokenizer import Tokenizer
from mtp.errors import ConvertError
from mtp.model.convert import checkpoint_fields, load_into, read_weights
from mtp.model.transformer import Transformer


def with_checkpoint_shapes(run: Run, tok: Tokenizer) -> Run:
    """`run` with the main model's shapes read from its checkpoint (unchanged without one)."""
    if not run.model.init_from:
        return run
    source = local_source(run.model.init_from)
    fields = checkpoint_fields(source)
    rows = fields["vocab_size"]
    added = tok.vocab_size - tok.base_vocab_size
    if tok.base_vocab_size > rows:
        raise ConvertError(
            f"{source}: the tokenizer has {tok.base_vocab_size} tokens but the embedding only "
            f"{rows} rows; give the tokenizer that belongs to this checkpoint"
        )
    # Added specials take ids base..base+added-1: rows a padded embedding may already have.
    fields["vocab_size"] = max(rows, tok.base_vocab_size + added)
    model = dataclasses.replace(run.model, **fields)
    model.check_taps()
    return run.replace(model=model)


def load_pretrained(main: Transformer, run: Run) -> None:
    """Copies the checkpoint's weights into `main` (built from `with_checkpoint_shapes`)."""
    source = local_source(run.model.init_from)
    load_into(main, read_weights(source), source=source)
