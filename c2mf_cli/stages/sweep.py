"""The k sweep (the paper's Figure 4 and Table 2 layout): fit every method at each k, evaluate each k, and read
fidelity against k, with the smallest k at which each method keeps the model's decision.

    from c2mf_cli.stages.sweep import SweepConfig, sweep
    result = sweep("train.zarr", "test.zarr", SweepConfig(ks=(5, 10, 20), methods=("c2mf", "pca")), "sweep/")

Data flow: for each k and method, `factorize` on the train store (the crop store for methods that learn from
crops, e.g. CRAFT) writes DIR/dicts/METHOD-kK.safetensors; for each k, `evaluate` of that k's dictionaries on the
test store writes DIR/kK/ (evaluation.json and plots; CRAFT is also clustered to K = k there). DIR/sweep.json
gathers, per method and k, agreement with the model and accuracy (both encodings evaluate computed), the
insertion/deletion AUCs when attribution is on, and `smallest_k`: the first k whose agreement under the headline
(predicted-class) encoding reaches `target`. Plots: DIR/agreement_vs_k.png and DIR/accuracy_vs_k.png.

Resumable: a fit is reused when its file exists and was made by the same method, k, seed and store; a k's
evaluation is reused when DIR/kK/inputs.json names the same dictionaries (by tensor sha256) and settings.
Anything else found at those paths is refused by name, never overwritten silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .._io import write_json
from ..artifacts.dictionary import ConceptDictionary
from ..artifacts.provenance import Provenance
from ..errors import C2MFError, UsageError
from ..methods import get_method, list_methods, load_dictionary
from ..progress import ProgressFn, no_progress
from .evaluate import EvaluateConfig, evaluate
from .factorize import factorize

SWEEP_TYPE = "c2mf-sweep"
SWEEP_VERSION = 1


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep fits and how it reads the result.

    ks: the numbers of concepts, increasing. methods: registered method names (each at its defaults, with
    `concepts` = k, `seed`, and `iterations` when given, for the methods that take them). rows, group_by: the
    rows whole-image methods learn from (`ActivationStore.row_source`: positions or pooled, by label or by the
    model's prediction); crop methods learn from their crops. target: the agreement with the model (headline encoding, mean over classes)
    that defines `smallest_k`. evaluate: the settings of every k's evaluation (attribution off by default: the
    sweep is about fidelity against k; turn it on for insertion/deletion against k).
    """

    ks: tuple[int, ...]
    methods: tuple[str, ...] = ("c2mf", "craft", "pca")
    target: float = 0.9
    seed: int = 0
    evaluate: EvaluateConfig = field(default_factory=lambda: EvaluateConfig(attribution=False))
    iterations: int | None = None
    rows: str = "positions"
    group_by: str = "label"

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks) or list(self.ks) != sorted(set(self.ks)):
            raise UsageError(f"--concepts takes increasing, distinct numbers >= 1 (e.g. 5,10,20), got "
                             f"{','.join(map(str, self.ks)) or 'nothing'}")
        unknown = [m for m in self.methods if m not in list_methods()]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise UsageError(f"--method takes distinct names among {', '.join(list_methods())}, got "
                             f"{', '.join(self.methods) or 'nothing'}")
        if not 0.0 < self.target <= 1.0:
            raise UsageError(f"--target must be in (0, 1], got {self.target}")
        if self.rows not in ("positions", "pooled") or self.group_by not in ("label", "predicted"):
            raise UsageError(f"--rows takes positions or pooled and --group-by label or predicted, got "
                             f"{self.rows!r} and {self.group_by!r}")
        if self.iterations is not None and self.iterations < 1:
            raise UsageError(f"--iterations must be at least 1, got {self.iterations}")

    def to_dict(self) -> dict[str, Any]:
        return {"ks": list(self.ks), "methods": list(self.methods), "target": self.target, "seed": self.seed,
                "iterations": self.iterations, "rows": self.rows, "group_by": self.group_by,
                "evaluate": self.evaluate.to_dict()}


def _fit_path(out: Path, method: str, k: int) -> Path:
    return out / "dicts" / f"{method}-k{k}.safetensors"


def _reuse_fit(path: Path, method: str, options: dict[str, Any], source: Any) -> ConceptDictionary | None:
    """The dictionary at `path` if it is this fit (method, options, store and rows); None when absent; else an
    error."""
    if not path.exists():
        return None
    d = load_dictionary(path)  # checksum, tensors and the method's contract: a damaged file is refused by name
    recorded = d.meta.get("config") or {}
    prov, theirs = d.provenance, Provenance.read(source.info)
    same = (d.method == method and d.n_concepts == options["concepts"] and prov.fingerprint == theirs.fingerprint
            and (prov.rows or "positions") == (theirs.rows or "positions")
            and (prov.group_by or "label") == (theirs.group_by or "label")
            and all(recorded.get(key) == value for key, value in options.items()))
    if not same:
        wanted = ", ".join(f"{key} {value}" for key, value in options.items())
        raise C2MFError(f"{path} was not fitted by this sweep ({method}, {wanted}, this store): give another --out "
                        "folder, or delete the file to refit it")
    return d


def _fit_options(method: str, k: int, config: SweepConfig) -> dict[str, Any]:
    """concepts = k, and the seed and iterations where the method takes them; the rest at the method's default."""
    fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    opts: dict[str, Any] = {"concepts": k}
    if "seed" in fields:
        opts["seed"] = config.seed
    if config.iterations is not None and "iterations" in fields:
        opts["iterations"] = config.iterations
    return opts


def _evaluation_stamp(dicts: Sequence[ConceptDictionary], settings: dict[str, Any],
                      stores: dict[str, str | None]) -> dict[str, Any]:
    return {"dictionaries": [d.meta.get("tensors_sha256") for d in dicts], "settings": settings, "stores": stores}


def _row(m: dict[str, Any]) -> dict[str, Any]:
    """What the sweep keeps of one method's evaluation row."""
    out: dict[str, Any] = {"name": m["name"], "method": m["method"], "k": m["k"], "capacity": m.get("capacity"),
                           "directions": m.get("directions")}
    for enc, entry in (m.get("by_encoding") or {}).items():
        rec = entry.get("reconstruction") or {}
        out[enc] = {"agreement": rec.get("agreement", {}).get("mean"),
                    "accuracy": rec.get("accuracy", {}).get("mean"),
                    "agreement_std": rec.get("agreement", {}).get("std"),
                    "accuracy_std": rec.get("accuracy", {}).get("std")}
    if m.get("insertion_deletion"):
        out["insertion_deletion"] = {r: {mode: c[mode]["prob_auc"] for mode in ("insertion", "deletion")}
                                     for r, c in m["insertion_deletion"].items()}
    return out


def sweep(
    train: Any,
    test: Any,
    config: SweepConfig,
    out_dir: str | os.PathLike[str],
    *,
    crops: Any = None,
    device: str = "auto",
    model: str | None = None,
    checkpoint: str | None = None,
    progress: ProgressFn = no_progress,
    log: Any = None,
) -> dict[str, Any]:
    """Fit `config.methods` at every k of `config.ks` and evaluate each k; returns (and writes) DIR/sweep.json.

    Args:
        train, test: activation stores (paths or opened `ActivationStore`s) of whole images.
        crops: a store of train-split crops, for the methods that learn from crops (CRAFT); None skips nothing
            silently: a crop method without it is an error.
        model, checkpoint: as in `evaluate` (a model recorded as code runs only when `model` names it).
        log: optional callable taking one line (what is reused, what is fitted).
    """
    from ..artifacts.store import ActivationStore

    def opened(s: Any) -> Any:
        return ActivationStore.open(s) if isinstance(s, (str, os.PathLike)) else s

    train_s, test_s = opened(train), opened(test)
    crops_s = opened(crops) if crops is not None else None
    say = log or (lambda line: None)
    needs_crops = [m for m in config.methods if get_method(m).needs == "crops"]
    if needs_crops and crops_s is None:
        raise UsageError(f"{', '.join(needs_crops)} learns from crop activations: give --train-crops STORE (made "
                         "by c2mf extract --mode crops --split train), or leave it out of --method")
    if crops_s is not None and crops_s.mode != "crops":
        raise UsageError(f"the --train-crops store holds {crops_s.mode!r} rows, not crops: make it with "
                         "c2mf extract --mode crops")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise C2MFError(f"the output folder {str(out)!r} is a file: give a folder path")
    (out / "dicts").mkdir(parents=True, exist_ok=True)

    sources = {"full": train_s.row_source(rows=config.rows, group_by=config.group_by),
               "crops": crops_s.row_source() if crops_s is not None else None}
    by_k: dict[int, list[dict[str, Any]]] = {}
    references: dict[int, Any] = {}
    for k in config.ks:
        dicts = []
        for method in config.methods:
            source = sources[get_method(method).needs]
            path = _fit_path(out, method, k)
            options = _fit_options(method, k, config)
            d = _reuse_fit(path, method, options, source)
            if d is None:
                say(f"fitting {method} at k = {k}")
                d = factorize(source, method, device=device, progress=progress, **options)
                d.save(path)  # records its tensors' sha256 in d.meta, as a load would
            else:
                say(f"reusing {path}")
            dicts.append(d)
        kdir = out / f"k{k}"
        settings = config.evaluate.to_dict()
        stamp = _evaluation_stamp(dicts, settings, {"train": train_s.fingerprint, "test": test_s.fingerprint})
        stamp_path = kdir / "inputs.json"
        result = None
        if (kdir / "evaluation.json").is_file() and stamp_path.is_file():
            try:
                previous = json.loads(stamp_path.read_text())
            except (OSError, json.JSONDecodeError):
                previous = None
            if previous == json.loads(json.dumps(stamp)):
                say(f"reusing the evaluation in {kdir}")
                result = json.loads((kdir / "evaluation.json").read_text())
        if result is None:
            say(f"evaluating k = {k}")
            stamp_path.unlink(missing_ok=True)  # an evaluation in progress is never taken for a finished one
            result = evaluate(train_s, test_s, dicts, None, config.evaluate, progress, names=list(config.methods),
                              device=device, model=model, checkpoint=checkpoint, out_dir=kdir)
            write_json(stamp_path, stamp)
        by_k[k] = [_row(m) for m in result["methods"]]
        references[k] = result.get("references")

    summary = _summary(by_k, references, config)
    record = {"encoding-type": SWEEP_TYPE, "encoding-version": SWEEP_VERSION, "settings": config.to_dict(),
              "stores": {"train": train_s.fingerprint, "test": test_s.fingerprint,
                         "train_crops": crops_s.fingerprint if crops_s is not None else None},
              **summary}
    files = _plots(summary, config, out)
    record["files"] = {name: os.path.basename(p) for name, p in files.items()}
    write_json(out / "sweep.json", record)
    return record


def _summary(by_k: dict[int, list[dict[str, Any]]], references: dict[int, Any], config: SweepConfig
             ) -> dict[str, Any]:
    """Rows as series against k (one per method, clustered CRAFT by its K), references per k, smallest k."""
    headline = config.evaluate.headline
    series: dict[str, list[dict[str, Any]]] = {}
    for rows in by_k.values():
        for r in rows:
            label = r["name"].rsplit(" K=", 1)[0] if " clustered K=" in r["name"] else r["name"]
            series.setdefault(label, []).append({key: v for key, v in r.items() if key != "name"})
    smallest = {}
    for label, pts in series.items():
        reached = [p["k"] for p in pts if (p.get(headline) or {}).get("agreement") is not None
                   and p[headline]["agreement"] >= config.target]
        smallest[label] = min(reached) if reached else None
    return {"headline_encoding": headline, "series": series,
            "references": {str(k): v for k, v in references.items()}, "smallest_k": smallest,
            "target": config.target}


def _plots(summary: dict[str, Any], config: SweepConfig, out: Path) -> dict[str, str]:
    from ..render import plots

    headline = summary["headline_encoding"]
    files = {}
    for what, ylabel in (("agreement", "agreement with the model"), ("accuracy", "accuracy (labels)")):
        series = {label: [(p["k"], p[headline][what], p[headline][f"{what}_std"] or 0.0) for p in pts
                          if (p.get(headline) or {}).get(what) is not None]
                  for label, pts in summary["series"].items()}
        series = {label: pts for label, pts in series.items() if pts}
        if series:
            files[f"{what}_vs_k"] = str(plots.accuracy_vs_k(
                series, out / f"{what}_vs_k.png", ylabel=f"{ylabel}, {headline}-class encoding",
                title=f"{what} against k (target {config.target:g})" if what == "agreement" else None))
    return files


def sweep_config(ks: Sequence[int], methods: Sequence[str], *, target: float = 0.9, seed: int = 0,
                 iterations: int | None = None, rows: str = "positions", group_by: str = "label",
                 **evaluate_settings: Any) -> SweepConfig:
    """A SweepConfig from plain values; `evaluate_settings` are fields of `EvaluateConfig`."""
    known = {f.name for f in dataclasses.fields(EvaluateConfig)}
    unknown = sorted(set(evaluate_settings) - known)
    if unknown:
        raise UsageError(f"unknown evaluate settings: {', '.join(unknown)}")
    evaluate_settings.setdefault("attribution", False)
    return SweepConfig(tuple(ks), tuple(methods), target, seed, EvaluateConfig(**evaluate_settings), iterations,
                       rows, group_by)
