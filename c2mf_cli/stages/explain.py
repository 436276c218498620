"""Explain one image with a concept dictionary (docs/explain.md).

For an image x: A = g(x) at the dictionary's layer, codes U = encode(A) on the spatial grid (for c2mf with
the gate of the explained class), the importance of every concept for the explained class c by Grad-CAM or
Integrated Gradients on U (c2mf_cli.metrics.importance, through head(U) = h(decode(U))), and for the top
concepts their code maps U[:, j] on the grid, drawn over the original image by c2mf_cli.render.figures.

Notation: P positions of the grid (gh x gw; the patch tokens of a ViT), k concepts, c channels.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from .._io import write_json
from ..devices import resolve_device
from ..artifacts.dictionary import ConceptDictionary
from ..errors import C2MFError, UsageError
from ..methods import decode, encode, gates, load_dictionary, needs_class
from ..metrics.importance import RANKING_LABELS, gradcam, integrated_gradients, sobol
from ..inputs.images import read_image
from ..inputs.models import LoadedModel, Preprocess, Split, reopen_recorded
from ..render.figures import ConceptPanel, explanation_figure, save_png
from ..render.geometry import geometry_for

ImportanceMethod = Literal["gradcam", "ig", "sobol"]
IMPORTANCE_LABELS = RANKING_LABELS


@dataclass(frozen=True)
class ExplainConfig:
    """How to explain.

    Attributes:
        importance: "gradcam", "ig" (Integrated Gradients from U = 0, `ig_steps` Gauss-Legendre points) or
            "sobol" (CRAFT's total Sobol indices, `sobol_designs` x (k + 2) head calls per image; unsigned, so
            every drawn concept is evidence for the class: Sobol says how much a concept matters, not which way).
        top: at most this many concepts drawn on each side (evidence for, evidence against the class).
        min_share: a concept is drawn only when its |importance| is at least this fraction of the largest one:
            the rest would be noise drawn at full colour.
        target: the class to explain: a model output index, a class name, or None for the prediction.
        top_classes: classes listed with their probabilities.
        ig_steps: points of the IG path integral.
        sobol_designs: the Sobol design size (32: CRAFT's default).
        encode_iters: NNLS iterations of the codes.
    """

    importance: ImportanceMethod = "gradcam"
    top: int = 5
    min_share: float = 0.1
    target: int | str | None = None
    top_classes: int = 5
    ig_steps: int = 32
    sobol_designs: int = 32
    encode_iters: int = 200

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE_LABELS:
            raise UsageError(f"unknown importance method {self.importance!r}: use gradcam, ig or sobol")
        if self.top < 1:
            raise UsageError(f"--top must be at least 1, got {self.top}")
        if not 0.0 <= self.min_share <= 1.0:
            raise UsageError(f"the share of the top importance a drawn concept needs must be in [0, 1], "
                             f"got {self.min_share}")
        if self.ig_steps < 2:
            raise UsageError(f"IG needs at least 2 steps, got {self.ig_steps}")
        if self.sobol_designs < 2:
            raise UsageError(f"Sobol needs at least 2 designs, got {self.sobol_designs}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """A label file: one class name per line, in model output order."""
    p = Path(path)
    if not p.is_file():
        raise C2MFError(f"labels file {str(p)!r} does not exist: give a text file with one label per line")
    labels = [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise C2MFError(f"labels file {str(p)!r} is empty: it needs one label per line, in model output order")
    return labels


@dataclass(frozen=True)
class AtlasCrops:
    """The strongest regions of each concept from a `c2mf atlas` folder: what each concept looks like.

    Build with `AtlasCrops.load`; `get(j)` gives (name or None, crops) of concept j.
    """

    names: dict[int, str]
    crops: dict[int, tuple[np.ndarray, ...]]

    @classmethod
    def load(cls, atlas_dir: str | os.PathLike[str], dictionary: ConceptDictionary, per_concept: int = 4
             ) -> "AtlasCrops":
        """Read atlas.json and the first `per_concept` crops of each concept, which the atlas saved in its folder
        (never an image path the record names: an atlas may come from someone else).

        The atlas must be of this dictionary (its tensors' sha256 where the atlas records it, else the same method
        and number of concepts): another's crops would show other concepts under the same ids. Every field is
        checked before any image is read, so an edited record is one error, not a traceback.
        """
        folder = Path(atlas_dir)
        path = folder / "atlas.json"
        if not path.is_file():
            raise UsageError(f"--atlas {str(folder)!r} has no atlas.json: give the output folder of `c2mf atlas`")
        try:
            rec = json.loads(path.read_text())
            d = dict(rec["dictionary"])
            sha = d.get("tensors_sha256")
            if (d.get("method") != dictionary.method or d.get("concepts") != dictionary.n_concepts
                    or (sha and sha != dictionary.meta.get("tensors_sha256"))):
                raise UsageError(
                    f"the atlas {str(folder)!r} is of another dictionary ({d.get('method')}, {d.get('concepts')} "
                    f"concepts{', tensors sha256 ' + str(sha)[:12] if sha else ''}), not of this {dictionary.method} "
                    f"dictionary with {dictionary.n_concepts}: make the atlas with the same dictionary")
            wanted = _atlas_regions(rec["concepts"], dictionary.n_concepts)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise C2MFError(f"{str(path)!r} is not an atlas record ({type(e).__name__}: {e}): rerun `c2mf atlas`"
                            ) from None
        names, crops = {}, {}
        root = folder.resolve()
        for j, (name, regions) in wanted.items():
            if name:
                names[j] = name
            got = []
            for crop_name in regions[:per_concept]:
                # only the crops inside the atlas folder: a record from someone else cannot make explain read
                # (and draw into a figure) a file elsewhere, as the report refuses to embed one
                if crop_name is None:
                    continue
                crop = (folder / crop_name).resolve()
                if not crop.is_relative_to(root) or not crop.is_file():
                    continue
                try:
                    got.append(np.asarray(read_image(crop)))
                except C2MFError:
                    continue  # a damaged crop is left out, as a moved one
            crops[j] = tuple(got)
        if any(regions for _, regions in wanted.values()) and all(
                crop is None for _, regions in wanted.values() for crop in regions):
            raise UsageError(f"the atlas {str(folder)!r} was made before c2mf kept each crop in the atlas folder: "
                             "rerun `c2mf atlas` to use it with explain")
        return cls(names, crops)

    def get(self, concept: int) -> tuple[str | None, tuple[np.ndarray, ...]]:
        return self.names.get(concept), self.crops.get(concept, ())


Box = tuple[int, int, int, int]


def _atlas_regions(concepts: Any, n_concepts: int) -> dict[int, tuple[str | None, list[str | None]]]:
    """concept -> (name, [crop file in the atlas folder, or None where the record has none]) from an atlas record's
    "concepts"; raises ValueError, KeyError, TypeError or IndexError on a field that is not what `c2mf atlas`
    writes."""
    if not isinstance(concepts, list):
        raise TypeError(f"'concepts' is a {type(concepts).__name__}, not a list")
    wanted = {}
    for c in concepts:
        j = c["concept"]
        if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < n_concepts:
            raise ValueError(f"concept {j!r} is not one of the dictionary's {n_concepts}")
        regions = c.get("regions") or []
        if not isinstance(regions, list):
            raise TypeError(f"the regions of concept {j} are a {type(regions).__name__}, not a list")
        boxes = []
        for r in regions:
            box = tuple(int(v) for v in r["box"])
            if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"concept {j}: crop box {list(r['box'])} is not (left, top, right, bottom)")
            if not isinstance(r["image"], str):
                raise TypeError(f"concept {j}: image {r['image']!r} is not a path")
            crop = r.get("crop")
            if crop is not None and not isinstance(crop, str):
                raise TypeError(f"concept {j}: crop {crop!r} is not a file name")
            boxes.append(crop)
        wanted[j] = (str(c["name"]) if c.get("name") else None, boxes)
    return wanted


@dataclass
class Explainer:
    """A model split at the dictionary's layer, ready to explain images. Build with `Explainer.create`."""

    dictionary: ConceptDictionary
    loaded: LoadedModel
    split: Split
    preprocess: Preprocess
    device: torch.device
    labels: dict[int, str]
    dict_class_of_output: dict[int, int]  # model output index -> dictionary class index
    n_outputs: int
    config: ExplainConfig = field(default_factory=ExplainConfig)
    warnings: list[str] = field(default_factory=list)
    class_names: dict[str, int] = field(default_factory=dict)  # store class (folder) name -> model output index

    @classmethod
    def create(
        cls,
        dictionary: ConceptDictionary | str | os.PathLike[str],
        config: ExplainConfig | None = None,
        *,
        model: str | None = None,
        checkpoint: str | None = None,
        labels: Sequence[str] | str | os.PathLike[str] | None = None,
        device: str | torch.device = "auto",
    ) -> "Explainer":
        """Load the model, checkpoint, layer and preprocessing named in the dictionary's metadata.

        Args:
            dictionary: a ConceptDictionary or the path of one.
            config: how to explain.
            model, checkpoint: override the model name / weights file recorded in the dictionary.
            labels: the model's labels in output order (a list or a file); default the store's class names.
            device: "auto", "cpu", "cuda"...
        """
        config = config or ExplainConfig()
        dev = resolve_device(device)
        d = dictionary if isinstance(dictionary, ConceptDictionary) else load_dictionary(dictionary)
        d = d.to(dev)
        prov = d.provenance
        layer = prov.layer
        if not layer:
            raise C2MFError("the dictionary does not record the layer it was fitted on: refit it from a c2mf store")
        recorded_pre = Preprocess.from_dict(prov.preprocess) if prov.preprocess else None
        opened = reopen_recorded(prov.model_record(), layer, model=model, checkpoint=checkpoint, what="the dictionary",
                                 command="c2mf explain DICT IMAGE...",
                                 input_size=recorded_pre.input_size if recorded_pre else None)
        loaded, split, warnings = opened.loaded, opened.split, opened.warnings
        preprocess = recorded_pre or loaded.preprocess
        if split.layout == "vector":
            raise C2MFError(f"layer {layer!r} has no spatial grid: explain needs a CNN map or ViT tokens")
        if split.channels != d.n_features:
            raise C2MFError(
                f"layer {layer!r} has {split.channels} channels but the dictionary has {d.n_features}: "
                "the dictionary belongs to another model or layer"
            )
        split.g.to(dev)
        split.h.to(dev)
        with torch.no_grad():
            n_outputs = int(split.h(split.g(torch.zeros(1, *preprocess.input_size, device=dev))).shape[-1])
        label_map = prov.readable()
        if labels is not None:
            lst = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else list(labels)
            if len(lst) != n_outputs:
                # a list of another length is almost surely another model's: every label shown would be wrong
                where = f"labels file {str(labels)!r}" if isinstance(labels, (str, os.PathLike)) else "the labels"
                raise UsageError(f"{where} has {len(lst)} labels but the model has {n_outputs} outputs: give "
                                 "one label per output, one a line in output order")
            label_map = dict(enumerate(lst))
        dict_class = {i: d.classes.index(n) for i, n in zip(prov.class_indices, prov.classes) if n in d.classes}
        explainer = cls(d, loaded, split, preprocess, dev, label_map, dict_class, n_outputs, config, warnings,
                        class_names=dict(zip(prov.classes, prov.class_indices)))
        if config.target is not None:
            explainer.resolve_target(config.target, np.zeros(n_outputs))
        return explainer

    # -- pieces
    def label(self, index: int) -> str:
        return self.labels.get(int(index), f"output {int(index)}")

    def head(self, y: int | None) -> Callable[..., torch.Tensor]:
        """head(U[, prefix]) = h(decode(U)) for codes (m, P, k): the rest of the network on the reconstruction.

        For token layouts the stored prefix tokens (ViT CLS ...) are the per-image side input h also needs.
        """
        gh, gw = self.split.grid
        d, split = self.dictionary, self.split

        def f(U: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
            m, P, k = U.shape
            A = decode(d, U.reshape(m * P, k), y).reshape(m, P, -1)
            if split.layout == "nchw":
                return split.h(split.from_store(A.reshape(m, gh, gw, -1)))
            side = prefix if prefix is not None else A[:, :0]
            return split.h(torch.cat([side, A], dim=1))

        return f

    def resolve_target(self, target: int | str | None, probs: np.ndarray) -> int:
        """The model output index to explain: the argument, a class name, or the prediction."""
        n = probs.shape[0]
        if target is None:
            return int(np.argmax(probs))
        if isinstance(target, str) and not target.lstrip("-").isdigit():
            # the label shown, or the store's class name (a folder name) where the label is a readable one
            by_name = {**{v: k for k, v in self.labels.items()}, **self.class_names}
            if target not in by_name:
                raise UsageError(f"--class {target!r} is not a known class name: give a name from the store or "
                                 f"--labels, or a model output index in 0..{n - 1}")
            return by_name[target]
        t = int(target)
        if not 0 <= t < n:
            raise UsageError(f"--class {t} is out of range: the model has {n} outputs (0..{n - 1})")
        return t

    def dictionary_class(self, target: int, probs: np.ndarray) -> tuple[int | None, str]:
        """The dictionary class whose codes (gates / per-class dictionary or mean) explain output `target`."""
        if not needs_class(self.dictionary):
            return None, "shared dictionary"
        if target in self.dict_class_of_output:
            return self.dict_class_of_output[target], "explained class"
        if not self.dict_class_of_output:
            if len(self.dictionary.classes) == 1:
                return 0, "the dictionary's only class"
            raise C2MFError("this per-class dictionary does not record which model output each class is: "
                            "refit it from a c2mf store")
        best = max(self.dict_class_of_output, key=lambda o: probs[o])
        return self.dict_class_of_output[best], (
            f"{self.label(target)!r} is not a class of the dictionary; codes use the gates of its most probable "
            f"class {self.label(best)!r}")

    # -- the whole explanation
    def explain(self, image: Image.Image, *, target: int | str | None = None) -> dict[str, Any]:
        """Every number of one explanation (JSON-able) plus the arrays the figure needs under "_arrays"."""
        return self.explain_batch([image], target=target)[0]

    def explain_batch(self, images: Sequence[Image.Image], *, target: int | str | None = None) -> list[dict[str, Any]]:
        """`explain` for several images with one model pass for all and one importance pass per dictionary class."""
        cfg = self.config
        if not images:
            return []
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with torch.no_grad():
            a = self.split.g(x)
            logits = self.split.h(a).float()
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        stored = self.split.to_store(a)  # (n, [prefix +] P, c)
        p0 = self.split.num_prefix_tokens if self.split.layout != "nchw" else 0
        rows_all = stored.reshape(len(images), -1, stored.shape[-1])[:, p0:]
        prefix_all = stored[:, :p0] if p0 else None
        targets = [self.resolve_target(target if target is not None else cfg.target, pr) for pr in probs]
        classes = [self.dictionary_class(t, pr) for t, pr in zip(targets, probs)]
        records: list[dict[str, Any] | None] = [None] * len(images)
        for y in dict.fromkeys(c[0] for c in classes):  # one importance pass per dictionary class
            idx = [i for i, c in enumerate(classes) if c[0] == y]
            rows = rows_all[idx]
            m, P, c = rows.shape
            U = encode(self.dictionary, rows.reshape(m * P, c), y, iters=cfg.encode_iters)
            U = U.detach().float().reshape(m, P, -1)
            head = self.head(y)
            side = prefix_all[idx] if prefix_all is not None else None
            t = torch.tensor([targets[i] for i in idx], device=self.device)
            extra: list[dict[str, Any]] = [{} for _ in idx]
            if cfg.importance == "gradcam":
                imp = gradcam(U, head, t, side=side)
            elif cfg.importance == "sobol":
                imp = sobol(U, head, t, designs=cfg.sobol_designs, side=side)
            else:
                res = integrated_gradients(U, head, t, steps=cfg.ig_steps, side=side)
                imp = res.attributions
                extra = [{"ig_logit": float(res.logit[j]), "ig_baseline_logit": float(res.baseline_logit[j]),
                          "ig_completeness_error": float(res.completeness_error[j])} for j in range(m)]
            with torch.no_grad():
                rec_logits = (head(U) if side is None else head(U, side)).float()
                rec_A = decode(self.dictionary, U.reshape(m * P, -1), y).reshape(m, P, -1)
            rec_probs = torch.softmax(rec_logits, dim=1).cpu().numpy()
            rel = (torch.linalg.norm((rows - rec_A).reshape(m, -1), dim=1)
                   / torch.linalg.norm(rows.reshape(m, -1), dim=1).clamp_min(1e-12)).cpu().numpy()
            imp_np = imp.detach().cpu().numpy().astype(np.float64)
            codes = U.cpu().numpy()
            for j, i in enumerate(idx):
                records[i] = self._record(images[i], probs[i], logits[i], targets[i], classes[i], imp_np[j],
                                          codes[j], rec_logits[j], rec_probs[j], float(rel[j]), extra[j])
        return [r for r in records if r is not None]

    def _record(self, image: Image.Image, probs: np.ndarray, logits: torch.Tensor, t: int,
                dict_class: tuple[int | None, str], imp_np: np.ndarray, codes_flat: np.ndarray,
                rec_logits: torch.Tensor, rec_probs: np.ndarray, rel_error: float,
                extra: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        y, why = dict_class
        geometry = geometry_for(self.preprocess, (image.height, image.width))
        gh, gw = self.split.grid
        codes = codes_flat.reshape(gh, gw, -1)
        order = np.argsort(-imp_np, kind="stable")
        g = gates(self.dictionary, y) if y is not None else None
        gate_values = g.cpu().numpy() if g is not None else None
        open_gates = [int(j) for j in np.flatnonzero(gate_values > GATE_OPEN)] if gate_values is not None else None
        peak = float(np.max(np.abs(imp_np))) if imp_np.size else 0.0
        notes: list[str] = []
        cname = None if y is None else self.dictionary.classes[y]
        if open_gates == []:
            # closed gates shrink every code to ~0: the importances would be drawn as noise, so say it instead
            notes.append(f"class {cname!r} has no open gate (every gate \u03c3(\u03bb) \u2264 {GATE_OPEN}): the "
                         "dictionary keeps no concept for it, so its concepts cannot explain this class")
            drawn_for: list[int] = []
            drawn_against: list[int] = []
        elif peak <= 0.0:
            notes.append("no concept carries any importance for this class (all importances are 0)")
            drawn_for, drawn_against = [], []
        else:
            drawn_for, drawn_against = select_concepts(imp_np, cfg.top, cfg.min_share)
        if cfg.importance == "sobol":
            notes.append("Sobol indices are unsigned: they say how much a concept matters to this class's logit, "
                         "not whether it speaks for or against it")
        notes += [w for w in self.warnings]
        pred = int(np.argmax(probs))
        top_cls = np.argsort(-probs, kind="stable")[: cfg.top_classes]

        def concept(j: int) -> dict[str, Any]:
            return {"concept": j, "importance": float(imp_np[j]),
                    "evidence": "for" if imp_np[j] > 0 else "against",
                    "mean_code": float(codes[..., j].mean()), "max_code": float(codes[..., j].max()),
                    "peak_cell": [int(v) for v in np.unravel_index(np.argmax(codes[..., j]), (gh, gw))],
                    **({"gate": float(gate_values[j])} if gate_values is not None else {})}

        record: dict[str, Any] = {
            "image": {"width": image.width, "height": image.height},
            "geometry": geometry.to_dict(),
            "model": {"name": self.loaded.spec.name, "checkpoint": self.loaded.spec.checkpoint,
                      "weights_sha256": self.loaded.weights_sha256, "layer": self.split.layer,
                      "layout": self.split.layout, "grid": [gh, gw]},
            "dictionary": {"method": self.dictionary.method, "concepts": self.dictionary.n_concepts,
                           "class": cname, "class_reason": why,
                           **({"open_gates": open_gates} if open_gates is not None else {})},
            "config": cfg.to_dict(),
            "top_classes": [{"index": int(i), "label": self.label(int(i)), "probability": float(probs[i])}
                            for i in top_cls],
            "prediction": {"index": pred, "label": self.label(pred)},
            "explained": {"index": t, "label": self.label(t), "logit": float(logits[t]),
                          "probability": float(probs[t])},
            "reconstruction": {"logit": float(rec_logits[t]), "probability": float(rec_probs[t]),
                               "prediction": int(np.argmax(rec_probs)), "relative_error": rel_error},
            "importance_method": cfg.importance,
            "importance": [float(v) for v in imp_np],
            "ranking": [int(j) for j in order],
            "top_concepts": [concept(j) for j in drawn_for + drawn_against],
            "notes": notes,
            **extra,
            "warnings": list(self.warnings),
        }
        if gate_values is not None:
            record["gates"] = [float(v) for v in gate_values]
        record["_arrays"] = {"codes": codes, "geometry": geometry}
        return record

    def figure(self, image: Image.Image, record: dict[str, Any], title: str | None = None,
               atlas: AtlasCrops | None = None) -> Image.Image:
        """The explanation figure of a record made by `explain` (a PIL image), with the atlas crops of each
        drawn concept beside its heatmap when an atlas is given."""
        codes = record["_arrays"]["codes"]
        panels = []
        for c in record["top_concepts"]:
            j = c["concept"]
            name, crops = atlas.get(j) if atlas is not None else (None, ())
            panels.append(ConceptPanel(j, c["importance"], codes[..., j], name=name, gate=c.get("gate"),
                                       crops=tuple(crops)))
        return explanation_figure(
            image,
            record["_arrays"]["geometry"],
            [(c["label"], c["probability"]) for c in record["top_classes"]],
            panels,
            importances=list(enumerate(record["importance"])),
            title=title or "",
            lines=describe(record),
            notes=record.get("notes", []),
            importance_label=IMPORTANCE_LABELS[record["importance_method"]],
        )

    def save_figure(self, image: Image.Image, record: dict[str, Any], path: str | os.PathLike[str],
                    title: str | None = None, atlas: AtlasCrops | None = None) -> Path:
        """Draw `figure` and write it as PNG (atomically)."""
        return save_png(self.figure(image, record, title, atlas), path)


#: A c2mf gate sigma(lambda) above this keeps its concept for the class (the demo's gate check uses the same).
GATE_OPEN = 0.5


def select_concepts(importance: np.ndarray, top: int, min_share: float) -> tuple[list[int], list[int]]:
    """The concepts worth drawing: (evidence for, evidence against) the class.

    A concept qualifies when |importance| >= min_share x the largest |importance|; at most `top` on each side,
    the strongest first (most positive for, most negative against).
    """
    imp = np.asarray(importance, dtype=np.float64)
    peak = float(np.max(np.abs(imp))) if imp.size else 0.0
    if peak <= 0.0:
        return [], []
    keep = np.abs(imp) >= min_share * peak
    order = np.argsort(-imp, kind="stable")
    drawn_for = [int(j) for j in order if keep[j] and imp[j] > 0][:top]
    drawn_against = [int(j) for j in order[::-1] if keep[j] and imp[j] < 0][:top]
    return drawn_for, drawn_against


def describe(record: dict[str, Any]) -> list[str]:
    """The lines under a figure's title: what was explained, what the model predicted, whose codes were used."""
    e, p = record["explained"], record["prediction"]
    lines = [f"explained: {e['label']} (p = {e['probability']:.3f})"
             + (", the model's prediction" if e["index"] == p["index"] else
                f"; the model predicts {p['label']} (p = {record['top_classes'][0]['probability']:.3f})")]
    d = record["dictionary"]
    how = f"{IMPORTANCE_LABELS[record['importance_method']]} importance"
    if d.get("class") is None:
        lines.append(f"dictionary: {d['method']}, {d['concepts']} concepts shared by every class; {how}")
    else:
        whose = "gates" if "open_gates" in d else "dictionary"
        line = f"dictionary: {d['method']}, {d['concepts']} concepts; codes use the {whose} of class {d['class']!r}"
        if d.get("class_reason") not in (None, "explained class"):
            line += f" ({d['class_reason']})"
        if "open_gates" in d:
            line += f", {len(d['open_gates'])} open"
        lines.append(line + f"; {how}")
    share = record.get("config", {}).get("min_share")
    if record["top_concepts"] and share:
        lines.append(f"drawn: concepts whose |importance| is at least {share:.0%} of the largest")
    return lines




def _out_stems(paths: Sequence[Path]) -> list[str]:
    """File stems for the outputs, unique even when two images share a name, and never the batch summary's
    (an image named explain.jpg must not overwrite explain.json)."""
    seen: dict[str, int] = {"explain": 1}
    stems = []
    for p in paths:
        s = p.stem or "image"
        n = seen.get(s, 0)
        seen[s] = n + 1
        stems.append(s if n == 0 else f"{s}-{n}")
    return stems


#: Images per model pass: large enough to amortise the passes, small enough to keep memory flat on big batches.
BATCH = 16


def explain_images(
    images: Sequence[str | os.PathLike[str]],
    explainer: Explainer,
    out_dir: str | os.PathLike[str],
    *,
    target: int | str | None = None,
    atlas: AtlasCrops | None = None,
    on_done: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Explain each image into out_dir/<stem>.png and out_dir/<stem>.json; go on past images that fail.

    Images are read and explained in batches of `BATCH` (one model pass each). With `atlas` (from
    `stages.atlas.AtlasCrops.load`), each drawn concept shows its atlas crops beside its heatmap.

    Returns a summary: {"explained": [{"image", "png", "json", "prediction", "explained", "top_concepts"}],
    "failed": [{"image", "error"}]}; the summary is also written to out_dir/explain.json when at least one image
    was explained (when every image fails nothing is written, not even out_dir).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"the output folder {str(out)!r} is a file: give a folder path")
    paths = [Path(p) for p in images]
    done, failed = [], []
    if target is not None:  # a bad --class is one error for the whole batch, not one per image
        explainer.resolve_target(target, np.zeros(explainer.n_outputs))
    jobs = list(zip(paths, _out_stems(paths)))
    for s in range(0, len(jobs), BATCH):
        ready = []
        for path, stem in jobs[s: s + BATCH]:
            try:
                if path.is_dir():
                    raise C2MFError(f"{str(path)!r} is a folder, not an image: give image files (e.g. {path}/*.jpg)")
                ready.append((path, stem, read_image(path)))
            except C2MFError as e:
                failed.append({"image": str(path), "error": str(e)})
                if on_done:
                    on_done(1)
        records = explainer.explain_batch([im for _, _, im in ready], target=target)
        for (path, stem, image), record in zip(ready, records):
            record = {"image_path": str(path), **record}
            arrays = record.pop("_arrays")
            record["codes"] = np.round(arrays["codes"], 6).tolist()
            out.mkdir(parents=True, exist_ok=True)  # only once an image succeeded: a batch that all fails writes nothing
            png = explainer.save_figure(image, {**record, "_arrays": arrays}, out / f"{stem}.png",
                                        title=_title(path), atlas=atlas)
            write_json(out / f"{stem}.json", record)
            done.append({"image": str(path), "png": png.name, "json": f"{stem}.json",
                         "prediction": record["prediction"], "explained": record["explained"],
                         "dictionary_class": record["dictionary"]["class"], "notes": record["notes"],
                         "top_concepts": [c["concept"] for c in record["top_concepts"]]})
            if on_done:
                on_done(1)
    summary = {"out_dir": str(out), "explained": done, "failed": failed,
               "dictionary": explainer.dictionary.meta.get("method"), "config": explainer.config.to_dict()}
    if done:
        write_json(out / "explain.json", summary)
    return summary


def _title(path: Path) -> str:
    """The image's file name, with its folder when that is all that tells two images apart (class/000.png)."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
