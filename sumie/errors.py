"""Errors a user can act on: each message names the problem and the fix."""

from __future__ import annotations


class SumieError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero, without a traceback."""


class CheckpointError(SumieError):
    """A model file cannot be read, is unsafe, or has an unknown or inconsistent layout."""


class ConfigError(SumieError):
    """Settings that do not fit together (unknown option, wrong value)."""


class NaNError(SumieError):
    """A network produced NaN or infinite values (names the stage: UNet step k, VAE decode) and how to avoid it."""
