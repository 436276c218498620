"""`c2mf sweep`: every method at each k, evaluated, read against k (the paper's Figure 4), resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ._console import Reporter, check_output_dir, out, print_json
from ..errors import UsageError
from .options import REQUIRED, check_input, option


def _ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--concepts takes comma-separated whole numbers (e.g. 5,10,20,40), got {text!r}") from None


def table(result: dict[str, Any]) -> Table:
    """Agreement with the model (headline encoding) of each method at each k; the smallest k reaching the target."""
    headline = result["headline_encoding"]
    ks = result["settings"]["ks"]
    t = Table(title=f"Agreement with the model against k ({headline}-class encoding; target {result['target']:g})",
              caption="accuracy (labels) in brackets; smallest k: the first k whose agreement reaches the target")
    t.add_column("method")
    for k in ks:
        t.add_column(f"k={k}", justify="right")
    t.add_column("smallest k", justify="right")
    for label, pts in result["series"].items():
        at = {p["k"]: p.get(headline) or {} for p in pts}
        cells = []
        for k in ks:
            e = at.get(k)
            if not e or e.get("agreement") is None:
                cells.append("-")
            else:
                acc = e.get("accuracy")
                cells.append(f"{e['agreement']:.3f}" + (f" ({acc:.3f})" if acc is not None else ""))
        small = result["smallest_k"].get(label)
        t.add_row(label, *cells, str(small) if small is not None else f"> {ks[-1]}")
    refs = result.get("references") or {}
    first = refs.get(str(ks[0])) or {}
    for key, label in (("model", "reference: the model itself"),
                       ("class_mean_predicted", "reference: predicted class's mean alone (k = 0)")):
        r = first.get(key) or {}
        agr, acc = (r.get("agreement") or {}).get("mean"), (r.get("accuracy") or {}).get("mean")
        text = "-" if agr is None else f"{agr:.3f}" + (f" ({acc:.3f})" if acc is not None else "")
        t.add_row(label, *([text] * len(ks)), "", style="dim")
    return t


def sweep(
    train: Path = option("train", default=REQUIRED),
    test: Path = option("test", default=REQUIRED),
    concepts: str = option("concepts", default=REQUIRED, help="The numbers of concepts, comma-separated and "
                           "increasing (e.g. 5,10,20,40)."),
    methods: Optional[list[str]] = option("method", default=None, help="A method to fit at every k; repeat the "
                                          "option for several (default: c2mf, craft, pca)."),
    train_crops: Optional[Path] = typer.Option(
        None, "--train-crops", metavar="STORE", help="Crop store of the training images, for the methods that learn "
        "from crops (CRAFT); c2mf extract --mode crops --split train."),
    out_dir: Path = option("out", default=REQUIRED, help="Folder for the dictionaries (dicts/), one evaluation per "
                           "k (kK/), sweep.json and the plots; a rerun reuses what is done."),
    target: float = typer.Option(0.9, "--target", metavar="FRACTION", help="The agreement with the model that "
                                 "defines each method's smallest k."),
    model: Optional[str] = option("model", help="Override the model the stores record; needed when they record it "
                                  "as code (path/file.py:factory)."),
    checkpoint: Optional[Path] = option("checkpoint", help="Override the weights file the stores record."),
    max_images: Optional[int] = option("max_images_per_class"),
    rows: str = option("rows"),
    group_by: str = option("group_by"),
    codes: str = option("codes"),
    attribution: bool = typer.Option(False, "--attribution/--no-attribution", help="Also compute importance and "
                                     "insertion/deletion at every k (the slow part)."),
    seed: int = option("seed", help="Seed of every fit and of the clustering ablation."),
    iterations: Optional[int] = typer.Option(None, "--iterations", metavar="N", help="Passes of every fit that "
                                             "takes them (default: each method's own)."),
    device: str = option("device"),
    json_out: bool = option("json", help="Print sweep.json on stdout."),
    quiet: bool = option("quiet"),
) -> None:
    """Fit every method at each k, evaluate each k, and read fidelity against k (the paper's Figure 4).

    Writes OUT/dicts/METHOD-kK.safetensors, OUT/kK/ (one evaluation per k), OUT/sweep.json and
    OUT/agreement_vs_k.png; reports, per method, the smallest k whose agreement with the model reaches --target.

    Example: c2mf sweep --train cub-train.zarr --test cub-test.zarr --train-crops cub-crops.zarr
    --concepts 5,10,20,40 -o sweep/
    """
    for p, name in [(train, "--train"), (test, "--test"), (train_crops, "--train-crops"),
                    (checkpoint, "--checkpoint")]:
        check_input(p, name)
    check_output_dir(out_dir)
    from ..stages.sweep import sweep as run_sweep, sweep_config

    config = sweep_config(_ks(concepts), methods or ("c2mf", "craft", "pca"), target=target, seed=seed,
                          iterations=iterations, rows=rows, group_by=group_by,
                          max_images_per_class=max_images, codes=codes.strip().lower(), attribution=attribution)
    reporter = Reporter(quiet)
    with reporter.session():
        result = run_sweep(train, test, config, out_dir, crops=train_crops, device=device, model=model,
                           checkpoint=str(checkpoint) if checkpoint else None, progress=reporter.task,
                           log=reporter.log)
    if json_out:
        print_json(result)
        return
    out.print(table(result))
    out.print(f"results in {out_dir}", markup=False)
