"""The `c2mf` command line: a thin layer over the library that parses options, prints, and exits.

Each command family lives in `c2mf_cli/commands/<name>.py` and exposes `register(app)`.
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

from .commands._console import err
from .errors import C2MFError


class _Group(TyperGroup):
    """Turns a `C2MFError` raised anywhere in a command into one `Error:` line and its exit code."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except C2MFError as e:
            err.print(f"Error: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(
    name="c2mf",
    cls=_Group,
    help="Find the concepts a vision model uses (C2MF, CRAFT, PCA) and show where they are in an image.\n\n"
    "The commands form a chain: extract -> factorize -> evaluate / explain. `c2mf demo` runs it all.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

@app.callback()
def _root() -> None:
    """Find the concepts a vision model uses and show where they are in an image."""


# Order here is the order in `c2mf --help`.
_COMMAND_MODULES = ("demo", "extract", "factorize", "evaluate", "explain", "info")

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"{__package__}.commands.{_name}")
    except ModuleNotFoundError as e:  # a command family not written yet must not break the others
        if e.name != f"{__package__}.commands.{_name}":
            raise
        continue
    _module.register(app)


@app.command("version")
def version() -> None:
    """Print the c2mf version."""
    from . import __version__

    print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
