"""Files written whole or not at all.

This module imports nothing from mtp, so every layer can write through it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Writes `path` by calling `write(tmp)` on a fresh name beside it, then flushing that
    file to disk and renaming it over `path`; returns `path`.

    A reader, or a run killed at any moment, sees the old file or the whole new one, never a
    part. Writers racing on one path (hosts launched together) each write their own name and
    the last rename wins; a failed write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
