"""The one text layout: prompt, thought, answer, pauses; encoded and read back.

A worked example is the text `prompt <think> thought </think> answer`; as
tokens it is `<bos> prompt <think> thought </think> <pause>*M answer <eos>`
(M = 0 but in pause training). A tokenizer with a chat template (an instruct
model's) gets the chat layout instead: the template renders the prompt as the
user's message with the generation prompt (`<|im_start|>user prompt<|im_end|>
<|im_start|>assistant` for ChatML), and the assistant's reply follows as above:
`<think> thought </think> <pause>*M answer <eos>`, <eos> being the model's end
token, which the template would also end the reply with. Every module that
builds or reads such rows (supervised data, RL rollouts, pause decoding,
evaluation) uses the functions here, so the layout has one owner.
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


def _reply(thought: str | None = None) -> str:
    """What the model writes after its prompt, up to the answer: `<think>` (it then thinks),
    or with a given `thought`, `<think> thought </think>` (it answers)."""
    return THINK if thought is None else f"{THINK}{thought}{END_THINK}"


def encode_text(tok: Tokenizer, text: str) -> np.ndarray:
    """(n,) int32: <bos> text <eos>, special spellings ("<think>", ...) as their ids; a
    document, in either layout (`[1:]` is an answer's tail: answer <eos>)."""
    s = tok.specials
    return np.concatenate([[s.bos], tok.encode_with_specials(text), [s.eos]]).astype(np.int32)


def encode_prompt(tok: Tokenizer, prompt: str, thought: str | None = None) -> np.ndarray:
    """(n,) int32 of what the model sees before it writes: `<bos> prompt <think>` (it then
    thinks), or with a given `thought`, `<bos> prompt <think> thought </think>` (it answers);
    in the chat layout the chat rendering of [user: prompt] with the generation prompt,
    then the same `<think>` or `<think> thought </think>`."""
    if tok.chat_template is None:
        return encode_text(tok, prompt + _reply(thought))[:-1]
    return tok.encode_with_specials(_chat_head(tok, prompt) + _reply(thought))


def _chat_head(tok: Tokenizer, prompt: str) -> str:
    return tok.apply_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)


def encode_question(tok: Tokenizer, question: str, chat: bool = True) -> np.ndarray:
    """(n,) int32 of a question the model answers in its own words, no `<think>` added: with
    `chat` and a chat template, the chat rendering of [user: question] with the generation
    prompt, else `<bos> question`; special spellings as their ids."""
    if chat and tok.chat_template is not None:
        return tok.encode_with_specials(_chat_head(tok, question))
    return encode_text(tok, question)[:-1]


def encode_chat_prompt(tok: Tokenizer, prompt: str) -> np.ndarray:
    """(n,) int32: a task prompt as a question in the chat layout where there is one
    (`encode_question`), which the model continues in its own words (self-distillation)."""
    return encode_question(tok, prompt, chat=True)


def encode_example(tok: Tokenizer, ex) -> np.ndarray:
    """(n,) int32: the training row of an example (`.prompt`, `.thought`, `.answer`) in the
    tokenizer's layout, no pauses: its prompt and thought, then `answer <eos>`."""
    head = encode_prompt(tok, ex.prompt, ex.thought)
    return np.concatenate([head, encode_text(tok, ex.answer)[1:]]).astype(np.int32)


def encode_plain_reply(tok: Tokenizer, ex) -> tuple[np.ndarray, int]:
    """((n,) int32, r): the example's prompt as a question (`encode_chat_prompt`) and its
    worked solution written as the reply, in plain words with no think marks, as an instruct
    model writes one (`thought\nThe answer is answer.` then <eos>); the reply starts at r.
    Text for a frozen main model to read teacher-forced (`data.teacher_forced`)."""
    head = encode_chat_prompt(tok, ex.prompt)
    reply = tok.encode_with_specials(f"{ex.thought}\nThe answer is {ex.answer}.")
    ids = np.concatenate([head, reply, [tok.specials.eos]]).astype(np.int32)
    return ids, head.size


def frame_len(tok: Tokenizer) -> int:
    """Tokens an example's row has beyond the UTF-8 bytes of `render(ex)`, at most: <bos> and
    <eos> (2), or the chat template's framing of the prompt and <eos> (a token is at least a
    byte, and each think mark one token)."""
    return int(encode_prompt(tok, "", "").size) - 1  # - the two think marks, + <eos>


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
