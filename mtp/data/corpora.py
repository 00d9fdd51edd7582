"""Text corpora as lists of documents: the bundled stdlib, local files, tfds datasets.

`DataConfig.corpus` picks the kind:
  'stdlib'                       this Python's standard-library .py files (no tests,
                                 no site-packages; files that are not UTF-8 skipped)
  'files:PATH_OR_GLOB'           one file, a directory (every non-hidden file below
                                 it) or a glob; every file must be UTF-8 text
  'tfds:NAME[/CONFIG]:SPLIT[:FEATURE]'  a tfds dataset prepared in array_record
                                 format under `data_dir`; FEATURE defaults to 'text'.
                                 SPLIT may be sliced ('train[:10%]'). `TextFiles`
                                 packages local files as such a dataset.

Every kind splits train/eval the same way. A document is held out for eval iff
`unit(key) < eval_fraction`, where `unit` is a stable hash of its key (the path
relative to the corpus root, or the record index within the tfds SPLIT) mapped
to [0, 1): the split does not depend on the seed, on max_bytes, or on the order
in which files are found. If that leaves a split with no document (a corpus of
one or a few files), every document is cut instead: its last eval_fraction of
bytes is eval, the rest train. `max_bytes` caps the bytes read: train gets
(1 - eval_fraction) of it, eval the rest, each filled with documents in hash
order (a fixed pseudo-random sample), the last one cut to fit.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
import re
import sysconfig
from collections.abc import Callable, Sequence

import tensorflow_datasets as tfds

from mtp.config import DataConfig
from mtp.errors import DataError

SPLITS = ("train", "eval")
# Directories of the standard library that are not its own source.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# NAME[/CONFIG]:SPLIT[:FEATURE]; SPLIT may hold bracketed slices such as 'train[:10%]'.
_TFDS_SPEC = re.compile(r"(?P<name>[^:]+):(?P<split>(?:[^:\[]|\[[^\]]*\])+)(?::(?P<feature>\w+))?")


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # key within the corpus: relative path, or tfds record index
    text: bytes


def load_documents(cfg: DataConfig, split: str) -> list[Document]:
    """The documents of `split` ('train' or 'eval') of `cfg.corpus`, in hash order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.corpus == "stdlib":
        keys, read = _stdlib()
    elif cfg.corpus.startswith("files:"):
        keys, read = _files(cfg.corpus.removeprefix("files:"))
    else:
        keys, read = _tfds(cfg.corpus.removeprefix("tfds:"), cfg.data_dir)
    return _take(keys, read, cfg, split)


def unit(key: str) -> float:
    """Stable hash of `key` in [0, 1), the same on every machine and Python run."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _take(keys: Sequence[str], read: Callable[[str], bytes | None], cfg: DataConfig, split: str):
    """Documents of `split` under the rule in the module docstring."""
    f = cfg.eval_fraction
    u = {k: unit(k) for k in keys}
    order = sorted(keys, key=u.__getitem__)
    n_eval = sum(u[k] < f for k in order)
    cut = n_eval in (0, len(order))
    if not cut:
        order = [k for k in order if (u[k] < f) == (split == "eval")]
    budget = math.inf
    if cfg.max_bytes:
        n_train = round(cfg.max_bytes * (1 - f))
        budget = n_train if split == "train" else cfg.max_bytes - n_train
    docs = []
    for key in order:
        if budget <= 0:
            break
        text = read(key)
        if not text:
            continue
        if cut:
            i = int(len(text) * (1 - f))
            text = text[:i] if split == "train" else text[i:]
        text = text[: min(len(text), budget)]
        if text:
            budget -= len(text)
            docs.append(Document(key, text))
    return docs


def _utf8(path: str) -> bytes:
    """Bytes of `path`; DataError naming the file and offset if they are not UTF-8."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"file {path}: undecodable bytes at offset {e.start}; corpora must be UTF-8 text"
        ) from None
    return data


def _stdlib():
    root = sysconfig.get_paths()["stdlib"]
    paths = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _STDLIB_SKIP]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(d, name)
                paths[os.path.relpath(path, root).replace(os.sep, "/")] = path

    def read(key):
        try:
            return _utf8(paths[key])
        except DataError:
            return None

    return sorted(paths), read


def find_text_files(pattern: str) -> dict[str, str]:
    """{key: path} for a file, a directory (every non-hidden file below it) or a glob.

    Keys are paths relative to the directory (or the glob's fixed prefix), so a
    corpus that moves keeps its train/eval split. DataError if nothing is found
    or every file is empty.
    """
    spec = f"data.corpus 'files:{pattern}'"
    if glob.has_magic(pattern):
        parts = pattern.split(os.sep)
        n_fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
        root = os.sep.join(parts[:n_fixed]) or "."
        found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not found:
            raise DataError(f"{spec}: the glob matched no files")
    elif os.path.isdir(pattern):
        root, found = pattern, []
        for d, dirs, files in os.walk(pattern):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            found += [os.path.join(d, x) for x in files if not x.startswith(".")]
        if not found:
            raise DataError(f"{spec}: the directory holds no files")
    elif os.path.isfile(pattern):
        root, found = os.path.dirname(pattern) or ".", [pattern]
    else:
        raise DataError(f"{spec}: no such file or directory")
    if all(os.path.getsize(p) == 0 for p in found):
        raise DataError(f"{spec}: all {len(found)} files are empty")
    return {os.path.relpath(p, root).replace(os.sep, "/"): p for p in sorted(found)}


def _files(pattern: str):
    paths = find_text_files(pattern)
    return sorted(paths), lambda key: _utf8(paths[key])


def _tfds(spec: str, data_dir: str):
    where = f"data.corpus 'tfds:{spec}'"
    m = _TFDS_SPEC.fullmatch(spec)
    if not m:
        raise DataError(f"{where}: expected 'tfds:NAME[/CONFIG]:SPLIT[:FEATURE]'")
    name, split, feature = m["name"], m["split"], m["feature"] or "text"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except ValueError as e:  # DatasetNotFoundError and unknown configs
        raise DataError(f"{where}: {_first_line(e)}") from None
    if not builder.is_prepared():
        raise DataError(
            f"{where}: dataset not prepared in {builder.data_dir}; prepare it there in "
            "array_record format (set data.data_dir), e.g. with mtp.data.corpora.TextFiles"
        )
    features = list(builder.info.features.keys())
    if feature not in features:
        raise DataError(f"{where}: no feature {feature!r}; features: {', '.join(features)}")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except (ValueError, NotImplementedError) as e:  # unknown split, tfrecord format
        raise DataError(f"{where}: {_first_line(e)}") from None

    def read(key):
        text = source[int(key)][feature]
        return text.encode("utf-8") if isinstance(text, str) else bytes(text)

    return [str(i) for i in range(len(source))], read


def _first_line(e: Exception) -> str:
    return str(e).strip().split("\n")[0]


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Local UTF-8 text files as the tfds dataset `text_files/CONFIG`, split 'train'.

    One example per file: {'text': bytes, 'path': key relative to the root}.
    Build it with `prepare_text_files` (no TensorFlow needed), then read it as
    corpus 'tfds:text_files/CONFIG:train' with the same data_dir.
    """

    VERSION = tfds.core.Version("1.0.0")
    # No checksums file beside the code. (tfds 4.9.10 would otherwise look for one
    # through `importlib_resources`, a package it uses but does not depend on.)
    code_path = None

    def __init__(self, *, pattern: str = "", **kwargs):
        self._pattern = pattern
        super().__init__(**kwargs)

    def _info(self):
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": text, "path": text})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(find_text_files(self._pattern))}

    def _generate_examples(self, paths: dict[str, str]):
        for key, path in paths.items():
            yield key, {"text": _utf8(path), "path": key}


def prepare_text_files(pattern: str, name: str, data_dir: str) -> str:
    """Builds `TextFiles` from `pattern` as config `name` in `data_dir`; returns its corpus spec."""
    builder = TextFiles(
        pattern=pattern,
        config=tfds.core.BuilderConfig(name=name),
        data_dir=data_dir,
        file_format="array_record",
    )
    builder.download_and_prepare()
    return f"tfds:text_files/{name}:train"
