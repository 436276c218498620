"""Progress reporting the library accepts without knowing the terminal.

A `ProgressFn` is called as `advance = progress(description, total)`; the library then calls `advance(n)`
as work completes. The CLI passes one backed by rich progress bars; the default does nothing.
"""

from __future__ import annotations

from typing import Callable, Protocol


class ProgressFn(Protocol):
    def __call__(self, description: str, total: int | None) -> Callable[[int], None]: ...


def no_progress(description: str, total: int | None) -> Callable[[int], None]:
    return lambda n=1: None
