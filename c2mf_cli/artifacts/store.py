"""The activation store: a versioned, fingerprinted Zarr v3 group of per-class activation tensors.

Layout (one directory):

    STORE/zarr.json                 root attributes: encoding-type/-version, fingerprint, config, plan, classes,
                                    and, written by finalize in one atomic step: complete, failures, manifest, seal
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

Integrity (format version 2): every chunk ends with a crc32c of its compressed bytes (zarr's `crc32c` codec), so
a changed or truncated chunk fails on read. Finalize records a manifest (per array: shape, dtype, chunks, codecs
and the byte size of every chunk; per class: name, label, images, valid rows and a digest of its paths) and a seal,
the sha256 of all root attributes, fingerprint and manifest included. Opening a complete store runs the fast
check (`check_store`): the seal, the manifest against the groups' and arrays' own metadata, and every chunk file
present with its recorded size; so a deleted chunk is never read as fill values, and an edited attribute, dtype
or shape is refused by name. `verify_store(deep=True)` also decodes every chunk and scans for NaN/Inf.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .. import __version__
from .._io import fsync_dir, fsync_file, remove_temporaries, write_text
from ..errors import C2MFError
from ..inputs.models.spec import ModelSpec, Preprocess, row_layout
from ..progress import ProgressFn, no_progress
from .provenance import Provenance
from .sources import rebatch

T = TypeVar("T")

if TYPE_CHECKING:
    from .rows import RegroupedRows

ENCODING_TYPE = "c2mf-activations"
# 2: crc32c on every chunk, manifest and seal written at finalize. Version 1 stores are refused (re-extract).
ENCODING_VERSION = 2
# zstd level 1: on ReLU activations in float16 it compresses as well as the default level 3 (ratio 1.69 on a
# ResNet-20 layer) in two thirds of the time, and extract compresses beside the model (benchmarks/extract.py)
ZSTD_LEVEL = 1
PROGRESS_DIR = "progress"
SHARDS_DIR = "shards"  # progress/shards/<i>-of-<n>.json: shard i of n has computed all its units
ARRAYS = ("activations", "logits", "valid")
CODECS = ("bytes", "zstd", "crc32c")  # what the writer uses; any other codec (pickle!) is refused on open


def fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines a store's content."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(attrs: dict[str, Any]) -> str:
    """sha256 of every root attribute but the seal itself: the fingerprint, the manifest and the class list."""
    return fingerprint({k: v for k, v in attrs.items() if k != "seal"})


def chunk_key(index: int, ndim: int) -> str:
    """The file of row-chunk `index` of an array chunked along rows only (zarr v3's default key encoding)."""
    return "/".join(["c", str(index)] + ["0"] * (ndim - 1))


def _paths_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()


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


def planned_unit_names(attrs: dict[str, Any]) -> list[str]:
    """The names of every unit a store's plan holds, in plan order (the order shards deal them out)."""
    k = int(attrs["plan"]["chunk_images"])
    return [unit_name(y, j) for y, c in enumerate(attrs["classes"]) for j in range(-(-int(c["n_images"]) // k))]


def _check_version(attrs: dict[str, Any], path: Path) -> None:
    kind = attrs.get("encoding-type")
    if kind != ENCODING_TYPE:
        what = f"a {kind!r} file" if kind else "not a c2mf activation store"
        raise C2MFError(f"{str(path)!r} is {what}: expected an activation store written by `c2mf extract`")
    version = attrs.get("encoding-version")
    if not isinstance(version, int) or isinstance(version, bool) or version > ENCODING_VERSION:
        raise C2MFError(
            f"{str(path)!r} has store format version {version!r}, newer than this c2mf ({__version__}) reads "
            f"(version {ENCODING_VERSION}): upgrade c2mf (pip install -U c2mf)"
        )
    if version < ENCODING_VERSION:
        raise C2MFError(
            f"{str(path)!r} has store format version {version} (c2mf {attrs.get('c2mf_version', '?')}), which has "
            f"no checksums or manifest; this c2mf ({__version__}) reads version {ENCODING_VERSION} only: "
            "re-extract it with this version (the same `c2mf extract` command, with a new --out)"
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
    _clean_creating(path)
    # host and pid in the name let the next run tell a dead writer's folder from one being made right now
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.{uuid.uuid4().hex}.creating")
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for y, cp in enumerate(classes):
            g = root.create_group(group_name(y))
            rows = max(1, min(chunk_images, cp.n_images) * cp.crops_per_image)  # never a chunk beyond the class
            for name, shape, dt in (("activations", row_shape, dtype), ("logits", (n_outputs,), "float32"),
                                    ("valid", (), "bool")):
                g.create_array(name, shape=(cp.n_rows, *shape), chunks=(rows, *shape), dtype=dt,
                               compressors=[ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()])
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
        # the layout's metadata is on disk before the rename publishes it (zarr writes without fsync)
        for f in sorted(tmp.rglob("zarr.json"), key=lambda f: -len(f.parts)):
            fsync_file(f)
            fsync_dir(f.parent)
        try:
            os.rename(tmp, path)
        except OSError:
            if path.exists():
                return False
            raise
        fsync_dir(path.parent)
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _clean_creating(path: Path) -> None:
    """Remove the `.creating` folders that a killed run left beside `path` (never one a live process makes)."""
    host = socket.gethostname()
    for d in path.parent.glob(f".{glob.escape(path.name)}.*.creating"):
        who = d.name[len(path.name) + 2 :].rsplit(".", 2)[0]
        owner, _, pid = who.rpartition("-")
        if owner == host and pid.isdigit():
            dead = not _alive(int(pid))
        else:  # another machine's: only once it is clearly abandoned
            try:
                dead = time.time() - d.stat().st_mtime > 3600
            except FileNotFoundError:
                continue
        if dead:
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class StoreWriter:
    """Writes units into a laid-out store; several writers (shards) may share one store."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.root = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        self._arrays: dict[tuple[int, str], Any] = {}

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(zarr.open_group(str(self.path), mode="r", zarr_format=3).attrs)

    def _array(self, y: int, name: str):
        if (y, name) not in self._arrays:
            # every chunk is written, even one that equals the fill value (all rows unreadable): the manifest
            # then lists the whole grid, and a missing chunk file always means damage
            arr = self.root[f"{group_name(y)}/{name}"]
            self._arrays[y, name] = arr.with_config({"write_empty_chunks": True})
        return self._arrays[y, name]

    def done_units(self) -> set[str]:
        d = self.path / PROGRESS_DIR
        return {p.stem for p in d.glob("*.json")} if d.is_dir() else set()

    def missing_units(self) -> list[str]:
        done = self.done_units()
        return [u for u in planned_unit_names(self.attrs) if u not in done]

    def mark_shard_done(self, index: int, count: int) -> None:
        """Record that shard index/count has computed all its units (so the last one can tell it is last)."""
        d = self.path / PROGRESS_DIR / SHARDS_DIR
        d.mkdir(exist_ok=True)
        record = write_text(d / f"{index}-of-{count}.json", json.dumps({"shard": [index, count], "time": time.time()}))
        remove_temporaries(record)  # what a run of this shard killed while writing its record left

    def shards_done(self, count: int) -> set[int]:
        d = self.path / PROGRESS_DIR / SHARDS_DIR
        return {int(p.stem.split("-of-")[0]) for p in d.glob(f"*-of-{count}.json")} if d.is_dir() else set()

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
        r0, r1 = unit.start * crops_per_image, unit.stop * crops_per_image
        if activations.shape[0] != r1 - r0:
            raise RuntimeError(f"unit {unit.name}: {activations.shape[0]} rows for {r1 - r0} planned")
        for name, values in (("activations", activations), ("logits", logits), ("valid", valid)):
            arr = self._array(unit.y, name)
            arr[r0:r1] = values
            # the chunk is on disk before the marker that publishes it (zarr renames but does not fsync)
            chunk = self.path / group_name(unit.y) / name / chunk_key(unit.chunk, arr.ndim)
            fsync_file(chunk)
            fsync_dir(chunk.parent)
        marker = {"unit": unit.name, "rows": [r0, r1], "failures": failures, "time": time.time()}
        write_text(self.path / PROGRESS_DIR / f"{unit.name}.json", json.dumps(marker))

    def clean_debris(self, units: set[str] | None = None) -> int:
        """Remove what a killed writer left: zarr's `.partial` chunk files and `.tmp` marker files of `units`
        (None: every unit and shard record, for finalize), and the `.tmp` of the root attributes. Returns how many were removed.

        Only the units a writer owns are cleaned, so a shard never deletes the file another shard is writing.
        """
        removed = 0
        for f in self.path.glob("c*/*/c/**/*.partial"):
            arr_dir = f.parents[len(f.relative_to(self.path).parts) - 3]
            key = f.relative_to(arr_dir).as_posix()
            name = unit_name(int(arr_dir.parent.name[1:]), int(key.split("/")[1].split(".")[0]))
            if units is None or name in units:
                f.unlink(missing_ok=True)
                removed += 1
        for f in (self.path / PROGRESS_DIR).glob(".*.tmp"):
            if units is None or f.name[1:].split(".json.")[0] in units:
                f.unlink(missing_ok=True)
                removed += 1
        if units is None:  # finalize: every shard has finished, so a shard record's temporary is debris too
            for f in (self.path / PROGRESS_DIR / SHARDS_DIR).glob(".*.tmp"):
                f.unlink(missing_ok=True)
                removed += 1
        for f in self.path.glob(".zarr.json.*.tmp"):
            f.unlink(missing_ok=True)
            removed += 1
        return removed

    def finalize(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check that every unit and chunk is there, gather the failures, and write the final root attributes
        (complete, failures, manifest, seal) in one atomic step."""
        attrs = self.attrs
        missing = self.missing_units()
        if missing:
            raise C2MFError(
                f"{str(self.path)!r} has {len(missing)} unit(s) missing (e.g. {', '.join(missing[:3])}): run the "
                "missing shards (or rerun extract without --shard) before finalizing"
            )
        self.clean_debris()
        failures: list[dict[str, str]] = []
        for m in sorted((self.path / PROGRESS_DIR).glob("*.json")):
            failures.extend(json.loads(m.read_text()).get("failures", []))
        failures.sort(key=lambda f: f["path"])
        update = {"complete": True, "failures": failures, "finalized_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "manifest": build_manifest(self.path, attrs)}
        update.update(extra or {})
        final = {**attrs, **update}
        final["seal"] = seal(final)
        meta_path = self.path / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["attributes"] = final
        write_text(meta_path, json.dumps(meta, indent=2))
        return update


def _array_meta(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _codec_names(meta: dict[str, Any]) -> list[str]:
    return [str(c.get("name")) if isinstance(c, dict) else str(c) for c in meta.get("codecs", [])]


def build_manifest(path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """What finalize records: every array's metadata and chunk sizes, every class's rows. Refuses a missing chunk."""
    arrays: dict[str, Any] = {}
    classes = []
    for y, c in enumerate(attrs["classes"]):
        g = group_name(y)
        for name in ARRAYS:
            meta = _array_meta(path / g / name / "zarr.json")
            shape = [int(v) for v in meta["shape"]]
            rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
            sizes = {}
            for i in range(-(-shape[0] // rows)):
                key = chunk_key(i, len(shape))
                f = path / g / name / key
                if not f.is_file():
                    raise C2MFError(f"{str(path)!r}: chunk {key} of {g}/{name} (class {c['name']!r}) is missing "
                                    "although its unit is marked done: delete the store and extract again")
                sizes[key] = f.stat().st_size
            arrays[f"{g}/{name}"] = {"shape": shape, "dtype": meta["data_type"], "chunk_rows": rows,
                                     "codecs": meta["codecs"], "chunk_bytes": sizes}
        gattrs = json.loads((path / g / "zarr.json").read_text()).get("attributes", {})
        valid = np.asarray(zarr.open_array(str(path / g / "valid"), mode="r")[:], dtype=bool)
        classes.append({"group": g, "name": c["name"], "label": c["label"], "n_images": c["n_images"],
                        "rows": int(valid.sum()), "crops_per_image": gattrs.get("crops_per_image", 1),
                        "paths_sha256": _paths_digest(list(gattrs.get("paths", [])))})
    return {"arrays": arrays, "classes": classes}


def _damaged(path: Path, what: str) -> C2MFError:
    return C2MFError(f"activation store {str(path)!r} is damaged: {what}; extract it again (or copy it again "
                     "from a good source); `c2mf verify` lists every problem")


def _read_json(path: Path, store: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise _damaged(store, f"{what} is missing ({path.relative_to(store).as_posix()})") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _damaged(store, f"{what} cannot be read ({path.relative_to(store).as_posix()}: {e})") from None


def check_store(path: Path, attrs: dict[str, Any]) -> list[str]:
    """The fast check of a complete store (metadata and file sizes, no chunk decoded). Returns the problems found,
    each one line naming the class, array or chunk; an empty list means the store is as finalize wrote it."""
    try:
        return _check_store(path, attrs)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return [f"its root attributes or manifest are malformed ({type(e).__name__}: {e})"]


def _check_store(path: Path, attrs: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if attrs.get("fingerprint") != fingerprint(attrs.get("config", {})):
        problems.append("its configuration (model, layer, data, preprocessing...) no longer matches its "
                        "fingerprint: the root attributes were edited")
    manifest = attrs.get("manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arrays"), dict):
        return problems + ["it is marked complete but has no manifest"]
    classes = attrs.get("classes")
    m_classes = manifest.get("classes", [])
    if not isinstance(classes, list) or len(classes) != len(m_classes):
        problems.append(f"the root attributes list {len(classes) if isinstance(classes, list) else '?'} classes, "
                        f"the manifest {len(m_classes)}")
    else:
        for c, m in zip(classes, m_classes):
            for key in ("name", "label", "n_images"):
                if c.get(key) != m.get(key):
                    problems.append(f"class {m['group']}: {key} is {c.get(key)!r} in the root attributes but "
                                    f"{m.get(key)!r} in the manifest")
    row_shape = attrs.get("row_shape")
    for m in m_classes:
        g = m["group"]
        gdir = path / g
        if not (gdir / "zarr.json").is_file():
            problems.append(f"group {g} (class {m['name']!r}) is missing")
            continue
        try:
            gattrs = json.loads((gdir / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError, UnicodeDecodeError) as e:
            problems.append(f"{g}/zarr.json cannot be read: {e}")
            continue
        for key, want in (("name", m["name"]), ("label", m["label"]), ("n_images", m["n_images"]),
                          ("crops_per_image", m["crops_per_image"])):
            if gattrs.get(key) != want:
                problems.append(f"group {g}: attribute {key} is {gattrs.get(key)!r}, the manifest says {want!r}")
        if _paths_digest(list(gattrs.get("paths", []))) != m["paths_sha256"]:
            problems.append(f"group {g} (class {m['name']!r}): its list of image paths was edited")
        for name in ARRAYS:
            want = manifest["arrays"].get(f"{g}/{name}")
            if want is None:
                problems.append(f"the manifest has no entry for {g}/{name}")
                continue
            problems.extend(_check_array(path, g, name, want, row_shape if name == "activations" else None,
                                         attrs.get("n_outputs") if name == "logits" else None))
    if not problems and attrs.get("seal") != seal(attrs):
        problems.append("its root attributes were edited after extract (the seal over them does not match)")
    return problems


def _check_array(path: Path, g: str, name: str, want: dict[str, Any], row_shape, n_outputs) -> list[str]:
    adir = path / g / name
    where = f"{g}/{name}"
    try:
        meta = json.loads((adir / "zarr.json").read_text())
    except FileNotFoundError:
        return [f"array {where} is missing"]
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return [f"{where}/zarr.json cannot be read: {e}"]
    problems = []
    codecs = _codec_names(meta)
    odd = [c for c in codecs if c not in CODECS]
    if odd:
        problems.append(f"array {where} uses codec {odd[0]!r}, which c2mf never writes (and will not read)")
    elif codecs[-1:] != ["crc32c"]:
        problems.append(f"array {where} has no crc32c checksum codec")
    if meta.get("data_type") != want["dtype"]:
        problems.append(f"array {where} has dtype {meta.get('data_type')!r}, the manifest says {want['dtype']!r}")
    if list(meta.get("shape", [])) != want["shape"]:
        problems.append(f"array {where} has shape {meta.get('shape')}, the manifest says {want['shape']}")
    if meta.get("codecs") != want["codecs"] and not odd:
        problems.append(f"array {where} has other codecs than the manifest records")
    try:
        rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        rows = None
    if rows != want["chunk_rows"]:
        problems.append(f"array {where} has chunks of {rows} rows, the manifest says {want['chunk_rows']}")
    if row_shape is not None and list(want["shape"][1:]) != list(row_shape):
        problems.append(f"the root attributes give rows of shape {row_shape}, array {where} holds "
                        f"{want['shape'][1:]}")
    if n_outputs is not None and want["shape"][1:] != [n_outputs]:
        problems.append(f"the root attributes give {n_outputs} outputs, array {where} holds {want['shape'][1:]}")
    for key, size in want["chunk_bytes"].items():
        f = adir / key
        try:
            actual = f.stat().st_size
        except FileNotFoundError:
            problems.append(f"chunk {key} of {where} is missing")
            continue
        if actual != size:
            problems.append(f"chunk {key} of {where} has {actual} bytes, the manifest says {size} (truncated or "
                            "replaced)")
    return problems


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
        """Reads chunk by chunk, up to `READ_AHEAD` chunks ahead in threads within `READ_AHEAD_BYTES` of float32
        rows (one at a time when a chunk alone passes it), so memory stays at a few chunks plus a batch whatever
        the store's size."""
        valid = self._store._valid(y)
        starts, step = self._starts(y)
        chunk_bytes = step * int(np.prod(self._store.row_shape)) * 4
        depth = max(1, min(READ_AHEAD, READ_AHEAD_BYTES // max(1, chunk_bytes)))
        rng = np.random.default_rng(seed)
        if shuffle:
            rng.shuffle(starts)

        def read(s: int) -> np.ndarray:
            v = valid[s : s + step]
            a = self._store._read(y, "activations", slice(s, s + step))
            return self._flatten(as_float32(a if v.all() else a[v]))

        def blocks() -> Iterator[np.ndarray]:
            first = -(-batch_size // max(1, step * self._per_row))  # the chunks a first batch needs at most
            for rows in read_ahead(read, [s for s in starts if valid[s : s + step].any()], depth, first):
                yield rows[rng.permutation(rows.shape[0])] if shuffle else rows

        return rebatch(blocks(), batch_size)


def _read_ahead_default() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # a SLURM or container limit, not the machine's total
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


# Chunks a row source reads ahead, each in its own thread: decoding (zstd, crc32c, float16 -> float32) releases the
# GIL, so a pass over a store is read by several cores while the caller computes on the rows already read.
READ_AHEAD = _read_ahead_default()
# and at most this many bytes of float32 rows in the chunks read ahead: a store's default chunks (about 8 MiB
# stored, 26 MB of float32 at 64 images of 7x7x2,048) are read READ_AHEAD ahead, a store made with large
# --chunk-images (up to 8 GiB of rows a chunk) fewer, one at a time where a chunk alone passes it
READ_AHEAD_BYTES = 256 * 2**20


# one read-ahead at a time in a process: a caller that keeps several row sources open side by side (SAE's
# `_mixed_batches`, one per class) would otherwise start `depth` threads and hold `depth` chunks for each
_READING_AHEAD = threading.BoundedSemaphore(1)


def read_ahead(read: Callable[[Any], T], keys: Sequence[Any], depth: int, first: int | None = None) -> Iterator[T]:
    """`read(key)` for every key, in order, with up to `depth` reads running ahead in threads (memory: `depth`
    results ahead plus the one the caller holds). Until the caller comes back for a second result only `first`
    reads are started (default `depth`): what its first batch needs, so a caller that takes one batch (a start
    sample: one batch per class) reads no more. One iterator of a process reads ahead at a time; another started
    meanwhile reads in the caller's thread. An error is raised where its key's result is taken; closing the
    iterator waits for the reads running."""
    if depth <= 1 or len(keys) <= 1 or not _READING_AHEAD.acquire(blocking=False):
        for key in keys:
            yield read(key)
        return
    try:
        with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="c2mf-read") as pool:
            pending: deque[Future[T]] = deque()
            todo = iter(keys)

            def top_up(n: int) -> None:
                while len(pending) < n:
                    key = next(todo, _NO_KEY)
                    if key is _NO_KEY:
                        return
                    pending.append(pool.submit(read, key))

            top_up(depth if first is None else max(1, min(depth, first)))
            came_back = False
            try:
                while True:
                    if came_back:
                        top_up(depth)
                    if not pending:
                        return
                    result = pending.popleft().result()
                    if came_back:
                        top_up(depth)  # `depth` reads run while the caller works on this result
                    yield result
                    came_back = True
            finally:
                for f in pending:
                    f.cancel()
    finally:
        _READING_AHEAD.release()


_NO_KEY = object()


def as_float32(a: np.ndarray) -> np.ndarray:
    """float32 rows; float16 is converted by torch (vectorised, 10-30x numpy's conversion, without the GIL)."""
    if a.dtype == np.float16:
        import torch  # already imported by every caller that reads rows to compute on them

        return torch.from_numpy(np.ascontiguousarray(a)).float().numpy()
    return a.astype(np.float32, copy=False)


class ActivationStore:
    """Read access to a complete store. Open with `ActivationStore.open(path)`."""

    def __init__(self, path: Path, root: Any, attrs: dict[str, Any]) -> None:
        self.path = path
        self._root = root
        self.info = attrs
        self._valid_cache: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True, check: bool = True) -> "ActivationStore":
        """Open a store; a complete one gets the fast check (`check_store`) unless `check` is False (verify
        runs it itself, to list every problem rather than the first)."""
        p = Path(path).expanduser()
        if not (p / "zarr.json").is_file():
            if p.is_file():
                raise C2MFError(f"{str(p)!r} is a file, not an activation store (a directory made by `c2mf extract`)")
            if p.is_dir():
                raise C2MFError(f"{str(p)!r} is a folder but not an activation store (no zarr.json): give a "
                                "directory made by `c2mf extract`")
            raise C2MFError(f"activation store {str(p)!r} does not exist: create it with `c2mf extract`")
        meta = _read_json(p / "zarr.json", p, "the root metadata")
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        if not isinstance(attrs, dict):
            raise C2MFError(f"{str(p)!r} is not a c2mf activation store (zarr.json has no attributes): expected a "
                            "store written by `c2mf extract`")
        _check_version(attrs, p)
        complete = attrs.get("complete") is True
        if require_complete and not complete:
            raise C2MFError(
                f"activation store {str(p)!r} is incomplete (an extract was interrupted or shards are missing): "
                "rerun the same `c2mf extract` command to resume and finalize it"
            )
        if complete and check:
            problems = check_store(p, attrs)
            if problems:
                more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
                raise _damaged(p, problems[0] + more)
        try:
            root = zarr.open_group(str(p), mode="r", zarr_format=3)
        except Exception as e:
            raise C2MFError(f"{str(p)!r} is not a readable Zarr v3 store: {e}") from None
        return cls(p, root, attrs)

    def _read(self, y: int, name: str, sel: slice = slice(None)) -> np.ndarray:
        """Rows `sel` of array `name` of class y; a chunk that fails its checksum or cannot be decoded raises
        one error naming the class, array and chunk."""
        g = group_name(y)
        try:
            arr = self._group(y)[name]
        except C2MFError:
            raise
        except Exception as e:
            raise _damaged(self.path, f"array {g}/{name} cannot be opened ({type(e).__name__}: {e})") from None
        try:
            return np.asarray(arr[sel])
        except Exception as e:
            step = int(arr.chunks[0])
            start, stop, _ = sel.indices(arr.shape[0])
            for i in range(start // step, -(-stop // step)):
                try:
                    arr[i * step : (i + 1) * step]
                except Exception as e_i:
                    e = e_i
                    key = chunk_key(i, arr.ndim)
                    break
            else:
                key = "?"
            reason = "fails its checksum" if "checksum" in str(e).lower() else f"cannot be decoded ({e})"
            raise _damaged(self.path, f"chunk {key} of {g}/{name} (class {self.classes[y]!r}) {reason}") from None

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

    @property
    def provenance(self) -> Provenance:
        """What produced these activations (model, weights, layer, preprocessing, data), as one typed record."""
        return Provenance.from_store(self.info, str(self.path))

    def describe_source(self) -> dict[str, Any]:
        """What a dictionary fitted on this store records about it (and checks against later): its provenance."""
        return self.provenance.to_dict()

    # -- data
    def _group(self, y: int):
        if not 0 <= y < len(self.info["classes"]):
            raise C2MFError(f"class index {y} out of range: the store has {len(self.info['classes'])} classes")
        return self._root[group_name(y)]

    def _valid(self, y: int) -> np.ndarray:
        if y not in self._valid_cache:
            self._valid_cache[y] = np.asarray(self._read(y, "valid"), dtype=bool)
        return self._valid_cache[y]

    def n_images(self, y: int) -> int:
        """Valid rows of class y (images in full mode, crops in crop mode)."""
        return int(self._valid(y).sum())

    def activations(self, y: int, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """float32 (n, *positions, c) of the valid rows of class y, or of `rows` of those (positions among the
        valid rows): only the chunks from the first of them to the last are read (a slice: exactly its chunks)."""
        return as_float32(self._valid_rows(y, "activations", rows))

    def logits(self, y: int, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """float32 (n, outputs): the model's logits on the valid rows of class y (or `rows` of those)."""
        return as_float32(self._valid_rows(y, "logits", rows))

    def _valid_rows(self, y: int, name: str, rows: slice | np.ndarray | None) -> np.ndarray:
        valid = self._valid(y)
        if rows is None:
            return self._read(y, name)[valid]
        at = np.flatnonzero(valid)[rows]  # where the wanted valid rows are stored
        if at.size == 0:
            return self._read(y, name, slice(0, 0))
        lo, hi = int(at.min()), int(at.max()) + 1  # one read of the stored range that spans them
        return self._read(y, name, slice(lo, hi))[at - lo]

    def labels(self, y: int) -> np.ndarray:
        return np.full(self.n_images(y), int(self.info["classes"][y]["label"]), dtype=np.int64)

    def paths(self, y: int) -> list[str]:
        """The image path of every valid row (repeated per crop in crop mode)."""
        attrs = self._group(y).attrs
        k = int(attrs.get("crops_per_image", 1))
        rows = [p for p in attrs["paths"] for _ in range(k)]
        return [p for p, v in zip(rows, self._valid(y)) if v]

    def row_source(self, include_prefix_tokens: bool = False, *, rows: str = "positions",
                   group_by: str = "label") -> "_StoreRows | RegroupedRows":
        """The rows methods learn from: one per position grouped by label (the default), or pooled per image
        and / or grouped by the model's prediction (`artifacts.rows`)."""
        if rows == "positions" and group_by == "label":
            return _StoreRows(self, include_prefix_tokens)
        if include_prefix_tokens:
            raise C2MFError("prefix tokens are kept only with one row per position grouped by label")
        from .rows import RegroupedRows

        return RegroupedRows(self, rows, group_by)

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
            "row_layout": row_layout(self.layout, self.mode, self.num_prefix_tokens),
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
