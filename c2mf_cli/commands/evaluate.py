"""`c2mf evaluate`: every metric for several dictionaries side by side, as tables, JSON and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ._console import Reporter, check_output_dir, err, out, print_json
from ..errors import UsageError
from .options import REQUIRED, check_input, option


def _pm(d: dict[str, Any] | None, mean: str = "mean", std: str = "std", fmt: str = ".3f") -> str:
    if not d or d.get(mean) is None or (isinstance(d.get(mean), float) and math.isnan(d[mean])):
        return "-"
    s = d.get(std)
    return f"{d[mean]:{fmt}} ± {s:{fmt}}" if s is not None and not math.isnan(s) else f"{d[mean]:{fmt}}"


def _num(x: Any, fmt: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:{fmt}}"


_ENC_LABEL = {"predicted": "predicted class", "true": "true class (paper's protocol)", "none": "no class"}


def _p(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2g}" if x >= 1e-3 else f"{x:.0e}"


def _pairs(result: dict[str, Any], measure: str) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for p in (result.get("significance") or {}).get("pairs", []):
        if p.get("measure") == measure:
            out[(p["a"], p["b"])] = out[(p["b"], p["a"])] = p
    return out


def _significant_best(rows: list[dict[str, Any]], measure: str, pairs: dict, alpha: float) -> str | None:
    """The row best on `measure` when it is significantly better than every other row of the block, else None."""
    scored = [m for m in rows if (m.get("reconstruction") or {}).get(measure, {}).get("mean") is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda m: m["reconstruction"][measure]["mean"])
    for m in scored:
        if m is best:
            continue
        p = pairs.get((best["name"], m["name"]))
        if p is None or p["p"] >= alpha or p["better"] != ("a" if p["a"] == best["name"] else "b"):
            return None
    return best["name"]


def _reconstruction_table(result: dict[str, Any], rows: list[dict[str, Any]], title: str) -> Table:
    enc = result.get("settings", {}).get("headline_encoding", "true")
    others = [e for e in result.get("settings", {}).get("encode_class", []) if e != enc]
    n, chance = result.get("n_test_images"), result.get("chance")
    caption = (f"n = {n} test images, {round(1 / chance) if chance else '?'} classes, chance = "
               f"{_num(chance, '.3f')}; codes under the {_ENC_LABEL.get(enc, enc)}; bold = significantly best "
               "of its block (exact McNemar, p < 0.05); p: against the best agreement")
    t = Table(title=title, caption=caption)
    cols = ["method", "k", "directions", "|Pearson| ↓", "|cosine| ↓", "agreement (model) ↑", "accuracy (labels) ↑"]
    cols += [f"acc / agr, {_ENC_LABEL.get(e, e)}" for e in others] + ["p"]
    for col in cols:
        t.add_column(col, justify="left" if col == "method" else "right")
    pairs_agr, pairs_acc = _pairs(result, "agreement"), _pairs(result, "accuracy")
    alpha = float((result.get("significance") or {}).get("alpha", 0.05))
    bold = {"agreement": _significant_best(rows, "agreement", pairs_agr, alpha),
            "accuracy": _significant_best(rows, "accuracy", pairs_acc, alpha)}
    scored = [m for m in rows if (m.get("reconstruction") or {}).get("agreement")]
    best = max(scored, key=lambda m: m["reconstruction"]["agreement"]["mean"]) if scored else None
    for m in rows:
        s, r = m["similarity"], m.get("reconstruction") or {}
        cos = _pm(s, "cosine_mean", "cosine_std") + (" (0 by construction)" if s.get("cosine_by_construction") else "")
        cells = [m["name"], str(m["k"]), str(m.get("directions", m["k"])), _pm(s, "pearson_mean", "pearson_std"), cos]
        for measure in ("agreement", "accuracy"):
            text = _pm(r.get(measure))
            cells.append(f"[bold]{text}[/bold]" if bold[measure] == m["name"] else text)
        for e in others:
            entry = (m.get("by_encoding") or {}).get(e, {})
            rec = entry.get("reconstruction")
            cells.append("skipped" if "skipped" in entry else
                         f"{_num(rec['accuracy']['mean'], '.3f')} / {_num(rec['agreement']['mean'], '.3f')}" if rec
                         else "-")
        p = pairs_agr.get((best["name"], m["name"])) if best is not None and m is not best else None
        cells.append("best" if m is best else (_p(p["p"]) + ("" if p["p"] < alpha else " n.s.")) if p else "-")
        t.add_row(*cells)
    refs = result.get("references") or {}
    t.add_section()
    for key in ("model", "class_mean_true", "class_mean_predicted", "global_mean", "chance"):
        ref = refs.get(key)
        if not ref:
            continue
        label = f"reference: {ref.get('label', key)}"
        if "skipped" in ref:
            cells = [label, "0", "-", "-", "-", "-", ref["skipped"]]
        else:
            cells = [label, "0" if key.startswith(("class", "global")) else "-", "-", "-", "-",
                     _pm(ref.get("agreement")), _pm(ref.get("accuracy"))]
        t.add_row(*cells, style="dim")
    return t


def tables(result: dict[str, Any]) -> list[Table]:
    """The paper's tables, methods as rows, read against references; shared and per-class dictionaries apart.

    Headline: shared dictionaries (k directions each, c2mf, PCA/semi-NMF --shared, CRAFT clustered to K = k),
    then per-class ones (k x classes directions); both with the references (the model, class means alone, the
    global mean, chance). Then consistency, insertion/deletion (not bolded where the reconstruction does not keep
    the model's decision), the clustering ablation and the OOD view.
    """
    ms = result["methods"]
    shared = [m for m in ms if m.get("capacity", "per-class" if m.get("per_class_dictionary") else "shared") == "shared"]
    per_class = [m for m in ms if m not in shared]
    out_tables = []
    if shared:
        out_tables.append(_reconstruction_table(
            result, shared, "Same capacity: shared dictionaries (k directions), per-class reconstruction of test images"))
    if per_class:
        out_tables.append(_reconstruction_table(
            result, per_class, "k per class: k x classes directions (not the same capacity as the block above)"))

    from ..metrics.importance import RANKING_LABELS, RANKINGS  # imported here: --help stays free of torch

    t2 = Table(title="Consistency and fit: MSE(A, UW) on train and test")
    for col in ("method", "k", "train MSE", "test MSE", "train − test", "rel. error (test)", "R² (test)"):
        t2.add_column(col, justify="left" if col == "method" else "right")
    for m in ms:
        c, f = m["consistency"], m["fit"]["test"]
        t2.add_row(m["name"], str(m["k"]), _num(c["train_mse"]), _num(c["test_mse"]), _num(c["difference"], "+.4f"),
                   _num(f["relative_error"], ".3f"), _num(f["r2"], ".3f"))

    t3 = Table(title="Concept insertion ↑ / deletion ↓ AUC (probability of the predicted class; accuracy)",
               caption="bold: best among methods whose reconstruction keeps the model's decision")
    with_curves = [m for m in ms if m.get("insertion_deletion")]
    ranks = [r for r in RANKINGS if any(r in m["insertion_deletion"] for m in with_curves)]
    cols = ["method", "k"] + [f"{mode} {RANKING_LABELS[r]}" for r in ranks for mode in ("ins", "del")]
    for col in cols + (["IG completeness err"] if "ig" in ranks else []):
        t3.add_column(col, justify="left" if col == "method" else "right")
    trusted = [m for m in with_curves if m.get("preserves_decision") is not False]
    best: dict[tuple[str, str], str] = {}
    for rank in ranks:
        for mode, better in (("insertion", max), ("deletion", min)):
            vals = [(m["insertion_deletion"][rank][mode]["prob_auc"], m["name"]) for m in trusted
                    if m["insertion_deletion"].get(rank) and m["insertion_deletion"][rank][mode]["prob_auc"] is not None]
            if len(vals) > 1:
                best[(rank, mode)] = better(vals)[1]
    for m in with_curves:
        idl = m["insertion_deletion"]
        cells = []
        for rank in ranks:
            for mode in ("insertion", "deletion"):
                c = idl[rank][mode]
                text = f"{_num(c['prob_auc'], '.3f')} / {_num(c['accuracy_auc'], '.3f')}"
                cells.append(f"[bold]{text}[/bold]" if best.get((rank, mode)) == m["name"] else text)
        if "ig" in ranks:
            comp = m["importance"]["ig_completeness"]
            cells.append(f"{_num(comp['mean_relative_error'], '.1e')} (rel.)")
        t3.add_row(m["name"], str(m["k"]), *cells)
        for w in m.get("warnings", []):
            t3.add_row(f"  ⚠ {m['name']}: {w}", style="yellow")
    out_tables += [t2, t3]

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


def evaluate(
    train: Path = option("train", default=REQUIRED),
    test: Path = option("test", default=REQUIRED),
    dicts: list[Path] = option("dict", default=REQUIRED, help="Dictionary file from `c2mf factorize`; repeat the "
                               "option to compare several."),
    out_dir: Path = option("out", default=REQUIRED, help="Folder for evaluation.json and the PNG plots; an "
                           "existing folder is reused: its evaluation.json and plots are replaced, other files are "
                           "left alone."),
    crops: Optional[Path] = option("crops"),
    model: Optional[str] = option("model", help="Override the model the stores record; needed when they record it "
                                  "as code (path/file.py:factory), which c2mf never runs because a file names it."),
    checkpoint: Optional[Path] = option("checkpoint", help="Override the weights file the stores record (its sha256 "
                                        "is then not required to match: a warning says so)."),
    json_out: bool = option("json", help="Print the full result as JSON on stdout."),
    device: str = option("device"),
    max_images: Optional[int] = option("max_images_per_class"),
    ig_steps: int = option("ig_steps"),
    importance: str = option("importance", default="gradcam,ig", help="The importances that rank concepts for "
                             "insertion/deletion, comma-separated among gradcam, ig, sobol (CRAFT's total Sobol "
                             "indices: designs x (k + 2) model calls per image, so asked for by name)."),
    sobol_designs: int = option("sobol_designs"),
    codes: str = typer.Option(
        "fit", "--codes", metavar="fit|nnls|lstsq",
        help="How codes of test and train images are solved: fit (the rule the dictionary was fitted with: ridge "
        "NNLS for c2mf, NNLS for NMF/CRAFT, the projection for PCA, the encoder for an SAE), nnls (no ridge) or "
        "lstsq (signed least squares)."),
    batch_size: int = option("batch_size", default=1024, help="Rows (image x step) per call of the model's tail."),
    seed: int = option("seed", help="Seed of the clustering ablation's k-means."),
    encode_class: str = typer.Option(
        "predicted,true", "--encode-class", metavar="ENCODINGS",
        help="Which class picks gates, per-class dictionaries and means when codes are solved, comma-separated: "
        "predicted (the model's prediction, as explain does: the headline), true (the label: the paper's "
        "protocol, which hands the answer to the reconstruction), none (all concepts ungated)."),
    attribution: bool = typer.Option(
        True, "--attribution/--no-attribution",
        help="Compute concept importance and insertion/deletion (the slow part); --no-attribution for a quick "
        "reconstruction and fidelity check."),
    min_agreement: float = typer.Option(
        0.5, "--min-agreement", metavar="FRACTION",
        help="Below this agreement with the model, a method's reconstruction is flagged as not keeping the "
        "model's decision (its insertion/deletion numbers are then not bolded)."),
    quiet: bool = option("quiet"),
) -> None:
    """Measure concept dictionaries side by side with every metric of the C2MF paper.

    Example: c2mf evaluate --train cub-train --test cub-test --crops cub-crops
    --dict c2mf-k10.safetensors --dict craft-k10.safetensors --dict pca-k10.safetensors -o eval/
    """
    if not dicts:
        raise UsageError("give at least one --dict")
    for p, name in [(train, "--train"), (test, "--test"), (crops, "--crops"), (checkpoint, "--checkpoint")] + [
            (d, "--dict") for d in dicts]:
        check_input(p, name)
    check_output_dir(out_dir)
    from ..artifacts.dictionary import ConceptDictionary
    from ..artifacts.store import ActivationStore
    from ..stages.evaluate import EvaluateConfig, evaluate as run_evaluate

    config = EvaluateConfig(max_images_per_class=max_images, ig_steps=ig_steps, batch_size=batch_size, seed=seed,
                            encode_class=tuple(e.strip() for e in encode_class.split(",") if e.strip()),
                            min_agreement=min_agreement, attribution=attribution,
                            rankings=tuple(r.strip().lower() for r in importance.split(",") if r.strip()),
                            sobol_designs=sobol_designs, codes=codes.strip().lower())
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
        result = run_evaluate(train_s, test_s, loaded, crops_s, config, reporter.task, names=names, device=device,
                              model=model, checkpoint=str(checkpoint) if checkpoint else None, out_dir=out_dir)
    console = err if json_out else out
    if not (json_out and quiet):
        for t in tables(result):
            console.print(t)
        for note in result.get("notes", []):
            console.print(f"note: {note}", markup=False)
        console.print(f"results in {out_dir} ({result['time_s']:.1f} s)", markup=False)
    if json_out:
        print_json(result)  # strict JSON: a NaN metric (e.g. one concept) is null, as in the file
