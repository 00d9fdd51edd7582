"""Config resolution, checkpoints, train_and_evaluate end to end, and the drafter scored one
offset at a time (same loss, grads and metrics as all at once, less memory)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mtp import checkpoint as ckpt
from mtp.config import (
    ConfigError,
    DrafterConfig,
    ModelConfig,
    TrainConfig,
    UserError,
    default_config,
    resolve,
)  # fmt: skip
from mtp.data.task_data import check_tasks
from mtp.data.tokenizer import ByteTokenizer
from mtp.errors import NonFiniteLoss
from mtp.metrics import compare_runs, read_csv
from mtp.model.system import Drafts, MTPSystem, shifted
from mtp.model.taps import with_noise
from mtp.rl.objectives import distill_kl, token_dists
from mtp.train import steps, supervised
from mtp.train.losses import draft_accuracy, offset_weights
from mtp.train.steps import init_train_state, jit_steps, loss_fn

TOK = ByteTokenizer()


def tiny_config(**overrides):
    """A model small enough to train a few steps in seconds."""
    c = default_config()
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_len=64)
    c.drafter.update(k=2, n_heads=2)
    c.data.update(seq_len=32, batch_size=4, max_bytes=60_000)
    c.train.update(steps=12, lr=1e-2, warmup_steps=2, log_every=3, eval_every=6, eval_batches=2,
                   checkpoint_every=6)  # fmt: skip
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def train_and_evaluate(config, workdir):
    """The supervised program on `config` (a ConfigDict) in `workdir`."""
    return supervised.train_and_evaluate(resolve(config), workdir, TOK)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("drafter.k", 0, "drafter.k: must be >= 1"),
        ("model.taps", (5,), "model.taps: layer 5 is outside the model; allowed 0..1"),
        ("data.seq_len", 128, "data.seq_len: 128 is above the model's maximum"),
        ("drafter.kind", "lstm", "drafter.kind: 'lstm' not in"),
        ("train.sharding", "tp", "train.sharding: 'tp' not in"),
        ("data.corpus", "http://x", "data.corpus: 'http://x' is not one of"),
        ("data.teacher_forced", "rg_chain_sum", "data.teacher_forced: needs data.cache_taps"),
        ("data.window_len", -1, "data.window_len: must be >= 0"),
        ("data.distill_max_new", -1, "data.distill_max_new: must be >= 0"),
        ("data.window_len", 64, "data.window_len: needs data.cache_taps=True"),
        ("data.pack_windows", True, "data.pack_windows: needs data.window_len > 0"),
        ("drafter.copy_layers", (0, 1), "drafter.copy_layers: one main layer per block"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message) as e:
        resolve(tiny_config(**{field: value}))
    assert "\n" not in str(e.value)


def test_packed_windows_refuse_a_drafter_that_reads_the_context():
    packed = {"data.corpus": "distill:rg_chain_sum:n=4", "data.cache_taps": True,
              "data.window_len": 8, "data.pack_windows": True}  # fmt: skip
    resolve(tiny_config(**packed))
    with pytest.raises(ConfigError, match="data.pack_windows: cannot pack for drafter.context"):
        resolve(tiny_config(**packed, **{"drafter.context": True}))


def test_copied_layers_must_lie_in_the_main_model_and_not_feed_a_context_drafter():
    with pytest.raises(ConfigError, match="drafter.copy_layers: cannot copy main layers into"):
        resolve(tiny_config(**{"drafter.copy_layers": (-1,), "drafter.context": True}))
    run = resolve(tiny_config(**{"drafter.copy_layers": (2,)}))  # the model has layers 0..1
    outside = r"drafter.copy_layers: layer 2 is outside the model; allowed 0..1 "
    with pytest.raises(ConfigError, match=outside):
        steps.make_system(run, TOK)
    run = resolve(tiny_config(**{"drafter.copy_layers": (-1,), "drafter.d_model": 16}))
    with pytest.raises(ConfigError, match="drafter.copy_layers: copied main layers need .* 32"):
        steps.make_system(run, TOK)


def test_unknown_field_is_named_with_the_allowed_ones():
    c = tiny_config()
    c.model.unlock()
    c.model.d_modle = 3
    with pytest.raises(ConfigError, match="model.d_modle: unknown field; allowed: .*d_model"):
        resolve(c)


def test_every_experiment_config_validates():
    import importlib.util
    import pathlib

    files = sorted(pathlib.Path(__file__).parent.parent.glob("experiments/*.py"))
    assert files
    for path in files:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for arg in (None, *getattr(module, "VARIANTS", ())):  # every documented variant too
            check_tasks(resolve(module.get_config(arg)))


def _fixed_batch(seq_len=32, batch=4):
    text = np.frombuffer(b"def add(a, b):\n    return a + b\n" * 20, np.uint8).astype(np.int32)
    rows = np.stack([text[i : i + seq_len] for i in range(batch)])
    return {"tokens": rows, "loss_mask": np.ones_like(rows, np.float32)}


def test_checkpoint_round_trip(tmp_path):
    run = resolve(tiny_config())
    graphdef, state = init_train_state(run, TOK)
    train_step, _ = jit_steps(graphdef, run.train)
    state, _ = train_step(state, _fixed_batch())
    expected = jax.tree.map(np.asarray, state)
    mngr = ckpt.manager(tmp_path, keep=2)
    ckpt.save(mngr, 1, state, {"next_index": 7})
    mngr.wait_until_finished()
    _, abstract_state = init_train_state(run, TOK, abstract=True)
    restored, data_state = ckpt.restore(mngr, 1, abstract_state)
    mngr.close()
    assert data_state == {"next_index": 7}
    jax.tree.map(np.testing.assert_array_equal, expected, jax.tree.map(np.asarray, restored))
    # a differently shaped model cannot restore it, with a one-line error
    other = resolve(tiny_config(**{"model.d_model": 64}))
    _, wrong = init_train_state(other, TOK, abstract=True)
    with pytest.raises(UserError, match="does not fit this config") as e:
        ckpt.restore(ocp.CheckpointManager(tmp_path / "checkpoints"), 1, wrong)
    assert "\n" not in str(e.value)


def test_train_and_evaluate_end_to_end_and_resume(tmp_path, capsys):
    c = tiny_config()
    results = train_and_evaluate(c, tmp_path)
    assert results["main_loss"] < 5.0  # from ~ln(264) = 5.6 at init
    assert ckpt.manager(tmp_path).latest_step() == 12
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert report["step"] == 12 and "acc_draft_1" in report and "accepted_len" in report
    rows = (tmp_path / "metrics" / "train.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 4  # logged at 3, 6, 9, 12
    assert (tmp_path / "config.json").exists() and list((tmp_path / "tensorboard").iterdir())
    # the same command again resumes the finished run, saying so: no step is trained twice
    capsys.readouterr()
    again = train_and_evaluate(c, tmp_path)
    assert f"resuming {tmp_path} from step 12 of 12\n" in capsys.readouterr().out
    assert again["main_loss"] == pytest.approx(results["main_loss"], rel=1e-6)
    assert len((tmp_path / "metrics" / "train.csv").read_text().splitlines()) == 5
    # runs compare side by side; a re-logged step (after kill -9) reads once, the last row winning
    table = compare_runs([str(tmp_path), str(tmp_path)])
    assert table.splitlines()[2].startswith("| step | 12 | 12 |") and "| main_loss |" in table
    with (tmp_path / "metrics" / "train.csv").open("a") as f:
        f.write("3" + ",0" * (len(rows[0].split(",")) - 1) + "\n")
    steps = [(r["step"], r["loss"]) for r in read_csv(tmp_path, "train")]
    assert [s for s, _ in steps] == [3, 6, 9, 12] and steps[0][1] == 0
    # an incompatible config is refused before anything is written
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(UserError, match="model.d_model=32, this config has 64"):
        train_and_evaluate(tiny_config(**{"model.d_model": 64}), tmp_path)
    assert (tmp_path / "config.json").read_text() == before


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    c = tiny_config(**{"train.lr": 1e30, "train.warmup_steps": 0, "train.log_every": 1,
                       "train.checkpoint_every": 1, "train.grad_clip": 1e30})  # fmt: skip
    with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf) at step \d+") as e:
        train_and_evaluate(c, tmp_path)
    bad_step = int(str(e.value).split("at step ")[1].split()[0])
    mngr = ckpt.manager(tmp_path)
    assert 0 < max(mngr.all_steps()) < bad_step
    _, abstract_state = init_train_state(resolve(c), TOK, abstract=True)
    good, _ = ckpt.restore(mngr, max(mngr.all_steps()), abstract_state)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(good))


# The drafter scored one offset at a time equals scoring all (B, T, k, V) logits at once.
CHUNK_MAIN = ModelConfig(vocab_size=48, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_len=16)
CHUNK_IDS = np.sort(np.random.default_rng(1).choice(48, 20, replace=False))


def _chunk_system(draft_vocab=0, head="own", kind="transformer"):
    cfg = DrafterConfig(kind=kind, k=3, n_heads=2, head=head, draft_vocab=draft_vocab)
    ids = CHUNK_IDS if draft_vocab else None
    return MTPSystem(CHUNK_MAIN, cfg, pad_id=0, draft_ids=ids, rngs=nnx.Rngs(0))


def _unchunked_loss(system, tokens_bt, mask_bt, distill):
    """The loss as written before chunking: all draft logits (B, T, k, V) at once; a trimmed
    vocabulary masks the targets outside it and restricts the teacher to it."""
    logits_btv, draft_btkv = system(tokens_bt)
    k, t, v = system.k, tokens_bt.shape[1], logits_btv.shape[-1]
    ids = np.arange(v) if system.draft_ids is None else CHUNK_IDS
    ce = optax.softmax_cross_entropy_with_integer_labels
    mean = lambda x, m: (x * m).sum() / jnp.maximum(m.sum(), 1.0)
    main = mean(ce(logits_btv, shifted(tokens_bt, 1, 0)[..., 0]), shifted(mask_bt, 1, 0)[..., 0])
    tgt_btk, m_btk = shifted(tokens_bt, k, 0, start=2), shifted(mask_bt, k, 0, start=2)
    inv_v = jnp.full(v, -1).at[ids].set(jnp.arange(len(ids)))
    m_btk = m_btk * (inv_v[tgt_btk] >= 0)
    draft_btku = draft_btkv[..., ids]
    w_k = offset_weights(k, 0.8)
    per_k = jax.vmap(mean, in_axes=(2, 2))(ce(draft_btku, jnp.maximum(inv_v[tgt_btk], 0)), m_btk)
    loss = main + (per_k * w_k).sum()
    if distill:
        pad = jnp.zeros((tokens_bt.shape[0], k + 1, v))
        teacher = jnp.concatenate([jax.lax.stop_gradient(logits_btv), pad], 1)[..., ids]
        logp = jax.nn.log_softmax(jnp.stack([teacher[:, 1 + j : 1 + j + t] for j in range(k)], 2))
        kl_btk = (jnp.exp(logp) * (logp - jax.nn.log_softmax(draft_btku))).sum(-1)
        loss = loss + distill * (jax.vmap(mean, in_axes=(2, 2))(kl_btk, m_btk) * w_k).sum()
    return loss


@pytest.mark.parametrize("draft_vocab, head, distill", [(0, "own", 0.0), (20, "shared", 0.5)])
def test_chunked_draft_loss_and_grads_equal_the_unchunked_ones(draft_vocab, head, distill):
    system = _chunk_system(draft_vocab, head)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 48)
    mask = jnp.ones((2, 12), jnp.float32).at[0, 5].set(0.0)
    batch = {"tokens": tokens, "loss_mask": mask}
    cfg = TrainConfig(distill_weight=distill)
    (loss, metrics), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True), static_argnums=2)(
        system, batch, cfg
    )
    ref, ref_grads = nnx.jit(nnx.value_and_grad(_unchunked_loss), static_argnums=3)(
        system, tokens, mask, distill
    )
    assert float(loss) == pytest.approx(float(ref), abs=1e-6)
    flat = lambda g: jax.tree.leaves(nnx.state(g))
    for got, want in zip(flat(grads), flat(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    lo, dr = system(tokens)
    for name, want in draft_accuracy(lo, Drafts.from_logits(dr), tokens, mask).items():
        np.testing.assert_allclose(metrics[name], want)  # the metrics mean what they meant
    tgt, m = np.asarray(shifted(tokens, 3, 0, start=2)), np.asarray(shifted(mask, 3, 0, start=2))
    covered = np.isin(tgt, CHUNK_IDS if draft_vocab else np.arange(48))
    assert float(metrics["draft_coverage"]) == pytest.approx(covered[m > 0].mean())
    assert (float(metrics["draft_coverage"]) < 1) == bool(draft_vocab)


@pytest.mark.parametrize("draft_vocab, head", [(0, "own"), (20, "shared_frozen")])
def test_cached_taps_carry_the_main_models_distillation_teacher(draft_vocab, head):
    """Distillation from a frozen main model's cached taps (the last block's output through
    the final norm and head) equals distillation from its full forward."""
    main = dataclasses.replace(CHUNK_MAIN, n_layers=2, taps=(-1, 0))
    cfg = DrafterConfig(k=3, n_heads=2, head=head, draft_vocab=draft_vocab, detach=True)
    ids = CHUNK_IDS if draft_vocab else None
    system = MTPSystem(main, cfg, pad_id=0, draft_ids=ids, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 48)
    batch = {"tokens": tokens, "loss_mask": jnp.ones((2, 12), jnp.float32).at[1, 3].set(0.0)}
    train = TrainConfig(distill_weight=0.5)
    _, full = loss_fn(system, batch, train)
    _, cached = loss_fn(system, batch | {"taps": system.main_taps(tokens)}, train)
    assert float(full["loss/distill"]) > 0.1
    assert float(cached["loss/distill"]) == pytest.approx(float(full["loss/distill"]), abs=1e-5)
    with pytest.raises(ValueError, match="last block"):
        no_last = MTPSystem(dataclasses.replace(main, taps=(0,)), cfg, pad_id=0, draft_ids=ids,
                            rngs=nnx.Rngs(0))  # fmt: skip
        no_last.main_logits_from_taps(no_last.main_taps(tokens))


def test_a_batchs_targets_are_scored_in_place_of_its_tokens():
    """Rows a frozen main model read teacher-forced are scored against their 'targets' (its
    own choices) while the drafter reads the tokens: targets set to the drafter's own first
    picks give first-offset agreement 1 and accepted length >= 1; the tokens alone do not."""
    main = dataclasses.replace(CHUNK_MAIN, n_layers=2, taps=(-1, 0))
    system = MTPSystem(main, DrafterConfig(k=3, n_heads=2, detach=True), pad_id=0,
                       rngs=nnx.Rngs(0))  # fmt: skip
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 48)
    taps = system.main_taps(tokens)
    drafts = system.drafts_from_taps(tokens, taps)
    first_bt = drafts.logits(drafts.hidden_btkd[:, :, 0]).argmax(-1)  # its pick for x_{t+2}
    targets = tokens.at[:, 2:].set(first_bt[:, :-2])
    batch = {"tokens": tokens, "loss_mask": jnp.ones((2, 12), jnp.float32), "taps": taps}
    _, own = loss_fn(system, batch | {"targets": targets}, TrainConfig())
    _, plain = loss_fn(system, batch, TrainConfig())
    assert float(own["agree/draft"][0]) == float(own["acc/draft"][0]) == 1.0
    assert float(own["accepted_len"]) >= 1.0
    assert float(plain["agree/draft"][0]) < 0.5
    assert float(own["loss/draft"]) < float(plain["loss/draft"])


def test_tap_noise_scales_with_each_taps_own_size():
    """Each tap gets uniform noise within +-scale times its own RMS over D, filling that range."""
    taps = jax.random.normal(jax.random.key(0), (2, 50, 2, 64)) * jnp.array([1.0, 10.0])[:, None]
    delta = with_noise(taps, 0.1, jax.random.key(1)) - taps
    ratio = jnp.abs(delta) / jnp.sqrt(jnp.mean(taps * taps, axis=-1, keepdims=True))
    for layer in range(2):  # both taps, although one is ten times the other
        assert 0.09 < float(ratio[:, :, layer].max()) <= 0.1 + 1e-6
        assert float(ratio[:, :, layer].mean()) == pytest.approx(0.05, rel=0.05)


def test_tap_noise_reaches_the_drafter_not_the_teacher_nor_the_evaluation():
    """With `train.tap_noise` the drafter reads `with_noise` of the cached taps (its loss equals
    the loss on those noisy taps) while the distillation teacher reads them clean (with
    distillation it differs from the loss on noisy taps); without a key (evaluation) or at
    0 the taps are read as they are."""
    main = dataclasses.replace(CHUNK_MAIN, n_layers=2, taps=(-1, 0))
    system = MTPSystem(main, DrafterConfig(k=3, n_heads=2, detach=True, head="shared_frozen"),
                       pad_id=0, rngs=nnx.Rngs(0))  # fmt: skip
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 48)
    batch = {"tokens": tokens, "loss_mask": jnp.ones((2, 12), jnp.float32)}
    batch["taps"] = system.main_taps(tokens)
    key = jax.random.key(7)
    noisy = batch | {"taps": with_noise(batch["taps"], 0.5, jax.random.split(key, 2)[0])}
    for distill in (0.0, 1.0):
        clean_cfg = TrainConfig(distill_weight=distill)
        cfg = dataclasses.replace(clean_cfg, tap_noise=0.5)
        got, _ = loss_fn(system, batch, cfg, key)
        clean, _ = loss_fn(system, batch, clean_cfg, key)
        on_noisy, _ = loss_fn(system, noisy, clean_cfg)
        assert abs(float(got) - float(clean)) > 1e-3
        assert float(loss_fn(system, batch, cfg)[0]) == float(clean)  # no key: no noise
        if distill:
            assert abs(float(got) - float(on_noisy)) > 1e-3
        else:
            assert float(got) == pytest.approx(float(on_noisy), abs=1e-6)
    live = {"tokens": tokens, "loss_mask": batch["loss_mask"]}  # taps from a main forward
    noisy_live, _ = loss_fn(system, live, TrainConfig(tap_noise=0.5), key)
    assert abs(float(noisy_live) - float(loss_fn(system, live, TrainConfig(), key)[0])) > 1e-3


def test_tap_noise_reaches_the_past_taps_of_a_drafter_that_reads_the_context():
    """A window's past taps get their own noise (the second half of the step's key)."""
    main = dataclasses.replace(CHUNK_MAIN, n_layers=2, taps=(-1, 0))
    cfg = DrafterConfig(k=3, n_heads=2, detach=True, context=True)
    system = MTPSystem(main, cfg, pad_id=0, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 14), 0, 48)
    taps, c, key = system.main_taps(tokens), 5, jax.random.key(3)
    batch = {"tokens": tokens[:, c:], "loss_mask": jnp.ones((2, 14 - c)), "taps": taps[:, c:],
             "past_taps": taps[:, :c], "past_mask": jnp.ones((2, c))}  # fmt: skip
    row_key, past_key = jax.random.split(key)
    noisy = batch | {"taps": with_noise(batch["taps"], 0.5, row_key),
                     "past_taps": with_noise(batch["past_taps"], 0.5, past_key)}  # fmt: skip
    got, _ = loss_fn(system, batch, TrainConfig(tap_noise=0.5), key)
    want, _ = loss_fn(system, noisy, TrainConfig())
    assert float(got) == pytest.approx(float(want), abs=1e-6)


def test_a_window_with_its_past_taps_trains_as_the_whole_row():
    """For a drafter that reads the context, the loss on a window of cached taps with the
    taps before it as its past (what self-distillation stores) equals the loss on the whole
    row whose chains before the window have no target (every target up to position c + k
    masked); without the past it differs."""
    main = dataclasses.replace(CHUNK_MAIN, n_layers=2, taps=(-1, 0))
    cfg = DrafterConfig(k=3, n_heads=2, detach=True, context=True)
    system = MTPSystem(main, cfg, pad_id=0, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 14), 0, 48)
    taps, c = system.main_taps(tokens), 5
    mask = jnp.ones((2, 14), jnp.float32).at[:, : c + 4].set(0.0)
    whole = {"tokens": tokens, "loss_mask": mask, "taps": taps}
    window = {"tokens": tokens[:, c:], "loss_mask": mask[:, c:], "taps": taps[:, c:]}
    past = {"past_taps": taps[:, :c], "past_mask": jnp.ones((2, c), jnp.float32)}
    train = TrainConfig()
    want, _ = loss_fn(system, whole, train)
    got, _ = loss_fn(system, window | past, train)
    alone, _ = loss_fn(system, window, train)
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    assert abs(float(alone) - float(want)) > 1e-3


@pytest.mark.parametrize("draft_vocab", [0, 20])
def test_chunked_rl_token_dists_and_grads_equal_the_unchunked_ones(draft_vocab):
    system = _chunk_system(draft_vocab, kind="rnn")
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 48)
    offset = jnp.asarray(np.tile([0, 1, 2, 3], (2, 3)))

    def score(system, chunked):
        if chunked:
            dist, _ = token_dists(*system.forward(tokens), offset, 0.7)
        else:  # the gather over all (B, T, k, V) draft log-probs, as written before chunking
            lo, dr = system(tokens)
            t = tokens.shape[1]
            draft_lp = jax.nn.log_softmax(dr / 0.7)[
                jnp.arange(2)[:, None], jnp.clip(jnp.arange(t) - 1 - offset, 0, t - 1),
                jnp.clip(offset - 1, 0, 2),
            ]  # fmt: skip
            main_lp = jax.nn.log_softmax(lo / 0.7)
            main_prev = jnp.concatenate([main_lp[:, :1], main_lp[:, :-1]], 1)
            dist = jnp.where((offset == 0)[..., None], main_prev, draft_lp)
        lp = jnp.take_along_axis(dist, tokens[..., None], -1)[..., 0]
        return jnp.where(jnp.isfinite(lp), lp, 0.0).sum() + distill_kl(
            dist, jnp.zeros_like(dist), offset > 0
        )

    grad = nnx.jit(nnx.value_and_grad(score), static_argnums=1)
    (got, g_got), (want, g_want) = grad(system, True), grad(system, False)
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    flat = lambda g: jax.tree.leaves(nnx.state(g))
    for a, b in zip(flat(g_got), flat(g_want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_training_step_never_holds_all_draft_logits():
    """Compiled temp memory of the gradient: below that of one (B, T, k, V) float32 tensor
    beside the main model's own (B, T, V) logits, when V dominates."""
    main = ModelConfig(vocab_size=16_384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                       max_len=128)  # fmt: skip
    build = lambda: MTPSystem(main, DrafterConfig(k=4, n_heads=2), pad_id=0, rngs=nnx.Rngs(0))
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    b, t = 2, 128
    batch = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32)}  # fmt: skip

    def step(state, batch):
        system = nnx.merge(graphdef, state)
        return nnx.grad(loss_fn, has_aux=True)(system, batch, TrainConfig())

    temp = jax.jit(step).lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes
    btv = b * t * main.vocab_size * 4
    assert temp < 4 * btv + 4 * btv // 2, temp / btv  # (B, T, k, V) alone is 4 btv


def test_each_step_draws_its_own_tap_noise_and_a_resumed_step_the_same(monkeypatch):
    """The noise key of step s is fold_in(key(NOISE_SEED), s): it differs from step to step,
    and a run resumed at step s draws what the uninterrupted run drew there."""
    run = resolve(tiny_config())
    cfg = dataclasses.replace(run.train, tap_noise=0.2)
    graphdef, state = init_train_state(run, TOK)
    seen = []

    def recording(system, batch, train_config, noise_key=None):
        seen.append(np.asarray(jax.random.key_data(noise_key)))
        return loss_fn(system, batch, train_config, noise_key)

    monkeypatch.setattr(steps, "loss_fn", recording)
    for _ in range(2):
        state, _ = steps.train_step(graphdef, state, _fixed_batch(), train_config=cfg)
    want = [jax.random.key_data(jax.random.fold_in(jax.random.key(steps.NOISE_SEED), s))
            for s in (0, 1)]  # fmt: skip
    np.testing.assert_array_equal(seen, want)
    assert not np.array_equal(seen[0], seen[1])
