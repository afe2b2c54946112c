"""Errors the CLI turns into one clear line and an exit code, never a traceback.

Exit codes are part of the CLI's contract: 0 ok, 1 the operation failed, 2 bad input.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class ClawError(Exception):
    """An operation failed for a reason the user can act on (exit 1)."""

    exit_code = EXIT_FAILED


class BadInput(ClawError):
    """The user gave us something malformed: a file, a field, an argument (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class BadInputs(BadInput):
    """Several problems found in one pass over an input; each is its own line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))
