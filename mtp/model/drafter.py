"""Drafters: read the main model's taps at position t and draft y_1..y_k.

Every kind provides two views of the same function:

- `__call__(taps_btld, inputs_btk) -> logits_btkv`, teacher-forced (training):
  `inputs_btk[..., j]` is the token emitted at draft step j (y_0 is the main
  token) and `logits_btkv[..., j, :]` scores y_{j+1}. Logits at step j see only
  `inputs[..., :j+1]` (causal over draft steps) and the tap at t (causal over
  positions), so teacher forcing over a whole sequence needs no Python loop over
  positions.
- `start(taps_bld) -> state` and `step(state, y_b, j) -> (state, logits_bv)`,
  incremental (decoding): step j reads y_j and scores y_{j+1} from cached
  state, so drafting k tokens costs k step evaluations, not k^2. `j` may be
  traced. `draft` runs the steps in one `fori_loop` for every kind.

Kinds, registered by name in `DRAFTERS` (the names `DrafterConfig` accepts are
`DRAFTER_KINDS`; both must list the same kinds):

- `transformer` (EAGLE-style, default): small causal transformer over the k
  draft steps; step j's input is the fused tap, the embedding of y_j and a
  learned embedding of j. (RoPE alone cannot tell steps apart when tokens
  repeat: equal inputs give equal values, so "=1" and "=11" would draft alike.)
  Incremental: one new position per step, with a k-slot KV cache per block.
- `medusa`: k independent residual-MLP heads on the tap (Cai et al. 2024).
  Incremental: all k heads at `start` (they ignore the drafted tokens).
- `rnn`: a GRU over draft steps started from the tap (ReDrafter-style,
  Cheng et al. 2024). Incremental: one GRU step per draft step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig
from mtp.config.model import DRAFTER_KINDS
from mtp.model.transformer import Block

Choose = Callable[[jax.Array, jax.Array], jax.Array]  # (logits_bv, j) -> y_b


class TapFusion(nnx.Module):
    """Norms each tapped layer and projects their concatenation to the drafter width."""

    def __init__(self, main: ModelConfig, d: int, *, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(main.d_model, epsilon=main.norm_eps, rngs=rngs)
        self.proj = nnx.Linear(len(main.taps) * main.d_model, d, use_bias=False, rngs=rngs)

    def __call__(self, taps_btld):
        b, t = taps_btld.shape[:2]
        return self.proj(self.norm(taps_btld.astype(jnp.float32)).reshape(b, t, -1))  # (B, T, d)


class DrafterBase(nnx.Module):
    """Shared parts: tap fusion, output head, and drafting through `start` / `step`.

    A kind (`register`ed) defines `__call__(taps_btld, inputs_btk) -> logits_btkv` (the
    teacher-forced forward: taps (B, T, L, D), inputs (B, T, k)), `start(taps_bld) -> state`
    (one position per row) and `step(state, y_b, j) -> (state, logits_bv)` (reads y_j (B,),
    scores y_{j+1}).
    """

    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        self.k = cfg.k
        self.d = cfg.d_model or main.d_model
        self.fuse = TapFusion(main, self.d, rngs=rngs)
        self.out_norm = nnx.RMSNorm(self.d, epsilon=main.norm_eps, rngs=rngs)
        self.head = nnx.Linear(self.d, main.vocab_size, use_bias=False, rngs=rngs)

    def draft(self, taps_bld, y0_b, choose: Choose) -> tuple[jax.Array, jax.Array]:
        """Drafts k tokens after y0 (B,) for one position per row.

        `choose(logits_bv, j)` picks y_{j+1} (greedy or sampled), which the
        next step reads. The steps run in a `fori_loop`, so one step compiles,
        however large k is. Returns tokens (B, k) and logits (B, k, V).
        """
        b = y0_b.shape[0]

        def body(j, carry):
            state, y_b, tokens_bk, logits_bkv = carry
            state, logits_bv = self.step(state, y_b, j)
            y_b = choose(logits_bv, j)
            return state, y_b, tokens_bk.at[:, j].set(y_b), logits_bkv.at[:, j].set(logits_bv)

        v = self.head.out_features
        init = (
            self.start(taps_bld),
            y0_b,
            jnp.zeros((b, self.k), jnp.int32),
            jnp.zeros((b, self.k, v), jnp.float32),
        )
        _, _, tokens_bk, logits_bkv = jax.lax.fori_loop(0, self.k, body, init)
        return tokens_bk, logits_bkv


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
        self.embed = nnx.Embed(main.vocab_size, self.d, rngs=rngs)
        self.in_proj = nnx.Linear(2 * self.d, self.d, use_bias=False, rngs=rngs)
        self.step_embed = nnx.Embed(cfg.k, self.d, rngs=rngs)
        block_cfg = dataclasses.replace(
            main, d_model=self.d, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, d_ff=0,
            dtype="float32", taps=(-1,), n_registers=0, use_urgency=False,
        )  # fmt: skip
        self.blocks = nnx.List([Block(block_cfg, rngs=rngs) for _ in range(cfg.n_layers)])

    def step_inputs(self, h_xd, tokens_x, steps_x):
        """Block input of draft steps: fused tap h (..., d), token y_j (...), step j (...)."""
        x_xd = self.in_proj(jnp.concatenate([h_xd, self.embed(tokens_x)], axis=-1))
        return x_xd + self.step_embed(steps_x)

    def __call__(self, taps_btld, inputs_btk):
        b, t, k = inputs_btk.shape
        h_btkd = jnp.broadcast_to(self.fuse(taps_btld)[:, :, None], (b, t, k, self.d))
        x_btkd = self.step_inputs(h_btkd, inputs_btk, jnp.broadcast_to(jnp.arange(k), (b, t, k)))
        x_nkd = x_btkd.reshape(b * t, k, self.d)  # each position's draft chain on its own
        step_nk = jnp.broadcast_to(jnp.arange(k), (b * t, k))
        for block in self.blocks:
            x_nkd, _ = block(x_nkd, step_nk)
        return self.head(self.out_norm(x_nkd)).reshape(b, t, k, -1)  # (B, T, k, V)

    def start(self, taps_bld):
        """The fused tap (B, 1, d) and an empty k-slot KV cache per block."""
        b = taps_bld.shape[0]
        acfg = self.blocks[0].attn.cfg
        shape = (b, self.k, acfg.n_kv_heads, acfg.head_dim)
        caches = tuple({"k": jnp.zeros(shape), "v": jnp.zeros(shape)} for _ in self.blocks)
        return self.fuse(taps_bld[:, None]), caches

    def step(self, state, y_b, j):
        h_b1d, caches = state
        slot_b1 = jnp.full((y_b.shape[0], 1), j, jnp.int32)
        x_b1d = self.step_inputs(h_b1d, y_b[:, None], slot_b1)
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x_b1d, cache = block(x_b1d, slot_b1, cache)
            new.append(cache)
        return (h_b1d, tuple(new)), self.head(self.out_norm(x_b1d))[:, 0]


@register("medusa")
class MedusaDrafter(DrafterBase):
    """k residual-MLP heads; ignores the drafted tokens (each offset guessed from h_t alone)."""

    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, main, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        self.w_kdd = nnx.Param(init(rngs.params(), (cfg.k, self.d, self.d)) * 0.1)

    def __call__(self, taps_btld, inputs_btk):
        h_btd = self.fuse(taps_btld)
        x_btkd = h_btd[:, :, None] + jax.nn.silu(
            jnp.einsum("btd,kde->btke", h_btd, self.w_kdd[...])
        )
        return self.head(self.out_norm(x_btkd))  # (B, T, k, V)

    def start(self, taps_bld):
        """Every head's logits (B, k, V) at once."""
        b = taps_bld.shape[0]
        return self(taps_bld[:, None], jnp.zeros((b, 1, self.k), jnp.int32))[:, 0]

    def step(self, state, y_b, j):
        return state, state[:, j]


@register("rnn")
class RNNDrafter(DrafterBase):
    """GRU over draft steps: state from h_t, input at step j the embedding of y_j."""

    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, main, rngs=rngs)
        self.embed = nnx.Embed(main.vocab_size, self.d, rngs=rngs)
        self.cell = nnx.GRUCell(self.d, self.d, rngs=rngs)

    def __call__(self, taps_btld, inputs_btk):
        b, t, k = inputs_btk.shape
        s_nd = jnp.tanh(self.fuse(taps_btld)).reshape(b * t, self.d)
        e_nkd = self.embed(inputs_btk).reshape(b * t, k, self.d)
        outs = []
        for j in range(k):
            s_nd, y_nd = self.cell(s_nd, e_nkd[:, j])
            outs.append(y_nd)
        x_btkd = jnp.stack(outs, 1).reshape(b, t, k, self.d)
        return self.head(self.out_norm(x_btkd))  # (B, T, k, V)

    def start(self, taps_bld):
        """The GRU state (B, d) from the fused tap."""
        return jnp.tanh(self.fuse(taps_bld[:, None]))[:, 0]

    def step(self, state, y_b, j):
        s_bd, o_bd = self.cell(state, self.embed(y_b))
        return s_bd, self.head(self.out_norm(o_bd))


def _check_registry() -> None:
    """Every kind the config accepts has a drafter (run at import)."""
    missing = [kind for kind in DRAFTER_KINDS if kind not in DRAFTERS]
    if missing:
        raise ImportError(f"DRAFTER_KINDS lists {missing}, but no drafter is registered for them")


_check_registry()


def make_drafter(cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs) -> DrafterBase:
    return DRAFTERS[cfg.kind](cfg, main, rngs=rngs)
