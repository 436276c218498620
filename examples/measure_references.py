"""Measure evaluate's references, predicted- vs true-class numbers and the code rules on the real models, and
write the tables of docs/metrics.md ("Measured: references and the class used to encode", "Measured: the code
rule at encoding").

    python examples/measure_references.py WORKDIR [--data ../shared/data] [--concepts 10] [--codes fit,nnls,lstsq]
                                          [--only CIFAR] [--write-docs]

CIFAR-10 ResNet-20 `layer3` (seeded 80/20 split of the 1,000 JPEGs, at most 30 train and 10 test images per
class) and the CUB bird model `head_conv` (seeded 80/20 split per species, at most 8 train and 3 test images per
species), and the same bird model at the signed layer `blocks.16` (CRAFT then fits A - min(A), `--shift`):
small stores, so that it runs in minutes on a laptop CPU. Each fits, at k concepts:
c2mf, PCA and semi-NMF shared (k directions), CRAFT on train crops, clustered to K = k by evaluate, and per-class
PCA (k x classes directions); then `evaluate` with codes under the predicted and the true class, without
attribution (importance is not what is measured here), once per code rule (`--codes`). Stores and dictionaries are kept in WORKDIR, so a rerun
reuses them. Every number in the docs table comes from the evaluation.json files this script writes.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
BEGIN, END = "<!-- measure_references: begin -->", "<!-- measure_references: end -->"
CODES_BEGIN, CODES_END = "<!-- measure_codes: begin -->", "<!-- measure_codes: end -->"


def _setups(data: Path) -> dict[str, dict[str, Any]]:
    return {
        "CIFAR-10 ResNet-20 layer3": {
            "model": f"{data / 'models.py'}:cifar_resnet20", "checkpoint": data / "cifar10" / "resnet20-12fca82f.th",
            "layer": "layer3", "images": data / "cifar10" / "images", "class_index": None,
            "train_cap": 30, "test_cap": 10,
        },
        "CUB bird model head_conv": {
            "model": f"{data / 'models.py'}:mobilenet_v2_inat_birds",
            "checkpoint": data / "cub" / "mobilenet_v2_inat_birds.pt", "layer": "head_conv",
            "images": data / "cub" / "images", "class_index": data / "cub" / "class_index.json",
            "train_cap": 8, "test_cap": 3,
        },
        "CUB bird model blocks.16": {
            "model": f"{data / 'models.py'}:mobilenet_v2_inat_birds",
            "checkpoint": data / "cub" / "mobilenet_v2_inat_birds.pt", "layer": "blocks.16",
            "images": data / "cub" / "images", "class_index": data / "cub" / "class_index.json",
            "train_cap": 8, "test_cap": 3, "signed": True,
        },
    }


def _store(work: Path, name: str, setup: dict, split: str, mode: str = "full") -> Path:
    from c2mf_cli.inputs.data import CropSpec, DatasetSpec
    from c2mf_cli.inputs.models import ModelSpec
    from c2mf_cli.stages.extract import ExtractConfig, extract

    out = work / f"{name}-{split}-{mode}.zarr"
    cap = setup["train_cap"] if split == "train" else setup["test_cap"]
    cfg = ExtractConfig(
        model=ModelSpec(setup["model"], checkpoint=str(setup["checkpoint"])), layer=setup["layer"],
        data=DatasetSpec(str(setup["images"]), split=split, class_index=str(setup["class_index"] or "") or None,
                         max_per_class=cap),
        out=str(out), mode=mode, crops=CropSpec(kind="grid", size=0.5, stride=0.5), dtype="float32", workers=0,
        device="cpu",
    )
    extract(cfg)
    return out


def _dictionaries(work: Path, name: str, train: Path, crops: Path, k: int, signed: bool = False) -> dict[str, Path]:
    from c2mf_cli.artifacts.store import ActivationStore
    from c2mf_cli.stages.factorize import factorize

    fits = {
        "c2mf": (train, "c2mf", {}),
        "pca --shared": (train, "pca", {"shared": True}),
        "semi-nmf --shared": (train, "semi-nmf", {"shared": True}),
        "craft (train crops)": (crops, "craft", {"shift": True} if signed else {}),
        "pca (per class)": (train, "pca", {}),
    }
    out = {}
    for label, (store, method, opts) in fits.items():
        path = work / f"{name}-{re.sub(r'[^a-z0-9]+', '_', label)}-k{k}.safetensors"
        if not path.is_file():
            t = time.perf_counter()
            d = factorize(ActivationStore.open(store).row_source(), method, concepts=k, device="cpu", **opts)
            d.save(path)
            print(f"  {label}: fitted in {time.perf_counter() - t:.0f} s", flush=True)
        out[label] = path
    return out


def measure(work: Path, data: Path, k: int, only: str | None = None,
            rules: tuple[str, ...] = ("fit",)) -> dict[str, dict[str, Any]]:
    """{setup title: {code rule: evaluation result}}."""
    from c2mf_cli.artifacts.dictionary import ConceptDictionary
    from c2mf_cli.artifacts.store import ActivationStore
    from c2mf_cli.stages.evaluate import EvaluateConfig, evaluate

    results = {}
    for title, setup in _setups(data).items():
        if only is not None and only.lower() not in title.lower():
            continue
        name = re.sub(r"[^a-z0-9]+", "_", title.lower())
        print(title, flush=True)
        train, test = _store(work, name, setup, "train"), _store(work, name, setup, "test")
        crops = _store(work, name, setup, "train", mode="crops")
        paths = _dictionaries(work, name, train, crops, k, bool(setup.get("signed")))
        results[title] = {}
        for rule in rules:
            t = time.perf_counter()
            results[title][rule] = evaluate(
                ActivationStore.open(train), ActivationStore.open(test),
                [ConceptDictionary.load(p) for p in paths.values()],
                config=EvaluateConfig(attribution=False, codes=rule), names=list(paths), device="cpu",
                model=setup["model"],  # our own example model: its code is ours to run
                out_dir=work / f"{name}-evaluation-{rule}")
            print(f"  codes {rule}: evaluated in {time.perf_counter() - t:.0f} s", flush=True)
    return results


def _f(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}"


def table(results: dict[str, Any], k: int) -> str:
    titles = list(results)
    lines = [f"| row (k = {k}) | directions | " + " | ".join(
        f"{t}: agreement, predicted class | {t}: accuracy, predicted | {t}: accuracy, true class (paper)"
        for t in titles) + " |", "|---|---|" + "---|---|---|" * len(titles)]

    def cells(entry: dict | None, true_entry: dict | None) -> list[str]:
        agr = (entry or {}).get("agreement", {}).get("mean")
        acc = (entry or {}).get("accuracy", {}).get("mean")
        acc_true = (true_entry or {}).get("accuracy", {}).get("mean")
        return [_f(agr), _f(acc), _f(acc_true)]

    refs = [("model", "the model itself"), ("class_mean_true", "true class's train mean alone (k = 0)"),
            ("class_mean_predicted", "predicted class's train mean alone (k = 0)"),
            ("global_mean", "global train mean alone"), ("chance", "chance (1 / classes)")]
    for key, label in refs:
        row = [f"reference: {label}", "0" if "mean" in key else "–"]
        for t in titles:
            ref = results[t]["references"][key]
            acc = ref.get("accuracy", {}).get("mean")
            agr = ref.get("agreement", {}).get("mean")
            # references take no encoding: the same numbers in both accuracy columns
            row += [_f(agr), _f(acc), _f(acc)]
        lines.append("| " + " | ".join(row) + " |")
    names = [m["name"] for m in results[titles[0]]["methods"]]
    for n in names:
        row = None
        for t in titles:
            m = next((m for m in results[t]["methods"] if m["name"] == n), None)
            if row is None:  # shared: k directions; per class: k for each class (k x classes in all)
                row = [n, ("–" if not m else f"{m['k']}" if m.get("capacity") == "shared" else f"{m['k']} per class")]
            by = (m or {}).get("by_encoding", {})
            row += cells((by.get("predicted") or {}).get("reconstruction"), (by.get("true") or {}).get("reconstruction"))
        lines.append("| " + " | ".join(row or []) + " |")
    n_test = ", ".join(f"{t}: {results[t]['n_test_images']} test images" for t in titles)
    return "\n".join(lines) + f"\n\n({n_test}; accuracy and agreement are means over classes.)\n"


def codes_table(results: dict[str, dict[str, Any]], k: int) -> str:
    """Agreement with the model (predicted-class encoding) of each method under each code rule."""
    titles = list(results)
    rules = list(next(iter(results.values())))
    lines = [f"| method (k = {k}) | " + " | ".join(f"{t}: {r}" for t in titles for r in rules) + " |",
             "|---|" + "---|" * (len(titles) * len(rules))]
    first = results[titles[0]][rules[0]]
    for n in [m["name"] for m in first["methods"]]:
        row = [n]
        for t in titles:
            for r in rules:
                m = next((m for m in results[t][r]["methods"] if m["name"] == n), None)
                rec = (((m or {}).get("by_encoding") or {}).get("predicted") or {}).get("reconstruction") or {}
                row.append(_f(rec.get("agreement", {}).get("mean")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n(agreement of h(reconstruction) with the model, predicted-class encoding, mean over classes)\n"


def _replace(doc: str, begin: str, end: str, text: str) -> str:
    if begin not in doc or end not in doc:
        raise SystemExit(f"{DOCS} has no {begin} ... {end} section to replace")
    head, rest = doc.split(begin, 1)
    return head + begin + "\n" + text + end + rest.split(end, 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--concepts", type=int, default=10)
    ap.add_argument("--only", help="measure only the setups whose title contains this (e.g. CIFAR)")
    ap.add_argument("--codes", default="fit,nnls,lstsq", help="code rules to evaluate, comma-separated")
    ap.add_argument("--write-docs", action="store_true", help=f"replace the measured table in {DOCS}")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rules = tuple(r.strip() for r in args.codes.split(",") if r.strip())
    results = measure(args.work, args.data, args.concepts, args.only, rules)
    fit = {t: r[rules[0]] for t, r in results.items()}
    text = table(fit, args.concepts)
    codes = codes_table(results, args.concepts)
    (args.work / "references.md").write_text(text + "\n" + codes)
    (args.work / "references.json").write_text(json.dumps(
        {t: {rule: {"references": r["references"], "significance": r["significance"],
                    "methods": [{k: m[k] for k in ("name", "directions", "by_encoding")} for m in r["methods"]]}
             for rule, r in by_rule.items()} for t, by_rule in results.items()}, indent=1))
    print(text)
    print(codes)
    if args.write_docs:
        doc = _replace(DOCS.read_text(), BEGIN, END, text)
        if len(rules) > 1:
            doc = _replace(doc, CODES_BEGIN, CODES_END, codes)
        DOCS.write_text(doc)


if __name__ == "__main__":
    main()
