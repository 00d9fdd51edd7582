"""What every config section shares: the user-facing errors and the checks that raise them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint); `mtp.run` prints it on one line."""


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the field and what is allowed."""


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


def task_section(cls, section: str, config):
    """Section `section` as a `cls`, None if the config has none; its `task` spec must parse."""
    if section not in config:
        return None
    sc = from_dict(cls, section, config[section])
    from mtp.data.task_data import parse_task_spec  # tasks import this module

    try:
        parse_task_spec(sc.task)
    except ConfigError as e:
        raise ConfigError(f"config.{section}.task: {e}") from None
    return sc
