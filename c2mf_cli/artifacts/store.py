"""The activation store: a versioned, fingerprinted Zarr v3 group of per-class activation tensors.

Layout (one directory):

    STORE/zarr.json                 root attributes: encoding-type/-version, fingerprint, config, plan, classes,
                                    complete (set by finalize), failures
    STORE/c0000/                    one group per class (attributes: name, label, n_images, paths, crop boxes)
        activations                 (n_rows, *positions, c)   float16 by default, chunked along rows
        logits                      (n_rows, n_outputs)       float32, the model's own logits for each row
        valid                       (n_rows,)                 bool, False for images that could not be read
    STORE/progress/<unit>.json      one marker per finished unit of work (written after its chunks, atomically)

A unit of work is one chunk of one class: `chunk_images` images (times the crops per image in crop mode).
The plan (classes, files, chunking) is deterministic, so several shard processes can each take their own units
and write disjoint chunks; a unit counts as done only once its marker exists, so a killed run resumes where it
stopped and never trusts a half-written chunk. `finalize` checks every marker and only then marks the store
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from .. import __version__
from ..errors import C2MFError
from ..inputs.models import ModelSpec, Preprocess

ENCODING_TYPE = "c2mf-activations"
ENCODING_VERSION = 1
PROGRESS_DIR = "progress"


def fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines a store's content."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def group_name(y: int) -> str:
    return f"c{y:04d}"


def unit_name(y: int, chunk: int) -> str:
    return f"{group_name(y)}-{chunk:05d}"


@dataclass(frozen=True)
class ClassPlan:
    name: str
    label: int
    paths: tuple[str, ...]
    crops_per_image: int  # 1 in full mode

    @property
    def n_images(self) -> int:
        return len(self.paths)

    @property
    def n_rows(self) -> int:
        return self.n_images * self.crops_per_image


@dataclass(frozen=True)
class Unit:
    y: int
    chunk: int
    start: int  # first image of the unit within the class
    stop: int

    @property
    def name(self) -> str:
        return unit_name(self.y, self.chunk)


def plan_units(classes: list[ClassPlan], chunk_images: int) -> list[Unit]:
    units = []
    for y, cp in enumerate(classes):
        for j, s in enumerate(range(0, cp.n_images, chunk_images)):
            units.append(Unit(y, j, s, min(s + chunk_images, cp.n_images)))
    return units


def _check_version(attrs: dict[str, Any], path: Path) -> None:
    kind = attrs.get("encoding-type")
    if kind != ENCODING_TYPE:
        what = f"a {kind!r} file" if kind else "not a c2mf activation store"
        raise C2MFError(f"{str(path)!r} is {what}: expected an activation store written by `c2mf extract`")
    version = attrs.get("encoding-version")
    if not isinstance(version, int) or version > ENCODING_VERSION:
        raise C2MFError(
            f"{str(path)!r} has store format version {version}, newer than this c2mf ({__version__}) reads "
            f"(version {ENCODING_VERSION}): upgrade c2mf (pip install -U c2mf)"
        )


def create_layout(
    path: Path,
    *,
    config: dict[str, Any],
    classes: list[ClassPlan],
    row_shape: tuple[int, ...],
    n_outputs: int,
    chunk_images: int,
    dtype: str,
) -> bool:
    """Lay out an empty store at `path` atomically (in a temporary directory, then renamed).

    Returns False if another process created the store first (the caller then opens and checks it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.creating")
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for y, cp in enumerate(classes):
            g = root.create_group(group_name(y))
            rows_per_chunk = chunk_images * cp.crops_per_image
            g.create_array(
                "activations",
                shape=(cp.n_rows, *row_shape),
                chunks=(max(1, rows_per_chunk), *row_shape),
                dtype=dtype,
                fill_value=0,
            )
            g.create_array(
                "logits", shape=(cp.n_rows, n_outputs), chunks=(max(1, rows_per_chunk), n_outputs), dtype="float32"
            )
            g.create_array("valid", shape=(cp.n_rows,), chunks=(max(1, rows_per_chunk),), dtype="bool")
            g.attrs.update(
                {"name": cp.name, "label": cp.label, "n_images": cp.n_images, "paths": list(cp.paths),
                 "crops_per_image": cp.crops_per_image}
            )
        root.attrs.update(
            {
                "encoding-type": ENCODING_TYPE,
                "encoding-version": ENCODING_VERSION,
                "c2mf_version": __version__,
                "fingerprint": fingerprint(config),
                "config": config,
                "plan": {"chunk_images": chunk_images, "n_units": len(plan_units(classes, chunk_images))},
                "row_shape": list(row_shape),
                "n_outputs": n_outputs,
                "classes": [{"name": c.name, "label": c.label, "n_images": c.n_images} for c in classes],
                "complete": False,
            }
        )
        (tmp / PROGRESS_DIR).mkdir()
        try:
            os.rename(tmp, path)
        except OSError:
            if path.exists():
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class StoreWriter:
    """Writes units into a laid-out store; several writers (shards) may share one store."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.root = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        self._groups: dict[int, Any] = {}

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    def _group(self, y: int):
        if y not in self._groups:
            self._groups[y] = self.root[group_name(y)]
        return self._groups[y]

    def done_units(self) -> set[str]:
        d = self.path / PROGRESS_DIR
        return {p.stem for p in d.glob("*.json")} if d.is_dir() else set()

    def write_unit(
        self,
        unit: Unit,
        crops_per_image: int,
        activations: np.ndarray,
        logits: np.ndarray,
        valid: np.ndarray,
        failures: list[dict[str, str]],
    ) -> None:
        """Write one unit's rows, then its marker. The marker is what makes the unit count as done."""
        g = self._group(unit.y)
        r0, r1 = unit.start * crops_per_image, unit.stop * crops_per_image
        if activations.shape[0] != r1 - r0:
            raise RuntimeError(f"unit {unit.name}: {activations.shape[0]} rows for {r1 - r0} planned")
        g["activations"][r0:r1] = activations
        g["logits"][r0:r1] = logits
        g["valid"][r0:r1] = valid
        marker = {"unit": unit.name, "rows": [r0, r1], "failures": failures, "time": time.time()}
        atomic_write_text(self.path / PROGRESS_DIR / f"{unit.name}.json", json.dumps(marker))

    def finalize(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check that every unit is done, gather the failures, and mark the store complete."""
        attrs = self.attrs
        n_units = int(attrs["plan"]["n_units"])
        markers = sorted((self.path / PROGRESS_DIR).glob("*.json"))
        if len(markers) < n_units:
            raise C2MFError(
                f"{str(self.path)!r} has {len(markers)} of {n_units} units done: run the missing shards "
                "(or rerun extract without --shard) before finalizing"
            )
        failures: list[dict[str, str]] = []
        for m in markers:
            failures.extend(json.loads(m.read_text()).get("failures", []))
        failures.sort(key=lambda f: f["path"])
        update = {"complete": True, "failures": failures, "finalized_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        update.update(extra or {})
        self.root.attrs.update(update)
        return update


class _StoreRows:
    """`RowSource` over a store: the positions of every valid row, flattened (ViT: patch tokens only)."""

    def __init__(self, store: "ActivationStore", include_prefix_tokens: bool = False,
                 part: tuple[int, int] = (0, 1)) -> None:
        self._store = store
        self._include_prefix_tokens = include_prefix_tokens
        self._part = part  # (index, count): read only the chunks of shard `index` of `count`
        self.classes = list(store.classes)
        self.mode = store.mode
        self.info = store.describe_source()
        self._skip = 0 if include_prefix_tokens else store.num_prefix_tokens
        self.n_features = int(store.row_shape[-1])
        self._per_row = int(np.prod(store.row_shape[:-1])) - self._skip if len(store.row_shape) > 1 else 1
        self._n_valid: dict[int, int] = {}

    def _flatten(self, a: np.ndarray) -> np.ndarray:
        if a.ndim == 2:
            return a
        if self._skip and a.ndim == 3:
            a = a[:, self._skip :]
        return a.reshape(-1, a.shape[-1])

    def shard(self, index: int, count: int) -> "_StoreRows":
        """The rows of shard `index` of `count`: whole chunks, dealt round-robin over the chunks of all classes
        in order, so that classes with fewer chunks than shards still spread over the processes."""
        if not 0 <= index < count:
            raise C2MFError(f"shard {index} of {count} does not exist")
        return _StoreRows(self._store, self._include_prefix_tokens, (index, count))

    def _starts(self, y: int) -> tuple[list[int], int]:
        """First rows of the chunks of class y this source reads, and the chunk length."""
        arr = self._store._group(y)["activations"]
        step = int(arr.chunks[0])
        starts = list(range(0, arr.shape[0], step))
        index, count = self._part
        if count == 1:
            return starts, step
        before = sum(-(-a.shape[0] // int(a.chunks[0])) for a in (self._store._group(z)["activations"] for z in range(y)))
        return [s for j, s in enumerate(starts) if (before + j) % count == index], step

    def n_rows(self, y: int) -> int:
        if y not in self._n_valid:
            valid = self._store._valid(y)
            if self._part[1] == 1:
                n = int(valid.sum())
            else:
                starts, step = self._starts(y)
                n = sum(int(valid[s : s + step].sum()) for s in starts)
            self._n_valid[y] = n * self._per_row
        return self._n_valid[y]

    def load(self, y: int) -> np.ndarray:
        if self._part[1] == 1:
            return self._flatten(self._store.activations(y))
        parts = list(self.batches(y, max(1, self.n_rows(y))))
        return parts[0] if parts else np.zeros((0, self.n_features), dtype=np.float32)

    def batches(self, y: int, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
        """Reads one chunk at a time, so memory stays at a chunk plus a batch whatever the store's size."""
        arr = self._store._group(y)["activations"]
        valid = self._store._valid(y)
        starts, step = self._starts(y)
        rng = np.random.default_rng(seed)
        if shuffle:
            rng.shuffle(starts)
        pending: list[np.ndarray] = []
        n_pending = 0
        for s in starts:
            v = valid[s : s + step]
            if not v.any():
                continue
            rows = self._flatten(np.asarray(arr[s : s + step])[v].astype(np.float32, copy=False))
            if shuffle:
                rows = rows[rng.permutation(rows.shape[0])]
            pending.append(rows)
            n_pending += rows.shape[0]
            while n_pending >= batch_size:
                block = np.concatenate(pending, 0) if len(pending) > 1 else pending[0]
                yield block[:batch_size]
                rest = block[batch_size:]
                pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
        if n_pending:
            yield np.concatenate(pending, 0) if len(pending) > 1 else pending[0]


class ActivationStore:
    """Read access to a complete store. Open with `ActivationStore.open(path)`."""

    def __init__(self, path: Path, root: Any, attrs: dict[str, Any]) -> None:
        self.path = path
        self._root = root
        self.info = attrs
        self._valid_cache: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> "ActivationStore":
        p = Path(path).expanduser()
        if not (p / "zarr.json").is_file():
            if p.is_file():
                raise C2MFError(f"{str(p)!r} is a file, not an activation store (a directory made by `c2mf extract`)")
            if p.is_dir():
                raise C2MFError(f"{str(p)!r} is a folder but not an activation store (no zarr.json): give a "
                                "directory made by `c2mf extract`")
            raise C2MFError(f"activation store {str(p)!r} does not exist: create it with `c2mf extract`")
        try:
            root = zarr.open_group(str(p), mode="r", zarr_format=3)
        except Exception as e:
            raise C2MFError(f"{str(p)!r} is not a readable Zarr v3 store: {e}") from None
        attrs = dict(root.attrs)
        _check_version(attrs, p)
        if require_complete and not attrs.get("complete"):
            raise C2MFError(
                f"activation store {str(p)!r} is incomplete (an extract was interrupted or shards are missing): "
                "rerun the same `c2mf extract` command to resume and finalize it"
            )
        return cls(p, root, attrs)

    # -- metadata
    @property
    def config(self) -> dict[str, Any]:
        return self.info["config"]

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def classes(self) -> list[str]:
        return [c["name"] for c in self.info["classes"]]

    @property
    def class_indices(self) -> list[int]:
        return [int(c["label"]) for c in self.info["classes"]]

    @property
    def mode(self) -> str:
        return self.config["mode"]

    @property
    def layer(self) -> str:
        return self.config["layer"]

    @property
    def layout(self) -> str:
        return self.config["split_info"]["layout"]

    @property
    def grid(self) -> tuple[int, int]:
        g = self.config["split_info"]["grid"]
        return int(g[0]), int(g[1])

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.config["split_info"]["num_prefix_tokens"])

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.info["row_shape"])

    @property
    def n_outputs(self) -> int:
        return int(self.info["n_outputs"])

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.config["model"])

    @property
    def weights_sha256(self) -> str:
        return self.config["model"]["weights_sha256"]

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.config["preprocess"])

    @property
    def failures(self) -> list[dict[str, str]]:
        return list(self.info.get("failures", []))

    def describe_source(self) -> dict[str, Any]:
        """What a dictionary fitted on this store records about it (and checks against later)."""
        return {
            "store": str(self.path),
            "fingerprint": self.fingerprint,
            "model": self.config["model"],
            "layer": self.layer,
            "mode": self.mode,
            "layout": self.layout,
            "grid": list(self.grid),
            "num_prefix_tokens": self.num_prefix_tokens,
            "row_shape": list(self.row_shape),
            "preprocess": self.config["preprocess"],
            "classes": self.classes,
            "class_indices": self.class_indices,
        }

    # -- data
    def _group(self, y: int):
        if not 0 <= y < len(self.info["classes"]):
            raise C2MFError(f"class index {y} out of range: the store has {len(self.info['classes'])} classes")
        return self._root[group_name(y)]

    def _valid(self, y: int) -> np.ndarray:
        if y not in self._valid_cache:
            self._valid_cache[y] = np.asarray(self._group(y)["valid"][:], dtype=bool)
        return self._valid_cache[y]

    def n_images(self, y: int) -> int:
        """Valid rows of class y (images in full mode, crops in crop mode)."""
        return int(self._valid(y).sum())

    def class_attrs(self, y: int) -> dict[str, Any]:
        return dict(self._group(y).attrs)

    def activations(self, y: int, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """float32 (n, *positions, c) of the valid rows of class y (optionally a subset of those)."""
        a = np.asarray(self._group(y)["activations"][:])[self._valid(y)]
        a = a if rows is None else a[rows]
        return a.astype(np.float32, copy=False)

    def logits(self, y: int) -> np.ndarray:
        return np.asarray(self._group(y)["logits"][:], dtype=np.float32)[self._valid(y)]

    def labels(self, y: int) -> np.ndarray:
        return np.full(self.n_images(y), int(self.info["classes"][y]["label"]), dtype=np.int64)

    def paths(self, y: int) -> list[str]:
        """The image path of every valid row (repeated per crop in crop mode)."""
        attrs = self._group(y).attrs
        k = int(attrs.get("crops_per_image", 1))
        rows = [p for p in attrs["paths"] for _ in range(k)]
        return [p for p, v in zip(rows, self._valid(y)) if v]

    def row_source(self, include_prefix_tokens: bool = False) -> _StoreRows:
        return _StoreRows(self, include_prefix_tokens)

    def _n_units_done(self) -> int:
        d = self.path / PROGRESS_DIR
        return sum(1 for _ in d.glob("*.json")) if d.is_dir() else 0

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "path": str(self.path),
            "kind": "activation store",
            "encoding_version": self.info["encoding-version"],
            "complete": bool(self.info.get("complete")),
            "model": cfg["model"]["name"],
            "checkpoint": cfg["model"].get("checkpoint"),
            "weights_sha256": cfg["model"]["weights_sha256"][:16],
            "layer": self.layer,
            "mode": self.mode,
            "layout": self.layout,
            "row_shape": list(self.row_shape),
            "dtype": cfg["dtype"],
            "split": cfg["data"]["split"],
            "classes": len(self.classes),
            "rows": int(sum(self.n_images(y) for y in range(len(self.classes)))),
            "chunks_done": f"{self._n_units_done()}/{self.info['plan']['n_units']}",
            "failures": len(self.failures),
            "disk_mb": round(self.disk_bytes() / 1e6, 2),
            "fingerprint": self.fingerprint[:16],
            "c2mf_version": self.info.get("c2mf_version"),
        }
