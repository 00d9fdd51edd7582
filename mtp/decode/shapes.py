"""The padded shapes a decoding call compiles for: its prompts' width and its cache's slots.

Both round up to a few sizes, so that few programs compile and little work is wasted: a
prefill is compute-bound (it wastes what its padding costs), and a pass's attention reads
every slot of the cache.
"""

from __future__ import annotations

WIDTH_STEP = 32  # prompts wider than this are padded to a multiple of it
MIN_SLOTS = 64  # the smallest cache a call gets (fewer sizes, fewer compiles)


def cache_slots(positions: int, max_len: int) -> int:
    """KV-cache slots of a call whose rows reach `positions` (prompt, new tokens and any
    pauses): the next size of 2^n or 3 * 2^(n-1) slots (>= MIN_SLOTS: 64, 96, 128, 192, ...),
    at most max_len. A pass's attention costs what its slots do, so a short call gets a short
    cache; these sizes leave under a third of the slots unused and compile few loops."""
    p = max(MIN_SLOTS, positions)
    two = 1 << (p - 1).bit_length()
    return min(max_len, 3 * two // 4 if 3 * two // 4 >= p else two)


def prompt_width(longest: int, max_len: int) -> int:
    """Prompts are padded to a power of two (>= 8) up to `WIDTH_STEP`, then to a multiple of
    it: few widths ever compile, and a prefill (compute-bound) wastes at most WIDTH_STEP - 1
    positions per row, not up to half its width."""
    if longest <= WIDTH_STEP:
        return min(max_len, max(8, 1 << (longest - 1).bit_length()))
    return min(max_len, -(-longest // WIDTH_STEP) * WIDTH_STEP)
