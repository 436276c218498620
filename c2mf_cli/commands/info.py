"""`c2mf info PATH`: summarise an activation store or a concept dictionary."""

from __future__ import annotations

from pathlib import Path

import typer

from ._console import err, out, print_json
from ..errors import C2MFError


def _store_summary(path: Path, per_class: bool) -> dict:
    from ..artifacts.store import ActivationStore

    store = ActivationStore.open(path, require_complete=False)
    summary = store.summary()
    summary["failed_images"] = store.failures
    if per_class:
        summary["per_class"] = [
            {"name": n, "label": lab, "rows": store.n_images(y)}
            for y, (n, lab) in enumerate(zip(store.classes, store.class_indices))
        ]
    return summary


def describe(path: Path, per_class: bool = False) -> dict:
    """The summary `c2mf info` prints, for a store or a dictionary."""
    if not path.exists():
        raise C2MFError(f"{str(path)!r} does not exist")
    if (path / "zarr.json").is_file():
        return _store_summary(path, per_class)
    if path.is_dir():
        raise C2MFError(
            f"{str(path)!r} is a directory but not an activation store (no zarr.json): give a store made by "
            "`c2mf extract` or a dictionary file made by `c2mf factorize`"
        )
    try:
        from .factorize import describe_dictionary
    except ImportError:
        raise C2MFError(f"{str(path)!r} is not an activation store (no zarr.json)") from None
    return describe_dictionary(path)


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info_cmd(
        path: Path = typer.Argument(..., help="An activation store (from extract) or a dictionary (from factorize)."),
        classes: bool = typer.Option(False, "--classes", help="Also list every class with its row count."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    ) -> None:
        """Summarise a store (classes, counts, shapes, disk size, model, layer, mode) or a dictionary.

        Example: c2mf info train.zarr
        """
        summary = describe(path, per_class=classes)
        if json_out:
            print_json(summary)
            return
        from rich.table import Table
        from rich.text import Text

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
