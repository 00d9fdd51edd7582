"""Token frequencies, and the trimmed draft vocabulary they pick (`drafter.draft_vocab`).

A drafter that scores only the U most frequent tokens of the training data
(EAGLE-3) keeps most of its accepted drafts at a fraction of the head's cost;
`most_frequent` picks those ids, the specials always among them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mtp.config import ConfigError


def token_counts(token_arrays: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
    """How often each id occurs in the arrays (any shapes): (V,) int64."""
    counts_v = np.zeros(vocab_size, np.int64)
    for tokens in token_arrays:
        flat = np.asarray(tokens).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
            raise ValueError(f"token ids outside 0..{vocab_size - 1}: {flat.min()}..{flat.max()}")
        counts_v += np.bincount(flat, minlength=vocab_size)
    return counts_v


def most_frequent(
    token_arrays: Iterable[np.ndarray], n: int, vocab_size: int, always: Iterable[int] = ()
) -> np.ndarray:
    """The n most frequent ids of the arrays, every id of `always` (the specials) among them:
    (n,) int32, ascending. Ties go to the smaller id; ids never seen fill up the rest."""
    always = sorted({int(i) for i in always})
    if not len(always) <= n <= vocab_size:
        raise ConfigError(
            f"drafter.draft_vocab: must lie in {len(always)}..{vocab_size} (the specials "
            f"up to the vocabulary), got {n}"
        )
    if always and not 0 <= always[0] <= always[-1] < vocab_size:
        raise ValueError(f"always: ids outside 0..{vocab_size - 1}: {always}")
    counts_v = token_counts(token_arrays, vocab_size)
    counts_v[always] = -1  # taken already; sorted after every other id
    order_v = np.lexsort((np.arange(vocab_size), -counts_v))  # count descending, then id
    rest = order_v[: n - len(always)]
    return np.sort(np.concatenate([np.asarray(always, np.int64), rest])).astype(np.int32)
