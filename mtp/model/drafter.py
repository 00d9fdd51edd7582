"""Drafters: read the main model's taps at position t and draft y_1..y_k.

Every kind provides two views of the same function:

- `__call__(taps_btld, inputs_btk) -> x_btkd`, teacher-forced (training): `inputs_btk`
  holds at [..., j] the token emitted at draft step j (y_0 is the main token), and
  `x_btkd[..., j, :]`, scored by `logits`, scores y_{j+1}. Step j sees only tokens up to
  y_j (causal over draft steps) and the tap at t (causal over positions): no Python loop
  over positions. Hidden states, not logits, come back, so that a loss can score one
  offset at a time (U-way logits for all k offsets at once would be (B, T, K, U)).
- `start(taps_bld) -> state` and `step(state, y_b, j) -> (state, x_bd)`, incremental
  (decoding): step j reads y_j and returns the hidden state that scores y_{j+1}, from
  cached state, so drafting k tokens costs k step evaluations, not k^2. `j` may be traced.
  `draft` runs the steps in one `fori_loop` for every kind and scores them with the head.

The output head scores U tokens: the whole vocabulary (U = V) or a trimmed draft vocabulary
(`drafter.draft_vocab`, EAGLE-3), whose full-vocabulary ids the caller holds and passes to
`draft` (`ids_u`); input tokens are always full ids. With `drafter.head` 'shared' or
'shared_frozen' the drafter has no embedding or head of its own: every method takes the
main model's as a call argument (`Tables`), so the drafter never holds a second reference
to the main model's variables.

With `drafter.emission` the drafter also has a keep head: from the hidden state that scores
y_{j+1} and an urgency input u in [0, 1] it gives the logit of emitting y_{j+1} rather than
ending the pass before it (learned emission, trained by the RL objective;
`mtp.decode.modes.Adaptive`).

Kinds, registered by name in `DRAFTERS` (the names `DrafterConfig` accepts are
`DRAFTER_KINDS`; both must list the same kinds):

- `transformer` (EAGLE-style, default): small causal transformer over the k draft steps;
  step j's input is the fused tap, the embedding of y_j and a learned embedding of j. (RoPE
  alone cannot tell steps apart when tokens repeat: equal inputs give equal values, so "=1"
  and "=11" would draft alike.) Incremental: one new position per step, with a k-slot KV
  cache per block. With `drafter.copy_layers` its blocks are main layers' copies
  (`copy_main_layers`). With `drafter.context` its blocks also attend over the fused taps
  of every position up to t (EAGLE's drafter reads the whole past; this one otherwise sees
  the tap at t alone): decoding keeps their keys and values in a context cache that every
  main pass writes (`write_context`, slot = position) and the steps continue after the
  root (`context_block` is the teacher-forced form).
- `medusa`: k independent residual-MLP heads on the tap (Cai et al. 2024). Incremental:
  all k heads at `start` (they ignore the drafted tokens).
- `rnn`: a GRU over draft steps started from the tap (ReDrafter-style, Cheng et al. 2024).
  Incremental: one GRU step per draft step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config import ConfigError, DrafterConfig, ModelConfig
from mtp.config.model import DRAFTER_KINDS
from mtp.model.packed_products import Dense
from mtp.model.taps import Past, TapFusion, context_block
from mtp.model.transformer import Block, Cache, write_slots

Choose = Callable[[jax.Array, jax.Array], jax.Array]  # (logits_bu, j) -> index in 0..U-1
KEEP_BIAS = 3.0  # the keep head's initial logit: p(keep) 0.95


class Tables(NamedTuple):
    """The main model's tables a shared drafter reads: `embed_vd` (V, D) embeds its input
    tokens, `head_du` (D, U) scores its U draft tokens."""

    embed_vd: jax.Array
    head_du: jax.Array


class DrafterBase(nnx.Module):
    """Shared parts: tap fusion, input embedding, output head, and drafting through `start` /
    `step`.

    A kind (`register`ed) defines `__call__(taps_btld, inputs_btk, tables=None) -> x_btkd`
    (the teacher-forced forward: taps (B, T, L, D), inputs (B, T, k), hidden states (B, T, k,
    d) that `logits` scores), `start(taps_bld, tables=None, context=(), root_b=None) -> state`
    (one position per row, the root; the context cache and the root's position (B,) are read
    by kinds that read the context: `init_context`, `write_context`) and
    `step(state, y_b, j, tables=None) -> (state, x_bd)` (reads y_j (B,); x_bd scores y_{j+1}).
    `tables` (`Tables`) is given exactly when the head is shared.
    """

    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        self.k = cfg.k
        self.d = cfg.d_model or main.d_model
        self.vocab_out = cfg.draft_vocab or main.vocab_size  # U, the tokens the head scores
        self.own = cfg.head == "own"
        if not self.own and self.d != main.d_model:
            raise ConfigError(
                f"drafter.d_model: a shared head needs the main model's width "
                f"{main.d_model} (or 0), got {cfg.d_model}"
            )
        if self.vocab_out > main.vocab_size:
            raise ConfigError(
                f"drafter.draft_vocab: must be <= model.vocab_size={main.vocab_size} "
                f"(0 = all), got {cfg.draft_vocab}"
            )
        pdt = jnp.dtype(main.param_dtype)
        self.fuse = TapFusion(main, self.d, rngs=rngs)
        self.out_norm = nnx.RMSNorm(self.d, epsilon=main.norm_eps, param_dtype=pdt, rngs=rngs)
        if self.own:
            self.head = nnx.Linear(
                self.d, self.vocab_out, use_bias=False, param_dtype=pdt, rngs=rngs
            )
        if cfg.emission:  # starts at p(keep) = sigmoid(KEEP_BIAS) for every draft: fast mode
            self.keep = nnx.Linear(
                self.d + 1, 1, kernel_init=nnx.initializers.zeros,
                bias_init=nnx.initializers.constant(KEEP_BIAS), param_dtype=pdt, rngs=rngs,
            )  # fmt: skip

    def init_context(self, b: int) -> Cache:
        """The empty context cache of b rows (kinds that read the tap at t alone: none)."""
        return ()

    def write_context(self, context: Cache, taps_bwld, slot_bw, rope_bw) -> Cache:
        """The context cache with the taps (B, W, L, D) of a main pass written at slots slot_bw
        (B, W), RoPE positions rope_bw (B, W) (kinds that read the tap at t alone: unchanged)."""
        return context

    def own_embed(self, main: ModelConfig, rngs: nnx.Rngs) -> None:
        """The input embedding of the kinds that read the drafted tokens (own head only)."""
        if self.own:
            pdt = jnp.dtype(main.param_dtype)
            self.embed = nnx.Embed(main.vocab_size, self.d, param_dtype=pdt, rngs=rngs)

    def embed_tokens(self, tokens_x, tables: Tables | None = None):
        """Embeddings (..., d) of full-vocabulary tokens (...)."""
        if tables is None:
            return self.embed(tokens_x)
        return tables.embed_vd[tokens_x].astype(jnp.float32)

    def logits(self, x_xd, tables: Tables | None = None):
        """Draft logits (..., U) of hidden states (..., d)."""
        if tables is None:
            return self.head(self.out_norm(x_xd))
        return jnp.matmul(self.out_norm(x_xd), tables.head_du.astype(jnp.float32))

    def keep_logits(self, x_xd, urgency_x):
        """Logit (...) of emitting the draft that hidden states (...) score, at urgency (...)."""
        u_x1 = jnp.broadcast_to(urgency_x, x_xd.shape[:-1])[..., None].astype(jnp.float32)
        return self.keep(jnp.concatenate([self.out_norm(x_xd), u_x1], axis=-1))[..., 0]

    def draft(
        self, taps_bld, y0_b, choose: Choose, tables: Tables | None = None, ids_u=None,
        context: Cache = (), root_b=None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
        """Drafts k tokens after y0 (B,) for one position per row, the root (at position
        root_b (B,), its tap taps_bld; `context`: the context cache, for kinds that read it).

        `choose(logits_bu, j)` picks the index of y_{j+1} among the U draft tokens (greedy
        or sampled); `ids_u` (U,) maps it to its full-vocabulary id (None: U = V, the
        identity), which the next step reads. The steps run in a `fori_loop`, so one step
        compiles, however large k is. Returns full-vocabulary tokens (B, k), logits
        (B, k, U) and the hidden states that scored them (B, k, d).
        """
        b = y0_b.shape[0]

        def body(j, carry):
            state, y_b, tokens_bk, logits_bku, x_bkd = carry
            state, x_bd = self.step(state, y_b, j, tables)
            logits_bu = self.logits(x_bd, tables)
            pick_b = choose(logits_bu, j)
            y_b = pick_b if ids_u is None else ids_u[pick_b]
            return (
                state, y_b, tokens_bk.at[:, j].set(y_b), logits_bku.at[:, j].set(logits_bu),
                x_bkd.at[:, j].set(x_bd),
            )  # fmt: skip

        init = (
            self.start(taps_bld, tables, context, root_b),
            y0_b,
            jnp.zeros((b, self.k), jnp.int32),
            jnp.zeros((b, self.k, self.vocab_out), jnp.float32),
            jnp.zeros((b, self.k, self.d), jnp.float32),
        )
        _, _, tokens_bk, logits_bku, x_bkd = jax.lax.fori_loop(0, self.k, body, init)
        return tokens_bk, logits_bku, x_bkd

    def draft_tree(
        self, taps_bld, y0_b, beams: int, depth: int, tables: Tables | None = None, ids_u=None,
        context: Cache = (), root_b=None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
        """Beam expansion of a draft tree after y0 (B,) (EAGLE-2): step 0 scores y0's
        children and keeps the `beams` likeliest; each later step scores every beam's
        children and keeps the `beams` likeliest paths (sum of the drafter's log-probs).
        Returns per depth j < `depth` and beam: full-vocabulary tokens (B, D, M), their
        paths' log-probs (B, D, M) and the beam at depth j - 1 each extends (B, D, M; 0 at
        depth 0). The steps run in a `fori_loop` on B * M rows, each beam's drafter state
        gathered from its parent's."""
        b, m, u = y0_b.shape[0], beams, self.vocab_out
        full = (lambda i: i) if ids_u is None else (lambda i: ids_u[i])
        state = self.start(taps_bld, tables, context, root_b)
        state, x_bd = self.step(state, y0_b, 0, tables)
        lp_bm, idx_bm = jax.lax.top_k(jax.nn.log_softmax(self.logits(x_bd, tables)), m)
        tok_bm = full(idx_bm).astype(jnp.int32)
        state = jax.tree.map(lambda x: jnp.repeat(x, m, axis=0), state)  # row b * M + beam
        zeros = jnp.zeros((b, depth, m), jnp.int32)
        init = (state, tok_bm, lp_bm, zeros.at[:, 0].set(tok_bm),
                jnp.zeros((b, depth, m)).at[:, 0].set(lp_bm), zeros)  # fmt: skip

        def body(j, carry):
            state, tok_bm, lp_bm, tok_bdm, lp_bdm, parent_bdm = carry
            state, x_nd = self.step(state, tok_bm.reshape(-1), j, tables)
            lp_bmu = jax.nn.log_softmax(self.logits(x_nd, tables)).reshape(b, m, u)
            lp_bm, flat_bm = jax.lax.top_k((lp_bm[:, :, None] + lp_bmu).reshape(b, m * u), m)
            parent_bm, tok_bm = flat_bm // u, full(flat_bm % u).astype(jnp.int32)
            rows_n = (jnp.arange(b)[:, None] * m + parent_bm).reshape(-1)
            state = jax.tree.map(lambda x: x[rows_n], state)
            return (state, tok_bm, lp_bm, tok_bdm.at[:, j].set(tok_bm),
                    lp_bdm.at[:, j].set(lp_bm), parent_bdm.at[:, j].set(parent_bm))  # fmt: skip

        out = jax.lax.fori_loop(1, depth, body, init)
        return out[3], out[4], out[5]


DRAFTERS: dict[str, type[DrafterBase]] = {}
KIND_METHODS = ("__call__", "start", "step")  # what each kind defines (DrafterBase docstring)


def register(kind: str):
    """Class decorator: makes the class the drafter of `kind`, a name in `DRAFTER_KINDS`."""
    if kind not in DRAFTER_KINDS:
        raise ValueError(f"drafter kind {kind!r} is not in DRAFTER_KINDS={DRAFTER_KINDS}")

    def add(cls: type[DrafterBase]) -> type[DrafterBase]:
        own = [c for c in cls.__mro__ if issubclass(c, DrafterBase) and c is not DrafterBase]
        missing = [m for m in KIND_METHODS if not any(m in vars(c) for c in own)]
        if missing:
            raise TypeError(f"drafter kind {kind!r} ({cls.__name__}) lacks {', '.join(missing)}")
        DRAFTERS[kind] = cls
        return cls

    return add


@register("transformer")
class TransformerDrafter(DrafterBase):
    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, main, rngs=rngs)
        pdt = jnp.dtype(main.param_dtype)
        self.own_embed(main, rngs)
        self.in_proj = Dense(2 * self.d, self.d, use_bias=False, param_dtype=pdt, rngs=rngs)
        self.step_embed = nnx.Embed(cfg.k, self.d, param_dtype=pdt, rngs=rngs)
        own_blocks = dict(  # a plain block, whatever the main model's family (else copied)
            n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, d_ff=0, d_head=0, qkv_bias=False,
            norm_plus_one=False, mlp_act="silu", rope_scaling=())  # fmt: skip
        block_cfg = dataclasses.replace(
            main, d_model=self.d, dtype="float32", taps=(-1,), n_registers=0, use_urgency=False,
            embed_scale=False, init_from="", **({} if cfg.copy_layers else own_blocks),
        )  # fmt: skip
        self.blocks = nnx.List([Block(block_cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.context = cfg.context
        self.max_len = main.max_len

    def step_inputs(self, h_xd, tokens_x, steps_x, tables=None):
        """Block input of draft steps: fused tap h (..., d), token y_j (...), step j (...)."""
        e_xd = self.embed_tokens(tokens_x, tables)
        x_xd = self.in_proj(jnp.concatenate([h_xd, e_xd], axis=-1))
        return x_xd + self.step_embed(steps_x)

    def __call__(self, taps_btld, inputs_btk, tables=None, past: Past | None = None):
        """`past`: the taps before the row, read with `drafter.context` (`Past`)."""
        b, t, k = inputs_btk.shape
        h_btd = self.fuse(taps_btld)
        h_btkd = jnp.broadcast_to(h_btd[:, :, None], (b, t, k, self.d))
        steps_btk = jnp.broadcast_to(jnp.arange(k), (b, t, k))
        x_btkd = self.step_inputs(h_btkd, inputs_btk, steps_btk, tables)
        if self.context:
            past_m_bpd = None if past is None else self.fuse(past.taps_bpld)
            valid_bp = None if past is None else past.valid_bp
            for block in self.blocks:
                x_btkd = context_block(block, x_btkd, h_btd, past_m_bpd, valid_bp)
            return x_btkd
        if past is not None:
            raise ValueError("the taps before a row are read with drafter.context only")
        x_nkd = x_btkd.reshape(b * t, k, self.d)  # each position's draft chain on its own
        step_nk = jnp.broadcast_to(jnp.arange(k), (b * t, k))
        for block in self.blocks:
            x_nkd, _ = block(x_nkd, step_nk)
        return x_nkd.reshape(b, t, k, self.d)

    def _empty_cache(self, b: int, slots: int) -> Cache:
        acfg = self.blocks[0].attn.cfg
        shape = (b, acfg.n_kv_heads, slots, acfg.head_dim)  # as `Transformer.init_cache`
        return tuple({"k": jnp.zeros(shape), "v": jnp.zeros(shape)} for _ in self.blocks)

    def init_context(self, b: int) -> Cache:
        """Per block, the keys and values of the fused taps at every position (B, G, S, H),
        S = max_len, when the drafter reads the context."""
        return self._empty_cache(b, self.max_len) if self.context else ()

    def write_context(self, context: Cache, taps_bwld, slot_bw, rope_bw) -> Cache:
        if not self.context:
            return context
        m_bwd = self.fuse(taps_bwld)
        return tuple(
            write_slots(layer, *block.attn.project(block.attn_norm(m_bwd), rope_bw)[1:], slot_bw)
            for block, layer in zip(self.blocks, context, strict=True)
        )

    def start(self, taps_bld, tables=None, context: Cache = (), root_b=None):
        """The fused tap (B, 1, d), the blocks' caches and the root's slot (B,). Step j writes
        and reads slot root + 1 + j: after the context cache's slots up to the root (context),
        or in an empty k-slot cache, the root at -1."""
        b = taps_bld.shape[0]
        if not self.context:
            context, root_b = self._empty_cache(b, self.k), jnp.full((b,), -1, jnp.int32)
        elif root_b is None or not context:
            raise ValueError("a drafter that reads the context drafts from its cache and root")
        return self.fuse(taps_bld[:, None]), context, root_b

    def step(self, state, y_b, j, tables=None):
        h_b1d, caches, root_b = state
        slot_b1 = (root_b + 1 + j)[:, None]
        x_b1d = self.step_inputs(h_b1d, y_b[:, None], jnp.full_like(slot_b1, j), tables)
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x_b1d, cache = block(x_b1d, slot_b1, cache)
            new.append(cache)
        return (h_b1d, tuple(new), root_b), x_b1d[:, 0]


@register("medusa")
class MedusaDrafter(DrafterBase):
    """k residual-MLP heads; ignores the drafted tokens (each offset guessed from h_t alone)."""

    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, main, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        w_kdd = init(rngs.params(), (cfg.k, self.d, self.d)) * 0.1
        self.w_kdd = nnx.Param(w_kdd.astype(main.param_dtype))

    def __call__(self, taps_btld, inputs_btk, tables=None):
        h_btd = self.fuse(taps_btld)
        return h_btd[:, :, None] + jax.nn.silu(
            jnp.einsum("btd,kde->btke", h_btd, self.w_kdd[...])
        )  # (B, T, k, d)

    def start(self, taps_bld, tables=None, context: Cache = (), root_b=None):
        """Every head's hidden state (B, k, d) at once."""
        b = taps_bld.shape[0]
        return self(taps_bld[:, None], jnp.zeros((b, 1, self.k), jnp.int32))[:, 0]

    def step(self, state, y_b, j, tables=None):
        return state, state[:, j]


@register("rnn")
class RNNDrafter(DrafterBase):
    """GRU over draft steps: state from h_t, input at step j the embedding of y_j."""

    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, main, rngs=rngs)
        self.own_embed(main, rngs)
        orthogonal = nnx.initializers.orthogonal()  # QR in float32: LAPACK has no bfloat16
        recurrent_init = lambda key, shape, dtype: orthogonal(key, shape).astype(dtype)
        self.cell = nnx.GRUCell(
            self.d, self.d, param_dtype=jnp.dtype(main.param_dtype),
            recurrent_kernel_init=recurrent_init, rngs=rngs,
        )  # fmt: skip

    def __call__(self, taps_btld, inputs_btk, tables=None):
        b, t, k = inputs_btk.shape
        s_nd = jnp.tanh(self.fuse(taps_btld)).reshape(b * t, self.d)
        e_nkd = self.embed_tokens(inputs_btk, tables).reshape(b * t, k, self.d)
        outs = []
        for j in range(k):
            s_nd, y_nd = self.cell(s_nd, e_nkd[:, j])
            outs.append(y_nd)
        return jnp.stack(outs, 1).reshape(b, t, k, self.d)

    def start(self, taps_bld, tables=None, context: Cache = (), root_b=None):
        """The GRU state (B, d) from the fused tap."""
        return jnp.tanh(self.fuse(taps_bld[:, None]))[:, 0]

    def step(self, state, y_b, j, tables=None):
        s_bd, o_bd = self.cell(state, self.embed_tokens(y_b, tables))
        return s_bd, o_bd


def _check_registry() -> None:
    """Every kind the config accepts has a drafter (run at import)."""
    missing = [kind for kind in DRAFTER_KINDS if kind not in DRAFTERS]
    if missing:
        raise ImportError(f"DRAFTER_KINDS lists {missing}, but no drafter is registered for them")


_check_registry()


def make_drafter(cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs) -> DrafterBase:
    return DRAFTERS[cfg.kind](cfg, main, rngs=rngs)
