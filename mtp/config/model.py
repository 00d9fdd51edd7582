"""Sections `model` (the main transformer) and `drafter`."""

from __future__ import annotations

import dataclasses

from mtp.config.fields import check, from_dict

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Main decoder-only transformer."""

    vocab_size: int = 264
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention when < n_heads
    d_ff: int = 0  # 0: 8/3 * d_model rounded up to a multiple of 32
    max_len: int = 512  # longest sequence the model (and its KV cache) supports
    rope_base: float = 10_000.0
    tie_embeddings: bool = True
    n_registers: int = 0  # learned extra positions that carry no output
    taps: tuple[int, ...] = (-1,)  # blocks whose output the drafter reads
    dtype: str = "float32"  # compute dtype; parameters stay float32
    norm_eps: float = 1e-6
    use_urgency: bool = False  # embed an urgency scalar in [0, 1] at every position

    def __post_init__(self):
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_len"):
            check(
                getattr(self, name) >= 1,
                f"model.{name}",
                f"must be >= 1, got {getattr(self, name)}",
            )
        check(
            self.d_model % self.n_heads == 0,
            "model.n_heads",
            f"must divide d_model={self.d_model}, got {self.n_heads}",
        )
        check(
            self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}",
        )
        check(
            (self.d_model // self.n_heads) % 2 == 0, "model.d_model", "head dim must be even (RoPE)"
        )
        check(self.n_registers >= 0, "model.n_registers", f"must be >= 0, got {self.n_registers}")
        check(self.dtype in DTYPES, "model.dtype", f"{self.dtype!r} not in {DTYPES}")
        check(len(self.taps) >= 1, "model.taps", "needs at least one layer")
        for t in self.taps:
            check(
                -self.n_layers <= t < self.n_layers,
                "model.taps",
                f"layer {t} is outside the model; allowed 0..{self.n_layers - 1} "
                f"(or -{self.n_layers}..-1 from the top)",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or -(-(8 * self.d_model // 3) // 32) * 32

    @property
    def tap_layers(self) -> tuple[int, ...]:
        """Tap indices normalised to 0..n_layers-1."""
        return tuple(t % self.n_layers for t in self.taps)


# The kinds `DrafterConfig` accepts; `mtp.model.drafter` registers one drafter per name and
# checks at import that none is missing.
DRAFTER_KINDS = ("transformer", "medusa", "rnn")


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    """Drafter reading the main model's taps; drafts y_1..y_k after the main token y_0."""

    kind: str = "transformer"
    k: int = 4
    d_model: int = 0  # 0: the main model's d_model
    n_layers: int = 1  # transformer drafter: causal layers over the k draft steps
    n_heads: int = 4
    detach: bool = False  # stop_gradient on the taps: Medusa-1 style, main untouched

    def __post_init__(self):
        check(self.kind in DRAFTER_KINDS, "drafter.kind", f"{self.kind!r} not in {DRAFTER_KINDS}")
        check(self.k >= 1, "drafter.k", f"must be >= 1, got {self.k}")
        check(self.n_layers >= 1, "drafter.n_layers", f"must be >= 1, got {self.n_layers}")
        check(self.d_model >= 0, "drafter.d_model", f"must be >= 0, got {self.d_model}")


def model_config(config) -> ModelConfig:
    return from_dict(ModelConfig, "model", config.model)


def drafter_config(config) -> DrafterConfig:
    return from_dict(DrafterConfig, "drafter", config.drafter)
