"""Exception classes.

Every error that a user can cause derives from :class:`MarsScaleError` and from the matching
builtin, so ``except ValueError`` keeps working. The CLI prints the message of a
``MarsScaleError`` as one line and exits with code 2.
"""

from __future__ import annotations

import numbers

__all__ = [
    "MarsScaleError",
    "InputError",
    "StoreError",
    "ConfigError",
    "CheckpointMismatchError",
    "TrainingError",
    "TrainingInterrupted",
    "positive_int",
]


class MarsScaleError(Exception):
    """Base class of every error caused by input, configuration or on-disk state."""


class InputError(MarsScaleError, ValueError):
    """An input file (h5ad) or an argument is unusable."""


class StoreError(MarsScaleError, ValueError):
    """An atlas store is missing, damaged, locked or of an unsupported version."""


class ConfigError(MarsScaleError, ValueError):
    """A configuration value or file is invalid."""


class CheckpointMismatchError(MarsScaleError, ValueError):
    """A saved model does not match the store it is applied to."""


class TrainingError(MarsScaleError, RuntimeError):
    """Training cannot go on (non-finite loss, a dead rank)."""


class TrainingInterrupted(MarsScaleError, RuntimeError):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint that resumes exactly.

    Attributes
    ----------
    signum
        The signal received.
    exit_code
        ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), what the CLI exits with.
    """

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def positive_int(value: object, *, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (a Python or numpy integer, not a bool).

    Parameters
    ----------
    value
        The value to check.
    name
        The option's name, for the message.

    Returns
    -------
    int
        ``int(value)``.

    Raises
    ------
    ConfigError
        If ``value`` is not a positive integer.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)
