"""The errors a user can act on, kept apart from internal bugs.

``UserError`` subclasses mean "bad input, a missing file, an occupied run directory": the CLI
prints them as one line and exits with status 2. Anything else that escapes is a bug and keeps
its traceback.
"""
from __future__ import annotations

import contextlib

__all__ = ["UserError", "ConfigError", "CheckpointError", "DataError", "RunDirError", "TrainingDiverged",
           "user_input"]


class UserError(Exception):
    """Something the user can fix; the message says what was expected and what was given."""


class ConfigError(UserError, ValueError):
    """A configuration value out of range or of the wrong type."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is safe to load but does not hold what it should (keys, shapes, config)."""


class DataError(UserError, ValueError):
    """Dataset files that are missing pieces, malformed, or do not fit the request."""


class RunDirError(UserError):
    """The output folder is locked by another run, holds results that would be overwritten, or is
    not a writable folder."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite; the last finite checkpoint was kept."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(message)


@contextlib.contextmanager
def user_input(where: str, cls=DataError):
    """Inside, a ValueError is about the user's input (a dataset file, a checkpoint): re-raise it
    as ``cls`` (a UserError) prefixed with ``where``. Use it only around code that reads input."""
    try:
        yield
    except UserError:
        raise
    except ValueError as exc:
        raise cls(f"{where}: {exc}") from exc
