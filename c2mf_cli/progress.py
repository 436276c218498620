"""Progress reporting the library accepts without knowing the terminal.

A `ProgressFn` is called as `advance = progress(description, total)`; the library then calls `advance(n)` as
work completes. Two keywords make the count truthful when the work is not known in advance:
`advance(0, total=t)` corrects the total (a fit that converged before its last pass), and
`advance(n, note="rel. change 3e-4")` shows how far from done the work is (a convergence measure).
The CLI passes one backed by rich progress bars on a terminal and by plain periodic lines in a log; the default
does nothing.
"""

from __future__ import annotations

from typing import Protocol


class Advance(Protocol):
    def __call__(self, n: int = 1, *, total: int | None = None, note: str | None = None) -> None: ...


class ProgressFn(Protocol):
    def __call__(self, description: str, total: int | None) -> Advance: ...


def _ignore(n: int = 1, *, total: int | None = None, note: str | None = None) -> None:
    return None


def no_progress(description: str, total: int | None) -> Advance:
    return _ignore
