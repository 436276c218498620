"""Shared terminal helpers for the CLI layer: diagnostics and progress on stderr, results on stdout."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class Reporter:
    """Progress callbacks the library accepts: `task(description, total)` returns an `advance(n)` callable.

    The library never imports rich; it calls whatever reporter it is given. `Reporter(quiet=True)` is silent.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None
        self._active = False

    @contextmanager
    def session(self) -> Iterator["Reporter"]:
        """The span in which `task` shows bars. The display starts with the first task, so a command that
        fails before any work prints its `Error:` line alone (an idle display would leave a blank line)."""
        self._active = not self.quiet
        try:
            yield self
        finally:
            self._active = False
            if self._progress is not None:
                self._progress.stop()
                self._progress = None

    def task(self, description: str, total: int | None):
        if not self._active:
            return lambda n=1: None
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            )
            self._progress.start()
        tid = self._progress.add_task(description, total=total)
        return lambda n=1: self._progress.advance(tid, n) if self._progress is not None else None

    def log(self, message: str) -> None:
        """One diagnostic line on stderr. Not markup: paths such as `birds/[juvenile]/x.jpg` print as they are."""
        if not self.quiet:
            err.print(message, markup=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    """Machine-readable result on stdout (plain print: rich would wrap long lines)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()
