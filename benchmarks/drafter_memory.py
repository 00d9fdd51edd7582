r"""Peak memory of one jitted training step, drafter scored one offset at a time vs all at once.

    python benchmarks/drafter_memory.py                    # V 49,152, B 4 x T 1,024, k 4
    python benchmarks/drafter_memory.py --batch=8 --seq_len=512 --distill=0.5 --run

Compiles (XLA on this machine's backend) the gradient of the supervised loss of a
small main model (d 576, SmolLM2's width and vocabulary) with a transformer drafter,
three times: `mtp.train.steps.loss_fn` (the drafter's (B, T, V) logits one offset at a
time, forward and backward, `mtp.train.losses`) and a reference that scores all
(B, T, k, V) draft logits at once, as the loss did before, and the main model's
loss alone (what the drafter adds is the difference). Prints each compiled
step's temp size (`memory_analysis()`: the buffers XLA keeps live besides inputs and
outputs) and, with --run, the peak RSS after running each once (CPU: the process'
peak, so the chunked step runs first). For scale: the size of one (B, T, k, V)
float32 tensor.
"""

from __future__ import annotations

import resource
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig, TrainConfig
from mtp.model.system import MTPSystem, shifted
from mtp.train.losses import offset_weights
from mtp.train.steps import loss_fn

_VOCAB = flags.DEFINE_integer("vocab", 49_152, "Vocabulary size V.")
_D = flags.DEFINE_integer("d_model", 576, "Main model width (the drafter's too).")
_LAYERS = flags.DEFINE_integer("n_layers", 2, "Main model layers.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows B.")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Positions T.")
_K = flags.DEFINE_integer("k", 4, "Draft offsets k.")
_DRAFT_VOCAB = flags.DEFINE_integer(
    "draft_vocab", 0, "Trimmed draft vocabulary (0 = V); the unchunked reference then scores V."
)
_DISTILL = flags.DEFINE_float("distill", 0.0, "train.distill_weight.")
_RUN = flags.DEFINE_bool("run", False, "Also run each step once and report the peak RSS.")

GiB = 2**30


def reference_loss(system, batch, train_config):
    """The supervised loss with all (B, T, k, V) draft logits at once (the unchunked path)."""
    tokens_bt, mask_bt = batch["tokens"], batch["loss_mask"].astype(jnp.float32)
    logits_btv, draft_btkv = system(tokens_bt)
    k, t = system.k, tokens_bt.shape[1]
    ce = optax.softmax_cross_entropy_with_integer_labels
    mean = lambda x, m: (x * m).sum() / jnp.maximum(m.sum(), 1.0)
    main = mean(ce(logits_btv, shifted(tokens_bt, 1, 0)[..., 0]), shifted(mask_bt, 1, 0)[..., 0])
    tgt_btk, m_btk = shifted(tokens_bt, k, 0, start=2), shifted(mask_bt, k, 0, start=2)
    w_k = offset_weights(k, train_config.draft_decay)
    per_k = jax.vmap(mean, in_axes=(2, 2))(ce(draft_btkv, tgt_btk), m_btk)
    loss = main + train_config.draft_weight * (per_k * w_k).sum()
    if train_config.distill_weight:
        pad = jnp.zeros((tokens_bt.shape[0], k + 1, logits_btv.shape[-1]))
        teacher = jnp.concatenate([jax.lax.stop_gradient(logits_btv), pad], 1)
        logp_btkv = jax.nn.log_softmax(
            jnp.stack([teacher[:, 1 + j : 1 + j + t] for j in range(k)], 2)
        )
        kl_btk = (jnp.exp(logp_btkv) * (logp_btkv - jax.nn.log_softmax(draft_btkv))).sum(-1)
        loss = (
            loss
            + train_config.distill_weight
            * (jax.vmap(mean, in_axes=(2, 2))(kl_btk, m_btk) * w_k).sum()
        )
    return loss, {}


def main_only_loss(system, batch, train_config):
    """The main model's loss alone: what the step holds without any drafter."""
    tokens_bt, mask_bt = batch["tokens"], batch["loss_mask"]
    logits_btv, _, _ = system.main(tokens_bt)
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(
        logits_btv, shifted(tokens_bt, 1, 0)[..., 0]
    )
    m_bt = shifted(mask_bt, 1, 0)[..., 0]
    return (ce_bt * m_bt).sum() / jnp.maximum(m_bt.sum(), 1.0), {}


def step_fn(graphdef, loss, train_config):
    def step(state, batch):
        system = nnx.merge(graphdef, state)
        (value, _), grads = nnx.value_and_grad(loss, has_aux=True)(system, batch, train_config)
        return value, optax.global_norm(grads)

    return jax.jit(step)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB


def main(argv):
    del argv
    v, b, t, k = _VOCAB.value, _BATCH.value, _SEQ.value, _K.value
    main_cfg = ModelConfig(vocab_size=v, d_model=_D.value, n_layers=_LAYERS.value, n_heads=9,
                           n_kv_heads=3, max_len=t)  # fmt: skip
    drafter_cfg = DrafterConfig(k=k, n_heads=9, draft_vocab=_DRAFT_VOCAB.value)
    train_config = TrainConfig(distill_weight=_DISTILL.value)
    build = lambda: MTPSystem(main_cfg, drafter_cfg, pad_id=0, rngs=nnx.Rngs(0))
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    batch = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32)}  # fmt: skip
    full_gib = b * t * k * v * 4 / GiB
    print(f"V={v} B={b} T={t} k={k} d={_D.value} layers={_LAYERS.value} "
          f"draft_vocab={_DRAFT_VOCAB.value or v} distill={_DISTILL.value} "
          f"backend={jax.default_backend()}")  # fmt: skip
    print(f"one (B, T, k, V) float32 tensor: {full_gib:.2f} GiB, one (B, T, V): {full_gib / k:.2f}")
    state = batch_values = None
    if _RUN.value:
        state = nnx.state(build())
        rng = np.random.default_rng(0)
        batch_values = {"tokens": jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
                        "loss_mask": jnp.ones((b, t), jnp.float32)}  # fmt: skip
    losses = (("chunked", loss_fn), ("unchunked", reference_loss), ("main only", main_only_loss))
    for name, loss in losses:
        step = step_fn(graphdef, loss, train_config)
        mem = step.lower(abstract, batch).compile().memory_analysis()
        line = (f"{name:>9}: temp {mem.temp_size_in_bytes / GiB:6.2f} GiB, "
                f"arguments {mem.argument_size_in_bytes / GiB:.2f} GiB, "
                f"outputs {mem.output_size_in_bytes / GiB:.2f} GiB")  # fmt: skip
        if _RUN.value:
            value, gnorm = jax.block_until_ready(step(state, batch_values))
            line += f"; ran: loss {float(value):.4f}, peak RSS so far {peak_rss_gib():.2f} GiB"
        print(line, flush=True)
    print("reproduce: python " + " ".join(sys.argv))


if __name__ == "__main__":
    app.run(main)
