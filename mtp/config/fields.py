"""What every config section shares: the checks that raise `ConfigError`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from mtp.errors import ConfigError


def check(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {msg}")


def from_dict(cls, section: str, d: Mapping[str, Any] | ml_collections.ConfigDict, **extra):
    """Builds dataclass `cls` from config section `d`, rejecting unknown fields by name."""
    d = dict(d.to_dict() if isinstance(d, ml_collections.ConfigDict) else d)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        check(
            key in names, f"{section}.{key}", f"unknown field; allowed: {', '.join(sorted(names))}"
        )
    d.update(extra)
    return cls(**d)
