"""Shared terminal helpers for the CLI layer: diagnostics and progress on stderr, results on stdout."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
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

from ..errors import C2MFError, UsageError

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


def check_output_file(path: Path, option: str = "--out") -> None:
    """Fail before any work when `path` cannot be written as a file (a folder, or under a file / read-only folder)."""
    if path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a folder: give a file path, e.g. {str(path / 'dict.safetensors')!r}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise C2MFError(f"cannot write {option} {str(path)!r}: folder {str(parent)!r} is not writable; "
                        "choose another path")


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Fail before any work when `path` cannot be used as an output folder (it is a file, or is below one)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        what = "is a file" if p == path else f"is below {str(p)!r}, which is a file"
        raise UsageError(f"{option} {str(path)!r} {what}: give a folder path")
    if not os.access(p, os.W_OK):
        raise C2MFError(f"cannot write into {option} {str(path)!r}: {str(p)!r} is not writable; choose another folder")
