"""The benchmark scripts end to end on tiny systems: their rows, files and commands."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode.engine import Decoder
from mtp.model import packed_products
from mtp.model.convert.drafter_file import save_drafter
from mtp.model.packed_products import available as packed_available
from mtp.model.system import MTPSystem

HAS_AVX512 = Path("/proc/cpuinfo").exists() and "avx512f" in Path("/proc/cpuinfo").read_text()

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decode  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import handwritten_products  # noqa: E402
import pass_cost  # noqa: E402
import pass_profile  # noqa: E402
import slow_batches  # noqa: E402
import tree_width  # noqa: E402

TINY_EXPERIMENT = """
from mtp.config import default_config
def get_config(arg=None):
    c = default_config()
    c.model.update(d_model=32, n_layers=2, n_heads=4, max_len=96)
    c.drafter.update(k=2, n_heads=4)
    c.data.update(seq_len=64)
    return c
"""


def test_the_decode_benchmark_writes_its_rows_json_and_plot(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = "--random --modes=slow,speculative,tree,fast --batches=1,8 --repeats=1 --prompts=2"
    # 52 new tokens: "def main(" (10 tokens) decodes on 64 slots slow, on 96 with a tree
    argv = [*argv.split(), "--max_new_tokens=52", "--bandwidth_gib=0.01", "--cache_len=128"]
    out = decode.main([*argv, f"--json={path}"])
    assert out["cache_len"] == 128  # of the random system's 256
    rows = {(r["batch"], r["mode"]): r for r in json.loads(path.read_text())["results"]}
    assert rows.keys() == {
        (b, m) for b in (1, 8) for m in ("slow", "speculative", "tree", "fast", "bandwidth bound")
    }
    assert rows[1, "speculative"]["ran_as"] == "speculative"
    assert rows[8, "speculative"]["ran_as"] == "slow"  # past the CPU limit of 4 rows
    assert rows[1, "speculative"]["identical_to_slow"] and rows[1, "tree"]["identical_to_slow"]
    assert rows[8, "speculative"]["mean_accepted"] is None
    assert rows[1, "fast"]["tokens_per_pass"] > 2  # k = 4 drafts kept per pass
    assert rows[8, "bandwidth bound"]["tokens_per_s"] == pytest.approx(
        8 * out["read_bandwidth_bytes_per_s"] / out["weight_bytes"]
    )
    assert path.with_suffix(".png").stat().st_size > 1000
    assert "reproduce: python benchmarks/decode.py --random" in capsys.readouterr().out


@pytest.mark.skipif(not packed_available(), reason="needs the packed kernel")
def test_the_decode_benchmark_sets_xla_products_beside_packed_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(packed_products, "MIN_BYTES", 0)  # the random system's weights: packed
    argv = "--random --modes=slow,speculative --xla_modes=speculative --batches=1 --repeats=1"
    out = decode.main([*argv.split(), "--prompts=2", "--max_new_tokens=8",
                       "--bandwidth_gib=0.01", f"--json={tmp_path / 'b.json'}"])  # fmt: skip
    rows = [(r["mode"], r.get("packed_products")) for r in out["results"]]
    assert rows == [("slow", True), ("speculative", True), ("speculative", False),
                    ("bandwidth bound", None)]  # fmt: skip
    assert all(r["identical_to_slow"] for r in out["results"] if r["mode"] == "speculative")
    assert "| 1 | speculative (XLA products) (= slow) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--xla_modes: a subset of --modes"):
        decode.main([*argv.split(), "--modes=slow"])


def test_the_decode_benchmark_times_peers_in_the_same_rounds_as_mtp(tmp_path, monkeypatch):
    """Every timed round runs every mtp mode and every peer, so that their ratio shares the
    machine's drift; a peer's rows are compared with mtp slow's. (A stand-in peer: the real
    ones need the optional extras.) Every mtp call runs at --matmul_precision."""
    import jax

    from mtp.decode.engine import Decoder

    events, generate, precisions = [], Decoder.generate, set()

    def logged(self, prompts, **kw):
        events.append("mtp")
        precisions.add(jax.config.jax_default_matmul_precision)
        return generate(self, prompts, **kw)

    def stand_in(name, files, batch, **kw):  # emits each prompt's last token, at batch 1
        def run(prompts):
            events.append(name)
            return [p[-1:] for p in prompts]

        return run if batch == 1 else None

    monkeypatch.setattr(Decoder, "generate", logged)
    monkeypatch.setattr(decode, "peer_runner", stand_in)
    monkeypatch.setattr(decode, "peer_files", lambda *a: {})
    argv = "--random --modes=slow --batches=1,2 --prompts=2 --repeats=3 --peer_repeats=2"
    out = decode.main([*argv.split(), "--max_new_tokens=4", "--bandwidth_gib=0.01",
                       "--peers=llamacpp_f32", "--matmul_precision=float32",
                       f"--json={tmp_path / 'b.json'}"])  # fmt: skip
    assert precisions == {"float32"} and out["machine"]["matmul_precision"] == "float32"
    assert jax.config.jax_default_matmul_precision is None  # restored for the rest
    # batch 1: compile (2 calls), warm-up (2), then rounds of mtp (2) and the peer (2)
    timed = "".join("m" if e == "mtp" else "p" for e in events[4:12])
    assert timed == "mmppmmpp" and events[12:14] == ["mtp", "mtp"]  # a third round: mtp only
    assert events[14:] == ["mtp"] * 4  # batch 2: one call to compile, one per round; no peer
    rows = {
        (r["batch"], r["mode"]): r for r in json.loads((tmp_path / "b.json").read_text())["results"]
    }
    assert (1, "llamacpp_f32") in rows and (2, "llamacpp_f32") not in rows
    assert rows[1, "llamacpp_f32"]["same_rows"] == 0.0  # one token each, not slow's rows


def test_the_pass_cost_benchmark_splits_a_speculative_pass(tmp_path, capsys):
    exp = tmp_path / "tiny.py"
    exp.write_text(TINY_EXPERIMENT)
    argv = [f"--config={exp}", "--context=16", "--new_tokens=8", "--repeats=2", "--widths=3,5"]
    runs = pass_cost.main([*argv, "--tree_nodes=3", "--tree_beams=2"])
    assert set(runs) == ({"xla", "packed"} if packed_available() else {"xla"})
    ms = runs["xla"]
    assert set(ms) >= {
        "main, 1 token (slow's pass)", "main, 3 tokens (verification)", "main, 5 tokens",
        "drafter, 2 steps", "speculative loop, per pass",
        "main's weight products alone, one after the other",
        "main's weight products alone, independent",
        "main, 4 tokens", "drafter, tree of 3 nodes (2 beams, depth 2)",
        "tree of 3 nodes loop, per pass", "tree of 3 nodes bookkeeping (loop - main - drafter)",
    }  # fmt: skip
    assert "main, 3 tokens" not in ms  # the verification width is timed once
    for ms in runs.values():
        assert set(ms) == set(runs["xla"])
        assert all(v > 0 for n, v in ms.items() if "loop" not in n and "bookkeeping" not in n)
    # (the loop figures are differences of wall times: at this size, noise)
    out = capsys.readouterr().out
    assert f"reproduce: python benchmarks/pass_cost.py --config={exp}" in out
    assert ("packed / xla |" in out) == packed_available()


@pytest.mark.skipif(
    not (HAS_AVX512 and shutil.which("g++")), reason="the kernel needs g++ and AVX-512"
)
def test_the_handwritten_kernel_multiplies_as_xla_and_both_are_timed(capsys):
    """The kernel's products equal XLA's (checked inside, on every product shape) at 1, 3
    and 8 rows (odd output widths: the unpaired last row), and both chains are timed."""
    argv = ["--d_model=32", "--q_width=48", "--kv_width=17", "--ff=16", "--layers=1"]
    rows = handwritten_products.main([*argv, "--rows=1,3,8", "--repeats=1"])
    assert [m for m, *_ in rows] == [1, 3, 8]
    assert all(xla > 0 and own > 0 for _, xla, own in rows)
    assert "reproduce: python benchmarks/handwritten_products.py --d_model=32" in (
        capsys.readouterr().out
    )


def test_the_slow_batches_benchmark_times_every_batch(tmp_path, capsys):
    experiment = tmp_path / "tiny_experiment.py"
    experiment.write_text(TINY_EXPERIMENT)
    rows = slow_batches.main([f"--config={experiment}", "--batches=1,3", "--max_new_tokens=4"])
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["ms_per_pass"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert "command:" in capsys.readouterr().out


def test_a_benchmark_reads_a_drafter_file_onto_its_experiments_main_model(tmp_path):
    """`--config=EXP --drafter=FILE` (every benchmark's source arguments): the experiment's
    system with the file's drafter, not a fresh one; `--drafter` with a run directory is
    refused."""
    exp = tmp_path / "tiny.py"
    exp.write_text(TINY_EXPERIMENT)
    system, _ = pass_cost.system_from_args(decode._args([f"--config={exp}"]))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(system.drafter)):
        var[...] = rng.normal(size=var.shape).astype(var.dtype)
    path = save_drafter(system, tmp_path / "drafter.safetensors")
    args = decode._args([f"--config={exp}", f"--drafter={path}", "--batches=1"])
    loaded, _ = pass_cost.system_from_args(args)
    want = nnx.to_flat_state(nnx.state(system.drafter))
    got = dict(nnx.to_flat_state(nnx.state(loaded.drafter)))
    for p, var in want:
        np.testing.assert_array_equal(got[p][...], var[...], err_msg=str(p))
    with pytest.raises(SystemExit, match="--drafter and --dtype go with --config"):
        pass_cost.system_from_args(pass_cost._args(["--workdir=runs/x", f"--drafter={path}"]))


def test_the_tree_width_benchmark_sets_a_chain_and_a_tree_of_one_width_side_by_side(capsys):
    """Its chain at width k + 1 is the speculative mode's chain (same accepted lengths), no
    path is deeper than the width allows, and the rows equal slow's (checked inside); on a
    small vocabulary a random drafter is accepted often enough to compare."""
    specials = ByteTokenizer().specials
    main = ModelConfig(vocab_size=7, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=40)
    drafter = DrafterConfig(kind="transformer", k=3, n_heads=4)
    dec = Decoder(MTPSystem(main, drafter, pad_id=specials.pad, rngs=nnx.Rngs(3)), specials)
    prompts = [np.array([1, 3]), np.array([4, 0, 2, 5]), np.array([6, 6])]
    kw = dict(max_new_tokens=20, stop_id=-1)
    rows = tree_width.compare(dec, prompts, kw, widths=(2, 4), beams=3, depth=3)
    assert [r["width"] for r in rows] == [2, 4]
    chain = [dec.generate([p], mode="speculative", **kw).accept_hist for p in prompts]
    hist = sum(chain)
    want = float((np.arange(len(hist)) * hist).sum() / hist.sum())
    assert rows[1]["chain"]["mean_accepted"] == pytest.approx(want) and want > 0.3
    for r in rows:
        for kind in ("chain", "tree"):
            assert all(x == 0 for x in r[kind]["by_depth"][r["width"] - 1 :]), (r, kind)
        assert r["tree"]["mean_accepted"] > 0 and r["chain"]["mean_accepted"] > 0
    with pytest.raises(AssertionError, match="a row differs from slow"):
        tree_width.accepted(dec, prompts[:1], "speculative", kw, [np.array([0, 1])])


def test_the_pass_profile_splits_each_pass_into_its_ops(tmp_path, capsys):
    """Per width: every traced run is one pass (the script raises otherwise); busy time is the
    union of the ops' intervals, so it is at most the span and at most the ops' summed time."""
    exp = tmp_path / "tiny.py"
    exp.write_text(TINY_EXPERIMENT)
    argv = [f"--config={exp}", "--widths=1,3", "--context=8", "--slots=32", "--repeats=3"]
    out = pass_profile.main(argv)
    assert set(out) == {1, 3}
    for p in out.values():
        assert len(p["runs"]) == 3
        for r in p["runs"]:
            summed = sum(r["kinds"].values())  # overlapping ops count twice here
            assert 0 < r["busy"] <= r["span"] + 1e-6 and r["busy"] <= summed + 1e-6
        assert p["idle"] == pytest.approx(p["span"] - p["busy"])
        assert p["span"] * 1e3 == pytest.approx(sorted(r["span"] for r in p["runs"])[1])
        assert p["ops"] >= 10 and any("dot" in k or "fusion" in k for k in p["kinds"])
    assert "reproduce: python benchmarks/pass_profile.py" in capsys.readouterr().out


def test_the_pass_profile_measures_busy_time_as_the_union_of_op_intervals():
    ev = lambda ts, dur, op: {"ts": ts, "dur": dur, "args": {"hlo_op": op}}
    ops = [ev(0, 10, "dot.1"), ev(2, 2, "copy.4"), ev(6, 6, "fusion.2"), ev(30, 5, "dot.3.1")]
    got = pass_profile.split(ops)
    assert (got["span"], got["busy"], got["idle"]) == (35, 17, 18)
    assert got["kinds"] == {"dot": 15, "copy": 2, "fusion": 6}
    assert got["counts"] == {"dot": 2, "copy": 1, "fusion": 1}
