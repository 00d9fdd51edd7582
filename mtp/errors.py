"""The user-facing errors: `mtp.run` prints any `UserError` on one line and exits with status 2.

This module imports nothing from mtp, so every layer can raise them.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, data, run directory) or a run that must stop; one line, no traceback."""


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the field and what is allowed."""


class DataError(UserError):
    """The corpus or task data cannot be read as configured; the message names the file or field."""


class DecodeError(UserError, ValueError):
    """A decode request is malformed (mode, prompt, lengths); the message says what is allowed."""


class CheckpointError(UserError):
    """A run directory or checkpoint cannot be used (missing, or written by another model)."""


class DamagedCheckpoint(CheckpointError):
    """A saved step is damaged (a file missing, truncated or unreadable); the message names it."""


class ConvertError(UserError):
    """A pretrained checkpoint or tokenizer cannot be loaded into (or written from) mtp's
    model; the message names the file and what is allowed."""


class NonFiniteLoss(UserError):
    """The loss, grad norm or parameters became NaN or Inf; the run stops, its last good
    checkpoint kept."""
