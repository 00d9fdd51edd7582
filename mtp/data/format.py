"""The one text layout: prompt, thought, answer, pauses; encoded and read back.

A worked example is the text `prompt <think> thought </think> answer`; as
tokens it is `<bos> prompt <think> thought </think> <pause>*M answer <eos>`
(M = 0 but in pause training). Every module that builds or reads such rows
(supervised data, RL rollouts, pause decoding, evaluation) uses the functions
here, so the layout has one owner.
"""

from __future__ import annotations

import numpy as np

from mtp.data.tokenizer import Tokenizer

THINK, END_THINK = "<think>", "</think>"
MARKS_LEN = len(THINK) + len(END_THINK)  # characters `render` adds around the thought


def render(ex) -> str:
    """The training text of an example (`.prompt`, `.thought`, `.answer`); the model ends it
    with <eos>."""
    return f"{ex.prompt}{THINK}{ex.thought}{END_THINK}{ex.answer}"


def encode_text(tok: Tokenizer, text: str) -> np.ndarray:
    """(n,) int32: <bos> text <eos>, special spellings ("<think>", ...) as their ids."""
    s = tok.specials
    return np.concatenate([[s.bos], tok.encode_with_specials(text), [s.eos]]).astype(np.int32)


def encode_prompt(tok: Tokenizer, prompt: str, thought: str | None = None) -> np.ndarray:
    """(n,) int32 of what the model sees before it writes: `<bos> prompt <think>` (it then
    thinks), or with a given `thought`, `<bos> prompt <think> thought </think>` (it answers)."""
    tail = THINK if thought is None else f"{THINK}{thought}{END_THINK}"
    return encode_text(tok, prompt + tail)[:-1]


def with_pauses(tok: Tokenizer, ids: np.ndarray, m: int) -> np.ndarray:
    """`ids` followed by m pauses: the prompt of a fixed-M pause decode."""
    return np.concatenate([ids, np.full(m, tok.specials.pause, np.int32)]).astype(np.int32)


def insert_pauses(tok: Tokenizer, stream: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """`stream` with a pause before each token with probability `rate` (seeded)."""
    if rate <= 0:
        return stream
    before = np.random.default_rng(seed).random(stream.shape[0]) < rate
    out = np.full(stream.shape[0] + before.sum(), tok.specials.pause, np.int32)
    out[np.arange(stream.shape[0]) + np.cumsum(before)] = stream
    return out


def loss_mask(tok: Tokenizer, tokens: np.ndarray) -> np.ndarray:
    """1.0 where the token is a real target, 0.0 at pads and pauses."""
    s = tok.specials
    return ((tokens != s.pad) & (tokens != s.pause)).astype(np.float32)


def answer_text(tok: Tokenizer, ids: np.ndarray) -> str:
    """The answer's text: the ids up to (not including) the first <eos>, specials dropped."""
    ids = np.asarray(ids)
    stop = np.flatnonzero(ids == tok.specials.eos)
    return tok.decode(ids[: stop[0]] if stop.size else ids, skip_special=True)
