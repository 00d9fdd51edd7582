"""Main model + drafter as one policy; the only module that knows both.

A pass at position t emits the main token y_0 = x_{t+1} and drafts
y_j = x_{t+1+j}, j = 1..k. The training forward scores all positions at once
with teacher forcing: the drafter at t is fed the true x_{t+1..t+k}, so
draft logits at (t, j) depend only on tokens x_{<=t+j} and never on their own
target x_{t+1+j}.

Decoding goes through the same object: `init_cache` and `main_pass` run the
main model incrementally, `draft` the drafter; nothing outside reads
`system.main` or `system.drafter`.

The system is also the only place that knows what the drafter shares with the
main model: with `drafter.head` 'shared' / 'shared_frozen' it passes the main
model's embedding and head (`Tables`) to every drafter call, and with a trimmed
draft vocabulary (`drafter.draft_vocab` = U < V) it holds the U full ids the
drafter's head scores (`draft_ids`, a non-trainable variable, so checkpointed).
Training scores the drafter one offset at a time (`forward` -> `Drafts`), so the
(B, T, K, U) draft logits never exist at once; `__call__` still returns them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.config import ConfigError, DrafterConfig, ModelConfig
from mtp.model.drafter import Tables, make_drafter
from mtp.model.taps import Past
from mtp.model.transformer import Cache, FedTree, Transformer, move_slots, rope_positions


def shifted(tokens_bt: jax.Array, k: int, pad_id: int, start: int = 1) -> jax.Array:
    """(B, T, k) with [b, t, j] = tokens[b, t + start + j], `pad_id` past the end."""
    b, t = tokens_bt.shape
    padded = jnp.concatenate([tokens_bt, jnp.full((b, start + k), pad_id, tokens_bt.dtype)], 1)
    return jnp.stack([padded[:, start + j : start + j + t] for j in range(k)], axis=-1)


def to_full_vocab(x_xu: jax.Array, ids_u: jax.Array | None, v: int, fill: float) -> jax.Array:
    """Values over the U draft tokens (..., U) laid out over the full vocabulary (..., V),
    `fill` elsewhere (-inf for logits or log-probs, 0 for probabilities); unchanged when
    `ids_u` is None (U = V)."""
    if ids_u is None:
        return x_xu
    full_xv = jnp.full((*x_xu.shape[:-1], v), fill, x_xu.dtype)
    return full_xv.at[..., ids_u].set(x_xu)


class DecodeCache(NamedTuple):
    """What decoding caches: the main model's keys and values (`Transformer.init_cache`) and
    the drafter's context cache (empty unless `drafter.context`), both by position."""

    main: Cache
    context: Cache


class DraftIds(nnx.Variable):
    """Full-vocabulary ids (U,) of the tokens a trimmed drafter head scores; not trained."""


@dataclasses.dataclass(frozen=True)
class Drafts:
    """Teacher-forced draft hidden states and their head, to score one offset at a time.

    hidden_btkd (B, T, K, d); `logits(x_xd) -> (..., U)`; `ids_u` (U,) the full ids of the U
    scored tokens (None: U = V); `vocab_size` V. `from_logits` wraps (B, T, K, V) logits.
    """

    hidden_btkd: jax.Array
    logits: Callable[[jax.Array], jax.Array]
    ids_u: jax.Array | None
    vocab_size: int

    @classmethod
    def from_logits(cls, draft_btkv: jax.Array) -> Drafts:
        return cls(draft_btkv, lambda x: x, None, draft_btkv.shape[-1])

    @property
    def k(self) -> int:
        return self.hidden_btkd.shape[2]

    def per_offset(self, *xs_btk_):
        """Scan inputs with the offset axis first: hidden (K, B, T, d), offsets 0..K-1, and
        each of `xs_btk_` (B, T, K, ...) as (K, B, T, ...)."""
        moved = tuple(jnp.moveaxis(x, 2, 0) for x in (self.hidden_btkd, *xs_btk_))
        return (moved[0], jnp.arange(self.k), *moved[1:])

    def local(self, tokens_x):
        """Index (...) of full-vocabulary tokens among the U draft tokens (0 where not
        covered) and whether they are covered (...)."""
        if self.ids_u is None:
            return tokens_x, jnp.ones(tokens_x.shape, bool)
        u = self.ids_u.shape[0]
        inv_v = jnp.full((self.vocab_size,), -1, jnp.int32).at[self.ids_u].set(jnp.arange(u))
        idx_x = inv_v[tokens_x]
        return jnp.maximum(idx_x, 0), idx_x >= 0

    def full_logits(self) -> jax.Array:
        """All draft logits at once over the full vocabulary (B, T, K, V), -inf outside the
        draft vocabulary: for tests and small evaluations, not for training."""
        return to_full_vocab(self.logits(self.hidden_btkd), self.ids_u, self.vocab_size, -jnp.inf)

    def target_logprobs(self, tgt_btk):
        """log p_draft(tgt[b, t, j]) at (t, j) (B, T, K), -inf for targets outside the draft
        vocabulary; one offset's logits at a time, in the backward pass too."""
        idx_btk, covered_btk = self.local(tgt_btk)

        @jax.checkpoint
        def one(xs):
            h_btd, _, idx_bt = xs
            lp_btu = jax.nn.log_softmax(self.logits(h_btd))
            return jnp.take_along_axis(lp_btu, idx_bt[..., None], -1)[..., 0]

        lp_btk = jnp.moveaxis(jax.lax.map(one, self.per_offset(idx_btk)), 0, 2)
        return jnp.where(covered_btk, lp_btk, -jnp.inf)


def _draft_ids(main: ModelConfig, drafter: DrafterConfig, draft_ids) -> DraftIds | None:
    """The trimmed draft vocabulary's ids, checked (None: the full vocabulary)."""
    u, v = drafter.draft_vocab, main.vocab_size
    if not u:
        if draft_ids is not None:
            raise ValueError("draft_ids given, but drafter.draft_vocab is 0 (the full vocabulary)")
        return None
    ids_u = np.arange(u) if draft_ids is None else np.asarray(draft_ids)
    if ids_u.shape != (u,) or not 0 <= ids_u.min() <= ids_u.max() < v:
        raise ValueError(f"draft_ids: need {u} ids in 0..{v - 1}, got shape {ids_u.shape}")
    if len(np.unique(ids_u)) != u:
        raise ValueError("draft_ids: the ids must be distinct")
    return DraftIds(jnp.asarray(ids_u, jnp.int32))


class MTPSystem(nnx.Module):
    def __init__(
        self, main: ModelConfig, drafter: DrafterConfig, *, pad_id: int, draft_ids=None,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        """`draft_ids` (U,): the full ids the drafter scores when `drafter.draft_vocab` = U > 0
        (e.g. `mtp.data.token_counts.most_frequent`); default 0..U-1."""
        self.main = Transformer(main, rngs=rngs)
        self.drafter = make_drafter(drafter, main, rngs=rngs)
        self.k = drafter.k
        self.detach = drafter.detach
        self.pad_id = pad_id
        self.shared = drafter.head != "own"
        self.frozen = drafter.head == "shared_frozen"
        self.draft_ids = _draft_ids(main, drafter, draft_ids)
        self.drafter_cfg = drafter

    def copy_main_layers(self) -> None:
        """Starts the drafter's blocks as copies of the main model's layers
        `drafter.copy_layers` and its out norm as the main model's final norm: a drafter step
        then begins as one more main layer whose output the main model's head reads (call
        after the main model's weights are loaded; no-op without `copy_layers`)."""
        layers, n = self.drafter_cfg.copy_layers, self.main.cfg.n_layers
        if not layers:
            return
        if self.drafter.d != self.main.cfg.d_model:
            raise ConfigError(
                f"drafter.copy_layers: copied main layers need the main model's width "
                f"{self.main.cfg.d_model} (drafter.d_model 0), got {self.drafter.d}"
            )
        self.main.cfg.check_layers(layers, "drafter.copy_layers")
        # own arrays: a train state donated to the step may hold no buffer twice
        copy = lambda tree: jax.tree.map(jnp.copy, tree)
        for block, i in zip(self.drafter.blocks, layers, strict=True):
            nnx.update(block, copy(nnx.state(self.main.blocks[i % n], nnx.Param)))
        scale = self.main.final_norm.scale[...]
        self.drafter.out_norm.scale[...] = scale + 1 if self.main.cfg.norm_plus_one else copy(scale)

    @property
    def max_len(self) -> int:
        """Longest sequence the main model (and its KV cache) supports."""
        return self.main.cfg.max_len

    def with_max_len(self, n: int) -> MTPSystem:
        """The same weights (shared, not copied) with decoding caches of n positions: every
        pass's attention reads the whole cache, so rows known to end by n decode faster on
        it (at 16 rows of SmolLM2-135M, 512 slots cost a third of a pass)."""
        if not 0 < n <= self.max_len:
            raise ConfigError(
                f"with_max_len: n must be in 1..model.max_len={self.max_len}, got {n}"
            )
        short = nnx.merge(*nnx.split(self))
        short.main.cfg = dataclasses.replace(self.main.cfg, max_len=n)
        if self.drafter_cfg.context:  # its context cache holds one slot per position too
            short.drafter.max_len = n
        return short

    @property
    def vocab_size(self) -> int:
        return self.main.cfg.vocab_size

    @property
    def draft_vocab_size(self) -> int:
        """U: the tokens the drafter's head scores (V unless trimmed)."""
        return self.drafter.vocab_out

    def ids(self) -> jax.Array | None:
        """The draft vocabulary's full ids (U,), None when it is the full vocabulary."""
        return None if self.draft_ids is None else self.draft_ids[...]

    def full_vocab(self, x_xu: jax.Array, fill: float = -jnp.inf) -> jax.Array:
        """Draft-vocabulary values (..., U) over the full vocabulary (..., V)."""
        return to_full_vocab(x_xu, self.ids(), self.vocab_size, fill)

    def tables(self) -> Tables | None:
        """What a shared drafter head reads from the main model (None for an own head): its
        embedding table and its head (the tied embedding's or its own kernel), the head's
        columns at the draft ids; through stop_gradient for 'shared_frozen'."""
        if not self.shared:
            return None
        tables = Tables(self.main.embed.embedding[...], self._main_head_du())
        return jax.tree.map(jax.lax.stop_gradient, tables) if self.frozen else tables

    def _main_head_du(self, trim: bool = True) -> jax.Array:
        """The main model's head (D, U), its columns at the draft ids (`trim`), or (D, V)."""
        tied = self.main.cfg.tie_embeddings
        head_dv = self.main.embed.embedding[...].T if tied else self.main.head.kernel[...]
        ids_u = self.ids()
        return head_dv if ids_u is None or not trim else head_dv[:, ids_u]

    def main_logits_from_taps(self, taps_btld, full_vocab: bool = False) -> jax.Array:
        """The main model's next-token logits over the draft vocabulary (B, T, U) (with
        `full_vocab`: over all V), from its taps (B, T, L, D): the last block's output through
        the final norm and the head, so a frozen main model's cached taps also carry its
        distribution (distillation teacher) and its greedy choices."""
        last = self.main.cfg.n_layers - 1
        if last not in self.main.cfg.tap_layers:
            raise ConfigError(
                f"model.taps: distillation from cached taps needs the main model's last "
                f"block among them (-1 or {last}), got {self.main.cfg.taps}"
            )
        h_btd = taps_btld[:, :, self.main.cfg.tap_layers.index(last)]
        x_btd = self.main.final_norm(h_btd.astype(jnp.dtype(self.main.cfg.dtype)))
        head_du = self._main_head_du(trim=not full_vocab).astype(jnp.float32)
        return jnp.matmul(x_btd.astype(jnp.float32), head_du)

    @property
    def use_urgency(self) -> bool:
        """Does the main model take an urgency input (`urgency_b`)?"""
        return self.main.cfg.use_urgency

    def set_detach(self, flag: bool) -> None:
        """Stop (True) or pass (False) the drafter's gradient into the main model via the taps."""
        self.detach = bool(flag)

    def taps_for_drafter(self, taps_btld):
        return jax.lax.stop_gradient(taps_btld) if self.detach else taps_btld

    def init_cache(self, batch: int) -> DecodeCache:
        """Empty decoding caches for `batch` rows of up to `max_len` tokens."""
        return DecodeCache(self.main.init_cache(batch), self.drafter.init_context(batch))

    def main_pass(
        self, tokens_bw, pos_b, cache: DecodeCache, urgency_b=None, *,
        tree: FedTree | None = None, logits_at_b=None, fresh: bool = False,
    ):  # fmt: skip
        """The main model over W tokens per row at positions pos_b[:, None] + 0..W-1, with the
        caches (`tree`: a draft tree, `FedTree`; `fresh`: a prefill, the rows from position 0
        of empty caches); the taps go to the drafter's context cache
        too. Returns logits (B, W, V) (or (B, 1, V) at fed token `logits_at_b`), taps
        (B, W, L, D) as the drafter reads them (the detach rule applied) and the caches."""
        pos_bw = pos_b[:, None] + jnp.arange(tokens_bw.shape[1])
        logits_bwv, taps_bwld, main_cache = self.main(
            tokens_bw, pos_bw, cache.main, urgency_b=urgency_b, tree=tree,
            logits_at_b=logits_at_b, fresh=fresh,
        )  # fmt: skip
        taps_bwld = self.taps_for_drafter(taps_bwld)
        rope_bw = rope_positions(pos_bw, tree)
        context = self.drafter.write_context(cache.context, taps_bwld, pos_bw, rope_bw)
        return logits_bwv, taps_bwld, DecodeCache(main_cache, context)

    def move_slots(self, cache: DecodeCache, src_bn, dst_bn) -> DecodeCache:
        """The caches with positions src_bn (B, N) moved to dst_bn (B, N) (a draft tree's
        accepted path to the positions after the root; a dst >= max_len: not moved)."""
        r = self.main.cfg.n_registers
        return DecodeCache(
            move_slots(cache.main, src_bn + r, dst_bn + r),
            move_slots(cache.context, src_bn, dst_bn),
        )

    def draft(
        self, taps_bld, y0_b, choose, cache: DecodeCache | None = None, root_b=None,
        tables: Tables | None = None,
    ):  # fmt: skip
        """Drafts k tokens after y0 (B,) from the root's taps (B, L, D) given by `main_pass`
        (the root at position root_b (B,), the caches `cache`: read by a drafter that reads
        the context): full-vocabulary tokens (B, k), draft-vocabulary logits (B, k, U)
        (`full_vocab` lays them over V) and the hidden states that scored them (B, k, d)
        (`keep_logits` reads them); `choose(logits_bu, j)` picks each, as an index among the U.
        `tables`: `self.tables()` computed once by a caller that drafts many times (a
        decoding loop: the trimmed head's gather then runs once per call, not once per pass)."""
        context = () if cache is None else cache.context
        tables = self.tables() if tables is None else tables
        return self.drafter.draft(taps_bld, y0_b, choose, tables, self.ids(), context, root_b)

    def draft_tree(
        self, taps_bld, y0_b, beams: int, depth: int, cache: DecodeCache | None = None,
        root_b=None, tables: Tables | None = None,
    ):  # fmt: skip
        """A draft tree's candidates after y0 (B,) from the root's taps (B, L, D) (as `draft`):
        full-vocabulary tokens, path log-probs and parent beams, each (B, depth, beams)
        (`DrafterBase.draft_tree`)."""
        context = () if cache is None else cache.context
        tables = self.tables() if tables is None else tables
        return self.drafter.draft_tree(
            taps_bld, y0_b, beams, depth, tables, self.ids(), context, root_b
        )

    @property
    def emission(self) -> bool:
        """Does the drafter have a keep head (`drafter.emission`)?"""
        return self.drafter_cfg.emission

    def keep_logits(self, x_xd, urgency_x=None):
        """Logit (...) of emitting each draft scored by drafter hidden states (..., d), at
        urgency (...) (None: 0), from the keep head (`drafter.emission`)."""
        u_x = jnp.zeros(x_xd.shape[:-1]) if urgency_x is None else urgency_x
        return self.drafter.keep_logits(x_xd, u_x)

    def forward(self, tokens_bt, urgency_b=None, augment=None) -> tuple[jax.Array, Drafts]:
        """Teacher-forced forward: main logits (B, T, V) and the drafts (hidden states
        (B, T, k, d) with their head), to be scored one offset at a time. `augment` maps the
        taps (B, T, L, D) before the drafter reads them (e.g. `taps.with_noise`)."""
        logits_btv, taps_btld, _ = self.main(tokens_bt, urgency_b=urgency_b)
        taps_btld = self.taps_for_drafter(taps_btld)
        taps_btld = taps_btld if augment is None else augment(taps_btld)
        return logits_btv, self.drafts_from_taps(tokens_bt, taps_btld)

    def main_taps(self, tokens_bt) -> jax.Array:
        """The main model's taps (B, T, L, D) over tokens (B, T), as the drafter reads them
        (under jit the unused LM head is dead code and not computed)."""
        return self.taps_for_drafter(self.main(tokens_bt)[1])

    def drafts_from_taps(self, tokens_bt, taps_btld, past: Past | None = None) -> Drafts:
        """The teacher-forced drafts of `forward` from given taps (B, T, L, D): e.g. taps of
        a frozen main model computed once (`mtp.train.self_distill`); `past`: the taps of the
        positions before the rows, for a drafter that reads the context."""
        inputs_btk = shifted(tokens_bt, self.k, self.pad_id)  # y_0..y_{k-1} at each t
        tables = self.tables()
        shared = () if tables is None else (tables,)  # an own head takes no tables
        past_kw = {} if past is None else {"past": past}
        hidden_btkd = self.drafter(taps_btld, inputs_btk, *shared, **past_kw)
        logits = lambda x_xd: self.drafter.logits(x_xd, tables)
        return Drafts(hidden_btkd, logits, self.ids(), self.vocab_size)

    def set_draft_ids(self, ids_u) -> None:
        """Replaces the trimmed draft vocabulary's ids (U,) (e.g. by frequency in the data)."""
        checked = _draft_ids(self.main.cfg, self.drafter_cfg, ids_u)
        self.draft_ids[...] = checked[...]

    def __call__(self, tokens_bt, urgency_b=None):
        """Teacher-forced forward: main logits (B, T, V) and all draft logits at once
        (B, T, k, V), -inf outside a trimmed draft vocabulary. Training uses `forward`."""
        logits_btv, drafts = self.forward(tokens_bt, urgency_b)
        return logits_btv, drafts.full_logits()

    def pass_logprobs(self, tokens_bt, urgency_b=None):
        """Log-prob of every token under the policy, split by who emitted it.

        Returns main_bt[b, t] = log p_main(x_{t+1} | x_<=t) and
        draft_btk[b, t, j] = log p_draft(x_{t+2+j} | h_t, x_{t+1..t+1+j}).
        A pass starting at t scores main_bt[t] + sum_j draft_btk[t, j]; the
        drafter term carries gradient into the main model through h_t.
        """
        logits_btv, drafts = self.forward(tokens_bt, urgency_b)
        main_lp = jax.nn.log_softmax(logits_btv)
        nxt_bt = shifted(tokens_bt, 1, self.pad_id)[..., 0]
        tgt_btk = shifted(tokens_bt, self.k, self.pad_id, start=2)
        main_bt = jnp.take_along_axis(main_lp, nxt_bt[..., None], -1)[..., 0]
        return main_bt, drafts.target_logprobs(tgt_btk)
