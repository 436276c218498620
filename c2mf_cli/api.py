"""The notebook API: the chain on in-memory arrays and models, no files and no model strings.

    import c2mf_cli as c2mf
    d = c2mf.fit(acts, labels, method="c2mf", k=10)      # acts (n, c) rows or (n, ..., c) per image
    U = c2mf.encode(d, acts, y=0)                         # or c2mf_cli.methods.encode(d, rows, 0)
    e = c2mf.explain(model, "layer3", images, d)          # images: a preprocessed (m, 3, H, W) tensor
    r = c2mf.evaluate(train_store, test_store, [d])       # stores from `c2mf extract` (paths or opened)
    r = c2mf.evaluate((train_images, train_labels), (test_images, test_labels), [d], model=model, layer="layer3")

Notation: A activations (rows, c); U codes (rows, k); W the dictionary (k, c); A ~ U W.
The CLI's `factorize` and `evaluate` call the same stage functions (`stages.factorize`, `stages.evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

from .errors import C2MFError
from .methods import decode as decode_rows, encode as encode_rows, needs_class
from .progress import ProgressFn, no_progress

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .artifacts.dictionary import ConceptDictionary


def _numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device; floats as float32 (numpy has no bfloat16)
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()
    a = np.asarray(x)
    if a.dtype == object:
        raise C2MFError(f"{name} must be a numeric array or tensor")
    return a


def _rows(acts: Any) -> tuple[np.ndarray, int]:
    """(rows, c) float32 from (n, c) or channels-last (n, ..., c); and the rows per item."""
    a = _numpy(acts, "acts").astype(np.float32, copy=False)
    if a.ndim < 2:
        raise C2MFError(f"acts must be (n, c) rows or (n, ..., c) per image, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise C2MFError("acts hold NaN or infinite values: check the layer's output")
    per_item = int(np.prod(a.shape[1:-1])) if a.ndim > 2 else 1
    return a.reshape(-1, a.shape[-1]), per_item


def fit(
    acts: Any,
    labels: Any = None,
    *,
    method: str = "c2mf",
    k: int = 10,
    mode: Literal["full", "crops"] = "full",
    device: str = "auto",
    progress: ProgressFn = no_progress,
    **options: Any,
) -> "ConceptDictionary":
    """Learn a concept dictionary from in-memory activations.

    Args:
        acts: (n, c) rows, or (n, ..., c) channels-last activations of n images (a PyTorch (n, c, h, w) map is
            `acts.permute(0, 2, 3, 1)`); every position of an image is one row.
        labels: the class of each of the n items (ints or strings); None: one class. Classes are sorted.
        method: a registered method (`c2mf_cli.methods.list_methods()`).
        k: number of concepts.
        mode: "full" (positions of whole images) or "crops" (pooled crops, what CRAFT learns from).
        options: the method's settings by name (alpha=0.05, iterations=50, seed=1, ...); a wrong name is an error.
    Returns:
        The dictionary: `c2mf.encode(d, rows, y)`, `c2mf.decode(d, U, y)`, `d.save(path)`; `d.classes` are the label names.
    """
    from .artifacts.sources import ArraySource
    from .stages.factorize import factorize

    rows, per_item = _rows(acts)
    n = rows.shape[0] // per_item
    if labels is None:
        names, groups = ["all"], [rows]
    else:
        lab = _numpy(labels, "labels").reshape(-1)
        if lab.shape[0] != n:
            raise C2MFError(f"{lab.shape[0]} labels for {n} items of acts: give one label per item")
        lab_rows = np.repeat(lab, per_item)
        values = sorted(set(lab.tolist()))
        names = [str(v) for v in values]
        groups = [rows[lab_rows == v] for v in values]
    source = ArraySource(groups, classes=names, mode=mode)
    return factorize(source, method, device=device, progress=progress, concepts=k, **options)


def encode(d: "ConceptDictionary", acts: Any, y: int | str | None = None, *, codes: str = "fit") -> Any:
    """Codes U of activations for class `y` (index or name; None for a shared, ungated dictionary).

    `acts` (n, c) gives (n, k); (n, ..., c) gives (n, ..., k). A tensor in gives a tensor out, numpy gives numpy.
    `codes`: "fit" (the dictionary's own rule), "nnls" (no ridge) or "lstsq" (signed least squares).
    """
    shape = tuple(acts.shape)
    is_tensor = hasattr(acts, "detach")
    rows = acts.reshape(-1, shape[-1]) if is_tensor else _rows(acts)[0]
    U = encode_rows(d, rows, d.class_index(y) if isinstance(y, str) else y, codes=codes)
    return U.reshape(*shape[:-1], U.shape[-1])


def decode(d: "ConceptDictionary", U: Any, y: int | str | None = None) -> Any:
    """Reconstructed activations U W (+ the mean for PCA) for class `y`; (n, ..., k) gives (n, ..., c)."""
    shape = tuple(U.shape)
    A = decode_rows(d, U.reshape(-1, shape[-1]), d.class_index(y) if isinstance(y, str) else y)
    return A.reshape(*shape[:-1], A.shape[-1])


@dataclass(frozen=True)
class Explanation:
    """One image: the explained output, each concept's importance for it, and where each concept is.

    `heatmaps` (h, w, k) are the codes on the layer's grid (upsample them to the image to overlay).
    """

    target: int
    probabilities: np.ndarray  # (outputs,) softmax of the model
    importance: np.ndarray  # (k,) Grad-CAM or Integrated Gradients on the codes, for `target`
    ranking: list[int]  # concepts, most important first
    heatmaps: np.ndarray  # (h, w, k)
    reconstruction_probability: float  # of `target`, when the layer is replaced by its reconstruction
    relative_error: float  # ||A - U W|| / ||A|| on this image


def explain(
    model: "nn.Module",
    layer: str,
    images: "torch.Tensor",
    d: "ConceptDictionary",
    *,
    target: int | Sequence[int] | None = None,
    importance: Literal["gradcam", "ig"] = "gradcam",
    ig_steps: int = 32,
    y: int | str | None = None,
) -> list[Explanation]:
    """Explain preprocessed images (m, 3, H, W) with a dictionary fitted at `layer` of `model`.

    Args:
        target: the model output to explain per image (default: the prediction).
        y: the dictionary class whose gates / per-class dictionary give the codes (default: for a dictionary
            with classes, the class named like the target's index if there is one; else the first class).
    """
    import torch

    from .inputs.models import split_model
    from .metrics.importance import gradcam, integrated_gradients

    if images.ndim != 4:
        raise C2MFError(f"images must be a preprocessed (m, 3, H, W) tensor, got shape {tuple(images.shape)}")
    model = model.eval()
    split = split_model(model, layer, tuple(images.shape[1:]))
    if split.layout == "vector":
        raise C2MFError(f"layer {layer!r} has no spatial grid: explain needs a CNN map or ViT tokens")
    if split.channels != d.n_features:
        raise C2MFError(f"layer {layer!r} has {split.channels} channels but the dictionary has {d.n_features}")
    device = next(iter(model.parameters()), torch.empty(0)).device
    d = d.to(device)
    with torch.no_grad():
        a = split.g(images.to(device))
        logits = split.h(a).float()
    probs = torch.softmax(logits, dim=1).cpu().numpy()
    targets = ([int(t) for t in target] if isinstance(target, Sequence) else
               [int(target)] * len(images) if target is not None else [int(p.argmax()) for p in probs])
    gh, gw = split.grid
    out = []
    for i in range(len(images)):
        s = split.to_store(a[i : i + 1])[0]
        rows, prefix = (s.reshape(-1, s.shape[-1]), None) if split.layout == "nchw" else \
            (s[split.num_prefix_tokens:], s[:split.num_prefix_tokens])
        cls = _dictionary_class(d, y, targets[i])
        U = encode_rows(d, rows, cls).detach().float()

        def head(codes: torch.Tensor, cls: int | None = cls, prefix: torch.Tensor | None = prefix) -> torch.Tensor:
            m, P, k = codes.shape
            A = decode_rows(d, codes.reshape(m * P, k), cls).reshape(m, P, -1)
            if split.layout == "nchw":
                return split.h(split.from_store(A.reshape(m, gh, gw, -1)))
            side = prefix.unsqueeze(0).expand(m, *prefix.shape) if prefix is not None else A[:, :0]
            return split.h(torch.cat([side, A], dim=1))

        t = torch.tensor([targets[i]], device=device)
        imp = (gradcam(U[None], head, t)[0] if importance == "gradcam"
               else integrated_gradients(U[None], head, t, steps=ig_steps).attributions[0])
        with torch.no_grad():
            rec = torch.softmax(head(U[None])[0].float(), dim=0)[targets[i]]
            err = torch.linalg.norm(rows - decode_rows(d, U, cls)) / torch.linalg.norm(rows).clamp_min(1e-12)
        imp_np = imp.detach().cpu().numpy().astype(np.float64)
        out.append(Explanation(
            target=targets[i], probabilities=probs[i], importance=imp_np,
            ranking=[int(j) for j in np.argsort(-imp_np, kind="stable")],
            heatmaps=U.cpu().numpy().reshape(gh, gw, -1), reconstruction_probability=float(rec),
            relative_error=float(err)))
    return out


def _dictionary_class(d: "ConceptDictionary", y: int | str | None, target: int) -> int | None:
    if y is not None:
        return d.class_index(y) if isinstance(y, str) else int(y)
    if not needs_class(d):
        return None
    if str(target) in d.classes:  # fit(acts, labels) with integer labels names classes by their output index
        return d.classes.index(str(target))
    return 0


class _ImageStore:
    """What evaluate reads of a store (`stages.evaluate.StoreLike`), over images in memory grouped by label. The
    activations (in the store layout) and the model's logits are computed when evaluate reads a range of a class
    (`rows`), so under a process group each process runs only the images of its own pieces through the model."""

    def __init__(self, split: Any, images: Any, labels: Any, role: str, batch_size: int) -> None:
        import hashlib

        import torch

        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else \
                f"a {type(images).__name__} of shape {tuple(getattr(images, 'shape', ()))} (torch.from_numpy() it)"
            raise C2MFError(f"{role} images must be a preprocessed (m, 3, H, W) tensor, got {got}")
        lab = _numpy(labels, f"{role} labels").reshape(-1)
        if lab.shape[0] != images.shape[0] or not np.issubdtype(lab.dtype, np.integer):
            raise C2MFError(f"{role} labels must be one model output index (int) per image: got {lab.shape[0]} "
                            f"labels of type {lab.dtype} for {images.shape[0]} images")
        self._split, self._images, self._role, self._batch_size = split, images, role, batch_size
        self._device = next(iter(split.h.parameters()), torch.empty(0)).device
        values = sorted(set(lab.tolist()))
        self.classes = [str(v) for v in values]
        self._outputs = values
        self._index = [np.nonzero(lab == v)[0] for v in values]
        self._last: tuple[tuple[int, tuple | None], np.ndarray, np.ndarray] | None = None
        self.mode, self.layer, self.layout = "full", split.layer, split.layout
        self.num_prefix_tokens = split.num_prefix_tokens if split.layout != "nchw" else 0
        pixels = images.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest = hashlib.sha256(pixels.tobytes() + lab.astype(np.int64).tobytes()).hexdigest()
        self.fingerprint = f"in-memory:{digest[:32]}"  # of the images and labels
        self.info = {"layer": split.layer, "fingerprint": self.fingerprint}

    def _run(self, y: int, rows: slice | None) -> tuple[np.ndarray, np.ndarray]:
        """Activations and logits of images `rows` of class y (the last range asked for is kept: evaluate reads
        a range's activations, then its logits)."""
        import torch

        key = (y, None if rows is None else (rows.start, rows.stop, rows.step))
        if self._last is None or self._last[0] != key:
            index = self._index[y] if rows is None else self._index[y][rows]
            acts, logits = [], []
            with torch.no_grad():
                for s in range(0, index.shape[0], self._batch_size):
                    batch = self._images[torch.as_tensor(index[s : s + self._batch_size], dtype=torch.long)]
                    a = self._split.g(batch.to(self._device))
                    logits.append(self._split.h(a).float().cpu().numpy())
                    acts.append(self._split.to_store(a).float().cpu().numpy())
            if not acts:
                raise C2MFError(f"no {self._role} image of class {self.classes[y]!r} in rows {rows}")
            A, L = np.concatenate(acts), np.concatenate(logits)
            if not np.isfinite(A).all():
                raise C2MFError(f"the layer's output on the {self._role} images holds NaN or infinite values")
            self._last = (key, A, L)
        return self._last[1], self._last[2]

    def n_images(self, y: int) -> int:
        return int(self._index[y].shape[0])

    def activations(self, y: int, rows: slice | None = None) -> np.ndarray:
        return self._run(y, rows)[0]

    def logits(self, y: int, rows: slice | None = None) -> np.ndarray:
        return self._run(y, rows)[1]

    def labels(self, y: int) -> np.ndarray:
        return np.full(self.n_images(y), self._outputs[y], dtype=np.int64)

    def paths(self, y: int) -> list[str]:
        return [f"{self._role} image {int(i)}" for i in self._index[y]]


def evaluate(
    train: Any,
    test: Any,
    dictionaries: Sequence[Any],
    *,
    crops: Any = None,
    names: Sequence[str] | None = None,
    device: str = "auto",
    out_dir: str | Path | None = None,
    progress: ProgressFn = no_progress,
    model: "str | nn.Module | None" = None,
    layer: str | None = None,
    checkpoint: str | Path | None = None,
    batch_size: int = 64,
    **settings: Any,
) -> dict[str, Any]:
    """Every metric of `c2mf evaluate`, as a plain dict (the content of evaluation.json).

    Two ways in:
    - stores: `train`, `test` (and `crops`) are activation stores from `c2mf extract`, paths or opened; `model`
      and `checkpoint` (strings) then override the model / weights the stores record (their sha256 is checked),
      and a model recorded as code (path/file.py:factory) is only run when `model` names it.
    - in memory: `train` and `test` are `(images, labels)` pairs, images a preprocessed (m, 3, H, W) tensor and
      labels the model's output index of each image, with `model` an `nn.Module` and `layer` where the
      dictionaries were fitted. Classes are the label values (as `fit(acts, labels)` names them); the
      activations and the model's logits are computed here, `batch_size` images at a time.

    Args:
        dictionaries: `ConceptDictionary` objects (e.g. from `fit`) or paths of saved ones.
        out_dir: where to write evaluation.json and the plots; None writes nothing.
        settings: fields of `EvaluateConfig` (max_images_per_class=..., ig_steps=..., ...).

    Under a process group (torchrun / srun and `c2mf_cli.distributed.start()`) every process calls it alike:
    each computes its share of the images (pieces of classes), all return the whole result, and only rank 0 writes
    `out_dir`; images in memory are run through the model by the process whose share they are in.
    """
    from .artifacts.store import ActivationStore
    from ._io import jsonable
    from .methods import load_dictionary
    from .stages.evaluate import EvaluateConfig, evaluate as run

    dicts = [load_dictionary(x) if isinstance(x, (str, Path)) else x for x in dictionaries]
    config = EvaluateConfig(**settings)
    common = dict(names=list(names) if names else None, device=device,
                  out_dir=Path(out_dir) if out_dir is not None else None)
    if isinstance(train, tuple) or isinstance(test, tuple):
        if not (isinstance(train, tuple) and isinstance(test, tuple) and len(train) == len(test) == 2):
            raise C2MFError("in memory, give train=(images, labels) and test=(images, labels)")
        if model is None or isinstance(model, str) or layer is None:
            raise C2MFError("images in memory need the model itself (model=nn.Module) and layer=NAME")
        if crops is not None:
            raise C2MFError("crops are read from a crop store: evaluate images in memory without crops")
        from .inputs.models import split_model

        model = model.eval()
        split = split_model(model, layer, tuple(train[0].shape[1:]))
        stores = [_ImageStore(split, *pair, role, batch_size) for pair, role in ((train, "train"), (test, "test"))]

        def tail(a: Any) -> Any:
            return split.h(split.from_store(a))

        result = run(stores[0], stores[1], dicts, None, config, progress, tail=tail, **common)
        return jsonable(result)

    def store(s: Any) -> Any:
        return ActivationStore.open(s) if isinstance(s, (str, Path)) else s

    if model is not None and not isinstance(model, str):
        raise C2MFError("with stores, model names the model to use instead of the recorded one (a string); an "
                        "nn.Module goes with images in memory: train=(images, labels), test=(images, labels)")
    result = run(store(train), store(test), dicts, store(crops) if crops is not None else None, config, progress,
                 model=model, checkpoint=str(checkpoint) if checkpoint is not None else None, **common)
    return jsonable(result)
