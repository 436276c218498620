"""The demo chain: generate a world, train a model, extract, factorize, evaluate, and measure recovery.

Everything goes under one output folder:

    OUT/world/                 the synthetic images, masks and world.json (synthetic.py)
    OUT/model/                 model.py (factory `create`) + model.safetensors + train.json
    OUT/stores/                train / test whole-image stores, train / test crop stores (Zarr)
    OUT/dictionaries/          c2mf.safetensors, craft.safetensors, pca.safetensors
    OUT/evaluation/            evaluation.json (with the ground-truth "recovery" section) and plots
    OUT/explain/, OUT/atlas/   figures, when those library modules are present
    OUT/demo.json              the summary: accuracy, timings, recovery table, gate selection

Ground-truth recovery (docs/metrics.md, "Planted recovery"; docs/demo.md), for each method:
- heatmap IoU: codes of the test images upsampled to the image (bilinear; the demo model sees the 64 px image
  whole: crop_pct 1.0), thresholded at 50 % of each map's maximum (`metrics.recovery.binarize`), IoU with each
  primitive's mask. `per_class`: for every class that contains the primitive, the best concept of the
  dictionary that class uses, averaged over those classes (comparable across per-class and shared methods).
  `shared` (shared dictionaries only): one concept per primitive for all classes, a stricter test.
  PCA codes are signed with arbitrary sign: both U and -U are candidates.
- yardsticks: the masks seen through the layer's grid (the IoU ceiling) and a supervised linear probe.
- gate selection (c2mf): primitives matched to concepts on the ungated W*; do the class gates open on the
  concepts of that class's primitives?
- planted dictionary: activations A = U W_planted (+ noise) built with the world's class structure, with W_planted
  non-negative and signed, fitted by each method; Hungarian-matched cosine to W_planted.
Torch runs on one CPU thread during the demo (see `run_demo`). docs/demo.md has the measured results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .._io import write_json
from .. import __version__
from ..errors import C2MFError
from ..progress import ProgressFn, no_progress
from .synthetic import World, WorldConfig, generate
from .train import CONCEPT_LAYER, ModelConfig, TrainConfig, save_model, train_model

if TYPE_CHECKING:
    from ..inputs.models import ModelSpec

METHODS = ("c2mf", "craft", "pca")


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of one demo run; written into demo.json."""

    world: WorldConfig = field(default_factory=WorldConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    c2mf_concepts: int = 12  # one shared dictionary
    concepts_per_class: int = 5  # craft and pca: one dictionary per class
    c2mf_alpha: float = 0.05
    crop_size: float = 0.5  # crops of half the image, every quarter image: 3 x 3 = 9 per image
    crop_stride: float = 0.5
    iterations: int = 100
    ig_steps: int = 16
    explain_images: int = 3
    planted_rows: int = 1000
    device: str = "auto"

    @classmethod
    def quick(cls, seed: int = 0, device: str = "auto") -> "DemoConfig":
        """A smaller run for a first look: half the images, fewer epochs and iterations."""
        return cls(
            world=WorldConfig(images_per_class=40, test_per_class=20, seed=seed),
            train=TrainConfig(epochs=10, seed=seed),
            iterations=40,
            ig_steps=8,
            explain_images=1,
            planted_rows=300,
            device=device,
        )

    @classmethod
    def full(cls, seed: int = 0, device: str = "auto") -> "DemoConfig":
        return cls(world=WorldConfig(seed=seed), train=TrainConfig(seed=seed), device=device)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["world"] = self.world.to_dict()
        d["train"] = self.train.to_dict()
        return d


# ---------------------------------------------------------------------------------------------- recovery


def _store_index(world: World, split: str, store: Any) -> list[np.ndarray]:
    """For each class of the store, the world index (within `split`) of each stored image."""
    where = {str(p.resolve()): i for i, p in enumerate(world.paths(split))}
    out = []
    for y in range(len(store.classes)):
        try:
            out.append(np.array([where[str(Path(p).resolve())] for p in store.paths(y)], dtype=np.int64))
        except KeyError as e:
            raise C2MFError(f"store image {e.args[0]} is not in the world at {world.root}: re-run the demo "
                            "into a fresh --out folder") from None
    return out


def concept_heatmaps(dictionary: Any, activations: np.ndarray, y: int | None, size: int) -> np.ndarray:
    """Codes of (n, h, w, c) activations for class y, upsampled to (n, k, size, size) (2k for PCA: U and -U)."""
    n, h, w, c = activations.shape
    from ..methods import encode, method_of

    U = torch.as_tensor(encode(dictionary, activations.reshape(-1, c), y)).float().cpu()
    U = U.reshape(n, h, w, -1).permute(0, 3, 1, 2)
    if method_of(dictionary).signed_codes:
        U = torch.cat([U, -U], dim=1)
    return F.interpolate(U, size=(size, size), mode="bilinear", align_corners=False).numpy()


def heatmap_recovery(dictionary: Any, store: Any, world: World, split: str = "test") -> dict[str, Any]:
    """Per-primitive IoU between the best-matching concept's heatmaps and the primitive masks (see module doc)."""
    from ..metrics.recovery import heatmap_mask_iou

    P = len(world.primitives)
    masks_all = world.primitive_masks(split)
    index = _store_index(world, split, store)
    cls_of = {name: i for i, name in enumerate(dictionary.classes)}
    per_class = np.full((len(store.classes), P), np.nan)
    shared_sum: np.ndarray | None = None
    shared_n = np.zeros(P)
    for y, name in enumerate(store.classes):
        if store.n_images(y) == 0:
            continue
        if name not in cls_of:
            raise C2MFError(f"class {name!r} of the store is not in the {dictionary.method} dictionary")
        hm = concept_heatmaps(dictionary, store.activations(y), cls_of[name], world.config.image_size)
        masks = masks_all[index[y]]
        r = heatmap_mask_iou(hm, masks)
        best = np.array(r["best_iou"], dtype=float)
        per_class[y] = best
        iou = np.nan_to_num(np.array(r["iou"], dtype=float), nan=0.0)  # (k, P)
        present = masks.any(axis=(2, 3)).sum(axis=0)  # images of this class showing each primitive
        shared_sum = iou * present[None, :] if shared_sum is None else shared_sum + iou * present[None, :]
        shared_n += present
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a primitive no class shows: all-NaN column
        per_prim = np.nanmean(per_class, axis=0)
    out: dict[str, Any] = {
        "primitives": world.primitive_names,
        "per_class": {"best_iou": _nan_list(per_prim), "mean": _nanmean(per_prim),
                      "by_class": [_nan_list(r) for r in per_class]},
    }
    if not dictionary.per_class and shared_sum is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_iou = shared_sum / np.maximum(shared_n, 1)[None, :]
        best_concept = mean_iou.argmax(axis=0)
        best = mean_iou[best_concept, np.arange(P)]
        k = dictionary.n_concepts
        out["shared"] = {
            "best_iou": _nan_list(best),
            "best_concept": [int(j) % k for j in best_concept],
            "best_sign": [(-1 if j >= k else 1) for j in best_concept],
            "mean": _nanmean(best),
        }
    return out


def ungated(dictionary: Any) -> Any:
    """The c2mf shared dictionary W* without the class gates (every class may use every concept).

    Matching primitives to concepts on ungated codes asks "which concept detects this primitive" independently
    of the gates, so the gate check that follows is not circular.
    """
    from ..methods import class_free

    return class_free(dictionary)


def _diagonal_recovery(maps: list[np.ndarray], masks: list[np.ndarray], P: int) -> dict[str, Any]:
    """IoU of map p with mask p (one map per primitive), averaged over the images showing p."""
    from ..metrics.recovery import heatmap_mask_iou

    total, count = np.zeros(P), np.zeros(P)
    for hm, mk in zip(maps, masks):
        r = heatmap_mask_iou(hm, mk)
        diag = np.nan_to_num(np.diag(np.array(r["iou"], dtype=float)), nan=0.0)
        present = mk.any(axis=(2, 3)).sum(axis=0)
        total += diag * present
        count += present
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return {"iou": _nan_list(iou), "mean": _nanmean(iou)}


def reference_recovery(train: Any, test: Any, world: World, ridge: float = 1e-2) -> dict[str, Any]:
    """Two yardsticks for the heatmap IoU of the methods.

    grid_ceiling: each mask average-pooled to the layer's grid and upsampled back, as a concept map would be:
    the best IoU any map on this grid can reach. linear_probe: a ridge regression from the activations of each
    position to the fraction of each primitive in its cell, fitted on train and applied to test: what the best
    linear concept direction of this layer (with supervision) reaches, so a primitive the model does not
    encode shows a low probe IoU whatever the method.
    """
    P = len(world.primitives)
    size = world.config.image_size
    h, w = test.grid

    def pooled(masks: np.ndarray) -> torch.Tensor:  # (n, P, H, W) -> (n, P, h, w) area fractions
        return F.adaptive_avg_pool2d(torch.from_numpy(masks.astype(np.float32)), (h, w))

    def up(maps: torch.Tensor) -> np.ndarray:
        return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False).numpy()

    tr_index, te_index = _store_index(world, "train", train), _store_index(world, "test", test)
    tr_masks, te_masks = world.primitive_masks("train"), world.primitive_masks("test")
    A = np.concatenate([train.activations(y).reshape(-1, train.activations(y).shape[-1])
                        for y in range(len(train.classes))]).astype(np.float64)
    T = np.concatenate([pooled(tr_masks[tr_index[y]]).permute(0, 2, 3, 1).reshape(-1, P).numpy()
                        for y in range(len(train.classes))]).astype(np.float64)
    mu_a, mu_t = A.mean(0), T.mean(0)
    Ac = A - mu_a
    coef = np.linalg.solve(Ac.T @ Ac + ridge * len(A) * np.eye(A.shape[1]), Ac.T @ (T - mu_t))
    ceiling_maps, probe_maps, masks = [], [], []
    for y in range(len(test.classes)):
        mk = te_masks[te_index[y]]
        a = test.activations(y)
        pred = ((a.reshape(-1, a.shape[-1]) - mu_a) @ coef + mu_t).reshape(a.shape[0], h, w, P)
        probe_maps.append(up(torch.from_numpy(pred.astype(np.float32)).permute(0, 3, 1, 2)))
        ceiling_maps.append(up(pooled(mk)))
        masks.append(mk)
    return {"grid_ceiling": _diagonal_recovery(ceiling_maps, masks, P),
            "linear_probe": _diagonal_recovery(probe_maps, masks, P)}


def gate_recovery(dictionary: Any, world: World, assignment: list[int]) -> dict[str, Any]:
    """For c2mf: gates against the class -> primitive table, with primitives matched to concepts by heatmap IoU."""
    from ..metrics.recovery import gate_selection_accuracy

    from ..methods import gates as gates_of

    order = [dictionary.class_index(name) for name in world.classes]
    gates = np.stack([gates_of(dictionary, y).cpu().numpy() for y in order])
    res = gate_selection_accuracy(gates, world.class_matrix(), assignment)
    res["open_gates"] = {name: [int(j) for j in np.nonzero(g > 0.5)[0]] for name, g in zip(world.classes, gates)}
    res["planted_concepts"] = {
        name: sorted({int(assignment[p]) for p in ps}) for name, ps in zip(world.classes, world.class_primitives)
    }
    return res


def planted_activations(world: World, n_features: int, rows: int, seed: int,
                        signed: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-class rows A(y) = U W_planted + noise, with U >= 0 using only class y's primitives.

    W_planted >= 0 by default, like a post-ReLU layer, so NMF-based methods are well posed; `signed` draws a
    signed W_planted (like ViT tokens or NF-ResNet pre-activations), where only a signed dictionary can match
    it. Rows showing no primitive (background) are kept, as in images.
    """
    rng = np.random.default_rng([seed, 424242, int(signed)])
    P = len(world.primitives)
    W = rng.normal(size=(P, n_features))
    if not signed:
        W = np.maximum(W, 0.0)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    arrays = []
    for ps in world.class_primitives:
        U = np.zeros((rows, P))
        for p in ps:
            U[:, p] = rng.exponential(1.0, size=rows) * (rng.random(rows) < 0.5)
        noise = 0.01 * rng.normal(size=(rows, n_features))
        A = U @ W + (noise if signed else np.abs(noise))
        arrays.append(A.astype(np.float32))
    return arrays, W.astype(np.float32)


def planted_recovery(world: World, config: DemoConfig, device: str, progress: ProgressFn) -> dict[str, Any]:
    """Fit each method on planted activations and report the Hungarian-matched cosine to W_planted.

    Two variants: `nonnegative` (W_planted >= 0) and `signed` (craft then needs its explicit shift A - min(A),
    the option the paper analyses). Each class's primitives are the world's; c2mf's gates are checked against them.
    """
    from ..methods import gates as gates_of, method_of
    from ..stages.factorize import factorize
    from ..metrics.recovery import gate_selection_accuracy, matched_cosine
    from ..artifacts.sources import ArraySource

    P = len(world.primitives)
    seed = config.world.seed
    out: dict[str, Any] = {"n_features": 64, "rows_per_class": config.planted_rows, "n_planted": P}
    for variant in ("nonnegative", "signed"):
        arrays, W = planted_activations(world, 64, config.planted_rows, seed, signed=variant == "signed")
        fits = {
            "c2mf": ("full", dict(concepts=P, alpha=config.c2mf_alpha, iterations=config.iterations, seed=seed)),
            "craft": ("crops", dict(concepts=3, iterations=config.iterations, seed=seed,
                                    shift=variant == "signed")),
            "pca": ("full", dict(concepts=3)),
        }
        res_v: dict[str, Any] = {}
        for name, (mode, opts) in fits.items():
            source = ArraySource(arrays, classes=world.classes, mode=mode)
            d = factorize(source, name, device=device, progress=progress, **opts)
            Wl = d.tensors["W"].cpu().numpy().reshape(-1, W.shape[1])
            res = matched_cosine(Wl, W, absolute=name == "pca")
            res_v[name] = {"mean": res["mean"], "min": res["min"], "per_planted": res["per_planted"]}
            if method_of(d).gated:
                order = [d.class_index(n) for n in world.classes]
                gates = np.stack([gates_of(d, y).cpu().numpy() for y in order])
                res_v[name]["gates"] = gate_selection_accuracy(gates, world.class_matrix(), res["assignment"])
        out[variant] = res_v
    return out


def _nan_list(a: Any) -> list[float | None]:
    return [None if (v is None or not math.isfinite(float(v))) else float(v) for v in np.asarray(a, dtype=float)]


def _nanmean(a: Any) -> float | None:
    a = np.asarray(a, dtype=float)
    return float(np.nanmean(a)) if np.isfinite(a).any() else None


# ---------------------------------------------------------------------------------------------- the chain


@dataclass
class DemoResult:
    out: Path
    summary: dict[str, Any]
    report: Path | None

    @property
    def json_path(self) -> Path:
        return self.out / "demo.json"


def _train_or_reuse(world: World, config: DemoConfig, out: Path, progress: ProgressFn,
                    log: Callable[[str], None]) -> tuple[Path, Path, dict[str, Any]]:
    mdir = out / "model"
    meta_path = mdir / "train.json"
    wanted = {"world": config.world.to_dict(), "train": config.train.to_dict(), "c2mf_version": __version__}
    if meta_path.is_file() and (mdir / "model.safetensors").is_file() and (mdir / "model.py").is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("made_from") == wanted:
            log("model: reusing the trained model in " + str(mdir))
            return mdir / "model.py", mdir / "model.safetensors", meta["result"]
    model, result = train_model(world, config.train, progress=progress)
    mcfg = ModelConfig(num_classes=len(world.classes), image_size=world.config.image_size)
    factory, ckpt = save_model(model, mcfg, mdir)
    meta = {"made_from": wanted, "model": mcfg.to_dict(), "result": result.to_dict()}
    write_json(meta_path, meta)
    return factory, ckpt, result.to_dict()


def run_demo(
    out_dir: str | os.PathLike[str],
    config: DemoConfig = DemoConfig(),
    progress: ProgressFn = no_progress,
    log: Callable[[str], None] = lambda msg: None,
) -> DemoResult:
    """Run the whole demo chain into `out_dir`; return the summary (also written to OUT/demo.json).

    Re-running into the same folder reuses the world, the model and the stores when their settings match.
    Torch runs on one CPU thread here: the demo's tensors are small, and on a busy machine two OpenMP threads
    per process were measured 20x slower per training step than one (spin-waiting on shared cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out_dir, config, progress, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir: str | os.PathLike[str], config: DemoConfig, progress: ProgressFn,
              log: Callable[[str], None]) -> DemoResult:
    from ..inputs.data import CropSpec, DatasetSpec
    from ..artifacts.dictionary import ConceptDictionary
    from ..stages.evaluate import EvaluateConfig, evaluate, write_results
    from ..stages.extract import ExtractConfig, extract
    from ..stages.factorize import factorize
    from ..inputs.models import ModelSpec
    from ..artifacts.store import ActivationStore

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    world = generate(config.world, out / "world", progress=progress)
    timings["generate"] = time.perf_counter() - t
    log(f"world: {len(world.classes)} classes, {len(world.primitives)} primitives, "
        f"{len(world.records('train'))} train / {len(world.records('test'))} test images in {out / 'world'}")

    t = time.perf_counter()
    factory, ckpt, train_result = _train_or_reuse(world, config, out, progress, log)
    timings["train"] = time.perf_counter() - t
    log(f"model: test accuracy {train_result['test_accuracy']:.1%} (train {train_result['train_accuracy']:.1%}); "
        f"use it as --model {factory}:create --checkpoint {ckpt}")

    t = time.perf_counter()
    spec = ModelSpec(name=f"{factory}:create", checkpoint=str(ckpt))
    crops = CropSpec(kind="grid", size=config.crop_size, stride=config.crop_stride)
    stores: dict[str, ActivationStore] = {}
    for split in ("train", "test"):
        for mode in ("full", "crops"):
            key = split if mode == "full" else f"{split}_crops"
            path = out / "stores" / f"{key}.zarr"
            ecfg = ExtractConfig(
                model=spec, layer=CONCEPT_LAYER, data=DatasetSpec(root=str(world.root / split), kind="folder"),
                out=str(path), mode=mode, crops=crops, dtype="float32", batch_size=64, workers=0,
                device=config.device, seed=config.world.seed,
            )
            extract(ecfg, progress=progress, log=log)
            stores[key] = ActivationStore.open(path)
    timings["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    seed = config.world.seed
    dicts: dict[str, ConceptDictionary] = {}
    ddir = out / "dictionaries"
    fits = {
        "c2mf": (stores["train"], dict(concepts=config.c2mf_concepts, alpha=config.c2mf_alpha,
                                       iterations=config.iterations, seed=seed)),
        "craft": (stores["train_crops"], dict(concepts=config.concepts_per_class, iterations=config.iterations,
                                              seed=seed)),
        "pca": (stores["train"], dict(concepts=config.concepts_per_class)),
    }
    for name, (store, opts) in fits.items():
        d = factorize(store.row_source(), name, device=config.device, progress=progress, **opts)
        d.save(ddir / f"{name}.safetensors")
        dicts[name] = ConceptDictionary.load(ddir / f"{name}.safetensors")
    timings["factorize"] = time.perf_counter() - t

    t = time.perf_counter()
    ecfg = EvaluateConfig(ig_steps=config.ig_steps, seed=seed)
    # the demo's own model: its code is ours to run, so name it (a recorded factory alone is never run)
    own = stores["test"].model_spec
    result = evaluate(stores["train"], stores["test"], [dicts[m] for m in METHODS], crops_store=stores["test_crops"],
                      config=ecfg, progress=progress, names=list(METHODS), device=config.device, model=own.name)
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    recovery: dict[str, Any] = {"heatmaps": {}, "threshold": {"method": "relative", "level": 0.5}}
    advance = progress("ground-truth recovery", len(METHODS) + 1)
    for name in METHODS:
        recovery["heatmaps"][name] = heatmap_recovery(dicts[name], stores["test"], world)
        advance(1)
    recovery["references"] = reference_recovery(stores["train"], stores["test"], world)
    matched = heatmap_recovery(ungated(dicts["c2mf"]), stores["test"], world)["shared"]
    recovery["c2mf_concept_of_primitive"] = matched
    recovery["gates"] = {"c2mf": gate_recovery(dicts["c2mf"], world, matched["best_concept"])}
    recovery["planted_dictionary"] = planted_recovery(world, config, config.device, progress)
    advance(1)
    recovery["class_primitives"] = {n: [world.primitive_names[p] for p in ps]
                                    for n, ps in zip(world.classes, world.class_primitives)}
    result["recovery"] = recovery
    timings["recovery"] = time.perf_counter() - t
    write_results(result, out / "evaluation")

    t = time.perf_counter()
    extras = _pictures(out, world, stores, dicts, config, recovery, spec, progress)
    timings["pictures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    methods_rows = []
    for m in result["methods"]:
        if "clustered_from" in m:  # the clustering ablation's rows: no dictionary of their own to recover
            continue
        name = m["name"]
        rec = recovery["heatmaps"][name]
        methods_rows.append({
            "method": name,
            "k": m["k"],
            "per_class_dictionary": m["per_class_dictionary"],
            "iou_per_class": rec["per_class"]["mean"],
            "iou_shared": rec.get("shared", {}).get("mean"),
            "planted_cosine": recovery["planted_dictionary"]["nonnegative"][name]["mean"],
            "planted_cosine_signed": recovery["planted_dictionary"]["signed"][name]["mean"],
            "pearson": m["similarity"]["pearson_mean"],
            "test_relative_error": m["fit"]["test"]["relative_error"],
            "train_minus_test_mse": m["consistency"]["difference"],
            "reconstruction_accuracy": m["reconstruction"]["accuracy"]["mean"],
        })
    summary = {
        "c2mf_version": __version__,
        "config": config.to_dict(),
        "model": {"factory": f"{factory}:create", "checkpoint": str(ckpt), "layer": CONCEPT_LAYER, **train_result},
        "table": methods_rows,
        "references": {k: v["mean"] for k, v in recovery["references"].items()},
        "per_primitive_iou": {
            "primitives": world.primitive_names,
            **{name: recovery["heatmaps"][name]["per_class"]["best_iou"] for name in METHODS},
            **{k: v["iou"] for k, v in recovery["references"].items()},
        },
        "gate_selection": {k: v for k, v in recovery["gates"]["c2mf"].items() if k in
                           ("accuracy", "exact", "precision", "recall", "extra_selected")},
        "recovery": recovery,
        "evaluation": str(out / "evaluation" / "evaluation.json"),
        "pictures": extras,
        "timings_s": timings,
    }
    write_json(out / "demo.json", summary)
    report = Path(extras["report"]) if extras.get("report") else None
    return DemoResult(out=out, summary=summary, report=report)


# A concept is named after a primitive in the atlas only when its heatmaps overlap the primitive's masks this
# much; the best match of a primitive the model ignores can be an unrelated concept (IoU ~0.05).
_NAME_MIN_IOU = 0.3


def _pictures(out: Path, world: World, stores: dict[str, Any], dicts: dict[str, Any], config: DemoConfig,
              recovery: dict[str, Any], spec: ModelSpec, progress: ProgressFn) -> dict[str, Any]:
    """Explain a few test images with the c2mf dictionary, draw its atlas (concepts named by the primitive they
    match best), and write the HTML report over the evaluation, atlas and explanations."""
    from ..stages.atlas import AtlasConfig, build_atlas
    from ..stages.explain import ExplainConfig, Explainer, explain_images
    from ..report.page import build_report
    from .report import demo_extension

    made: dict[str, Any] = {}
    shared = recovery["c2mf_concept_of_primitive"]
    names: dict[int, str] = {}
    for p, j in enumerate(shared["best_concept"]):  # primitives matched on the ungated W*
        iou = shared["best_iou"][p]
        if iou is None or iou < _NAME_MIN_IOU:  # a weak best match would put a wrong name on the concept
            continue
        label = f"{world.primitive_names[p]} (IoU {iou:.2f})"
        names[j] = f"{names[j]} / {label}" if j in names else label
    d = dicts["c2mf"]
    if config.explain_images > 0:
        # one test image of each of the first classes, so different primitives show
        paths = [world.paths("test")[next(i for i, r in enumerate(world.records("test")) if r.label == y)]
                 for y in range(min(config.explain_images, len(world.classes)))]
        advance = progress("explain", len(paths))
        # the demo's own model: its code is ours to run, so name it (a recorded factory alone is never run)
        explainer = Explainer.create(d, ExplainConfig(top=4, ig_steps=config.ig_steps), model=spec.name,
                                     checkpoint=spec.checkpoint, device=config.device)
        summary = explain_images(paths, explainer, out / "explain", on_done=lambda i: advance(1))
        made["explain"] = str(out / "explain")
        made["explained"] = [e.get("png") for e in summary.get("explained", [])]
    advance = progress("atlas", len(stores["test"].classes))
    build_atlas(stores["test"], d, out / "atlas", AtlasConfig(top=8), names=names, progress=lambda n=1: advance(n))
    made["atlas"] = str(out / "atlas")
    made["report"] = str(build_report(out, evaluate_dir=out / "evaluation", atlas_dir=out / "atlas",
                                      explain_dir=out / "explain" if "explain" in made else None,
                                      title="c2mf demo: concepts planted in a synthetic world",
                                      extension=demo_extension(out / "evaluation")))
    return made

