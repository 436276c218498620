"""Evaluate concept dictionaries side by side with every metric of METHOD.md section 4.

Data flow: a train store and a held-out test store of the same model and layer (whole images), optionally a crop
store, and one or more `ConceptDictionary` files. The model's tail h comes from splitting the store's model at its
layer. For each test image, the codes are U = encode(A, y) on its positions (y = the image's class, which picks
the class's dictionary: diag(sigma(lambda_y)) W* for c2mf, W_y for per-class methods) and reshaped to the grid;
`head(U) = h(from_store(decode(U)))` is what importance, insertion/deletion and reconstruction accuracy feed.

ViT stores: the rows are the patch tokens; the prefix (CLS) tokens are kept as stored and fed to h unchanged, so
only the patch tokens are explained and reconstructed (METHOD.md: heatmaps use the patch tokens on their grid).

Every metric is computed class by class (one read of each class per store) and pooled. The result is one dict
(written as JSON by `write_results`, with PNG plots) holding every number, the inputs' fingerprints and the
settings. The importance target c is the model's own prediction on the original activations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from .. import __version__
from ..devices import resolve_device
from ..errors import C2MFError, UsageError
from ..metrics import (
    FitAccumulator,
    InsertionDeletion,
    cluster_concepts,
    concept_similarity,
    confidence_histograms,
    consistency,
    gradcam,
    insertion_deletion,
    integrated_gradients,
    max_softmax,
    ood_scores,
    per_class_accuracy,
    ranking,
)
from ..progress import ProgressFn, no_progress

ENCODING_TYPE = "c2mf-evaluation"
ENCODING_VERSION = 1
# every plot `write_results` may draw (names are fixed, so a rerun into the same folder replaces them)
PLOT_FILES = tuple(f"insertion_deletion_{r}_{q}.png" for r in ("gradcam", "ig") for q in ("prob", "accuracy")) + (
    "accuracy_vs_k.png", "confidence_histograms.png")


class StoreLike(Protocol):
    """What evaluate reads from an activation store (c2mf_cli.artifacts.store.ActivationStore satisfies it)."""

    info: dict
    classes: list[str]
    mode: str
    layer: str
    fingerprint: str
    layout: str
    num_prefix_tokens: int

    def n_images(self, y: int) -> int: ...
    def activations(self, y: int) -> np.ndarray: ...
    def logits(self, y: int) -> np.ndarray: ...
    def labels(self, y: int) -> np.ndarray: ...


class DictionaryLike(Protocol):
    """What evaluate needs of a dictionary (c2mf_cli.artifacts.dictionary.ConceptDictionary satisfies it)."""

    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def method(self) -> str: ...
    @property
    def classes(self) -> list[str]: ...
    @property
    def per_class(self) -> bool: ...
    @property
    def n_concepts(self) -> int: ...
    @property
    def n_features(self) -> int: ...
    def to(self, device: str | torch.device) -> "DictionaryLike": ...
    def basis(self, y: int | None = None) -> torch.Tensor: ...
    def encode(self, A: Any, y: int | None = None) -> Any: ...
    def decode(self, U: Any, y: int | None = None) -> Any: ...


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one evaluation; written into the output JSON.

    max_images_per_class: cap on test and train images read per class (the first N; None = all).
    ig_steps / ig_rule: Integrated Gradients quadrature. batch_size: rows (image x step) per call of h.
    cluster_ks: K values of the clustering ablation (None: the k of every shared dictionary given).
    """

    max_images_per_class: int | None = None
    ig_steps: int = 32
    ig_rule: str = "gausslegendre"
    batch_size: int = 1024
    histogram_bins: int = 20
    cluster_ks: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ig_steps < 2:
            raise UsageError(f"--ig-steps must be at least 2 (32 or more is advised), got {self.ig_steps}")
        if self.max_images_per_class is not None and self.max_images_per_class < 1:
            raise UsageError(f"--max-images-per-class must be at least 1, got {self.max_images_per_class}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cluster_ks"] = list(self.cluster_ks) if self.cluster_ks is not None else None
        return d


@dataclass
class _Tail:
    """h with the store layout: maps store-layout activations (m, *positions, c) to logits."""

    h: torch.nn.Module
    from_store: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return self.h(self.from_store(a))


def _tail_from_store(store: StoreLike, device: torch.device) -> _Tail:
    from ..inputs.models import load_model, split_model

    spec = store.model_spec  # type: ignore[attr-defined]
    lm = load_model(spec)
    pre = getattr(store, "preprocess", None)
    size = tuple(pre.input_size) if pre is not None and getattr(pre, "input_size", None) else None
    split = split_model(lm.model, store.layer, size, verify=False)  # type: ignore[arg-type]
    h = split.h.to(device).eval()
    for p in h.parameters():
        p.requires_grad_(False)
    return _Tail(h, split.from_store)


# ---------------------------------------------------------------------------------------------------- checks


def _label(d: DictionaryLike, i: int, names: Sequence[str] | None) -> str:
    if names is not None:
        return names[i]
    return f"{d.method} k={d.n_concepts}"


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} #{seen[lab]}")
    return out


def _class_map(d: DictionaryLike, store: StoreLike, label: str) -> list[int | None]:
    """For each store class, the class index y to give the dictionary (None where it takes no class)."""
    needs_y = d.per_class or "gates" in d.tensors or d.tensors.get("mean", torch.zeros(1)).ndim == 2
    names = d.classes
    out: list[int | None] = []
    for name in store.classes:
        if name in names:
            out.append(names.index(name))
        elif needs_y:
            raise C2MFError(
                f"dictionary {label!r} has no class {name!r} of the store (it has {len(names)} classes: "
                f"{', '.join(names[:5])}{'...' if len(names) > 5 else ''}); fit it on a store of the same classes"
            )
        else:
            out.append(None)
    return out


def _check_inputs(train: StoreLike, test: StoreLike, crops: StoreLike | None, dicts: Sequence[DictionaryLike],
                  labels: Sequence[str]) -> None:
    for role, s in (("train", train), ("test", test)):
        if s.mode != "full":
            raise C2MFError(f"the {role} store holds {s.mode!r} rows: give a store of whole images (mode full)")
    if crops is not None and crops.mode != "crops":
        raise C2MFError(f"--crops expects a crop store, got a store of mode {crops.mode!r}")
    for s, role in ((test, "test"), (crops, "crops")):
        if s is None:
            continue
        for key in ("weights_sha256", "layer", "layout"):
            a, b = getattr(train, key, None), getattr(s, key, None)
            if a is not None and b is not None and a != b:
                raise C2MFError(
                    f"the train and {role} stores differ in {key} ({a!r} vs {b!r}): evaluate needs stores of "
                    "one model and layer"
                )
    if train.fingerprint == test.fingerprint and train.fingerprint:
        raise C2MFError("the train and test stores are the same store: give a held-out test store")
    if list(test.classes) != list(train.classes):
        missing = sorted(set(test.classes) ^ set(train.classes))
        raise C2MFError(f"train and test stores have different classes (e.g. {missing[:3]}): extract both from one "
                        "class list")
    width = _store_width(test)
    describe = getattr(test, "describe_source", None)
    test_info = describe() if describe is not None else test.info
    for d, lab in zip(dicts, labels):
        check = getattr(d, "check_compatible", None)
        try:
            if check is not None:
                check(test_info)
            if d.n_features != width:
                raise C2MFError("channels differ")
        except C2MFError:
            from ..artifacts.dictionary import identity, mismatch_message

            source = identity((d.meta.get("source") or {}).get("info") or {})
            if source.get("model") is None and source.get("layer") is None:  # a dictionary made outside a store
                raise C2MFError(f"dictionary {lab!r} has {d.n_features} channels but the store's layer "
                                f"{test.layer!r} has {width}: use a dictionary fitted on this model and layer"
                                ) from None
            raise C2MFError(mismatch_message(d, lab, test_info, width)) from None


def _store_width(store: StoreLike) -> int:
    for y in range(len(store.classes)):
        if store.n_images(y) > 0:
            return int(store.activations(y).shape[-1])
    raise C2MFError("the store has no images")


def _take(store: StoreLike, y: int, cap: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = store.n_images(y)
    m = n if cap is None else min(n, cap)
    A = np.asarray(store.activations(y)[:m], dtype=np.float32)
    return A, np.asarray(store.logits(y)[:m], dtype=np.float32), np.asarray(store.labels(y)[:m]).astype(np.int64)


# ---------------------------------------------------------------------------------------------------- per class


@dataclass
class _Split:
    """One class's images split into what is explained (patch positions) and what is fed to h as is (prefix)."""

    rows: torch.Tensor  # (n, P, c)
    prefix: torch.Tensor | None  # (n, T0, c) or None
    shape: tuple[int, ...]  # one image's store shape, (*positions, c)


def _split_positions(A: torch.Tensor, prefix: int) -> _Split:
    n, c = A.shape[0], A.shape[-1]
    if A.ndim == 2:  # one vector per image
        return _Split(A[:, None, :], None, tuple(A.shape[1:]))
    if prefix:
        return _Split(A[:, prefix:, :], A[:, :prefix, :], tuple(A.shape[1:]))
    return _Split(A.reshape(n, -1, c), None, tuple(A.shape[1:]))


def _make_head(tail: _Tail, d: DictionaryLike, y: int | None, sp: _Split) -> Callable[..., torch.Tensor]:
    c = sp.rows.shape[-1]
    grid_shape = sp.shape if sp.prefix is None else (sp.shape[0] - sp.prefix.shape[1], c)

    def decode(U: torch.Tensor) -> torch.Tensor:
        m, P, k = U.shape
        return d.decode(U.reshape(m * P, k), y).reshape(m, P, c)

    if sp.prefix is None:
        return lambda U: tail(decode(U).reshape(U.shape[0], *grid_shape))
    return lambda U, prefix: tail(torch.cat([prefix, decode(U)], dim=1))


@dataclass
class _Accum:
    recon_logits: list = dataclasses.field(default_factory=list)
    model_logits: list = dataclasses.field(default_factory=list)
    labels: list = dataclasses.field(default_factory=list)
    groups: list = dataclasses.field(default_factory=list)
    fit_test: FitAccumulator = dataclasses.field(default_factory=FitAccumulator)
    fit_train: FitAccumulator = dataclasses.field(default_factory=FitAccumulator)
    curves: dict = dataclasses.field(default_factory=lambda: {"gradcam": [], "ig": []})
    mean_imp: dict = dataclasses.field(default_factory=lambda: {"gradcam": [], "ig": []})
    ig_err: list = dataclasses.field(default_factory=list)
    ig_rel: list = dataclasses.field(default_factory=list)
    ig_gap: list = dataclasses.field(default_factory=list)


def _encode(d: DictionaryLike, rows: torch.Tensor, y: int | None) -> torch.Tensor:
    n, P, c = rows.shape
    return torch.as_tensor(d.encode(rows.reshape(n * P, c), y)).reshape(n, P, -1).float()


def _eval_test_class(acc: _Accum, tail: _Tail, d: DictionaryLike, y: int | None, sp: _Split, model_logits: torch.Tensor,
                     labels: torch.Tensor, group: int, cfg: EvaluateConfig, importance: bool) -> None:
    U = _encode(d, sp.rows, y)
    head = _make_head(tail, d, y, sp)
    side = sp.prefix
    n = U.shape[0]
    with torch.no_grad():
        recon = torch.cat([
            (head(U[s : s + cfg.batch_size]) if side is None else head(U[s : s + cfg.batch_size], side[s : s + cfg.batch_size]))
            for s in range(0, n, cfg.batch_size)
        ])
        A_hat = torch.as_tensor(d.decode(U.reshape(-1, U.shape[-1]), y))
    acc.fit_test.update(sp.rows.reshape(-1, sp.rows.shape[-1]), A_hat)
    acc.recon_logits.append(recon.cpu())
    acc.model_logits.append(model_logits.cpu())
    acc.labels.append(labels.cpu())
    acc.groups.append(torch.full((n,), group))
    if not importance:
        return
    targets = model_logits.argmax(1)
    gc = gradcam(U, head, targets, side=side, batch_size=cfg.batch_size)
    ig = integrated_gradients(U, head, targets, steps=cfg.ig_steps, rule=cfg.ig_rule,  # type: ignore[arg-type]
                              side=side, batch_size=cfg.batch_size)
    acc.ig_err.append(ig.completeness_error.abs().cpu())
    acc.ig_rel.append(ig.relative_completeness_error().cpu())
    acc.ig_gap.append((ig.logit - ig.baseline_logit).abs().cpu())
    for name, imp in (("gradcam", gc), ("ig", ig.attributions)):
        acc.mean_imp[name].append(imp.detach().cpu())
        acc.curves[name].append(insertion_deletion(U, head, targets, ranking(imp), labels=labels, side=side,
                                                   batch_size=cfg.batch_size))


def _summarise(acc: _Accum, classes: Sequence[str], importance: bool) -> dict:
    groups = torch.cat(acc.groups).numpy()
    rec = per_class_accuracy(torch.cat(acc.recon_logits), torch.cat(acc.labels), torch.cat(acc.model_logits), groups)
    for key in ("accuracy", "agreement"):
        rec[key]["per_class"] = {classes[int(g)]: v for g, v in rec[key]["per_class"].items()}
    train, test = acc.fit_train.result(), acc.fit_test.result()
    out: dict[str, Any] = {
        "reconstruction": rec,
        "consistency": consistency(train["mse"], test["mse"]),
        "fit": {"train": train, "test": test},
    }
    if importance:
        err, rel, gap = torch.cat(acc.ig_err), torch.cat(acc.ig_rel), torch.cat(acc.ig_gap)
        out["importance"] = {
            "target": "model prediction",
            "gradcam_mean": torch.cat(acc.mean_imp["gradcam"]).mean(0).tolist(),
            "ig_mean": torch.cat(acc.mean_imp["ig"]).mean(0).tolist(),
            "ig_completeness": {
                "mean_abs_error": float(err.mean()),
                "max_abs_error": float(err.max()),
                "mean_relative_error": float(rel.mean()),
                "max_relative_error": float(rel.max()),
                "mean_abs_logit_gap": float(gap.mean()),
            },
        }
        out["insertion_deletion"] = {
            name: InsertionDeletion.concat(parts).to_dict() for name, parts in acc.curves.items()
        }
    return out


def _similarity(d: DictionaryLike) -> dict:
    W = d.tensors["W"].detach().cpu()
    return concept_similarity(list(W) if W.ndim == 3 else W)


# ---------------------------------------------------------------------------------------------------- main


def evaluate(
    train_store: StoreLike,
    test_store: StoreLike,
    dictionaries: Sequence[DictionaryLike],
    crops_store: StoreLike | None = None,
    config: EvaluateConfig = EvaluateConfig(),
    progress: ProgressFn = no_progress,
    *,
    names: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    tail: Callable[[torch.Tensor], torch.Tensor] | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Every metric of METHOD.md section 4 for each dictionary, side by side; returns the results dict.

    names: one row label per dictionary (default "<method> k=<k>"). tail: h in the store layout (activations
    (m, *positions, c) -> logits), built from the store's model spec when not given (tests pass their own).
    out_dir: when given, also writes evaluation.json and the PNG plots there (`write_results`).
    """
    if not dictionaries:
        raise C2MFError("no dictionary to evaluate: give at least one --dict")
    if names is not None and len(names) != len(dictionaries):
        raise C2MFError(f"{len(names)} names for {len(dictionaries)} dictionaries")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    labels = _unique_labels([_label(d, i, names) for i, d in enumerate(dictionaries)])
    _check_inputs(train_store, test_store, crops_store, dictionaries, labels)
    class_maps = [_class_map(d, test_store, lab) for d, lab in zip(dictionaries, labels)]
    dicts = [d.to(dev) for d in dictionaries]
    if tail is None:
        tail = _tail_from_store(test_store, dev)
    prefix = int(getattr(test_store, "num_prefix_tokens", 0) or 0)
    classes = list(test_store.classes)
    cap = config.max_images_per_class

    # clustering ablation: per-class non-negative (CRAFT-style) dictionaries are the sources, K from the shared ones
    sources = [i for i, d in enumerate(dicts) if d.per_class and bool((d.tensors["W"] >= 0).all())]
    ks = config.cluster_ks
    if ks is None:
        ks = tuple(sorted({d.n_concepts for d in dicts if not d.per_class}))
    clustered: list[tuple[int, int, DictionaryLike]] = []
    for i in sources:
        pooled = dicts[i].tensors["W"].shape[0] * dicts[i].n_concepts
        for K in ks:
            if K <= pooled:
                clustered.append((i, K, _clustered_dictionary(dicts[i], K, config.seed)))

    accs = [_Accum() for _ in dicts]
    cl_accs = [_Accum() for _ in clustered]
    h_diff, h_agree, h_n = 0.0, 0, 0
    advance = progress("evaluating test images", len(classes))
    for y, name in enumerate(classes):
        if test_store.n_images(y) == 0:
            advance(1)
            continue
        A, logits, lab = _take(test_store, y, cap)
        A_t = torch.from_numpy(A).to(dev)
        sp = _split_positions(A_t, prefix)
        ml, lb = torch.from_numpy(logits).to(dev), torch.from_numpy(lab).to(dev)
        with torch.no_grad():
            own = torch.cat([tail(A_t[s : s + config.batch_size]) for s in range(0, A_t.shape[0], config.batch_size)])
        h_diff = max(h_diff, float((own - ml).abs().max()))
        h_agree += int((own.argmax(1) == ml.argmax(1)).sum())
        h_n += int(own.shape[0])
        for acc, d, cmap in zip(accs, dicts, class_maps):
            _eval_test_class(acc, tail, d, cmap[y], sp, ml, lb, y, config, importance=True)
        for acc, (i, _, d) in zip(cl_accs, clustered):
            _eval_test_class(acc, tail, d, class_maps[i][y], sp, ml, lb, y, config, importance=False)
        advance(1)

    advance = progress("reconstructing train images", len(classes))
    for y in range(len(classes)):
        if train_store.n_images(y) > 0:
            A, _, _ = _take(train_store, y, cap)
            rows = _split_positions(torch.from_numpy(A).to(dev), prefix).rows
            for acc, d, cmap in zip(accs, dicts, class_maps):
                U = _encode(d, rows, cmap[y])
                acc.fit_train.update(rows.reshape(-1, rows.shape[-1]),
                                     torch.as_tensor(d.decode(U.reshape(-1, U.shape[-1]), cmap[y])))
        advance(1)

    methods = []
    for lab, d, acc in zip(labels, dicts, accs):
        row = {
            "name": lab,
            "method": d.method,
            "k": d.n_concepts,
            "per_class_dictionary": bool(d.per_class),
            "gated": "gates" in d.tensors,
            "similarity": _similarity(d),
        }
        row.update(_summarise(acc, classes, importance=True))
        methods.append(row)

    clustering = []
    for (i, K, d), acc in zip(clustered, cl_accs):
        rec = _summarise(acc, classes, importance=False)["reconstruction"]
        shared = [m for m in methods if not m["per_class_dictionary"] and m["k"] == K]
        clustering.append({
            "source": labels[i],
            "K": K,
            "clustered_accuracy": {k: rec["accuracy"][k] for k in ("mean", "std")},
            "clustered_agreement": {k: rec["agreement"][k] for k in ("mean", "std")},
            "shared": {m["name"]: {k: m["reconstruction"]["accuracy"][k] for k in ("mean", "std")} for m in shared},
        })

    result: dict[str, Any] = {
        "encoding-type": ENCODING_TYPE,
        "encoding-version": ENCODING_VERSION,
        "c2mf_version": __version__,
        "inputs": {
            "train": _store_identity(train_store),
            "test": _store_identity(test_store),
            "crops": _store_identity(crops_store) if crops_store is not None else None,
            "dictionaries": [_dict_identity(d, lab) for d, lab in zip(dictionaries, labels)],
        },
        "settings": dict(config.to_dict(), device=str(dev)),
        "h_check": {"max_abs_logit_diff": h_diff, "prediction_agreement": h_agree / max(h_n, 1), "n_images": h_n},
        "methods": methods,
        "clustering": clustering,
        "ood": _ood(test_store, crops_store, config, progress) if crops_store is not None else None,
    }
    result["time_s"] = time.perf_counter() - t0
    if out_dir is not None:
        files = write_results(result, out_dir)
        result["files"] = {k: os.path.basename(v) for k, v in files.items() if k != "json"}  # as in evaluation.json
    return result


def _clustered_dictionary(d: DictionaryLike, K: int, seed: int) -> DictionaryLike:
    from ..artifacts.dictionary import ConceptDictionary

    W = d.tensors["W"].detach().cpu()
    cl = cluster_concepts(list(W), K, seed=seed)
    tensors = {"W": cl.W}
    if "shift" in d.tensors:
        tensors["shift"] = d.tensors["shift"].detach().cpu()
    meta = {"method": f"{d.method}-clustered", "classes": d.classes, "codes": "nnls",
            "clustered_from": [list(s) for s in cl.source]}
    return ConceptDictionary(tensors, meta).to(d.tensors["W"].device)


def _ood(test: StoreLike, crops: StoreLike, cfg: EvaluateConfig, progress: ProgressFn) -> dict:
    conf_in, conf_out = [], []
    advance = progress("crop confidences", len(test.classes))
    for y in range(len(test.classes)):
        if test.n_images(y):
            conf_in.append(max_softmax(test.logits(y)))
        if y < len(crops.classes) and crops.n_images(y):
            conf_out.append(max_softmax(crops.logits(y)))
        advance(1)
    s_in = np.concatenate(conf_in) if conf_in else np.zeros(0)
    s_out = np.concatenate(conf_out) if conf_out else np.zeros(0)
    out = ood_scores(s_in, s_out)
    out["histograms"] = confidence_histograms(s_in, s_out, bins=cfg.histogram_bins)
    return out


def _store_identity(s: StoreLike) -> dict:
    return {
        "path": str(getattr(s, "path", "")) or None,
        "fingerprint": s.fingerprint,
        "mode": s.mode,
        "layer": s.layer,
        "classes": len(s.classes),
        "images": int(sum(s.n_images(y) for y in range(len(s.classes)))),
    }


def _dict_identity(d: DictionaryLike, label: str) -> dict:
    src = d.meta.get("source", {}) if isinstance(d.meta.get("source"), dict) else {}
    return {
        "name": label,
        "path": d.meta.get("path"),
        "method": d.method,
        "k": d.n_concepts,
        "source_fingerprint": src.get("fingerprint") or src.get("info", {}).get("fingerprint"),
    }


# ---------------------------------------------------------------------------------------------------- output


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return json_safe(obj.item())
    return obj


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_results(result: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write evaluation.json and the PNG plots into out_dir (atomically); returns {what: path}."""
    from ..render import plots

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise C2MFError(f"the output folder {str(out)!r} is a file: give a folder path")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    methods = result["methods"]
    for ranking_name in ("gradcam", "ig"):
        for quantity in ("prob", "accuracy"):
            curves = {m["name"]: m["insertion_deletion"][ranking_name] for m in methods if "insertion_deletion" in m}
            if curves:
                p = plots.insertion_deletion_curves(
                    curves, out / f"insertion_deletion_{ranking_name}_{quantity}.png", quantity=quantity,
                    title=f"concept insertion / deletion, ranked by {'Grad-CAM' if ranking_name == 'gradcam' else 'IG'}",
                )
                files[f"insertion_deletion_{ranking_name}_{quantity}"] = str(p)
    series: dict[str, list[tuple[int, float, float]]] = {}
    for m in methods:
        acc = m["reconstruction"]["accuracy"]
        series.setdefault(m["method"], []).append((m["k"], acc["mean"], acc["std"]))
    for c in result.get("clustering") or []:
        series.setdefault(f"{c['source'].split(' k=')[0]} clustered", []).append(
            (c["K"], c["clustered_accuracy"]["mean"], c["clustered_accuracy"]["std"]))
    files["accuracy_vs_k"] = str(plots.accuracy_vs_k(series, out / "accuracy_vs_k.png"))
    if result.get("ood"):
        files["confidence_histograms"] = str(
            plots.confidence_histograms(result["ood"]["histograms"], out / "confidence_histograms.png"))
    payload = dict(result, files={k: os.path.basename(v) for k, v in files.items()})
    path = out / "evaluation.json"
    _atomic_write_text(path, json.dumps(json_safe(payload), indent=2))
    files["json"] = str(path)
    # a reused folder: drop plots of an earlier run that this one did not draw (e.g. no --crops this time), so the
    # folder (and `c2mf report`, which shows its PNGs) describes this run only
    written = {Path(p).name for p in files.values()}
    for name in PLOT_FILES:
        if name not in written:
            (out / name).unlink(missing_ok=True)
    return files
