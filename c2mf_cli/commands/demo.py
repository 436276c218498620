"""`c2mf demo`: the whole chain on a synthetic world whose concepts are known, with the recovery table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ._console import Reporter, err, out, print_json
from ..errors import UsageError
from .options import option


def _fmt(v: Any, pct: bool = False, d: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.0%}" if pct else f"{v:.{d}f}"


def demo(
    out_dir: Path = option("out", default=Path("c2mf-demo"), help="Folder for everything the demo writes."),
    quick: bool = typer.Option(False, "--quick", help="A smaller, faster run (fewer images, epochs, iterations)."),
    seed: int = option("seed", help="Seeds the world, the training and every fit."),
    device: str = option("device"),
    quiet: bool = option("quiet"),
    json_out: bool = option("json", help="Print the summary as JSON on stdout."),
) -> None:
    """Build a synthetic world with planted concepts, train a small model on it, run extract, factorize
    (c2mf, craft, pca), evaluate and the pictures, and measure how well each method recovers the planted
    concepts (heatmap IoU with the primitives' masks, c2mf's gates, planted-dictionary cosine).

    Runs in a few minutes on 2 CPU cores with no network. Re-running into the same folder reuses the world,
    the model and the stores.

    Example: c2mf demo --out c2mf-demo
    """
    from ..demo.pipeline import DemoConfig, run_demo
    from ..devices import resolve_device

    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    resolve_device(device)  # fail on a bad --device before any work
    config = DemoConfig.quick(seed=seed, device=device) if quick else DemoConfig.full(seed=seed, device=device)
    reporter = Reporter(quiet=quiet)
    with reporter.session():
        result = run_demo(out_dir, config, progress=reporter.task, log=reporter.log)
    s = result.summary
    if json_out:
        print_json(s)
        return
    from rich.table import Table

    model = s["model"]
    out.print(f"model: timm resnet10t (small), layer {model['layer']}, test accuracy "
              f"{model['test_accuracy']:.1%}, trained in {model['seconds']:.0f} s")
    table = Table(title="ground-truth concept recovery (test images)", title_justify="left")
    cols = ("method", "k", "IoU class", "IoU shared", "cos W+", "cos W±", "|r|", "rel err", "acc")
    for col in cols:
        table.add_column(col, justify="right" if col != "method" else "left")
    for row in s["table"]:
        k = f"{row['k']}/cls" if row["per_class_dictionary"] else f"{row['k']}"
        table.add_row(row["method"], k, _fmt(row["iou_per_class"], d=2), _fmt(row["iou_shared"], d=2),
                      _fmt(row["planted_cosine"], d=2), _fmt(row["planted_cosine_signed"], d=2),
                      _fmt(row["pearson"], d=2), _fmt(row["test_relative_error"], d=2),
                      _fmt(row["reconstruction_accuracy"], pct=True))
    ref = s["references"]
    table.add_row("probe*", "", _fmt(ref["linear_probe"], d=2), *[""] * 6)
    table.add_row("grid*", "", _fmt(ref["grid_ceiling"], d=2), *[""] * 6)
    out.print(table)
    out.print("IoU: concept heatmap vs primitive masks (best concept per primitive; 'class': per class, 'shared':"
              " one concept for all classes). cos W+/W±: matched cosine to a planted non-negative / signed "
              "dictionary. |r|: mean |Pearson| between concepts (lower = more distinct). rel err: test "
              "||A - UW|| / ||A||. acc: accuracy of h(UW). * yardsticks: a supervised linear probe of the layer, "
              "and the masks seen through the layer's grid.")
    g = s["gate_selection"]
    out.print(f"c2mf gates vs planted class primitives: accuracy {_fmt(g['accuracy'], True)}, "
              f"precision {_fmt(g['precision'], True)}, recall {_fmt(g['recall'], True)}, "
              f"exact classes {_fmt(g['exact'], True)}")
    out.print(f"total {s['timings_s']['total']:.0f} s; summary {result.json_path}")
    if result.report is not None:
        out.print(f"report: {result.report}")
    else:
        err.print(f"evaluation: {s['evaluation']}")
