"""Sections `model` (the main transformer) and `drafter`."""

from __future__ import annotations

import dataclasses

from mtp.config.fields import check, from_dict

DTYPES = ("float32", "bfloat16", "float16")
MLP_ACTS = ("silu", "gelu_tanh")  # SwiGLU (Llama, Qwen2) or GeGLU with tanh GELU (Gemma)
SPECIAL_MODES = ("add", "map")
# `model.init_from`: a Hugging Face directory, a GGUF file, or a named source (mtp.model.sources).
INIT_KINDS = ("hf:", "gguf:", "named:")


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
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters ('bfloat16' halves memory)
    norm_eps: float = 1e-6
    use_urgency: bool = False  # embed an urgency scalar in [0, 1] at every position
    # Architecture families of pretrained checkpoints (set from the checkpoint, see init_from).
    d_head: int = 0  # 0: d_model // n_heads (Gemma sets it explicitly)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w) (Gemma)
    embed_scale: bool = False  # embeddings multiplied by sqrt(d_model) (Gemma)
    mlp_act: str = "silu"  # gated MLP activation, one of MLP_ACTS
    # Llama 3 RoPE scaling: (factor, low_freq_factor, high_freq_factor, original_max_len); ().
    rope_scaling: tuple[float, ...] = ()
    # Pretrained weights: 'hf:DIR', 'gguf:FILE' or 'named:NAME' ('' = train from scratch). The
    # checkpoint fixes the shapes and family fields above; max_len, taps, dtypes, registers
    # and urgency stay the config's.
    init_from: str = ""
    # Specials (think, pause, pad) a pretrained vocabulary lacks: 'add' grows the embedding and
    # head by new rows (initialised to the mean row); 'map' reuses existing tokens, named in
    # special_map as 'think_open=<tok>,think_close=<tok>,pause=<tok>' (unnamed ones are added).
    specials: str = "add"
    special_map: str = ""

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
        check(self.d_head >= 0, "model.d_head", f"must be >= 0, got {self.d_head}")
        check(self.head_dim % 2 == 0, "model.d_head", "head dim must be even (RoPE)")
        check(self.n_registers >= 0, "model.n_registers", f"must be >= 0, got {self.n_registers}")
        check(self.dtype in DTYPES, "model.dtype", f"{self.dtype!r} not in {DTYPES}")
        check(
            self.param_dtype in DTYPES,
            "model.param_dtype",
            f"{self.param_dtype!r} not in {DTYPES}",
        )
        check(self.mlp_act in MLP_ACTS, "model.mlp_act", f"{self.mlp_act!r} not in {MLP_ACTS}")
        object.__setattr__(self, "rope_scaling", tuple(float(x) for x in self.rope_scaling))
        check(
            len(self.rope_scaling) in (0, 4),
            "model.rope_scaling",
            "must be () or (factor, low_freq_factor, high_freq_factor, original_max_len)",
        )
        check(
            self.init_from == "" or self.init_from.startswith(INIT_KINDS),
            "model.init_from",
            f"{self.init_from!r} is not '' or one of 'hf:DIR', 'gguf:FILE', 'named:NAME'",
        )
        check(
            self.specials in SPECIAL_MODES,
            "model.specials",
            f"{self.specials!r} not in {SPECIAL_MODES}",
        )
        for item in filter(None, self.special_map.split(",")):
            name = item.split("=", 1)[0]
            check(
                "=" in item and name in ("think_open", "think_close", "pause"),
                "model.special_map",
                f"{item!r} is not NAME=TOKEN with NAME in think_open, think_close, pause",
            )
        check(len(self.taps) >= 1, "model.taps", "needs at least one layer")
        if not self.init_from:  # a checkpoint's depth is known once it is read
            self.check_taps()

    def check_taps(self) -> None:
        """Every tap names a layer of the model (ConfigError otherwise)."""
        self.check_layers(self.taps, "model.taps")

    def check_layers(self, layers: tuple[int, ...], field: str) -> None:
        """Every index of config field `field` names a layer of the model (ConfigError
        otherwise)."""
        for t in layers:
            check(
                -self.n_layers <= t < self.n_layers,
                field,
                f"layer {t} is outside the model; allowed 0..{self.n_layers - 1} "
                f"(or -{self.n_layers}..-1 from the top)",
            )

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

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
DRAFTER_HEADS = ("own", "shared", "shared_frozen")


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    """Drafter reading the main model's taps; drafts y_1..y_k after the main token y_0."""

    kind: str = "transformer"
    k: int = 4
    d_model: int = 0  # 0: the main model's d_model
    n_layers: int = 1  # transformer drafter: causal layers over the k draft steps
    n_heads: int = 4
    detach: bool = False  # stop_gradient on the taps: Medusa-1 style, main untouched
    # Output head (and input embedding): 'own' (the drafter's), 'shared' (the main model's
    # embedding and head, trained through the drafter loss too) or 'shared_frozen' (read
    # through stop_gradient).
    head: str = "own"
    # Trimmed draft vocabulary (EAGLE-3): the drafter scores only the draft_vocab most frequent
    # tokens of the training data, mapped back to full ids; 0 = the full vocabulary.
    draft_vocab: int = 0
    # A keep head: after each draft, the logit of emitting it or ending the pass (learned
    # emission; trained by RL, read by the adaptive decoding mode's 'learned' confidence).
    emission: bool = False
    # Transformer drafter: its blocks also attend over the main model's fused taps at every
    # past position (EAGLE), not only the tap at t; decoding carries them in a context cache.
    context: bool = False
    # Transformer drafter: main-model layers (one per drafter block, e.g. (-1,) the top one)
    # whose weights start the drafter's blocks, which then take the main model's block shape;
    # its out norm starts as the main model's final norm. () = random blocks.
    copy_layers: tuple[int, ...] = ()
    # A drafter file (`python -m mtp.run --mode=export_drafter` writes one) whose weights and
    # draft vocabulary start the drafter; its drafter config and main model must match. "": none.
    init_from: str = ""

    def __post_init__(self):
        check(self.kind in DRAFTER_KINDS, "drafter.kind", f"{self.kind!r} not in {DRAFTER_KINDS}")
        check(self.k >= 1, "drafter.k", f"must be >= 1, got {self.k}")
        check(self.n_layers >= 1, "drafter.n_layers", f"must be >= 1, got {self.n_layers}")
        check(self.d_model >= 0, "drafter.d_model", f"must be >= 0, got {self.d_model}")
        check(
            self.head in DRAFTER_HEADS,
            "drafter.head",
            f"{self.head!r} not in {DRAFTER_HEADS}",
        )
        check(self.draft_vocab >= 0, "drafter.draft_vocab", f"must be >= 0, got {self.draft_vocab}")
        check(
            not self.context or self.kind == "transformer",
            "drafter.context",
            f"only the transformer drafter reads the context, got kind {self.kind!r}",
        )
        check(
            not self.init_from or self.init_from.endswith(".safetensors"),
            "drafter.init_from",
            f"a drafter file (.safetensors) or '', got {self.init_from!r}",
        )
        object.__setattr__(self, "copy_layers", tuple(int(i) for i in self.copy_layers))
        if self.copy_layers:
            check(
                self.kind == "transformer" and len(self.copy_layers) == self.n_layers,
                "drafter.copy_layers",
                f"one main layer per block of the transformer drafter ({self.n_layers} for "
                f"drafter.n_layers={self.n_layers}), got {self.copy_layers} for kind {self.kind!r}",
            )
            check(
                not self.context,
                "drafter.copy_layers",
                "cannot copy main layers into a drafter that reads the context (drafter.context)",
            )


def model_config(config) -> ModelConfig:
    return from_dict(ModelConfig, "model", config.model)


def drafter_config(config) -> DrafterConfig:
    return from_dict(DrafterConfig, "drafter", config.drafter)
