"""`c2mf version` (and the root's `--version`)."""

from __future__ import annotations

from typing import Optional

import typer


def version() -> None:
    """Print the c2mf version.

    Example: c2mf version
    """
    from .. import __version__

    print(__version__)


def version_flag(value: Optional[bool]) -> None:
    """`c2mf --version`: print the version and stop, before any command runs."""
    if value:
        version()
        raise typer.Exit()
