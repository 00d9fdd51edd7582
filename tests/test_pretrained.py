"""A pretrained main model in a run: shapes from the checkpoint, weights loaded, the frozen
recipe on self-distillation rows, and the main model's own learning rate."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp import checkpoint as ckpt
from mtp.config import (
    ConfigError,
    ModelConfig,
    PauseConfig,
    RLConfig,
    SweepConfig,
    default_config,
    resolve,
)
from mtp.config.sources import local_source
from mtp.data.format import encode_chat_prompt
from mtp.data.rows_dataset import read_rows
from mtp.data.task_data import parse_task_spec
from mtp.data.tasks import make_task
from mtp.data.tokenizer import ByteTokenizer, tokenizer_of
from mtp.decode.engine import Decoder
from mtp.errors import ConvertError
from mtp.model.convert import export_hf, read_weights
from mtp.model.transformer import Transformer
from mtp.programs import PROGRAMS, run_program
from mtp.train import self_distill
from mtp.train.pretrained import with_checkpoint_shapes
from mtp.train.self_distill import dataset_name
from mtp.train.steps import init_train_state, jit_steps, loss_fn

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "tokenizer"
BASE_VOCAB = 400  # the fixture tokenizer's own tokens


def _checkpoint(directory: Path, vocab: int = BASE_VOCAB, n_layers: int = 2) -> Path:
    """A random Llama-family model in HF format, with the fixture's ChatML tokenizer."""
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=n_layers, n_heads=2, n_kv_heads=1)
    export_hf(Transformer(cfg, rngs=nnx.Rngs(3)), directory, arch="llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, directory / name)
    return directory


def _config(hf_dir, **train):
    c = default_config()
    c.model.update(init_from=f"hf:{hf_dir}", max_len=320)
    c.drafter.update(k=2, n_heads=2, head="shared_frozen", draft_vocab=64, detach=True)
    c.data.update(
        corpus="distill:rg_chain_sum:max_terms=3,max_digits=2,n=6", seq_len=256,
        batch_size=4, eval_fraction=0.34, cache_taps=True,
    )  # fmt: skip
    c.train.update(
        steps=3, warmup_steps=1, lr=1e-2, log_every=1, eval_every=3, checkpoint_every=3,
        eval_batches=1, main_lr_scale=0.0,
    )  # fmt: skip
    c.train.update(**train)
    return c


def _shaped_system(c):
    """The resolved run (shapes from its checkpoint), its tokenizer and a fresh system."""
    run = resolve(c)
    tok = tokenizer_of(run)
    run = with_checkpoint_shapes(run, tok)
    system, _ = nnx.merge(*init_train_state(run, tok))
    return run, tok, system


def test_checkpoint_fixes_the_shapes_and_a_tokenizer_larger_than_the_embedding_fails(tmp_path):
    hf = _checkpoint(tmp_path / "hf")
    run = resolve(_config(hf))
    tok = tokenizer_of(run)
    shaped = with_checkpoint_shapes(run, tok)
    assert (shaped.model.d_model, shaped.model.n_layers, shaped.model.n_kv_heads) == (32, 2, 1)
    assert shaped.model.vocab_size == tok.vocab_size == BASE_VOCAB + 4  # pad, think x2, pause
    assert shaped.model.max_len == 320  # the run's own choice stays
    small = _checkpoint(tmp_path / "small", vocab=BASE_VOCAB - 8)
    with pytest.raises(ConvertError, match="tokenizer has 400 tokens but the embedding only 392"):
        with_checkpoint_shapes(resolve(_config(small)), tok)


def test_taps_are_checked_against_the_checkpoints_depth(tmp_path):
    """A checkpoint deeper than the default model takes taps below its own top layer, and
    a tap past it fails in one line naming the field, once the depth is read."""
    deep = _checkpoint(tmp_path / "deep", n_layers=6)
    c = _config(deep)
    c.model.taps = (1, 5, -1)
    run = resolve(c)
    assert with_checkpoint_shapes(run, tokenizer_of(run)).model.tap_layers == (1, 5, 5)
    c.model.taps = (6,)
    run = resolve(c)
    with pytest.raises(
        ConfigError, match=r"model.taps: layer 6 is outside the model; allowed 0..5"
    ):
        with_checkpoint_shapes(run, tokenizer_of(run))


@pytest.mark.parametrize("distill_batch, calls", [(0, [4, 2]), (5, [5, 1])])
def test_self_distillation_generates_in_calls_of_distill_batch_size(
    tmp_path, monkeypatch, distill_batch, calls
):
    """Answers are generated `data.distill_batch_size` rows per call (0: `data.batch_size`)."""
    seen = []

    class Recording(Decoder):
        def generate(self, prompts, **kw):
            seen.append(len(prompts))
            return super().generate(prompts, **kw)

    monkeypatch.setattr(self_distill, "Decoder", Recording)
    c = _config(_checkpoint(tmp_path / "hf"))
    c.data.update(distill_batch_size=distill_batch)
    run, tok, system = _shaped_system(c)
    self_distill.generate_rows(run, tok, system, "train")
    assert seen == calls


def test_self_distillation_calls_take_prompts_of_similar_lengths_rows_keep_their_order(
    tmp_path, monkeypatch
):
    """Prompts go to the decoder shortest first (each prefill as wide as its longest), and
    every row still holds its own prompt, at its place in the task's order."""
    seen = []

    class Recording(Decoder):
        def generate(self, prompts, **kw):
            seen.append([p.size for p in prompts])
            return super().generate(prompts, **kw)

    monkeypatch.setattr(self_distill, "Decoder", Recording)
    run, tok, system = _shaped_system(_config(_checkpoint(tmp_path / "hf")))
    task, n = parse_task_spec(run.data.corpus.removeprefix(self_distill.PREFIX))
    prompts = [encode_chat_prompt(tok, ex.prompt) for ex in task.examples("train", n, start=0)]
    sizes = [p.size for p in prompts]
    assert sizes != sorted(sizes)  # else the order would not be tested
    rows, mask, _ = self_distill.generate_rows(run, tok, system, "train")
    assert sum(seen, []) == sorted(sizes)
    for row, row_mask, prompt in zip(rows, mask, prompts, strict=True):
        np.testing.assert_array_equal(row[: prompt.size], prompt)
        assert row_mask[: prompt.size].sum() == 0 and row_mask[prompt.size] == 1


def test_capped_answers_are_the_whole_answers_first_tokens(tmp_path):
    """`data.distill_max_new` cuts each answer after that many tokens: the same greedy
    tokens as the uncut answer's first ones, under a dataset name of their own."""
    c = _config(_checkpoint(tmp_path / "hf"))
    run, tok, system = _shaped_system(c)
    rows, mask, _ = self_distill.generate_rows(run, tok, system, "train")
    c.data.update(distill_max_new=3)
    capped_run = resolve(c)
    capped, capped_mask, _ = self_distill.generate_rows(capped_run, tok, system, "train")
    assert mask.sum(1).min() > 3  # else the cap would cut nothing
    np.testing.assert_array_equal(capped_mask.sum(1), 3)
    keep = capped_mask > 0
    np.testing.assert_array_equal(capped[keep], rows[keep])
    assert dataset_name(capped_run) != dataset_name(run)


def test_taps_kept_while_generating_replace_the_taps_pass_and_are_read_back(tmp_path, monkeypatch):
    """With cached taps the rows' taps come from the passes that wrote them: no taps pass
    runs, they equal the taps pass's over every window (within float32 rounding), and a
    resumed run reads the same bits back; rows stored without taps get the taps pass."""
    passes = []
    taps_pass = self_distill.main_taps
    monkeypatch.setattr(
        self_distill, "main_taps", lambda *a, **kw: passes.append(1) or taps_pass(*a, **kw)
    )
    run, tok, system = _shaped_system(_config(_checkpoint(tmp_path / "hf")))
    kept = self_distill.distill_arrays(run, tok, system, tmp_path / "run")
    assert passes == []
    again = self_distill.distill_arrays(run, tok, system, tmp_path / "run")
    assert passes == []
    for taps in (tmp_path / "run" / "distill" / "taps").iterdir():
        taps.unlink()  # as rows written before taps were kept
    recomputed = self_distill.distill_arrays(run, tok, system, tmp_path / "run")
    assert passes == [1]
    for split in ("train", "eval"):
        np.testing.assert_array_equal(again[split]["taps"], kept[split]["taps"])
        np.testing.assert_array_equal(recomputed[split]["tokens"], kept[split]["tokens"])
        np.testing.assert_allclose(
            kept[split]["taps"], recomputed[split]["taps"], atol=1e-5, rtol=1e-4
        )
        assert np.abs(kept[split]["taps"]).sum(-1).all(-1).sum() > 10  # windows, not zeros


def test_frozen_recipe_trains_the_drafter_on_the_main_models_own_text(tmp_path):
    hf = _checkpoint(tmp_path / "hf")
    run = resolve(_config(hf))
    workdir = tmp_path / "run"
    run_program(run, workdir)
    saved = json.loads((workdir / "config.json").read_text())["model"]
    assert saved["d_model"] == 32 and saved["vocab_size"] == BASE_VOCAB + 4

    system, loaded = ckpt.load_system(workdir)
    tok = tokenizer_of(loaded)
    # frozen: the main model is the checkpoint's, bit for bit (added rows: the mean row)
    ref = read_weights(f"hf:{hf}")
    np.testing.assert_array_equal(
        system.main.blocks[0].attn.q.kernel[...], ref["blocks.0.attn.q.kernel"]
    )
    embed = np.asarray(system.main.embed.embedding[...])
    np.testing.assert_array_equal(embed[:BASE_VOCAB], ref["embed.embedding"])
    np.testing.assert_allclose(
        embed[BASE_VOCAB:], np.broadcast_to(ref["embed.embedding"].mean(0), (4, 32)), rtol=1e-6
    )

    # the rows are the main model's greedy answers to the task's chat prompts
    rows, mask = read_rows(dataset_name(loaded), workdir / "distill", 256, "train")
    ex = next(
        iter(make_task("rg_chain_sum", max_terms=3, max_digits=2).examples("train", 1, start=0))
    )
    prompt = encode_chat_prompt(tok, ex.prompt)
    np.testing.assert_array_equal(rows[0, : prompt.size], prompt)
    assert mask[0, : prompt.size].sum() == 0 and mask[0, prompt.size] == 1
    out = Decoder(system, tok.specials).generate([prompt], max_new_tokens=256 - prompt.size)
    n = int(mask[0].sum())
    np.testing.assert_array_equal(rows[0, prompt.size : prompt.size + n], out.row(0)[:n])

    # the draft vocabulary: the most frequent targets of those rows, the end token among them
    ids = np.asarray(system.ids())
    assert ids.shape == (64,) and tok.specials.eos in ids
    counts = np.bincount(rows[mask > 0], minlength=system.vocab_size)
    assert counts[ids].sum() == np.sort(counts)[::-1][:64].sum()

    # the drafter alone (`--mode=export_drafter`) starts another run's drafter as trained
    path, _ = ckpt.export_drafter(workdir)
    c = _config(hf)
    c.drafter.update(init_from=str(path))
    _, _, other = _shaped_system(c)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(other.drafter), nnx.state(system.drafter))
    np.testing.assert_array_equal(other.ids(), ids)


def _update(run, tok, batch):
    """Parameters before and after one train step of a fresh system."""
    graphdef, state = init_train_state(run, tok)
    before = jax.tree.map(np.asarray, nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
    train, _ = jit_steps(graphdef, run.train)
    state, _ = train(state, batch)
    after = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
    return before, jax.tree.map(np.asarray, after)


def _max_change(before, after, part):
    return max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(after[part]), jax.tree.leaves(before[part]), strict=True)
    )


def test_main_lr_scale_is_the_main_models_share_of_the_learning_rate():
    c = default_config()
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_len=32)
    c.drafter.update(k=2, n_heads=2)
    c.data.update(seq_len=16, batch_size=2)
    c.train.update(steps=10, warmup_steps=0, lr=1e-3, weight_decay=0.0)
    tok = ByteTokenizer()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    batch = {"tokens": tokens, "loss_mask": jnp.ones((2, 16), jnp.float32)}
    changes = {}
    for scale in (1.0, 0.1, 0.0):
        run = resolve(c).replace(train=dataclasses.replace(resolve(c).train, main_lr_scale=scale))
        before, after = _update(run, tok, batch)
        changes[scale] = (_max_change(before, after, "main"), _max_change(before, after, "drafter"))
    # Adam's first step moves every parameter by about its learning rate
    assert changes[1.0][0] == pytest.approx(1e-3, rel=0.05)
    assert changes[0.1][0] == pytest.approx(1e-4, rel=0.05)
    assert changes[0.0][0] == 0.0
    assert changes[1.0][1] == changes[0.1][1] == changes[0.0][1] == pytest.approx(1e-3, rel=0.05)


@pytest.mark.parametrize("program", ["train", "rl", "pause", "sweep"])
def test_every_program_gets_the_checkpoints_shapes(tmp_path, monkeypatch, program):
    hf = _checkpoint(tmp_path / "hf")
    c = _config(hf)
    c.data.update(corpus="stdlib", cache_taps=False)
    c.program = program
    if program in ("rl", "pause"):
        c.rl = dataclasses.asdict(RLConfig(rollout="pause" if program == "pause" else "think"))
    if program == "pause":
        c.model.use_urgency = True
        c.pause = dataclasses.asdict(PauseConfig())
        c.rl.task = c.pause.task
    if program == "sweep":
        c.sweep = dataclasses.asdict(SweepConfig(prompt_len=16, new_tokens=16))
    seen = {}
    monkeypatch.setitem(PROGRAMS, program, lambda run, workdir, tok: seen.update(run=run, tok=tok))
    run_program(resolve(c), tmp_path / "run")
    assert (seen["run"].model.d_model, seen["run"].model.n_layers) == (32, 2)
    assert seen["run"].model.vocab_size == seen["tok"].vocab_size == BASE_VOCAB + 4


def test_a_drafter_started_from_the_pretrained_top_layer_trains_and_resumes(tmp_path):
    """`drafter.copy_layers` on a pretrained main model: the drafter's block starts as the
    checkpoint's top layer, in arrays of its own (the train state placed from the host and
    donated to each step may hold no buffer twice), and a resumed run restores it."""
    hf = _checkpoint(tmp_path / "hf")
    c = _config(hf)
    c.drafter.update(n_layers=1, copy_layers=(-1,))
    run_program(resolve(c), tmp_path / "run")
    c.train.update(steps=5, eval_every=5, checkpoint_every=5)
    run_program(resolve(c), tmp_path / "run")
    system, _ = ckpt.load_system(tmp_path / "run")
    ref = read_weights(f"hf:{hf}")["blocks.1.attn.q.kernel"]
    moved = np.abs(system.drafter.blocks[0].attn.q.kernel[...] - ref)
    assert ckpt.manager(tmp_path / "run").latest_step() == 5
    assert 0 < moved.mean() < 0.5 * np.abs(ref).mean()  # trained from the copy, not from noise


def test_a_source_that_is_not_there_is_one_line(tmp_path):
    with pytest.raises(ConvertError, match="is not a directory"):
        local_source(f"hf:{tmp_path / 'none'}")
    with pytest.raises(ConvertError, match="is not a file"):
        local_source(f"gguf:{tmp_path / 'none.gguf'}")
    with pytest.raises(ConvertError, match="no named source 'smollm9'; known: smollm2-135m"):
        local_source("named:smollm9")
    assert local_source(f"hf:{tmp_path}") == f"hf:{tmp_path}"


@pytest.mark.parametrize("context", [False, True])
def test_cached_taps_bring_the_prompts_taps_for_a_drafter_that_reads_the_context(tmp_path, context):
    """Rows with cached taps are cut to the answer's window; for a drafter that reads the
    context the taps before each window (the prompt's) come too, right-aligned."""
    c = _config(_checkpoint(tmp_path / "hf"))
    c.drafter.update(context=context)
    run, tok, system = _shaped_system(c)
    out = self_distill.distill_arrays(run, tok, system, tmp_path / "run")["train"]
    rows, mask = read_rows(dataset_name(run), tmp_path / "run" / "distill", 256, "train")
    first = np.argmax(mask > 0, axis=1) - 1  # each row's last prompt token: its window's start
    taps = np.asarray(system.main_taps(jnp.asarray(rows)))
    for i, a in enumerate(first):
        np.testing.assert_array_equal(out["tokens"][i, :8], rows[i, a : a + 8])
        np.testing.assert_allclose(out["taps"][i, :8], taps[i, a : a + 8], atol=1e-4)
    assert ("past_taps" in out) == context
    if context:
        p = out["past_taps"].shape[1]
        assert p == first.max()
        for i, a in enumerate(first):
            np.testing.assert_allclose(out["past_taps"][i, p - a :], taps[i, :a], atol=1e-4)
            assert out["past_mask"][i].tolist() == [0.0] * (p - a) + [1.0] * a


def test_teacher_forced_rows_carry_the_main_models_own_choices(tmp_path):
    """`data.teacher_forced` adds a task's worked solutions, read by the frozen main model:
    each cut to its reply's window with the taps of the full row, its targets the main
    model's greedy choice for each token (the argmax one position before it). On the
    model's own rows those choices, made from the cached taps, are the tokens it wrote; the
    held-out rows are its own alone, scored against their tokens."""
    c = _config(_checkpoint(tmp_path / "hf"))
    c.data.update(teacher_forced="rg_chain_sum:max_terms=3,max_digits=2,n=3")
    run, tok, system = _shaped_system(c)
    out = self_distill.distill_arrays(run, tok, system, tmp_path / "run")
    train = out["train"]
    own, _ = read_rows(dataset_name(run), tmp_path / "run" / "distill", 256, "train")
    n = own.shape[0]
    written = train["loss_mask"][:n] > 0
    np.testing.assert_array_equal(train["targets"][:n][written], train["tokens"][:n][written])
    assert "targets" not in out["eval"]
    rows, mask = self_distill.forced_rows(run, tok)
    assert train["tokens"].shape[0] == n + rows.shape[0]  # one piece each: replies are short
    logits, taps, _ = system.main(jnp.asarray(rows))
    choice = np.asarray(logits.argmax(-1))
    for i in range(rows.shape[0]):
        a, e = np.argmax(mask[i] > 0) - 1, np.flatnonzero(mask[i])[-1] + 1
        got = {k: train[k][n + i, : e - a] for k in ("tokens", "targets", "taps")}
        np.testing.assert_array_equal(got["tokens"], rows[i, a:e])
        np.testing.assert_array_equal(got["targets"][1:], choice[i, a : e - 1])
        np.testing.assert_allclose(got["taps"], np.asarray(taps)[i, a:e], atol=1e-4)
        assert (got["targets"][1:] != got["tokens"][1:]).any()  # a random model's own choices
    # worked solutions of prompts after the corpus's own n = 6
    task = make_task("rg_chain_sum", max_terms=3, max_digits=2)
    first = encode_chat_prompt(tok, task.examples("train", 1, start=6)[0].prompt)
    np.testing.assert_array_equal(rows[0, : first.size], first)


@pytest.mark.parametrize("past", [False, True])
def test_windows_wider_than_the_width_are_cut_into_pieces(past):
    """A window longer than `width` becomes consecutive pieces of at most `width`, each with
    its row's tokens, mask and taps, and (`past`) every tap before it as its past."""
    t, width = 20, 4
    tokens = np.arange(2 * t, dtype=np.int32).reshape(2, t)
    mask = np.zeros((2, t), np.float32)
    mask[0, 3:13] = 1.0  # window 2..13: pieces 2-6, 6-10, 10-13
    mask[1, 15:17] = 1.0  # window 14..17: one piece
    taps = tokens[:, :, None, None].astype(np.float32)
    out = self_distill.generated_windows(tokens, mask, taps, pad=-1, past=past, width=width)
    assert out["tokens"].tolist() == [
        [2, 3, 4, 5],
        [6, 7, 8, 9],
        [10, 11, 12, -1],
        [34, 35, 36, -1],
    ]
    assert out["loss_mask"].sum() == mask.sum()  # each target lands in exactly one piece
    np.testing.assert_array_equal(out["taps"][..., 0, 0][out["tokens"] >= 0],
                                  out["tokens"][out["tokens"] >= 0])  # fmt: skip
    if past:
        p = out["past_taps"].shape[1]
        assert p == 14
        assert out["past_mask"].sum(1).tolist() == [2, 6, 10, 14]
        np.testing.assert_array_equal(out["past_taps"][1, p - 6 :, 0, 0], tokens[0, :6])


def test_packed_windows_lie_end_to_end_in_rows_of_the_width():
    """`pack`: every answer's window (from its last prompt token to its last target) in row
    order, end to end, the stream cut into rows of `width`; 'segments' number the windows
    from 1, padding (the last row's tail alone) is 0."""
    t, width = 20, 4
    tokens = np.arange(3 * t, dtype=np.int32).reshape(3, t)
    mask = np.zeros((3, t), np.float32)
    mask[0, 3:6] = 1.0  # window 2..6
    mask[1, 15:17] = 1.0  # window 14..17 (row 1: tokens 34-36)
    mask[2, 8:11] = 1.0  # window 7..11 (row 2: tokens 47-50)
    taps = tokens[:, :, None, None].astype(np.float32)
    out = self_distill.generated_windows(tokens, mask, taps, pad=-1, width=width, pack=True)
    assert out["tokens"].tolist() == [[2, 3, 4, 5], [34, 35, 36, 47], [48, 49, 50, -1]]
    assert out["segments"].tolist() == [[1, 1, 1, 1], [2, 2, 2, 3], [3, 3, 3, 0]]
    assert out["loss_mask"].sum() == mask.sum()
    assert out["loss_mask"][0].tolist() == [0, 1, 1, 1] and out["loss_mask"][1, 3] == 0
    np.testing.assert_array_equal(out["taps"][..., 0, 0][out["tokens"] >= 0],
                                  out["tokens"][out["tokens"] >= 0])  # fmt: skip


def test_a_packed_row_scores_the_same_drafts_as_its_windows_apart(tmp_path):
    """Windows end to end in one row give the drafter's loss, distillation and accepted length
    of the same windows one per row: a draft near a window's end is never scored against
    the next window's tokens."""
    c = _config(_checkpoint(tmp_path / "hf"), distill_weight=1.0)
    run, tok, system = _shaped_system(c)
    rng = np.random.default_rng(0)
    n, t = 5, 12
    tokens = rng.integers(0, BASE_VOCAB, (n, t)).astype(np.int32)
    mask = np.zeros((n, t), np.float32)
    for i, (a, e) in enumerate([(2, 9), (1, 4), (5, 12), (3, 10), (4, 6)]):
        mask[i, a:e] = 1.0
    taps = rng.normal(size=(n, t, len(run.model.taps), 32)).astype(np.float32)
    apart = self_distill.generated_windows(tokens, mask, taps, pad=tok.specials.pad)
    width = int((apart["tokens"] != tok.specials.pad).sum())
    packed = self_distill.generated_windows(
        tokens, mask, taps, pad=tok.specials.pad, width=width, pack=True
    )
    assert packed["tokens"].shape == (1, width)
    metrics = [loss_fn(system, jax.tree.map(jnp.asarray, b), run.train)[1] for b in (apart, packed)]
    for name in ("loss/draft", "loss/distill", "accepted_len", "agree/draft"):
        np.testing.assert_allclose(metrics[1][name], metrics[0][name], rtol=1e-5, err_msg=name)
