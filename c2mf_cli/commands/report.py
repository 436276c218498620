"""`c2mf report`: one self-contained HTML page gathering a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._console import check_output_dir, out, print_json
from ..errors import UsageError
from .options import option


def report(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Folder of a run: its evaluate/, atlas/ and "
                                   "explain/ sub-folders are found automatically."),
    evaluate_dir: Optional[Path] = typer.Option(None, "--evaluate", metavar="DIR", help="evaluate output folder."),
    atlas_dir: Optional[Path] = typer.Option(None, "--atlas", metavar="DIR", help="atlas output folder."),
    explain_dirs: Optional[list[Path]] = typer.Option(None, "--explain", metavar="DIR", help="explain output folder; "
                                                      "repeat it for several dictionaries (shown side by side)."),
    out_dir: Optional[Path] = option("out", show_default="RUN_DIR", help="Where report.html goes."),
    json_out: bool = option("json", help="Print the report path as JSON."),
) -> None:
    """One self-contained HTML page (images embedded, no network) gathering a run.

    Example: c2mf report run/   (reads run/evaluate, run/atlas, run/explain; writes run/report.html)

    Several explain folders (e.g. run/explain-c2mf, run/explain-pca: the same images explained with each
    dictionary) are shown side by side, image by image.
    """
    from ..demo.report import demo_extension
    from ..report.page import Extension, build_report, find_parts

    if run_dir.is_file():
        raise UsageError(f"{str(run_dir)!r} is a file: give the folder of a run (holding evaluate/, atlas/, "
                         "explain/) or --evaluate/--atlas/--explain folders")
    if out_dir is not None:
        check_output_dir(out_dir)
    parts = find_parts(run_dir, evaluate_dir=evaluate_dir, atlas_dir=atlas_dir, explain_dir=explain_dirs or None)
    # a demo run's evaluation carries its ground truth: the demo renders that part, the report the rest
    ext = demo_extension(parts["evaluate_dir"]) if parts["evaluate_dir"] else Extension()
    path = build_report(out_dir or run_dir, **parts, extension=ext)
    if json_out:
        print_json({"report": str(path), **{k: ([str(p) for p in v] if isinstance(v, list) else str(v)) if v else None
                                            for k, v in parts.items()}})
    else:
        out.print(str(path), markup=False)
