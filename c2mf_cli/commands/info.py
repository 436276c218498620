"""`c2mf info PATH`: summarise an activation store or a concept dictionary."""

from __future__ import annotations

from pathlib import Path

import typer

from ._console import err, out, print_json
from .options import option


def info(
    path: Path = typer.Argument(..., metavar="PATH", help="An activation store (from extract) or a dictionary "
                                "(from factorize)."),
    classes: bool = typer.Option(False, "--classes", help="Also list every class with its row count."),
    json_out: bool = option("json"),
) -> None:
    """Summarise a store (classes, counts, shapes, disk size, model, layer, mode) or a dictionary.

    Example: c2mf info train.zarr
    """
    from rich.table import Table
    from rich.text import Text

    from ..stages.describe import describe

    summary = describe(path, per_class=classes)
    if json_out:
        print_json(summary)
        return
    # Text, not markup: a path or class name such as `runs/[exp1]` must print as it is.
    table = Table(show_header=False, title=Text(str(path)), title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary.items():
        if key in ("per_class", "failed_images", "per_class_concepts"):
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) if len(value) <= 8 else f"{len(value)} items"
        table.add_row(Text(key), Text(str(value)))
    out.print(table)
    if summary.get("kind") == "activation store" and not summary.get("complete"):
        err.print(
            f"incomplete: {summary.get('chunks_done')} chunks done; rerun the same `c2mf extract` command "
            "(every shard of it) to resume and finalize the store", markup=False, soft_wrap=True,
        )
    failed = summary.get("failed_images") or []
    if failed:
        out.print(f"{len(failed)} image(s) could not be read, e.g. {failed[0]['path']}", markup=False)
    for row in summary.get("per_class", []):
        out.print(f"  {row['name']}: {row['rows']} rows (output {row['label']})", markup=False)
