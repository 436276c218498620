"""Errors a user can cause. The CLI prints them as one `Error: ...` line and exits non-zero, with no traceback."""

from __future__ import annotations


class C2MFError(Exception):
    """A problem with the user's input or environment: the message names the problem and the way out."""

    exit_code: int = 1


class UsageError(C2MFError):
    """Bad option values or combinations (exit code 2, like click's usage errors)."""

    exit_code = 2
