"""Shared terminal helpers for the CLI layer: diagnostics and progress on stderr, results on stdout."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .._io import dumps
from ..errors import C2MFError, UsageError
from ..progress import Advance, no_progress

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class PlainTask:
    """One task written as plain lines, for logs (SLURM, `2> log`) where a bar would appear only at the end.

    A line at the start, one every `interval` seconds while work advances, and one at the end:
    `[extract layer3] 120/400 (30%), 4.1/s, elapsed 0:00:30, ETA 0:01:08; note`.
    """

    def __init__(self, description: str, total: int | None, write: Callable[[str], None], interval: float,
                 clock: Callable[[], float]) -> None:
        self.description, self.total, self.done = description, total, 0
        self.note: str | None = None
        self._write, self._interval, self._clock = write, interval, clock
        self._start = self._last = clock()
        self.finished = False
        self._write(f"[{description}] started" + (f", {total} to do" if total is not None else ""))

    def advance(self, n: int = 1, *, total: int | None = None, note: str | None = None) -> None:
        if self.finished:
            return
        self.done += n
        if total is not None:
            self.total = total
        if note is not None:
            self.note = note
        now = self._clock()
        if self.total is not None and self.done >= self.total:
            self.finish()
        elif now - self._last >= self._interval:
            self._last = now
            self._write(self.line(now))

    def finish(self, status: str = "done") -> None:
        """The last line: at completion, or when the session ends (`stopped` when it ends by an error)."""
        if not self.finished:
            self.finished = True
            self._write(self.line(self._clock(), status))

    def line(self, now: float, status: str | None = None) -> str:
        elapsed = max(now - self._start, 0.0)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total} ({self.done / self.total:.0%})" if self.total else f"{self.done}"
        parts = [f"[{self.description}] {count}", f"{rate:.3g}/s" if rate else "-/s", f"elapsed {_clock(elapsed)}"]
        if status is not None:
            parts.append(status)
        elif self.total is not None and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        text = ", ".join(parts)
        return f"{text}; {self.note}" if self.note else text


class Reporter:
    """Progress callbacks the library accepts: `task(description, total)` returns an `advance(n)` callable.

    The library never imports rich; it calls whatever reporter it is given. On a terminal, rich bars; when stderr
    is not a terminal (a SLURM log, `2> log`), plain lines every `interval` seconds (`C2MF_PROGRESS_INTERVAL`,
    default 30) and at the end of each task. `Reporter(quiet=True)` is silent.
    """

    def __init__(self, quiet: bool = False, *, interactive: bool | None = None, interval: float | None = None,
                 write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet = quiet
        self.interactive = err.is_terminal if interactive is None else interactive
        self.interval = interval if interval is not None else _interval_from_env()
        self._write = write or (lambda line: err.print(line, markup=False, soft_wrap=True, highlight=False))
        self._clock = clock
        self._progress: Progress | None = None
        self._plain: list[PlainTask] = []
        self._active = False

    @contextmanager
    def session(self) -> Iterator["Reporter"]:
        """The span in which `task` shows progress. The display starts with the first task, so a command that
        fails before any work prints its `Error:` line alone (an idle display would leave a blank line)."""
        self._active = not self.quiet
        ended_well = False
        try:
            yield self
            ended_well = True
        finally:
            self._active = False
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
            for t in self._plain:
                t.finish("done" if ended_well else "stopped")
            self._plain = []

    def task(self, description: str, total: int | None) -> Advance:
        if not self._active:
            return no_progress(description, total)
        if not self.interactive:
            plain = PlainTask(description, total, self._write, self.interval, self._clock)
            self._plain = [t for t in self._plain if not t.finished] + [plain]
            return plain.advance
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                console=err,
                transient=False,
            )
            self._progress.start()
        tid = self._progress.add_task(description, total=total, note="")

        def advance(n: int = 1, *, total: int | None = None, note: str | None = None) -> None:
            if self._progress is None:
                return
            fields = {"note": note} if note is not None else {}
            self._progress.update(tid, advance=n, total=total, **fields)

        return advance

    def log(self, message: str) -> None:
        """One diagnostic line on stderr. Not markup: paths such as `birds/[juvenile]/x.jpg` print as they are."""
        if not self.quiet:
            err.print(message, markup=False, soft_wrap=True)


def _interval_from_env() -> float:
    text = os.environ.get("C2MF_PROGRESS_INTERVAL", "30")
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"C2MF_PROGRESS_INTERVAL must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise UsageError(f"C2MF_PROGRESS_INTERVAL must be positive, got {text!r}")
    return value


def print_json(obj: Any) -> None:
    """Machine-readable result on stdout, strict JSON (plain print: rich would wrap long lines)."""
    sys.stdout.write(dumps(obj, indent=2) + "\n")
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
