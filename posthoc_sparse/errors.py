"""Errors a user can cause. The CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A bad input the user can fix: the message names the bad value and the fix, in one line."""


class GateMismatchError(UserError):
    """A gate artifact does not fit the model it is applied to."""


class Interrupted(BaseException):
    """A run stopped on Ctrl-C (SIGINT) at a safe point; the message says what was kept and how to continue.

    A BaseException like KeyboardInterrupt, so no ``except Exception`` swallows it, but not a KeyboardInterrupt,
    so click does not turn it into a bare exit code: the CLI prints the message and exits with code 130.
    """


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when the message is empty), cut at ``limit``."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]
