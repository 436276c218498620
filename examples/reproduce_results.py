"""Reproduce docs/results.md: the paper's tables and Figure 4 on every image of the real models we have.

    python examples/reproduce_results.py WORKDIR [--data ../shared/data] [--concepts 5,10,25,50] [--only CUB]
                                         [--write-docs] [--docs-only]

Setups (each on all its images, split 80/20 per class with seed 0, as `c2mf extract --split` does):
- CIFAR-10 ResNet-20 `layer3` (1,000 JPEGs: 800 train, 200 test);
- the CUB bird model (MobileNetV2) at `head_conv` (2,340 images of 78 species: 1,872 train, 468 test);
- the same model at the signed layer `blocks.16` (no crop store there: no CRAFT, and the OOD view is head_conv's,
  since it reads only the model's logits).

For each setup: train and test stores of whole images and a store of train crops (2 x 2 grid, as CRAFT's
reference crops), then
1. `c2mf sweep` at every k (c2mf, CRAFT on the train crops, per-class PCA; CRAFT is also clustered to K = k):
   Figure 4 and the smallest k reaching agreement 0.9;
2. one evaluation at k = 10 of every dictionary side by side (the sweep's three, shared PCA and shared
   semi-NMF), with the crop store for the OOD view: Tables 1-3 and the OOD table;
3. one evaluation at k = 10 with attribution (c2mf, CRAFT, per-class PCA): insertion / deletion with concepts
   ranked by Grad-CAM, Integrated Gradients and CRAFT's Sobol indices.

Steps 1-2 run without attribution (fidelity is what the paper's tables measure). Everything is kept in WORKDIR,
so a rerun reuses stores, fits and evaluations (the sweep checks that they match); setups may be run one at a
time (`--only`, each with its own `--concepts`) and gathered with `--docs-only`. Every number written into
docs/results.md comes from the evaluation.json / sweep.json files of WORKDIR; results.json gathers them
(`--write-docs` puts a copy in docs/results.json).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
TABLE_K = 10


def _setups(data: Path) -> dict[str, dict[str, Any]]:
    bird = {"model": f"{data / 'models.py'}:mobilenet_v2_inat_birds",
            "checkpoint": data / "cub" / "mobilenet_v2_inat_birds.pt",
            "images": data / "cub" / "images", "class_index": data / "cub" / "class_index.json"}
    return {
        "CIFAR-10 layer3": {
            "model": f"{data / 'models.py'}:cifar_resnet20", "checkpoint": data / "cifar10" / "resnet20-12fca82f.th",
            "layer": "layer3", "images": data / "cifar10" / "images", "class_index": None, "signed": False},
        "CUB head_conv": dict(bird, layer="head_conv", signed=False),
        # crops cost 4 forward passes per train image (~40 min on 2 loaded cores); the OOD view needs only the
        # model's logits, the same as head_conv's, so this layer goes without them (and without CRAFT)
        "CUB blocks.16": dict(bird, layer="blocks.16", signed=True, crops=False),
    }


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def _store(work: Path, name: str, setup: dict, split: str, mode: str = "full") -> Path:
    from c2mf_cli.artifacts.store import ActivationStore
    from c2mf_cli.errors import C2MFError
    from c2mf_cli.inputs.data import CropSpec, DatasetSpec
    from c2mf_cli.inputs.models import ModelSpec
    from c2mf_cli.stages.extract import ExtractConfig, extract

    out = work / f"{name}-{split}-{mode}.zarr"
    if out.is_dir():
        try:
            ActivationStore.open(out)
            return out
        except C2MFError:  # unfinished: extract resumes it below (or says why it cannot)
            pass
    t = time.perf_counter()
    extract(ExtractConfig(
        model=ModelSpec(setup["model"], checkpoint=str(setup["checkpoint"])), layer=setup["layer"],
        data=DatasetSpec(str(setup["images"]), split=split,
                         class_index=str(setup["class_index"]) if setup["class_index"] else None),
        out=str(out), mode=mode, crops=CropSpec(kind="grid", size=0.5, stride=0.5), dtype="float32", device="cpu"))
    print(f"  {out.name}: extracted in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def _fit(work: Path, store: Path, method: str, k: int, **options: Any) -> Path:
    from c2mf_cli.artifacts.store import ActivationStore
    from c2mf_cli.stages.factorize import factorize

    tag = "-".join([method] + [key for key, on in options.items() if on])
    path = work / f"{tag}-k{k}.safetensors"
    if not path.is_file():
        t = time.perf_counter()
        factorize(ActivationStore.open(store).row_source(), method, concepts=k, device="cpu", **options).save(path)
        print(f"  {path.name}: fitted in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def _evaluation(out: Path, train: Path, test: Path, dicts: dict[str, Path], crops: Path | None, model: str,
                config: Any) -> dict[str, Any]:
    """evaluate's result in `out`: read back when it is there, else computed and written there."""
    from c2mf_cli.artifacts.store import ActivationStore
    from c2mf_cli.methods import load_dictionary
    from c2mf_cli.stages.evaluate import evaluate

    if (out / "evaluation.json").is_file():
        print(f"  reusing {out}", flush=True)
        return json.loads((out / "evaluation.json").read_text())
    t = time.perf_counter()
    result = evaluate(ActivationStore.open(train), ActivationStore.open(test),
                      [load_dictionary(p) for p in dicts.values()],
                      ActivationStore.open(crops) if crops is not None else None, config, names=list(dicts),
                      device="cpu", model=model, out_dir=out)  # our own example model: its code is ours to run
    print(f"  {out.name}: evaluated in {time.perf_counter() - t:.0f} s", flush=True)
    return result


def measure(work: Path, data: Path, ks: tuple[int, ...], only: str | None) -> dict[str, Any]:
    from c2mf_cli.metrics import RANKINGS
    from c2mf_cli.stages.evaluate import EvaluateConfig
    from c2mf_cli.stages.sweep import SweepConfig, sweep

    out: dict[str, Any] = {}
    for title, setup in _setups(data).items():
        if only is not None and only.lower() not in title.lower():
            continue
        name = _slug(title)
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        print(title, flush=True)
        train, test = _store(folder, name, setup, "train"), _store(folder, name, setup, "test")
        crops = _store(folder, name, setup, "train", mode="crops") if setup.get("crops", True) else None

        methods = ("c2mf", "craft", "pca") if crops is not None else ("c2mf", "pca")
        t = time.perf_counter()
        swept = sweep(train, test, SweepConfig(ks=ks, methods=methods), folder / "sweep",
                      crops=crops, device="cpu", model=setup["model"],
                      log=lambda line: print(f"  sweep: {line}", flush=True))
        print(f"  sweep: {time.perf_counter() - t:.0f} s", flush=True)

        k = TABLE_K
        dicts = {"c2mf": folder / "sweep" / "dicts" / f"c2mf-k{k}.safetensors"} if k in ks else {
            "c2mf": _fit(folder, train, "c2mf", k)}
        dicts["PCA, shared"] = _fit(folder, train, "pca", k, shared=True)
        dicts["semi-NMF, shared"] = _fit(folder, train, "semi-nmf", k, shared=True)
        if crops is not None:
            dicts["CRAFT (train crops)"] = _fit(folder, crops, "craft", k, shift=setup["signed"])
        dicts["PCA, per class"] = (folder / "sweep" / "dicts" / f"pca-k{k}.safetensors") if k in ks else (
            _fit(folder, train, "pca", k))
        table = _evaluation(folder / f"table-k{k}", train, test, dicts, crops, setup["model"],
                            EvaluateConfig(attribution=False))
        # attribution: concept rankings by Grad-CAM, IG and CRAFT's Sobol indices, read by insertion/deletion
        chosen = {n: dicts[n] for n in ("c2mf", "CRAFT (train crops)", "PCA, per class") if n in dicts}
        attribution = _evaluation(folder / f"attribution-k{k}", train, test, chosen, None, setup["model"],
                                  EvaluateConfig(attribution=True, rankings=RANKINGS, encode_class=("predicted",),
                                                 cluster_ks=()))
        out[title] = {"sweep": swept, "table": table, "attribution": attribution}
    return out


def gather(work: Path, data: Path) -> dict[str, Any]:
    """The results already in WORKDIR, read from the files `measure` wrote (setups not run yet are left out)."""
    out: dict[str, Any] = {}
    for title in _setups(data):
        folder = work / _slug(title)
        files = {"sweep": folder / "sweep" / "sweep.json", "table": folder / f"table-k{TABLE_K}" / "evaluation.json",
                 "attribution": folder / f"attribution-k{TABLE_K}" / "evaluation.json"}
        if files["sweep"].is_file() and files["table"].is_file():
            out[title] = {part: json.loads(f.read_text()) if f.is_file() else None for part, f in files.items()}
            if out[title]["attribution"] is None:
                print(f"{title}: no attribution evaluation in {folder} yet, left out of that table", flush=True)
        elif any(f.is_file() for f in files.values()):
            print(f"{title}: unfinished in {folder} (rerun without --docs-only), left out", flush=True)
    if not out:
        raise SystemExit(f"no finished setup in {work}: run without --docs-only first")
    return out


# ------------------------------------------------------------------------------------------------ tables

def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _methods(table: dict[str, Any]) -> list[dict[str, Any]]:
    return table["methods"]


def _rec(m: dict[str, Any], enc: str) -> dict[str, Any]:
    return (((m.get("by_encoding") or {}).get(enc) or {}).get("reconstruction") or {})


def _sizes(results: dict[str, Any]) -> str:
    return "; ".join(f"{t}: {r['table']['n_test_images']} test images, "
                     f"{len(r['table']['references']['model']['accuracy']['per_class'])} classes"
                     for t, r in results.items())


def _by_method(results: dict[str, Any], part: str, header: str, cell: Any) -> str:
    """One row per method (in the order of the first setup's evaluation, then any others), one column per setup."""
    titles = list(results)
    names: list[str] = []
    for t in titles:
        names += [m["name"] for m in _methods(results[t][part]) if m["name"] not in names]
    lines = [f"| method (k = {TABLE_K}) | " + " | ".join(f"{t}: {header}" for t in titles) + " |",
             "|---|" + "---|" * len(titles)]
    for name in names:
        row = [name]
        for t in titles:
            m = next((m for m in _methods(results[t][part]) if m["name"] == name), None)
            row.append("–" if m is None else cell(m))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def similarity_table(results: dict[str, Any]) -> str:
    """Table 1: mean |Pearson| (and |cosine|) between pairs of concepts; per-class methods pair within a class."""
    def cell(m: dict[str, Any]) -> str:
        s = m.get("similarity") or {}
        return f"{_f(s.get('pearson_mean'))} ± {_f(s.get('pearson_std'))} ({_f(s.get('cosine_mean'))})"
    return _by_method(results, "table", "\\|Pearson\\| (\\|cosine\\|)", cell)  # pipes escaped in a table


def reconstruction_table(results: dict[str, Any]) -> str:
    """Table 2: accuracy under the true class (the paper's protocol) and agreement under the predicted class."""
    titles = list(results)
    lines = ["| row (k = 10) | directions | " + " | ".join(
        f"{t}: accuracy, true class (paper) | {t}: agreement, predicted class" for t in titles) + " |",
        "|---|---|" + "---|---|" * len(titles)]
    refs = [("model", "the model itself"), ("class_mean_true", "**true class's train mean alone, k = 0**"),
            ("class_mean_predicted", "predicted class's train mean alone, k = 0"),
            ("global_mean", "global train mean alone"), ("chance", "chance (1 / classes)")]
    for key, label in refs:
        row = [label, "0" if "mean" in key else "–"]
        for t in titles:
            ref = results[t]["table"]["references"][key]
            row += [_f(ref.get("accuracy", {}).get("mean")), _f(ref.get("agreement", {}).get("mean"))]
        lines.append("| " + " | ".join(row) + " |")
    for name in [m["name"] for m in _methods(results[titles[0]]["table"])]:
        row = None
        for t in titles:
            m = next((m for m in _methods(results[t]["table"]) if m["name"] == name), None)
            if row is None:
                row = [name, "–" if not m else str(m["directions"]) if m.get("capacity") == "shared"
                       else f"{m['k']} per class"]
            row += [_f(_rec(m or {}, "true").get("accuracy", {}).get("mean")),
                    _f(_rec(m or {}, "predicted").get("agreement", {}).get("mean"))]
        lines.append("| " + " | ".join(row or []) + " |")
    return "\n".join(lines) + f"\n\n({_sizes(results)}; means over classes.)\n"


def consistency_table(results: dict[str, Any]) -> str:
    """Table 3: MSE(A, U W) on train and test images and the difference, under the predicted class."""
    def cell(m: dict[str, Any]) -> str:
        c, fit = m.get("consistency") or {}, (m.get("fit") or {}).get("test") or {}
        return (f"{_f(c.get('difference'), 4)} ({_f(c.get('train_mse'), 3)} / {_f(c.get('test_mse'), 3)}; "
                f"R² {_f(fit.get('r2'), 2)})")
    return _by_method(results, "table", "train − test MSE (train / test; test R²)", cell)


def ood_table(results: dict[str, Any]) -> str:
    """The OOD view of crops: whole test images (in-distribution) against train crops resized to the input."""
    lines = ["| setup | AUROC | FPR at 95 % TPR | AUPR-In | AUPR-Out | mean max-softmax, whole images | crops |",
             "|---|---|---|---|---|---|---|"]
    for t, r in results.items():
        if not r["table"].get("ood"):
            continue
        o = r["table"]["ood"]
        h = o.get("histograms") or {}
        lines.append(f"| {t} | {_f(o.get('auroc'))} | {_f(o.get('fpr_at_95_tpr'))} | {_f(o.get('aupr_in'))} | "
                     f"{_f(o.get('aupr_out'))} | {_f(h.get('mean_in'))} | {_f(h.get('mean_out'))} |")
    return "\n".join(lines) + "\n"


def sweep_table(results: dict[str, Any]) -> str:
    """Figure 4 as a table: agreement (predicted class) and, in brackets, accuracy (true class) against k."""
    parts = []
    for t, r in results.items():
        s = r["sweep"]
        ks = s["settings"]["ks"]
        lines = [f"**{t}**", "", "| method | " + " | ".join(f"k = {k}" for k in ks) +
                 f" | smallest k reaching {s['target']} |", "|---|" + "---|" * (len(ks) + 1)]
        for method, points in s["series"].items():
            by_k = {p["k"]: p for p in points}
            cells = [f"{_f(by_k[k]['predicted']['agreement'])} ({_f(by_k[k]['true']['accuracy'])})"
                     if k in by_k and "true" in by_k[k] else
                     (_f(by_k[k]["predicted"]["agreement"]) if k in by_k else "–") for k in ks]
            best = s["smallest_k"].get(method)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {best if best is not None else f'> {ks[-1]}'} |")
        ref = (s.get("references") or {}).get(str(ks[0])) or {}
        cm = (ref.get("class_mean_predicted") or {}).get("agreement", {}).get("mean")
        lines.append(f"| predicted class's mean alone (k = 0) | {_f(cm)} |" + " |" * len(ks))
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def attribution_table(results: dict[str, Any]) -> str:
    """Insertion / deletion AUC (probability of the model's class) with concepts ranked by each importance."""
    results = {t: r for t, r in results.items() if r.get("attribution")}
    if not results:
        return "(no attribution evaluation yet)\n"
    rankings = next(iter(results.values()))["attribution"]["settings"]["rankings"]

    def cell(m: dict[str, Any]) -> str:
        out = []
        for r in rankings:
            curves = (m.get("insertion_deletion") or {}).get(r) or {}
            out.append(f"{r} {_f((curves.get('insertion') or {}).get('prob_auc'), 2)} / "
                       f"{_f((curves.get('deletion') or {}).get('prob_auc'), 2)}")
        return "<br>".join(out)
    return _by_method(results, "attribution", "insertion ↑ / deletion ↓", cell)


SECTIONS = {"similarity": similarity_table, "reconstruction": reconstruction_table,
            "consistency": consistency_table, "ood": ood_table, "sweep": sweep_table,
            "attribution": attribution_table}


def write_docs(results: dict[str, Any]) -> None:
    doc = DOCS.read_text()
    for key, make in SECTIONS.items():
        begin, end = f"<!-- results: {key} begin -->", f"<!-- results: {key} end -->"
        if begin not in doc or end not in doc:
            raise SystemExit(f"{DOCS} has no {begin} ... {end} section to replace")
        head, rest = doc.split(begin, 1)
        doc = head + begin + "\n" + make(results) + end + rest.split(end, 1)[1]
    DOCS.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--concepts", default="5,10,25,50", help="the sweep's k values, comma-separated")
    ap.add_argument("--only", help="run only the setups whose title contains this (e.g. CUB)")
    ap.add_argument("--write-docs", action="store_true", help=f"replace the generated tables in {DOCS}")
    ap.add_argument("--docs-only", action="store_true",
                    help="measure nothing: read every finished setup's files in WORKDIR (each may have been run with "
                         "its own --only / --concepts)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ks = tuple(int(k) for k in args.concepts.split(",") if k.strip())
    results = gather(args.work, args.data) if args.docs_only else measure(args.work, args.data, ks, args.only)
    keep = ("inputs", "settings", "c2mf_version", "n_test_images", "references", "methods", "significance", "ood",
            "time_s")
    record = json.dumps(
        {t: {"sweep": r["sweep"], **{part: {k: r[part].get(k) for k in keep} if r[part] else None
                                     for part in ("table", "attribution")}}
         for t, r in results.items()}, indent=1)
    (args.work / "results.json").write_text(record)
    for make in SECTIONS.values():
        print(make(results))
    if args.write_docs:
        write_docs(results)
        (DOCS.parent / "results.json").write_text(record)  # the numbers the tables were written from


if __name__ == "__main__":
    main()
