"""The `c2mf` command line: a thin layer over the library that parses options, prints, and exits.

Each command is a module-level function in `c2mf_cli/commands/<name>.py`, registered below. Command modules
import the library (torch, timm, matplotlib) inside the command, so `c2mf --help`, `--version`, completion and
option errors answer without loading it.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

import typer
from typer.core import TyperGroup

from .commands import (atlas, demo, evaluate, explain, extract, factorize, info, layers, methods, report,
                       sweep, verify, version)
from .commands._console import err
from .errors import C2MFError


# a disk that refuses every write, whatever the command was writing (commands name the file where they can)
_FULL_DISK = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class _Group(TyperGroup):
    """Turns a `C2MFError` raised anywhere in a command, or a full or read-only disk, into one `Error:` line and
    its exit code."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except C2MFError as e:
            err.print(f"Error: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            if e.errno not in _FULL_DISK:
                raise
            where = f" {e.filename}" if e.filename else " the output"
            err.print(f"Error: cannot write{where}: {os.strerror(e.errno)}: free space or choose another output "
                      "folder, then rerun", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None

    def get_command(self, ctx, cmd_name):  # type: ignore[override]
        command = super().get_command(ctx, cmd_name)
        # declared_params: factorize's own, without building its method options (`c2mf --help` stays fast)
        for p in getattr(command, "declared_params", command.params) if command is not None else ():
            # typer prints an argument's Python type after its name (`IMAGE... <list[Path]>`); the metavar says it
            if p.param_type_name == "argument" and p.metavar is not None:
                p.display_type_rich = lambda ctx: None
        return command

    def list_commands(self, ctx):  # type: ignore[override]
        return list(self.commands)  # registration order: the chain, not the alphabet


app = typer.Typer(
    name="c2mf",
    cls=_Group,
    help="Find the concepts a vision model uses (C2MF, CRAFT, PCA) and show where they are in an image.\n\n"
    "The commands form a chain: extract -> factorize -> evaluate / explain. `c2mf demo` runs it all.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    show_version: Optional[bool] = typer.Option(None, "--version", callback=version.version_flag, is_eager=True,
                                                help="Print the c2mf version and exit."),
) -> None:
    """Find the concepts a vision model uses and show where they are in an image."""


# The order here is the order in `c2mf --help`: the chain.
app.command("demo")(demo.demo)
app.command("layers")(layers.layers)
app.command("extract")(extract.extract)
app.command("factorize", cls=factorize.FactorizeCommand)(factorize.factorize)
app.command("methods")(methods.methods)
app.command("evaluate")(evaluate.evaluate)
app.command("sweep")(sweep.sweep)
app.command("explain")(explain.explain)
app.command("atlas")(atlas.atlas)
app.command("report")(report.report)
app.command("info")(info.info)
app.command("verify")(verify.verify)
app.command("version")(version.version)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
