"""Errors about the user's input or environment: each is reported as one paragraph, without a traceback,
by the command that meets it (see `report`)."""

from __future__ import annotations

import sys


class EditflowError(Exception):
    """Bad input, a bad config value or an unusable file; the message says which and what to do."""


class ConfigError(EditflowError, ValueError):
    """A config value (the message starts with its key) that cannot work."""


class DataError(EditflowError, RuntimeError):
    """Training data that cannot be used: a set with no samples, or too many unreadable samples."""


class CheckpointError(EditflowError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def report(command: str, err: BaseException, code: int = 1) -> None:
    """Print `err` as `editflow COMMAND: error: ...` on stderr and exit with `code`."""
    print(f"editflow {command}: error: {err}", file=sys.stderr)
    sys.exit(code)
