"""Evaluate concept dictionaries side by side with every metric of docs/metrics.md.

Data flow: a train store and a held-out test store of the same model and layer (whole images), optionally a crop
store, and one or more `ConceptDictionary` files. The model's tail h comes from splitting the store's model at its
layer. For each test image, the codes are U = encode(A, y) on its positions and reshaped to the grid;
`head(U) = h(from_store(decode(U)))` is what importance, insertion/deletion and reconstruction accuracy feed.
y picks the class's dictionary (diag(sigma(lambda_y)) W* for c2mf, W_y and mean_y for per-class methods); which
class is the encoding (`--encode-class`): `true` (the label: the paper's protocol, which hands the answer to the
reconstruction), `predicted` (the model's prediction on the original activations: what explain does, and the
headline) or `none` (all concepts ungated; per-class dictionaries have no such basis and are skipped).

References, computed on the same test images: the model itself, the train mean of the true / predicted class
alone (k = 0), the global train mean, and chance. Methods are compared image by image with an exact McNemar test,
and shared dictionaries (k directions) are kept apart from per-class ones (k x classes directions).

ViT stores: the rows are the patch tokens; the prefix (CLS) tokens are kept as stored and fed to h unchanged, so
only the patch tokens are explained and reconstructed (heatmaps use the patch tokens on their grid).

Every metric is computed block by block and pooled: a piece is a contiguous range of one class's images (on one
process each class is one piece), and consecutive pieces are merged into blocks of at least `block_images(device)`
images (`blocks`; 64 on a GPU, one piece per block on a CPU), so the metrics get one batch per block and
encoding, its images of any classes, each encoded and decoded with its own dictionary class index, and the
model's tail is called on all of them at once. The result is one dict (written as JSON by `write_results`, with
PNG plots) holding every number, the inputs' fingerprints and the settings. The importance target c is the
model's own prediction on the original activations.

Under torch.distributed (a process group the caller started, e.g. `c2mf_cli.distributed.start()` from torchrun's
or srun's environment) every process calls `evaluate` alike. Each takes its share of the images (`deal`: every
class's images, in class order, cut into one contiguous range per process, a class split where a range ends;
the train pass, the test pass and the OOD pass dealt separately) and reads and computes only those; the train
class sums are all-reduced before the test pass (the class-mean references need every class's mean), and at the
end the metrics' states (`metrics.State`: sums and maxima) and the per-image arrays (each process fills its own
images, zeros elsewhere) are all-reduced. Every process then holds the one-process result, to float rounding;
only rank 0 writes files. A class may be split because every number is a sum over images (per class or pooled),
a maximum, or read from the whole per-image arrays: nothing is computed once per class from all its images
(Sobol's design is one fixed Halton sequence for every image; codes are solved row by row, to within the NNLS
solver's stopping tolerance, 1e-7 of the largest code, which any batching of rows already allows).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from .._io import unique_names, write_json
from .. import __version__, distributed
from ..devices import resolve_device
from ..errors import C2MFError, UsageError
from ..metrics import (
    ALPHA,
    DEFAULT_RANKINGS,
    RANKING_LABELS,
    RANKINGS,
    EVALUATE_METRICS,
    Batch,
    State,
    cluster_concepts,
    confidence_histograms,
    max_softmax,
    ood_scores,
    pairwise_mcnemar,
)
from ..metrics.reconstruction import per_class_accuracy_from_predictions
from ..methods import CODE_RULES, class_free, decode, encode, needs_class
from ..progress import ProgressFn, no_progress

ENCODING_TYPE = "c2mf-evaluation"
ENCODING_VERSION = 2  # 2: references, encodings, capacity, significance
ENCODINGS = ("true", "predicted", "none")
# every plot `write_results` may draw (names are fixed, so a rerun into the same folder replaces them)
PLOT_FILES = tuple(f"insertion_deletion_{r}_{q}.png" for r in RANKINGS for q in ("prob", "accuracy")) + (
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

    # activations and logits may also take `rows` (a slice of the class's images) to read only those; a store
    # whose readers do not is sliced after the call (evaluate reads one piece of a class at a time)
    def n_images(self, y: int) -> int: ...
    def activations(self, y: int) -> np.ndarray: ...
    def logits(self, y: int) -> np.ndarray: ...
    def labels(self, y: int) -> np.ndarray: ...
    def paths(self, y: int) -> list[str]: ...


class DictionaryLike(Protocol):
    """What evaluate needs of a dictionary (c2mf_cli.artifacts.dictionary.ConceptDictionary satisfies it); codes
    come from `c2mf_cli.methods.encode / decode`, which dispatch on `method`."""

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


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one evaluation; written into the output JSON.

    max_images_per_class: cap on test and train images read per class (the first N; None = all).
    ig_steps / ig_rule: Integrated Gradients quadrature. batch_size: rows (image x step) per call of h.
    cluster_ks: K values of the clustering ablation (None: the k of every shared dictionary given).
    encode_class: the encodings computed (true, predicted, none); the headline one (predicted when listed, else
    the first) gets every metric, the others the reconstruction. min_agreement: below this agreement with the
    model (mean over classes, headline encoding) a method's reconstruction is said not to preserve the decision.
    attribution: compute importance and insertion/deletion (the costly part; off for a quick fidelity check).
    rankings: the importances computed and used to rank concepts for insertion/deletion (gradcam, ig, sobol);
    sobol_designs: the Sobol design size (designs x (k + 2) head calls per image; 32 as CRAFT).
    codes: how test and train codes are solved (`methods.CODE_RULES`): fit (the dictionary's own rule), nnls
    (no ridge) or lstsq (signed least squares).
    """

    max_images_per_class: int | None = None
    ig_steps: int = 32
    ig_rule: str = "gausslegendre"
    batch_size: int = 1024
    histogram_bins: int = 20
    cluster_ks: tuple[int, ...] | None = None
    seed: int = 0
    encode_class: tuple[str, ...] = ("predicted", "true")
    min_agreement: float = 0.5
    attribution: bool = True
    rankings: tuple[str, ...] = DEFAULT_RANKINGS
    sobol_designs: int = 32
    codes: str = "fit"

    def __post_init__(self) -> None:
        if self.ig_steps < 2:
            raise UsageError(f"--ig-steps must be at least 2 (32 or more is advised), got {self.ig_steps}")
        if self.max_images_per_class is not None and self.max_images_per_class < 1:
            raise UsageError(f"--max-images-per-class must be at least 1, got {self.max_images_per_class}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        bad = [e for e in self.encode_class if e not in ENCODINGS]
        if bad or not self.encode_class or len(set(self.encode_class)) != len(self.encode_class):
            raise UsageError(f"--encode-class takes distinct values among {', '.join(ENCODINGS)} (comma-separated), "
                             f"got {','.join(self.encode_class) or 'nothing'}")
        bad = [r for r in self.rankings if r not in RANKINGS]
        if bad or not self.rankings or len(set(self.rankings)) != len(self.rankings):
            raise UsageError(f"--importance takes distinct values among {', '.join(RANKINGS)} (comma-separated), "
                             f"got {','.join(self.rankings) or 'nothing'}")
        if self.codes not in CODE_RULES:
            raise UsageError(f"--codes must be one of {', '.join(CODE_RULES)}, got {self.codes!r}")
        if self.sobol_designs < 2:
            raise UsageError(f"--sobol-designs must be at least 2 (32 is CRAFT's default), got {self.sobol_designs}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise UsageError(f"--min-agreement must be between 0 and 1, got {self.min_agreement}")

    @property
    def headline(self) -> str:
        """The encoding every metric is computed under: the predicted class when listed (the honest one)."""
        return "predicted" if "predicted" in self.encode_class else self.encode_class[0]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cluster_ks"] = list(self.cluster_ks) if self.cluster_ks is not None else None
        d["encode_class"] = list(self.encode_class)
        d["rankings"] = list(self.rankings)
        return d


@dataclass
class _Tail:
    """h with the store layout: maps store-layout activations (m, *positions, c) to logits."""

    h: torch.nn.Module
    from_store: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return self.h(self.from_store(a))


def _tail_from_store(store: StoreLike, device: torch.device, model: str | None = None,
                     checkpoint: str | None = None) -> tuple[_Tail, list[str]]:
    """h from the store's model, reopened with its weights checked; a model recorded as code needs `model`.

    Returns the tail and the warnings to show (other weights chosen on purpose with `checkpoint`).
    """
    from ..inputs.models import reopen_recorded

    cfg = getattr(store, "config", None) or {}
    pre = getattr(store, "preprocess", None)
    size = tuple(pre.input_size) if pre is not None and getattr(pre, "input_size", None) else None
    # no check of the split on a random batch (six full-model image passes, most of the reopen): evaluate
    # checks h itself on every stored test image against the stored logits (`h_check`), and a split not made by
    # torch.fx is verified regardless
    opened = reopen_recorded(cfg.get("model") or {}, store.layer, model=model, checkpoint=checkpoint,  # type: ignore[arg-type]
                             what="the test store", command="c2mf evaluate --train ... --test ... --dict ... -o ...",
                             input_size=size, verify=False)  # type: ignore[arg-type]
    split = opened.split
    h = split.h.to(device).eval()
    for p in h.parameters():
        p.requires_grad_(False)
    return _Tail(h, split.from_store), opened.warnings


# ---------------------------------------------------------------------------------------------------- checks


def _label(d: DictionaryLike, i: int, names: Sequence[str] | None) -> str:
    if names is not None:
        return names[i]
    return f"{d.method} k={d.n_concepts}"


def _class_map(d: DictionaryLike, store: StoreLike, label: str) -> list[int | None]:
    """For each store class, the class index y to give the dictionary (None where it takes no class)."""
    needs_y = _needs_class(d)
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
    _check_disjoint(train, test)
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
            from ..artifacts.dictionary import mismatch_message
            from ..artifacts.provenance import Provenance

            source = Provenance.read((d.meta.get("source") or {}).get("info"))
            if source.model is None and source.layer is None:  # a dictionary made outside a store
                raise C2MFError(f"dictionary {lab!r} has {d.n_features} channels but the store's layer "
                                f"{test.layer!r} has {width}: use a dictionary fitted on this model and layer"
                                ) from None
            raise C2MFError(mismatch_message(d, lab, test_info, width)) from None


def _check_disjoint(train: StoreLike, test: StoreLike) -> None:
    """Refuse train and test stores that share images: every held-out number would be inflated."""
    seen = {p for y in range(len(train.classes)) for p in train.paths(y)}
    shared = sorted({p for y in range(len(test.classes)) for p in test.paths(y) if p in seen})
    if shared:
        n_test = sum(len(set(test.paths(y))) for y in range(len(test.classes)))
        raise C2MFError(
            f"the train and test stores share {len(shared)} of the test store's {n_test} images (e.g. "
            f"{', '.join(shared[:3])}): extract them with --split train and --split test (same --seed and "
            "--test-fraction), not --split all for the training store"
        )


def _store_width(store: StoreLike) -> int:
    for y in range(len(store.classes)):
        if store.n_images(y) > 0:
            read = store.activations
            return int((read(y, rows=slice(0, 1)) if _takes_rows(read) else read(y)).shape[-1])
    raise C2MFError("the store has no images")


@dataclass(frozen=True)
class Piece:
    """Images [start, stop) of store class y (positions within the class, after `--max-images-per-class`)."""

    y: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def deal(counts: Sequence[int], world: int) -> list[list[Piece]]:
    """Each process's (rank's) pieces of classes: the images of every class, in class order, cut into `world`
    contiguous ranges of near-equal size (rank r takes images [r N // world, (r + 1) N // world) of the N in
    all), each range cut again where a class ends. Deterministic, so every process deals alike without talking.

    Every image is in exactly one piece and loads differ by at most one image, whatever the classes' sizes. A
    class is cut only where a rank's range ends, so a rank holds at most two partial classes and its pieces are
    as large as the balance allows (a rank's pieces are then merged into blocks, `blocks`). On one process every
    non-empty class is one whole piece, as before the division.
    """
    if world < 1:
        raise C2MFError(f"cannot deal images to {world} processes")
    at = [0]
    for n in counts:
        at.append(at[-1] + int(n))
    out: list[list[Piece]] = []
    y = 0
    for r in range(world):
        lo, hi = r * at[-1] // world, (r + 1) * at[-1] // world
        mine = []
        while y < len(counts) and at[y] < hi:  # the classes that start before this range ends
            start, stop = max(lo, at[y]) - at[y], min(hi, at[y + 1]) - at[y]
            if stop > start:
                mine.append(Piece(y, start, stop))
            if at[y + 1] > hi:  # the class goes on into the next rank's range
                break
            y += 1
        out.append(mine)
    return out


def _mask(pieces: Sequence[Piece], offsets: np.ndarray) -> np.ndarray:
    """Which images of the concatenation (classes at `offsets`, one more entry than classes) `pieces` hold."""
    mine = np.zeros(int(offsets[-1]), dtype=bool)
    for p in pieces:
        mine[offsets[p.y] + p.start : offsets[p.y] + p.stop] = True
    return mine


def _whole(parts: Mapping[str, tuple[np.ndarray, np.ndarray]], dev: torch.device) -> dict[str, np.ndarray]:
    """1-D arrays each process filled at its own entries (`mine`, a mask), made whole on every process: the
    others' entries are zeroed and the arrays all-reduced (summed) as one float64 vector; integer arrays come
    back as integers (exact below 2**53)."""
    if distributed.world_size() == 1:
        return {k: a for k, (a, _) in parts.items()}
    flat = torch.from_numpy(np.concatenate([np.where(mine, a, 0).astype(np.float64) for a, mine in parts.values()]))
    flat = flat.to(dev)
    _check_same_length(flat.numel(), dev)
    distributed.all_reduce_sum(flat)
    out, at, back = {}, 0, flat.cpu().numpy()
    for k, (a, _) in parts.items():
        out[k] = back[at : at + a.size].astype(a.dtype)
        at += a.size
    return out


def _merge_states(states: Sequence[State], dev: torch.device) -> list[State]:
    """Every process's metric states merged (the sums summed, the maxima maximised) on every process.

    The states come in the same order with the same keys and shapes on every process (the metric contract),
    so each kind travels as one float64 vector."""
    if distributed.world_size() == 1:
        return list(states)
    merged = [State({}, {}) for _ in states]
    for kind, reduce in (("sums", distributed.all_reduce_sum), ("maxima", distributed.all_reduce_max)):
        entries = [(i, key, t) for i, st in enumerate(states) for key, t in sorted(getattr(st, kind).items())]
        if not entries:
            continue
        flat = torch.cat([t.reshape(-1).double().cpu() for _, _, t in entries]).to(dev)
        _check_same_length(flat.numel(), dev)
        reduce(flat)
        back, at = flat.cpu(), 0
        for i, key, t in entries:
            getattr(merged[i], kind)[key] = back[at : at + t.numel()].reshape(t.shape).to(t.dtype)
            at += t.numel()
    return merged


def _check_same_length(n: int, dev: torch.device) -> None:
    """Refuse to all-reduce vectors of different lengths (a metric whose state depends on the images seen)."""
    t = torch.tensor([n, -n], dtype=torch.float64, device=dev)
    distributed.all_reduce_max(t)
    if int(t[0]) != n or -int(t[1]) != n:
        raise C2MFError(f"rank {distributed.rank()}: the processes' evaluation states differ in size ({n} here, "
                        f"{-int(t[1])} to {int(t[0])} in all): every metric's state must depend only on its "
                        "dictionary and the classes (metrics/_common.py, Metric)")


def _takes_rows(read: Callable[..., Any]) -> bool:
    """Whether a store's reader (`activations`, `logits`) takes `rows`, reading only those images."""
    return "rows" in inspect.signature(read).parameters


def _rows(read: Callable[..., Any], y: int, rows: slice) -> np.ndarray:
    """Images `rows` of class y from a store's reader: passed on where it takes them, else sliced from what it
    returns (a lazy array, e.g. zarr's, then reads only the slice)."""
    return read(y, rows=rows) if _takes_rows(read) else read(y)[rows]


def _take(store: StoreLike, piece: Piece) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The activations, logits and labels of one piece of a class."""
    rows = slice(piece.start, piece.stop)
    A = np.asarray(_rows(store.activations, piece.y, rows), dtype=np.float32)
    logits = np.asarray(_rows(store.logits, piece.y, rows), dtype=np.float32)
    return A, logits, np.asarray(store.labels(piece.y)[rows]).astype(np.int64)


# images a block of pieces holds at least (its last piece may take it past): the metrics cut their head calls
# at `--batch-size` rows whatever a block holds (IG's 1 + steps rows per image: 31 images a call at 32 steps and
# 1,024 rows), so a block bounds the activations, codes and reconstructions held at once, not a call's memory;
# 64 images fill IG's and insertion/deletion's calls at the default settings while holding a few tens of MB of
# activations at a 7 x 7 x 2,048 layer (a piece larger than that, a whole class on one process, is never cut).
# By device type: on a GPU, fewer and larger calls save kernel launches and syncs (144 / 48 calls of h -> 10 / 6 on
# benchmarks/evaluate.py's CUB case; its time on a GPU is not measured yet); on a CPU larger calls were slower per
# row (evaluate 10-25 % slower with blocks of 64 on that case, the bare tail 0.68 s in 1,024-row calls against
# 0.47 s in 128-row ones), so there each piece is its own block, which takes the time of the code before blocks
BLOCK_IMAGES: dict[str, int] = {"cpu": 1}
BLOCK_IMAGES_DEFAULT = 64


def block_images(dev: torch.device) -> int:
    """Images a block holds at least on `dev` (BLOCK_IMAGES by device type, else BLOCK_IMAGES_DEFAULT)."""
    return BLOCK_IMAGES.get(dev.type, BLOCK_IMAGES_DEFAULT)


def blocks(pieces: Sequence[Piece], at_least: int = BLOCK_IMAGES_DEFAULT) -> list[list[Piece]]:
    """Consecutive pieces merged into blocks of at least `at_least` images (the last block may hold fewer); a
    piece is never cut. Evaluate feeds the metrics one batch per block, so its head calls span classes."""
    out: list[list[Piece]] = []
    size = at_least
    for p in pieces:
        if size >= at_least:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.size
    return out


@dataclass
class _Block:
    """The images of a block of pieces, in piece order: activations, logits, labels, and each image's store
    class (`group`) and position among all the (capped) images of the store (`ids`, given class offsets)."""

    A: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    group: np.ndarray
    ids: np.ndarray

    @property
    def size(self) -> int:
        return int(self.group.shape[0])


def _take_block(store: StoreLike, block: Sequence[Piece], offsets: np.ndarray) -> _Block:
    parts = [_take(store, p) for p in block]
    cat = (lambda xs: xs[0]) if len(parts) == 1 else np.concatenate
    return _Block(cat([a for a, _, _ in parts]), cat([lo for _, lo, _ in parts]), cat([lb for _, _, lb in parts]),
                  np.concatenate([np.full(p.size, p.y, dtype=np.int64) for p in block]),
                  np.concatenate([np.arange(offsets[p.y] + p.start, offsets[p.y] + p.stop) for p in block]))


# ---------------------------------------------------------------------------------------------------- per block


@dataclass
class _Split:
    """A block's images split into what is explained (patch positions) and what is fed to h as is (prefix)."""

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


def _make_head(tail: _Tail, d: DictionaryLike, index: Sequence[int | None],
               sp: _Split) -> tuple[Callable[..., torch.Tensor], torch.Tensor | None]:
    """The head of a batch whose image i is decoded with dictionary class index `index[i]`, and its side input.

    Every call sorts its rows by index (the codes: k numbers a position), decodes each index's rows in one
    pass, calls h once on all of them and puts the logits back in the rows' order, so the decoded rows (c numbers a
    position) are never permuted, nor is their gradient. Where every image has one index and there is no prefix,
    the head takes the codes alone (`head(U)`, side None, and head(0) is one row for all images); otherwise the
    side input is each image's position in the batch (`head(U, image)`, `metrics._common.Head`), which picks its
    index and its stored prefix tokens.
    """
    c = sp.rows.shape[-1]
    grid_shape = sp.shape if sp.prefix is None else (sp.shape[0] - sp.prefix.shape[1], c)
    plan = _groups(list(index))
    prefix = sp.prefix

    def decoded(U: torch.Tensor, yd: int | None) -> torch.Tensor:
        m, P, k = U.shape
        return _decode(d, U.reshape(m * P, k), yd).reshape(m, P, c)

    def h(rows: torch.Tensor, pre: torch.Tensor | None) -> torch.Tensor:
        return tail(rows.reshape(rows.shape[0], *grid_shape) if pre is None else torch.cat([pre, rows], dim=1))

    if len(plan) == 1:
        yd = plan[0][0]
        if prefix is None:
            return (lambda U: h(decoded(U, yd), None)), None
        return (lambda U, image: h(decoded(U, yd), prefix[image])), torch.arange(len(index), device=sp.rows.device)
    device = sp.rows.device
    which = torch.empty(len(index), dtype=torch.long, device=device)
    for g, (_, members) in enumerate(plan):
        which[torch.as_tensor(members, device=device)] = g

    def head(U: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        w = which[image]
        perm = torch.argsort(w, stable=True)
        sizes = torch.bincount(w, minlength=len(plan)).tolist()
        parts = [decoded(u, plan[g][0]) for g, u in enumerate(torch.split(U.index_select(0, perm), sizes))
                 if u.shape[0]]
        logits = h(torch.cat(parts) if len(parts) > 1 else parts[0],
                   None if prefix is None else prefix[image.index_select(0, perm)])
        return logits.index_select(0, torch.argsort(perm))

    return head, torch.arange(len(index), device=device)


def _encode(d: DictionaryLike, rows: torch.Tensor, y: int | None, codes: str = "fit") -> torch.Tensor:
    n, P, c = rows.shape
    U = encode(d, rows.reshape(n * P, c), y, codes=codes)  # type: ignore[arg-type]
    return torch.as_tensor(U).reshape(n, P, -1).float()


def _decode(d: DictionaryLike, U: torch.Tensor, y: int | None) -> torch.Tensor:
    return torch.as_tensor(decode(d, U, y))  # type: ignore[arg-type]


def _needs_class(d: DictionaryLike) -> bool:
    """Whether encoding needs a class index: the method of the dictionary decides (c2mf_cli.methods)."""
    return needs_class(d)  # type: ignore[arg-type]


def _class_free(d: DictionaryLike) -> tuple[DictionaryLike | None, str]:
    """The dictionary `--encode-class none` uses (all concepts ungated, one shared basis), or None and why not."""
    free = class_free(d)  # type: ignore[arg-type]
    if free is None:
        return None, ("a per-class dictionary has no class-free basis: fit a shared one (e.g. --shared) to "
                      "encode without a class")
    return free, ""


def _rows_to_head(tail: _Tail, sp: _Split, rows_hat: torch.Tensor, batch_size: int,
                  images: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of h on reconstructed rows (m, P, c) placed back in the store layout (prefix tokens as stored), in
    calls of at most `batch_size` images. `images`: the image of `sp` each row stands for (its prefix tokens;
    default: row i is image i). Each call places only its own rows, so an expanded `rows_hat` stays a view."""
    n = rows_hat.shape[0]
    if not n:
        return rows_hat.new_zeros((0, 0))
    out = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            part = rows_hat[s : s + batch_size]
            if sp.prefix is None:
                out.append(tail(part.reshape(part.shape[0], *sp.shape)))
            else:
                pre = sp.prefix[s : s + batch_size] if images is None else sp.prefix[images[s : s + batch_size]]
                out.append(tail(torch.cat([pre, part], dim=1)))
    return torch.cat(out)


def _subset(sp: _Split, members: Sequence[int]) -> _Split:
    if list(members) == list(range(sp.rows.shape[0])):  # every image in order (the common case): no copy
        return sp
    idx = torch.as_tensor(members, device=sp.rows.device)
    return _Split(sp.rows[idx], None if sp.prefix is None else sp.prefix[idx], sp.shape)


def _groups(index: list[int | None]) -> list[tuple[int | None, list[int]]]:
    """Images grouped by the dictionary class index that encodes them, in first-seen order."""
    out: dict[int | None, list[int]] = {}
    for i, v in enumerate(index):
        out.setdefault(v, []).append(i)
    return list(out.items())


def _predicted_class(logits: torch.Tensor, class_outputs: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """The store class each image is predicted as: the most probable of the outputs that are the store's classes.

    A model with more outputs than the store has classes may predict an output that is no class of the store; its
    most probable store class is then used, as explain does for the gates.
    """
    scores = logits[:, class_outputs].masked_fill(~known[None, :], float("-inf"))
    return scores.argmax(1)


@dataclass
class _Row:
    """One dictionary evaluated: the encodings it is computed under and one set of metrics for each."""

    name: str
    d: DictionaryLike
    class_map: list[int | None]
    needs_class: bool
    attribute: bool
    variants: dict[str, DictionaryLike]
    skipped: dict[str, str]
    metrics: dict[str, list[Any]]
    predictions: dict[str, np.ndarray]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    states: dict[str, list[State]] = dataclasses.field(default_factory=dict)  # merged over processes, per metric

    def computed(self) -> list[str]:
        return list(self.variants)


def _make_row(name: str, d: DictionaryLike, class_map: list[int | None], cfg: EvaluateConfig, n_test: int,
              attribute: bool, extra: dict[str, Any] | None = None) -> _Row:
    needs = _needs_class(d)
    variants: dict[str, DictionaryLike] = {}
    skipped: dict[str, str] = {}
    # a dictionary that takes no class gives the same numbers under every encoding: computed once
    for enc in (cfg.encode_class if needs else (cfg.headline,)):
        if enc == "none":
            v, why = _class_free(d)
            if v is None:
                skipped[enc] = why
                continue
            variants[enc] = v
        else:
            variants[enc] = d
    W = d.tensors["W"]
    metrics = {enc: [m(W, d.meta, cfg) for m in EVALUATE_METRICS] for enc in variants}
    preds = {enc: np.full(n_test, -1, dtype=np.int64) for enc in variants}
    return _Row(name, d, class_map, needs, attribute, variants, skipped, metrics, preds, dict(extra or {}))


def _index_for(row: _Row, enc: str, group: torch.Tensor, pred_class: torch.Tensor) -> list[int | None]:
    """The dictionary class index that encodes each image under `enc` (group: each image's store class)."""
    n = pred_class.shape[0]
    if not row.needs_class or enc == "none":
        return [None] * n
    return [row.class_map[int(c)] for c in (group if enc == "true" else pred_class).tolist()]


def _feed(row: _Row, encodings: Sequence[str], split: str, sp: _Split, group: torch.Tensor, tail: _Tail,
          model_logits: torch.Tensor, labels: torch.Tensor, pred_class: torch.Tensor, ids: np.ndarray | None,
          cfg: EvaluateConfig, attribute: str | None) -> None:
    """Feed one block's images (of any classes: `group` gives each one's store class) to `row`'s metrics, one
    batch per encoding of `encodings`.

    Codes are solved per dictionary class index (the gates or per-class dictionaries differ), and depend only on
    the dictionary (variant) and that index, so an image coded alike under two encodings (its predicted class is
    its true one) is encoded and decoded once; the reconstructions of every image coded go through h in one pass
    (cut at `--batch-size` rows). Each encoding's batch takes its images' codes, reconstruction and logits back in
    image order, with a head that decodes each image with its own index (`_make_head`). `attribute`: the
    encoding whose batch gets the importance metrics.
    """
    n = sp.rows.shape[0]
    index = {enc: _index_for(row, enc, group, pred_class) for enc in encodings}
    wanted: dict[tuple[str, int | None], set[int]] = {}
    owner: dict[str, str] = {}  # encoding -> the first encoding with the same dictionary variant
    for enc in encodings:
        owner[enc] = next(e for e in encodings if row.variants[e] is row.variants[enc])
        for i, yd in enumerate(index[enc]):
            wanted.setdefault((owner[enc], yd), set()).add(i)
    coded: dict[tuple[str, int | None], tuple[list[int], torch.Tensor, torch.Tensor]] = {}
    for (enc, yd), members in wanted.items():
        d = row.variants[enc]
        order = sorted(members)
        U = _encode(d, _subset(sp, order).rows, yd, cfg.codes)
        with torch.no_grad():
            A_hat = _decode(d, U.reshape(-1, U.shape[-1]), yd).reshape(*U.shape[:2], -1)
        coded[enc, yd] = (order, U, A_hat)
    recon: dict[tuple[str, int | None], torch.Tensor] = {}
    if split == "test":  # every reconstruction coded, one pass of h
        keys = list(coded)
        every = [i for key in keys for i in coded[key][0]]
        logits = _rows_to_head(tail, sp, torch.cat([coded[key][2] for key in keys]), cfg.batch_size,
                               torch.as_tensor(every, device=sp.rows.device))
        recon = dict(zip(keys, torch.split(logits, [len(coded[key][0]) for key in keys])))
    for enc in encodings:
        plan = _groups(index[enc])
        if len(plan) == 1:  # one index for every image: coded in image order
            key = (owner[enc], plan[0][0])
            U, A_hat, rec = coded[key][1], coded[key][2], recon.get(key)
        else:
            first = coded[owner[enc], plan[0][0]]
            U = first[1].new_empty((n, *first[1].shape[1:]))
            A_hat = first[2].new_empty((n, *first[2].shape[1:]))
            some = next(iter(recon.values()), None)
            rec = None if some is None else some.new_empty((n, some.shape[1]))
            for yd, members in plan:  # each index's images, taken from what was coded with it, in their places
                order, Uc, Ac = coded[owner[enc], yd]
                pos = {i: p for p, i in enumerate(order)}
                to = torch.as_tensor(members, device=U.device)
                take = torch.as_tensor([pos[i] for i in members], device=U.device)
                U[to], A_hat[to] = Uc[take], Ac[take]
                if rec is not None:
                    rec[to] = recon[owner[enc], yd][take]
        if rec is not None and ids is not None:
            row.predictions[enc][ids] = rec.argmax(1).cpu().numpy()
        head, side = _make_head(tail, row.variants[enc], index[enc], sp)
        batch = Batch(split=split, group=group, rows=sp.rows, U=U, A_hat=A_hat.reshape(-1, A_hat.shape[-1]),
                      head=head, side=side, model_logits=model_logits, labels=labels, recon_logits=rec,
                      attribute=enc == attribute)
        for metric in row.metrics[enc]:
            metric.update(batch)


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
    model: str | None = None,
    checkpoint: str | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Every metric of docs/metrics.md for each dictionary, side by side, with references; returns a dict.

    names: one row label per dictionary (default "<method> k=<k>"). tail: h in the store layout (activations
    (m, *positions, c) -> logits), built from the store's model spec when not given (tests pass their own).
    model, checkpoint: override the model / weights the stores record. The recorded weights' sha256 is checked
    (other weights given with `checkpoint` are a warning in the result's notes), and a model recorded as code
    (path/file.py:factory) is run only when `model` names it: a store may come from someone else.
    out_dir: when given, also writes evaluation.json and the PNG plots there (`write_results`).

    Codes are solved under each encoding of `config.encode_class` (the class that picks gates, per-class
    dictionaries and means: the true one, the model's predicted one, or none); the full set of metrics is
    computed under the headline encoding (`config.headline`, the predicted class by default), the reconstruction
    under every one. References read every method against what no concept at all gives: the model itself, the
    train mean of the true / predicted class alone (k = 0), the global train mean, and chance.
    """
    if not dictionaries:
        raise C2MFError("no dictionary to evaluate: give at least one --dict")
    if names is not None and len(names) != len(dictionaries):
        raise C2MFError(f"{len(names)} names for {len(dictionaries)} dictionaries")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    labels = unique_names([_label(d, i, names) for i, d in enumerate(dictionaries)])
    _check_inputs(train_store, test_store, crops_store, dictionaries, labels)
    class_maps = [_class_map(d, test_store, lab) for d, lab in zip(dictionaries, labels)]
    dicts = [d.to(dev) for d in dictionaries]
    model_warnings: list[str] = []
    built_tail = tail is None  # a tail the caller passes is theirs to vouch for
    if tail is None:
        tail, model_warnings = _tail_from_store(test_store, dev, model, checkpoint)
    prefix = int(getattr(test_store, "num_prefix_tokens", 0) or 0)
    classes = list(test_store.classes)
    cap = config.max_images_per_class
    headline = config.headline

    counts = [min(test_store.n_images(y), cap) if cap is not None else test_store.n_images(y)
              for y in range(len(classes))]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_test = int(offsets[-1])
    if n_test == 0:
        raise C2MFError("the test store has no images")

    rows = [_make_row(lab, d, cmap, config, n_test, attribute=config.attribution, extra={"capacity": _capacity(d)})
            for lab, d, cmap in zip(labels, dicts, class_maps)]
    # clustering ablation: per-class non-negative (CRAFT-style) dictionaries are the sources, K from the shared ones;
    # each clustered dictionary is a shared one of K concepts, so it joins the same-capacity comparison
    sources = [i for i, d in enumerate(dicts) if d.per_class and bool((d.tensors["W"] >= 0).all())]
    ks = config.cluster_ks
    if ks is None:
        ks = tuple(sorted({d.n_concepts for d in dicts if not d.per_class}))
    for i in sources:
        pooled = dicts[i].tensors["W"].shape[0] * dicts[i].n_concepts
        for K in ks:
            if K <= pooled:
                cd = _clustered_dictionary(dicts[i], K, config.seed)
                distributed.broadcast({"W": cd.tensors["W"]})  # one dictionary on every process, whatever k-means did
                rows.append(_make_row(f"{labels[i]} clustered K={K}", cd, class_maps[i], config, n_test,
                                      attribute=False, extra={"capacity": "shared", "clustered_from": labels[i]}))

    class_outputs, known = _class_outputs(test_store, train_store, dev)
    run_by = distributed.describe(dev)  # also the first collective: every process has joined before the data
    rank, world = distributed.rank(), distributed.world_size()

    # train: class means (the k = 0 references) and the train side of fit/consistency, under the headline encoding
    width = _store_width(test_store)
    sums = torch.zeros(len(classes), width, dtype=torch.float64, device=dev)
    n_rows = torch.zeros(len(classes), dtype=torch.float64, device=dev)
    train_counts = [min(train_store.n_images(y), cap) if cap is not None else train_store.n_images(y)
                    for y in range(len(classes))]
    pieces = deal(train_counts, world)[rank]
    train_offsets = np.concatenate([[0], np.cumsum(train_counts)]).astype(np.int64)
    advance = progress("reconstructing train images", sum(p.size for p in pieces))
    for block in blocks(pieces, block_images(dev)):
        b = _take_block(train_store, block, train_offsets)
        sp = _split_positions(torch.from_numpy(b.A).to(dev), prefix)
        group_t = torch.from_numpy(b.group).to(dev)
        flat = sp.rows.reshape(-1, sp.rows.shape[-1]).double()
        sums.index_add_(0, group_t.repeat_interleave(sp.rows.shape[1]), flat)
        n_rows += torch.bincount(group_t, minlength=len(classes)).double() * sp.rows.shape[1]
        ml, lb = torch.from_numpy(b.logits).to(dev), torch.from_numpy(b.labels).to(dev)
        pc = _predicted_class(ml, class_outputs, known)
        for row in rows:
            if headline in row.variants:
                _feed(row, [headline], "train", sp, group_t, tail, ml, lb, pc, None, config, attribute=None)
        advance(b.size)
    distributed.all_reduce_sum(sums, n_rows)  # the test pass needs every class's mean
    means = (sums / n_rows.clamp_min(1)[:, None]).float()
    global_mean = (sums.sum(0) / n_rows.sum().clamp_min(1)).float()
    has_mean = (n_rows > 0).cpu()

    model_pred = np.zeros(n_test, dtype=np.int64)
    true_label = np.zeros(n_test, dtype=np.int64)
    group = np.zeros(n_test, dtype=np.int64)
    ref_pred = {k: np.zeros(n_test, dtype=np.int64) for k in _REFERENCES}
    h_diff, h_agree = 0.0, 0
    pieces = deal(counts, world)[rank]
    advance = progress("evaluating test images", sum(p.size for p in pieces))
    for block in blocks(pieces, block_images(dev)):
        b = _take_block(test_store, block, offsets)
        ids = b.ids
        A_t = torch.from_numpy(b.A).to(dev)
        sp = _split_positions(A_t, prefix)
        group_t = torch.from_numpy(b.group).to(dev)
        ml, lb = torch.from_numpy(b.logits).to(dev), torch.from_numpy(b.labels).to(dev)
        with torch.no_grad():
            own = torch.cat([tail(A_t[s : s + config.batch_size]) for s in range(0, A_t.shape[0], config.batch_size)])
        h_diff = max(h_diff, float((own - ml).abs().max()))
        h_agree += int((own.argmax(1) == ml.argmax(1)).sum())
        model_pred[ids], true_label[ids], group[ids] = ml.argmax(1).cpu().numpy(), b.labels, b.group
        pc = _predicted_class(ml, class_outputs, known)
        n, P = sp.rows.shape[:2]
        # the three mean references of every image, one pass of h
        hat = torch.cat([means[group_t], means[pc], global_mean[None, :].expand(n, -1)])[:, None, :].expand(-1, P, -1)
        refs = _rows_to_head(tail, sp, hat, config.batch_size, torch.arange(n, device=dev).repeat(3))
        refs = refs.argmax(1).cpu().numpy()
        for j, key in enumerate(_REFERENCES):
            ref_pred[key][ids] = refs[j * n : (j + 1) * n]
        for row in rows:
            _feed(row, row.computed(), "test", sp, group_t, tail, ml, lb, pc, ids, config,
                  attribute=headline if row.attribute else None)
        advance(b.size)

    # every process's images and states, made whole on every process
    mine = _mask(pieces, offsets)
    per_image = {"model": model_pred, "label": true_label, "group": group, **{f"ref.{k}": v for k, v in ref_pred.items()},
                 **{f"{i}.{enc}": p for i, row in enumerate(rows) for enc, p in row.predictions.items()}}
    per_image = _whole({k: (v, mine) for k, v in per_image.items()}, dev)
    model_pred, true_label, group = per_image["model"], per_image["label"], per_image["group"]
    ref_pred = {k: per_image[f"ref.{k}"] for k in ref_pred}
    for i, row in enumerate(rows):
        row.predictions = {enc: per_image[f"{i}.{enc}"] for enc in row.predictions}
    largest, agreed = (torch.tensor([v], dtype=torch.float64, device=dev) for v in (h_diff, h_agree))
    distributed.all_reduce_max(largest)
    distributed.all_reduce_sum(agreed)
    h_diff, h_agree = float(largest), int(agreed)
    if built_tail:
        model_warnings += _check_tail(h_agree / n_test, h_diff, test_store.layer)
    merged = iter(_merge_states([m.state(len(classes)) for row in rows for enc in row.computed()
                                 for m in row.metrics[enc]], dev))
    for row in rows:
        row.states = {enc: [next(merged) for _ in row.metrics[enc]] for enc in row.computed()}

    references = _references(ref_pred, model_pred, true_label, group, classes, bool(has_mean.all()))
    methods = [_row_result(row, classes, config, model_pred, true_label, group, references) for row in rows]
    significance = _significance(rows, headline, model_pred, true_label, ref_pred)
    clustering = _clustering_summary(methods)
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
        "settings": dict(config.to_dict(), device=str(dev), headline_encoding=headline, distributed=run_by),
        "h_check": {"max_abs_logit_diff": h_diff, "prediction_agreement": h_agree / n_test, "n_images": n_test},
        "n_test_images": n_test,
        "chance": 1.0 / len(classes),
        "references": references,
        "methods": methods,
        "significance": significance,
        "notes": model_warnings + [n for m in methods for n in m["notes"]],
        "clustering": clustering,
        "per_image": {
            "store_class": group.tolist(),
            "label": true_label.tolist(),
            "model_prediction": model_pred.tolist(),
            "references": {k: v.tolist() for k, v in ref_pred.items()},
            "methods": {r.name: {enc: p.tolist() for enc, p in r.predictions.items()} for r in rows},
        },
        "ood": _ood(test_store, crops_store, config, progress, dev) if crops_store is not None else None,
    }
    result["time_s"] = time.perf_counter() - t0
    if out_dir is not None and distributed.is_writer():
        files = write_results(result, out_dir)
        result["files"] = {k: os.path.basename(v) for k, v in files.items() if k != "json"}  # as in evaluation.json
    return result


_REFERENCES = ("class_mean_true", "class_mean_predicted", "global_mean")
REFERENCE_LABELS = {
    "model": "the model itself (original activations)",
    "class_mean_true": "true class's train mean only (k = 0)",
    "class_mean_predicted": "predicted class's train mean only (k = 0)",
    "global_mean": "global train mean only",
    "chance": "chance (1 / classes)",
}
# the reference a method is read against under each encoding, and the measure compared
_BAR = {"true": ("class_mean_true", "accuracy"), "predicted": ("class_mean_predicted", "agreement"),
        "none": ("global_mean", "agreement")}


# h(stored activations) must give the stored prediction: float16 stores and bf16 extraction move a few borderline
# images, a wrong model, checkpoint or split moves most of them
H_MIN_AGREEMENT = 0.9


def _check_tail(agreement: float, largest: float, layer: str) -> list[str]:
    """The model's tail, rebuilt from the store's model, against the logits stored at extraction: an error when it
    does not reproduce the model's decision, a note when it moves a few images."""
    if agreement < H_MIN_AGREEMENT:
        raise C2MFError(
            f"the model's tail after layer {layer!r} gives the stored prediction on only {agreement:.1%} of the test "
            f"images (largest logit difference {largest:.3g}): the model or weights used here are not the ones the "
            "store was extracted with; give the store's own --model / --checkpoint, or re-extract the stores")
    if agreement < 1.0:
        return [f"the model's tail reproduces the stored prediction on {agreement:.1%} of the test images (largest "
                f"logit difference {largest:.3g}; float16 stores and bf16 extraction move borderline images)"]
    return []


def _capacity(d: DictionaryLike) -> str:
    return "per-class" if d.per_class else "shared"


def _class_outputs(test: StoreLike, train: StoreLike, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model output of each store class (from its stored labels) and whether it is known."""
    outs, known = [], []
    for y in range(len(test.classes)):
        src = test if test.n_images(y) else train
        lab = np.asarray(src.labels(y)) if src.n_images(y) else np.zeros(0, dtype=np.int64)
        outs.append(int(lab[0]) if lab.size else 0)
        known.append(bool(lab.size))
    return torch.tensor(outs, device=dev), torch.tensor(known, device=dev)


def _references(ref_pred: dict[str, np.ndarray], model_pred: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                classes: Sequence[str], have_means: bool) -> dict[str, Any]:
    def named(rec: dict) -> dict:
        for key in ("accuracy", "agreement"):
            rec[key]["per_class"] = {classes[int(g)]: v for g, v in rec[key]["per_class"].items()}
        return rec

    out: dict[str, Any] = {
        "model": named(per_class_accuracy_from_predictions(model_pred, labels, model_pred, groups)),
        "chance": {"accuracy": {"mean": 1.0 / len(classes)}},
    }
    for key in _REFERENCES:
        if key.startswith("class_mean") and not have_means:
            out[key] = {"skipped": "a class has no train images, so its train mean is unknown"}
            continue
        out[key] = named(per_class_accuracy_from_predictions(ref_pred[key], labels, model_pred, groups))
    for key, rec in out.items():
        rec["label"] = REFERENCE_LABELS[key]
    return out


def _row_result(row: _Row, classes: Sequence[str], cfg: EvaluateConfig, model_pred: np.ndarray,
                labels: np.ndarray, groups: np.ndarray, references: dict[str, Any]) -> dict[str, Any]:
    d = row.d
    out: dict[str, Any] = {
        "name": row.name,
        "method": d.method,
        "k": d.n_concepts,
        "per_class_dictionary": bool(d.per_class),
        "capacity": row.extra["capacity"],
        "directions": d.n_concepts * (d.tensors["W"].shape[0] if d.per_class else 1),
        "gated": "gates" in d.tensors,
        "needs_class": row.needs_class,
        "encode_class": cfg.headline,
    }
    out.update({k: v for k, v in row.extra.items() if k != "capacity"})
    per_enc: dict[str, dict[str, Any]] = {}
    for enc in row.computed():
        res: dict[str, Any] = {}
        for metric, state in zip(row.metrics[enc], row.states[enc]):
            res.update(metric.result(classes, state))
        per_enc[enc] = res
    out.update(per_enc[cfg.headline] if cfg.headline in per_enc else {})
    by_encoding: dict[str, Any] = {}
    for enc in cfg.encode_class:
        if enc in row.skipped:
            by_encoding[enc] = {"skipped": row.skipped[enc]}
            continue
        src = enc if enc in per_enc else cfg.headline  # a dictionary that takes no class: one result for all
        by_encoding[enc] = {"reconstruction": per_enc[src].get("reconstruction"),
                            "fit": {"test": per_enc[src]["fit"]["test"]},
                            "class_free": not row.needs_class}
    out["by_encoding"] = by_encoding

    notes, warnings = [], []
    agreement = (out.get("reconstruction") or {}).get("agreement", {}).get("mean")
    # None: not computed under the headline encoding (a per-class dictionary under `none`)
    out["preserves_decision"] = None if agreement is None else bool(agreement >= cfg.min_agreement)
    if out["preserves_decision"] is False:
        warnings.append(
            f"its reconstruction keeps the model's decision on {agreement:.1%} of test images per class (below "
            f"{cfg.min_agreement:.0%}): its importance and insertion/deletion numbers describe another decision")
    beats: dict[str, bool] = {}
    for enc, entry in by_encoding.items():
        rec = entry.get("reconstruction")
        ref_key, measure = _BAR[enc]
        ref = references.get(ref_key, {})
        # a dictionary that takes no class has one set of numbers: read it against the headline's reference only
        if rec is None or measure not in ref or (not row.needs_class and enc != cfg.headline):
            continue
        mine, bar = rec[measure]["mean"], ref[measure]["mean"]
        beats[enc] = bool(mine > bar)
        if not beats[enc]:
            alone = "the global mean" if ref_key == "global_mean" else "the class's mean"
            notes.append(f"{row.name} does not beat the reference \"{REFERENCE_LABELS[ref_key]}\" under {enc}-class "
                         f"encoding ({measure} {mine:.3f} against {bar:.3f}): {alone} alone, with no concept, "
                         f"does as well")
    out["beats_reference"] = beats
    out["warnings"] = warnings
    out["notes"] = notes
    return out


def _significance(rows: Sequence[_Row], headline: str, model_pred: np.ndarray, labels: np.ndarray,
                  ref_pred: dict[str, np.ndarray]) -> dict[str, Any]:
    """Exact McNemar for every pair of methods (and each against the class-mean reference) on the same images."""
    bar = _BAR[headline][0]
    pairs = []
    for measure, target in (("accuracy", labels), ("agreement", model_pred)):
        correct = {r.name: r.predictions[headline] == target for r in rows if headline in r.variants}
        correct[REFERENCE_LABELS[bar]] = ref_pred[bar] == target
        pairs += [dict(p, measure=measure) for p in pairwise_mcnemar(correct)]
    return {"test": "exact McNemar (two-sided binomial on discordant images)", "encoding": headline,
            "alpha": ALPHA, "pairs": pairs}


def _clustering_summary(methods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in methods:
        if "clustered_from" not in m:
            continue
        shared = [s for s in methods if s["capacity"] == "shared" and "clustered_from" not in s and s["k"] == m["k"]]
        rec = m["reconstruction"]
        out.append({
            "source": m["clustered_from"],
            "K": m["k"],
            "clustered_accuracy": {k: rec["accuracy"][k] for k in ("mean", "std")},
            "clustered_agreement": {k: rec["agreement"][k] for k in ("mean", "std")},
            "shared": {s["name"]: {k: s["reconstruction"]["accuracy"][k] for k in ("mean", "std")} for s in shared},
        })
    return out


def _clustered_dictionary(d: DictionaryLike, K: int, seed: int) -> DictionaryLike:
    from ..artifacts.dictionary import ConceptDictionary

    W = d.tensors["W"].detach().cpu()
    cl = cluster_concepts(list(W), K, seed=seed)
    tensors = {"W": cl.W}
    if "shift" in d.tensors:
        tensors["shift"] = d.tensors["shift"].detach().cpu()
    # kept rows of non-negative dictionaries, coded by NNLS (after the sources' shift): an NMF dictionary
    meta = {"method": "nmf", "classes": d.classes, "clustered_from": {"method": d.method,
                                                                       "rows": [list(s) for s in cl.source]}}
    return ConceptDictionary(tensors, meta).to(d.tensors["W"].device)


def _ood(test: StoreLike, crops: StoreLike, cfg: EvaluateConfig, progress: ProgressFn,
         dev: torch.device) -> dict:
    """OOD scores of every test image against every crop (all of them: no --max-images-per-class cap); the test
    images and the crops, one list of classes after the other, are dealt in pieces (`deal`), each process reads
    the confidences of its own, then they are made whole."""
    n_cls = len(test.classes)
    n_in = [test.n_images(y) for y in range(n_cls)]
    n_out = [crops.n_images(y) if y < len(crops.classes) else 0 for y in range(n_cls)]
    at = np.concatenate([[0], np.cumsum(n_in + n_out)]).astype(np.int64)
    conf = np.zeros(int(at[-1]))
    own = deal(n_in + n_out, distributed.world_size())[distributed.rank()]
    advance = progress("crop confidences", sum(p.size for p in own))
    for p in own:
        store, y = (test, p.y) if p.y < n_cls else (crops, p.y - n_cls)
        conf[at[p.y] + p.start : at[p.y] + p.stop] = max_softmax(_rows(store.logits, y, slice(p.start, p.stop)))
        advance(p.size)
    conf = _whole({"conf": (conf, _mask(own, at))}, dev)["conf"]
    s_in, s_out = conf[: at[n_cls]], conf[at[n_cls] :]
    out = ood_scores(s_in, s_out)
    out["histograms"] = confidence_histograms(s_in, s_out, bins=cfg.histogram_bins)
    return out


def _store_identity(s: StoreLike) -> dict:
    cfg = s.info.get("config") if isinstance(s.info.get("config"), dict) else {}
    return {
        "path": str(getattr(s, "path", "")) or None,
        "fingerprint": s.fingerprint,
        "model": (cfg.get("model") or {}).get("name"),  # named at the top of the report
        "data": (cfg.get("data") or {}).get("root"),
        "mode": s.mode,
        "layer": s.layer,
        "classes": len(s.classes),
        "images": int(sum(s.n_images(y) for y in range(len(s.classes)))),
    }


def _dict_identity(d: DictionaryLike, label: str) -> dict:
    from ..artifacts.provenance import Provenance

    path = getattr(d, "path", None)  # a loaded dictionary knows its file
    return {
        "name": label,
        "path": str(path) if path else None,
        "method": d.method,
        "k": d.n_concepts,
        "source_fingerprint": Provenance.read((d.meta.get("source") or {}).get("info")).fingerprint,
    }


# ---------------------------------------------------------------------------------------------------- output


def write_results(result: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write evaluation.json and the PNG plots into out_dir (atomically); returns {what: path}."""
    from ..render import plots

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise C2MFError(f"the output folder {str(out)!r} is a file: give a folder path")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    methods = result["methods"]
    for ranking_name in RANKINGS:
        for quantity in ("prob", "accuracy"):
            curves = {m["name"]: m["insertion_deletion"][ranking_name] for m in methods
                      if ranking_name in m.get("insertion_deletion", {})}
            if curves:
                p = plots.insertion_deletion_curves(
                    curves, out / f"insertion_deletion_{ranking_name}_{quantity}.png", quantity=quantity,
                    title=f"concept insertion / deletion, ranked by {RANKING_LABELS[ranking_name]}",
                )
                files[f"insertion_deletion_{ranking_name}_{quantity}"] = str(p)
    series: dict[str, list[tuple[int, float, float]]] = {}
    for m in methods:
        if "clustered_from" in m:  # drawn from the clustering entries below
            continue
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
    write_json(path, payload)
    files["json"] = str(path)
    # a reused folder: drop plots of an earlier run that this one did not draw (e.g. no --crops this time), so the
    # folder (and `c2mf report`, which shows its PNGs) describes this run only
    written = {Path(p).name for p in files.values()}
    for name in PLOT_FILES:
        if name not in written:
            (out / name).unlink(missing_ok=True)
    return files
