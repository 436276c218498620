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

    @contextmanager
    def session(self) -> Iterator["Reporter"]:
        if self.quiet:
            yield self
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        with self._progress:
            yield self
        self._progress = None

    def task(self, description: str, total: int | None):
        if self.quiet or self._progress is None:
            return lambda n=1: None
        tid = self._progress.add_task(description, total=total)
        return lambda n=1: self._progress.advance(tid, n) if self._progress is not None else None

    def log(self, message: str) -> None:
        if not self.quiet:
            err.print(message)


def print_json(obj: Any) -> None:
    """Machine-readable result on stdout (plain print: rich would wrap long lines)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()
