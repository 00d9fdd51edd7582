"""Decoding modes by name; each is a frozen dataclass behind the protocol of `base.Mode`."""

from __future__ import annotations

from mtp.decode.modes.adaptive import Adaptive
from mtp.decode.modes.base import Mode
from mtp.decode.modes.fast import Fast
from mtp.decode.modes.pause import Pause
from mtp.decode.modes.slow import Slow
from mtp.decode.modes.speculative import Speculative
from mtp.decode.modes.think import Think
from mtp.errors import DecodeError

MODES: dict[str, type[Mode]] = {
    m.name: m for m in (Slow, Fast, Adaptive, Speculative, Think, Pause)
}


def make_mode(mode: str | Mode) -> Mode:
    """A mode object from its name (modes with options are passed as objects)."""
    if isinstance(mode, Mode):
        return mode
    if mode not in MODES:
        raise DecodeError(f"decode mode {mode!r} is unknown; allowed: {', '.join(MODES)}")
    return MODES[mode]()


__all__ = [
    "MODES",
    "Adaptive",
    "Fast",
    "Mode",
    "Pause",
    "Slow",
    "Speculative",
    "Think",
    "make_mode",
]
