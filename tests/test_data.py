"""Tokenizer, corpora (stdlib, files, tfds built here) and the packed, resumable pipeline."""

import dataclasses

import numpy as np
import pytest

from mtp.config import DataConfig
from mtp.data import corpora
from mtp.data.corpora import load_documents, prepare_text_files
from mtp.data.format import insert_pauses
from mtp.data.pipeline import eval_batches, packed_rows, train_iterator
from mtp.data.tokenizer import ByteTokenizer
from mtp.errors import DataError

TOK = ByteTokenizer()
S = TOK.specials


def test_tokenizer_round_trips_text_and_specials():
    text = "héllo <think>x</think> 🙂"
    assert TOK.decode(TOK.encode(text)) == text
    ids = TOK.encode_with_specials(text)
    assert S.think_open in ids.tolist()
    assert TOK.decode(ids, skip_special=False) == text
    assert TOK.decode(ids) == "héllo x 🙂"
    # a pause between the bytes of one character does not break it
    smile = TOK.encode("🙂").tolist()
    assert TOK.decode(smile[:2] + [S.pause] + smile[2:]) == "🙂"


def test_stdlib_split_is_disjoint_deterministic_and_capped():
    cfg = DataConfig(max_bytes=400_000, eval_fraction=0.1)
    train, held = load_documents(cfg, "train"), load_documents(cfg, "eval")
    assert {d.name for d in train}.isdisjoint({d.name for d in held})
    assert sum(len(d.text) for d in train) <= 360_000
    assert 0 < sum(len(d.text) for d in held) <= 40_000
    assert [d.name for d in load_documents(cfg, "train")] == [d.name for d in train]
    assert any(d.name.endswith(".py") for d in train)


def _write(tmp_path, files):
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return tmp_path


def test_files_corpus_splits_by_file_and_cuts_a_single_file(tmp_path):
    root = _write(tmp_path / "c", {f"d/f{i}.txt": f"file {i} " * 50 for i in range(40)})
    cfg = DataConfig(corpus=f"files:{root}", eval_fraction=0.2)
    train, held = load_documents(cfg, "train"), load_documents(cfg, "eval")
    assert len(train) + len(held) == 40 and train and held
    one = _write(tmp_path / "one", {"a.txt": "abcdefghij" * 10})
    cfg1 = DataConfig(corpus=f"files:{one}/a.txt", eval_fraction=0.2)
    tr, ev = load_documents(cfg1, "train"), load_documents(cfg1, "eval")
    assert tr[0].text + ev[0].text == b"abcdefghij" * 10 and len(ev[0].text) == 20


@pytest.mark.parametrize(
    "files, spec, message",
    [
        ({}, "missing", "no such file or directory"),
        ({"e.txt": ""}, "e.txt", "all 1 files are empty"),
        ({"bad.txt": b"ok\xff\xfe"}, "bad.txt", "undecodable bytes at offset 2"),
    ],
)
def test_bad_corpora_name_the_file(tmp_path, files, spec, message):
    _write(tmp_path, files)
    with pytest.raises(DataError, match=message) as e:
        load_documents(DataConfig(corpus=f"files:{tmp_path}/{spec}"), "train")
    assert "\n" not in str(e.value)


def test_tfds_corpus_built_here_reads_like_the_files(tmp_path):
    root = _write(tmp_path / "src", {f"f{i}.txt": f"doc {i}\n" * 30 for i in range(12)})
    spec = prepare_text_files(str(root), "mini", str(tmp_path / "tfds"))
    via_tfds = DataConfig(corpus=spec, data_dir=str(tmp_path / "tfds"), eval_fraction=0.25)
    texts = sorted(d.text for s in ("train", "eval") for d in load_documents(via_tfds, s))
    assert texts == sorted(f"doc {i}\n".encode() * 30 for i in range(12))
    with pytest.raises(DataError, match="no feature 'body'"):
        load_documents(dataclasses.replace(via_tfds, corpus=spec + ":body"), "train")
    with pytest.raises(DataError, match="not_a_dataset"):
        load_documents(DataConfig(corpus="tfds:not_a_dataset:train"), "train")


def test_packing_masks_and_pauses():
    cfg = DataConfig(max_bytes=50_000, seq_len=64, batch_size=4)
    rows, mask = packed_rows(cfg, TOK, "train")
    assert rows.shape[1] == 64 and rows.dtype == np.int32 and mask.shape == rows.shape
    assert (rows == S.bos).sum() >= 1 and (rows == S.eos).sum() >= 1
    assert (mask == 1).all()  # packed text: no pads, no pauses, every token a target
    stream = np.arange(1000, dtype=np.int32) % 200
    paused = insert_pauses(TOK, stream, 0.25, seed=0)
    assert np.array_equal(paused[paused != S.pause], stream)  # order kept, nothing lost
    assert 150 < (paused == S.pause).sum() < 350
    batch = next(train_iterator(dataclasses.replace(cfg, pause_rate=0.2), TOK))
    assert (batch["tokens"] == S.pause).any()
    assert np.array_equal(batch["loss_mask"] == 0, batch["tokens"] == S.pause)
    held = eval_batches(cfg, TOK, 100)
    assert held[-1]["tokens"].shape == (4, 64)
    assert np.array_equal(held[-1]["loss_mask"] == 0, held[-1]["tokens"] == S.pad)


def test_iterator_resumes_exactly_and_hosts_split_the_batch():
    cfg = DataConfig(max_bytes=60_000, seq_len=32, batch_size=4)
    it = train_iterator(cfg, TOK)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(3)]
    again = train_iterator(cfg, TOK)
    again.set_state(state)
    assert all(np.array_equal(next(again)["tokens"], e) for e in expected)
    first = next(train_iterator(cfg, TOK))["tokens"]
    halves = [next(train_iterator(cfg, TOK, i, 2))["tokens"] for i in range(2)]
    assert all(h.shape == (2, 32) for h in halves)
    # the hosts' halves together are exactly the single-host global batch
    assert sorted(r.tobytes() for h in halves for r in h) == sorted(r.tobytes() for r in first)
    with pytest.raises(DataError, match="divisible"):
        train_iterator(cfg, TOK, 0, 3)


def test_corpus_shorter_than_a_row_is_an_error(tmp_path):
    root = _write(tmp_path, {f"f{i}.txt": "x" for i in range(30)})
    cfg = DataConfig(corpus=f"files:{root}", seq_len=512)
    with pytest.raises(DataError, match="fewer than one row of data.seq_len=512"):
        packed_rows(cfg, TOK, "train")


def test_unit_hash_is_stable():
    assert corpora.unit("a/b.py") == corpora.unit("a/b.py")
    assert 0 <= corpora.unit("x") < 1
