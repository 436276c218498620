"""`c2mf evaluate`: every metric for several dictionaries side by side, as tables, JSON and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ._console import Reporter, err, out, print_json
from ..errors import UsageError


def _pm(d: dict[str, Any] | None, mean: str = "mean", std: str = "std", fmt: str = ".3f") -> str:
    if not d or d.get(mean) is None or (isinstance(d.get(mean), float) and math.isnan(d[mean])):
        return "-"
    s = d.get(std)
    return f"{d[mean]:{fmt}} ± {s:{fmt}}" if s is not None and not math.isnan(s) else f"{d[mean]:{fmt}}"


def _num(x: Any, fmt: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:{fmt}}"


def tables(result: dict[str, Any]) -> list[Table]:
    """The paper's tables, methods as rows: similarity/accuracy (T1), consistency (T2), importance, ablation, OOD."""
    ms = result["methods"]
    t1 = Table(title="Concept similarity and per-class reconstruction accuracy (test)")
    for col in ("method", "k", "|Pearson| ↓", "|cosine| ↓", "accuracy (labels) ↑", "agreement (model) ↑"):
        t1.add_column(col, justify="left" if col == "method" else "right")
    for m in ms:
        s, r = m["similarity"], m["reconstruction"]
        t1.add_row(m["name"], str(m["k"]), _pm(s, "pearson_mean", "pearson_std"), _pm(s, "cosine_mean", "cosine_std"),
                   _pm(r["accuracy"]), _pm(r["agreement"]))

    t2 = Table(title="Consistency and fit: MSE(A, UW) on train and test")
    for col in ("method", "k", "train MSE", "test MSE", "train − test", "rel. error (test)", "R² (test)"):
        t2.add_column(col, justify="left" if col == "method" else "right")
    for m in ms:
        c, f = m["consistency"], m["fit"]["test"]
        t2.add_row(m["name"], str(m["k"]), _num(c["train_mse"]), _num(c["test_mse"]), _num(c["difference"], "+.4f"),
                   _num(f["relative_error"], ".3f"), _num(f["r2"], ".3f"))

    t3 = Table(title="Concept insertion ↑ / deletion ↓ AUC (probability of the predicted class; accuracy)")
    for col in ("method", "k", "ins Grad-CAM", "del Grad-CAM", "ins IG", "del IG", "IG completeness err"):
        t3.add_column(col, justify="left" if col == "method" else "right")
    for m in ms:
        idl = m.get("insertion_deletion")
        if not idl:
            continue
        cells = []
        for rank in ("gradcam", "ig"):
            for mode in ("insertion", "deletion"):
                c = idl[rank][mode]
                cells.append(f"{_num(c['prob_auc'], '.3f')} / {_num(c['accuracy_auc'], '.3f')}")
        comp = m["importance"]["ig_completeness"]
        t3.add_row(m["name"], str(m["k"]), *cells, f"{_num(comp['mean_relative_error'], '.1e')} (rel.)")
    out_tables = [t1, t2, t3]

    if result.get("clustering"):
        t4 = Table(title="Multi-class clustering ablation: per-class accuracy with K shared concepts")
        for col in ("K", "clustered per-class (source)", "shared dictionaries with K concepts"):
            t4.add_column(col, justify="right" if col == "K" else "left")
        for c in result["clustering"]:
            shared = ", ".join(f"{n}: {_pm(v)}" for n, v in c["shared"].items()) or "-"
            t4.add_row(str(c["K"]), f"{_pm(c['clustered_accuracy'])} ({c['source']})", shared)
        out_tables.append(t4)

    if result.get("ood"):
        o = result["ood"]
        t5 = Table(title="Crops as out-of-distribution inputs (max-softmax; in = whole images, out = crops)")
        for col in ("AUROC", "FPR@95%TPR", "AUPR-In", "AUPR-Out", "mean conf. images", "mean conf. crops", "gap"):
            t5.add_column(col, justify="right")
        h = o["histograms"]
        t5.add_row(_num(o["auroc"], ".3f"), _num(o["fpr_at_95_tpr"], ".3f"), _num(o["aupr_in"], ".3f"),
                   _num(o["aupr_out"], ".3f"), _num(h["mean_in"], ".3f"), _num(h["mean_out"], ".3f"),
                   _num(h["mean_gap"], "+.3f"))
        out_tables.append(t5)
    return out_tables


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        train: Path = typer.Option(..., "--train", help="Activation store of the training images (whole images)."),
        test: Path = typer.Option(..., "--test", help="Held-out activation store (whole images, same model/layer)."),
        dicts: list[Path] = typer.Option(..., "--dict", help="Dictionary file from `c2mf factorize`; repeat the option."),
        out_dir: Path = typer.Option(
            ..., "--out", help="Folder for evaluation.json and the PNG plots; an existing folder is reused: its "
            "evaluation.json and plots are replaced, other files are left alone."),
        crops: Optional[Path] = typer.Option(None, "--crops", help="Crop store (for the OOD view of crops)."),
        json_out: bool = typer.Option(False, "--json", help="Print the full result as JSON on stdout."),
        device: str = typer.Option("auto", "--device", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps."),
        max_images: Optional[int] = typer.Option(None, "--max-images-per-class", help="Use at most N images per class."),
        ig_steps: int = typer.Option(32, "--ig-steps", help="Integrated Gradients steps (>= 32 advised)."),
        batch_size: int = typer.Option(1024, "--batch-size", help="Rows (image x step) per call of the model's tail."),
        seed: int = typer.Option(0, "--seed", help="Seed of the clustering ablation's k-means."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Measure concept dictionaries side by side with every metric of the C2MF paper.

        Example: c2mf evaluate --train cub-train --test cub-test --crops cub-crops
        --dict c2mf-k10.safetensors --dict craft-k10.safetensors --dict pca-k10.safetensors --out eval/
        """
        from ..artifacts.dictionary import ConceptDictionary
        from ..stages.evaluate import EvaluateConfig, evaluate, json_safe
        from ..artifacts.store import ActivationStore

        from ._console import check_output_dir

        if not dicts:
            raise UsageError("give at least one --dict")
        check_output_dir(out_dir)
        config = EvaluateConfig(max_images_per_class=max_images, ig_steps=ig_steps, batch_size=batch_size, seed=seed)
        train_s, test_s = ActivationStore.open(train), ActivationStore.open(test)
        crops_s = ActivationStore.open(crops) if crops is not None else None
        loaded = []
        for p in dicts:
            d = ConceptDictionary.load(p)
            d.meta["path"] = str(p)
            loaded.append(d)
        names = [p.stem for p in dicts] if len({p.stem for p in dicts}) == len(dicts) else None
        reporter = Reporter(quiet)
        with reporter.session():
            result = evaluate(train_s, test_s, loaded, crops_s, config, reporter.task, names=names, device=device,
                              out_dir=out_dir)
        console: Console = err if json_out else out
        if not (json_out and quiet):
            for t in tables(result):
                console.print(t)
            console.print(f"results in {out_dir} ({result['time_s']:.1f} s)", markup=False)
        if json_out:
            print_json(json_safe(result))  # strict JSON: a NaN metric (e.g. one concept) is null, as in the file
