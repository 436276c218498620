"""`extract`: run a model over an image dataset and write per-class activations at one layer to a store.

Whole-image mode stores every position of the layer's map (what C2MF learns from); crop mode stores, for each
crop of each image (CRAFT's grid by default), the layer's map mean-pooled over positions (what CRAFT learns
from) and the model's logits on the crop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from .._io import DISK_ERRORS
from ..inputs.class_check import IDENTITY, check_class_count, check_label_agreement
from ..inputs.data import (CropSpec, DatasetSpec, Item, check_crop_geometry, class_labels, make_crops,
                           resolve_dataset)
from ..inputs.images import read_image
from ..devices import resolve_device
from ..errors import C2MFError, UsageError
from ..inputs.models import LoadedModel, ModelSpec, Preprocess, Split, load_model, split_model
from ..progress import ProgressFn, no_progress
from ..artifacts.store import (
    PROGRESS_DIR,
    ActivationStore,
    ClassPlan,
    StoreWriter,
    Unit,
    create_layout,
    fingerprint,
    plan_units,
)


@dataclass(frozen=True)
class ShardSpec:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "ShardSpec":
        """`i/n` (0-based), or None/"auto": from torchrun (RANK, WORLD_SIZE) or a SLURM array, else 0/1."""
        if text is None or text == "auto":
            return cls.from_environment()
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise UsageError(f"--shard must look like i/n (for example 0/4), got {text!r}") from None
        if n < 1 or not 0 <= i < n:
            raise UsageError(f"--shard {text}: need 0 <= i < n")
        return cls(i, n)

    @classmethod
    def from_environment(cls) -> "ShardSpec":
        """torchrun's RANK/WORLD_SIZE, else a SLURM array's task id (ranges with a step too), else 0/1."""
        env = os.environ
        if "WORLD_SIZE" in env and "RANK" in env:
            rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
            if world < 1 or not 0 <= rank < world:
                raise UsageError(f"RANK={rank} and WORLD_SIZE={world} in the environment: need WORLD_SIZE >= 1 and "
                                 "0 <= RANK < WORLD_SIZE (or pass --shard i/n)")
            return cls(rank, world)
        if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
            task, count = _env_int("SLURM_ARRAY_TASK_ID"), _env_int("SLURM_ARRAY_TASK_COUNT")
            first = _env_int("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
            step = _env_int("SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
            # --array=0-3:2 runs tasks 0 and 2 with COUNT=2: they are shards 0/2 and 1/2
            index, off = divmod(task - first, step) if step >= 1 else (-1, 0)
            if count < 1 or off or not 0 <= index < count:
                raise UsageError(
                    f"SLURM array task {task} (min {first}, step {step}, count {count}) does not map to one of "
                    f"{count} shards: use a range such as --array=0-{max(count, 1) - 1} (a step is fine), or pass "
                    "--shard i/n yourself"
                )
            return cls(index, count)
        return cls(0, 1)


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} in the environment is not a whole number (or pass --shard i/n)") from None


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `extract` needs; the parts that determine the store's content go into its fingerprint."""

    model: ModelSpec
    layer: str
    data: DatasetSpec
    out: str
    mode: Literal["full", "crops"] = "full"
    crops: CropSpec = field(default_factory=CropSpec)
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    autocast: Literal["none", "bf16", "fp16"] = "none"
    chunk_images: int | None = None  # None: auto_chunk_images (or the chunking of the store being resumed)
    seed: int = 0
    strict: bool = False
    channels_last: bool = True
    preprocess_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Every option's range, checked before any work or allocation starts."""
        if self.mode not in ("full", "crops"):
            raise UsageError(f"unknown mode {self.mode!r}: use full or crops")
        if self.dtype not in ("float16", "float32"):
            raise UsageError(f"unknown dtype {self.dtype!r}: use float16 or float32")
        if self.autocast not in ("none", "bf16", "fp16"):
            raise UsageError(f"unknown autocast {self.autocast!r}: use none, bf16 or fp16")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.batch_size > MAX_BATCH:
            raise UsageError(f"--batch-size must be at most {MAX_BATCH}, got {self.batch_size}")
        if self.chunk_images is not None and not 1 <= self.chunk_images <= MAX_CHUNK_IMAGES:
            raise UsageError(f"--chunk-images must be between 1 and {MAX_CHUNK_IMAGES:,} (a chunk is held in "
                             f"memory until it is written), got {self.chunk_images}")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be between 0 and 2**63 - 1, got {self.seed}")
        if self.workers is not None:
            cpus = available_cpus()
            if not 0 <= self.workers <= cpus:
                raise UsageError(f"--workers must be between 0 and the {cpus} CPU(s) this process may use, got "
                                 f"{self.workers} (0 reads images in the main process)")
        c = self.crops
        if not (math.isfinite(c.size) and 0 < c.size <= 1):
            raise UsageError(f"--crop-size must be in (0, 1] (relative to the input's short side), got {c.size}")
        if not (math.isfinite(c.stride) and 0 < c.stride <= 1):
            raise UsageError(f"--crop-stride must be in (0, 1] (relative to the crop side), got {c.stride}")
        if not 1 <= c.count <= MAX_CROPS:
            raise UsageError(f"--n-crops must be between 1 and {MAX_CROPS}, got {c.count}")
        if not (math.isfinite(c.size_min) and math.isfinite(c.size_max) and 0 < c.size_min <= c.size_max <= 1):
            raise UsageError("random crops need 0 < size_min <= size_max <= 1")
        for key in ("mean", "std"):
            values = self.preprocess_overrides.get(key)
            if values is not None and not all(math.isfinite(v) and (key == "mean" or v > 0) for v in values):
                need = "finite numbers" if key == "mean" else "finite numbers above 0"
                raise UsageError(f"--{key} takes {need}, got {','.join(map(str, values))}")
        pct = self.preprocess_overrides.get("crop_pct")
        if pct is not None and not (math.isfinite(pct) and 0 < pct <= 1):
            raise UsageError(f"--crop-pct must be in (0, 1], got {pct}")


MAX_BATCH = 65536
MAX_CHUNK_IMAGES = 1_000_000
MAX_CROPS = 1024  # crops per image: a batch holds every crop of its images, so this bounds its memory
MAX_UNIT_BYTES = 8 * 2**30  # the rows of one unit, held in memory (float32) until the unit is written
# --chunk-images auto: about this many bytes of stored rows per chunk (and per unit of work), in a power of two of
# images between the two bounds; small rows (a 32-px model's layer) make few large chunks rather than many tiny files
CHUNK_TARGET_BYTES = 8 * 2**20
CHUNK_IMAGES_MIN, CHUNK_IMAGES_MAX = 64, 4096
LOADER_TIMEOUT_S = 300.0  # no batch from the loading workers for this long: they are dead or stuck


def available_cpus() -> int:
    """CPUs this process may run on (a SLURM or container limit, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class ExtractResult:
    path: str
    created: bool
    complete: bool
    shard: ShardSpec
    units_total: int
    units_done_now: int
    units_skipped: int
    images: int
    seconds: float
    compute_seconds: float  # reading, the model and writing: the total less one-off setup (model, split, layout)
    images_per_second: float
    failures: list[dict[str, str]]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shard"] = f"{self.shard.index}/{self.shard.count}"
        return d


class _Images(Dataset):
    """Preprocessed images (or their crops) of the pending units; unreadable images come back as failures."""

    def __init__(self, entries: list[tuple[int, str]], preprocess: Preprocess, crops: CropSpec | None) -> None:
        self.entries = entries
        self.preprocess = preprocess
        self.crops = crops

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        slot, path = self.entries[i]
        h, w = self.preprocess.size
        c = self.preprocess.input_size[0]
        n = self.crops.n_crops(h, w) if self.crops is not None else 1
        try:
            x = self.preprocess(read_image(path))
            error = ""
        except C2MFError as e:
            x, error = torch.zeros(c, h, w), str(e)
        if self.crops is not None:
            x = make_crops(x, self.crops.boxes(h, w, image_key=path)) if not error else torch.zeros(n, c, h, w)
        else:
            x = x[None]
        return slot, path, x, error


def _collate(batch):
    slots, paths, xs, errors = zip(*batch)
    return list(slots), list(paths), torch.cat(xs, 0), list(errors), [x.shape[0] for x in xs]


def _check_class_index(cfg: ExtractConfig, lm: LoadedModel, split: Split, items: list[Item], n_outputs: int,
                       device: torch.device, per_class: int = 4, max_classes: int = 16) -> None:
    """Stop early when folders are silently taken as outputs 0..n-1 and that is wrong (inputs/class_check.py).

    Runs only without --class-index and for a model with trained weights; the evidence is the model's own
    prediction on the first few images of the first classes (one small batch, before anything is written).
    """
    if cfg.data.class_index or (cfg.model.checkpoint is None and not cfg.model.pretrained):
        return
    classes = list(dict.fromkeys(it.class_name for it in items))
    check_class_count(len(classes), n_outputs)
    sample = [it for c in classes[:max_classes] for it in [i for i in items if i.class_name == c][:per_class]]
    readable = [(it, x) for it, (_, _, x, error) in ((it, _Images([(0, it.path)], lm.preprocess, None)[0])
                                                     for it in sample) if not error]
    if not readable:
        return
    with torch.no_grad():
        x = torch.cat([x for _, x in readable]).to(device)
        logits = split.h.to(device)(split.g.to(device)(x)).float().cpu().numpy()
    check_label_agreement(np.array([it.label for it, _ in readable]), logits,
                          label_names={it.label: it.class_name for it, _ in readable})


def _files_digest(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.path}\t{it.class_name}\t{it.label}\n".encode())
    return h.hexdigest()


def _store_config(cfg: ExtractConfig, lm: LoadedModel, split: Split, items: list[Item], n_outputs: int) -> dict:
    data = cfg.data.to_dict()
    data["root"] = str(Path(cfg.data.root).expanduser().resolve())
    if data.get("class_index") and data["class_index"] != IDENTITY:
        data["class_index"] = str(Path(data["class_index"]).expanduser().resolve())
        # the class index's readable labels (CUB's model_label, Keras' names), kept for pictures: the file may
        # not travel with the store
        known = class_labels(data["class_index"])
        names = sorted({it.class_name for it in items})
        labels = {n: known[n] for n in names if known.get(n)}
        if labels:
            data["labels"] = labels
    model = lm.spec.to_dict()
    if model.get("checkpoint"):
        model["checkpoint"] = str(Path(model["checkpoint"]).expanduser().resolve())
    if ":" in model["name"]:
        target, _, fn = model["name"].rpartition(":")
        if target.endswith(".py"):
            model["name"] = f"{Path(target).expanduser().resolve()}:{fn}"
    model["weights_sha256"] = lm.weights_sha256
    return {
        "model": model,
        "layer": cfg.layer,
        "split_info": split.describe(),
        "preprocess": lm.preprocess.to_dict(),
        "mode": cfg.mode,
        "crops": cfg.crops.to_dict() if cfg.mode == "crops" else None,
        "data": data,
        "files_sha256": _files_digest(items),
        "n_images": len(items),
        "n_outputs": n_outputs,
        "dtype": cfg.dtype,
        "autocast": cfg.autocast,
        "chunk_images": cfg.chunk_images,
        "seed": cfg.seed,
        "c2mf_version": __version__,
    }


def _explain_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    labels = {"model": "model or weights", "files_sha256": "image list", "data": "data/split", "layer": "layer"}
    return ", ".join(labels.get(k, k) for k in keys) or "its fingerprint"


def _open_existing(path: Path, config: dict[str, Any]) -> StoreWriter:
    store = ActivationStore.open(path, require_complete=False)
    if store.fingerprint != fingerprint(config):
        raise C2MFError(
            f"{str(path)!r} holds activations of another configuration (differs in: "
            f"{_explain_mismatch(store.config, config)}): choose another --out, or delete it to start over"
        )
    return StoreWriter(path)


def _report_missing(out: Path, missing: list[str], plan: list[str], shard: ShardSpec, writer: StoreWriter,
                    log) -> None:
    """After this shard's units: say which shards still owe units; when every shard of this count has finished
    and units are still missing, the store cannot complete by itself, so that is an error."""
    position = {name: k for k, name in enumerate(plan)}
    owners = sorted({position[u] % shard.count for u in missing})
    finished = writer.shards_done(shard.count)
    rerun = " ".join(f"--shard {i}/{shard.count}" for i in owners[:8])
    if all(i in finished for i in owners):
        raise C2MFError(
            f"{str(out)!r} is incomplete although every shard of {shard.count} has finished: {len(missing)} "
            f"unit(s) missing (e.g. {', '.join(missing[:3])}), owned by shard(s) "
            f"{', '.join(f'{i}/{shard.count}' for i in owners)}; rerun the same command with {rerun} "
            "(or without --shard) to compute them and finalize the store"
        )
    waiting = [i for i in owners if i not in finished]
    log(f"shard {shard.index}/{shard.count} done; {len(missing)} unit(s) left to shard(s) "
        f"{', '.join(f'{i}/{shard.count}' for i in waiting)}: the last shard to finish finalizes the store "
        f"(if one of them is not running, rerun the same command with --shard {waiting[0]}/{shard.count})")


def auto_chunk_images(image_bytes: int) -> int:
    """Images per chunk for `image_bytes` of stored rows per image (every crop of it in crop mode): the largest
    power of two whose chunk stays within CHUNK_TARGET_BYTES, bounded to [CHUNK_IMAGES_MIN, CHUNK_IMAGES_MAX].
    Each chunk is a file per array and a unit of work (a marker, its fsyncs, a resume step, a shard's share)."""
    n = CHUNK_IMAGES_MIN
    while n * 2 <= CHUNK_IMAGES_MAX and n * 2 * image_bytes <= CHUNK_TARGET_BYTES:
        n *= 2
    return n


def _recorded_chunk_images(out: Path) -> int | None:
    """The chunking of the store at `out` being resumed, so that `--chunk-images auto` never changes the plan of a
    store made before (by an older default, say); None where there is no readable store (opening it reports why)."""
    try:
        attrs = json.loads((out / "zarr.json").read_text()).get("attributes", {})
        value = attrs["config"]["chunk_images"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _default_workers() -> int:
    return max(0, min(8, available_cpus() - 1))


def extract(
    cfg: ExtractConfig,
    *,
    shard: ShardSpec = ShardSpec(),
    progress: ProgressFn = no_progress,
    log=lambda msg: None,
) -> ExtractResult:
    """Create (or resume) the store `cfg.out` and compute this shard's units. Idempotent."""
    cfg.validate()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    lm = load_model(cfg.model, seed=cfg.seed, preprocess_overrides=cfg.preprocess_overrides)
    if not lm.preprocess_declared:
        log(
            "warning: the model declares no pretrained_cfg; using ImageNet defaults "
            f"{lm.preprocess.to_dict()} (override with --input-size/--mean/--std/--crop-pct)"
        )
    split = split_model(lm.model, cfg.layer, lm.preprocess.input_size)
    for note in split.notes:  # an inferred token grid, a split by torch.export or hooks: said, and recorded
        log(note)
    with torch.no_grad():
        n_outputs = int(split.h(split.g(torch.zeros(1, *lm.preprocess.input_size))).shape[-1])
    items = resolve_dataset(cfg.data, num_outputs=n_outputs, log=log)
    _check_class_index(cfg, lm, split, items, n_outputs, device)

    h, w = lm.preprocess.size
    crops = cfg.crops if cfg.mode == "crops" else None
    if crops is not None:
        check_crop_geometry(crops, h, w)
    per_image = crops.n_crops(h, w) if crops is not None else 1
    if per_image > MAX_CROPS:
        raise UsageError(f"--crop-size {crops.size:g} and --crop-stride {crops.stride:g} give {per_image} crops per "
                         f"image on a {h}x{w} input, more than {MAX_CROPS}: raise them")
    row_shape = (split.channels,) if cfg.mode == "crops" else split.store_shape
    out = Path(cfg.out).expanduser()
    if cfg.chunk_images is None:
        image_bytes = per_image * math.prod(row_shape) * (2 if cfg.dtype == "float16" else 4)
        chunk = _recorded_chunk_images(out) if out.exists() else None
        cfg = replace(cfg, chunk_images=chunk or auto_chunk_images(image_bytes))
    _check_file_names(items)
    classes: list[ClassPlan] = []
    for name in dict.fromkeys(it.class_name for it in items):
        mine = [it for it in items if it.class_name == name]
        classes.append(ClassPlan(name, mine[0].label, tuple(it.path for it in mine), per_image))
    unit_images = min(cfg.chunk_images, max(c.n_images for c in classes))
    unit_bytes = unit_images * per_image * (math.prod(row_shape) + n_outputs) * 4
    if unit_bytes > MAX_UNIT_BYTES:
        fit = max(1, cfg.chunk_images * MAX_UNIT_BYTES // unit_bytes)
        raise UsageError(f"--chunk-images {cfg.chunk_images} holds {unit_bytes / 2**30:.1f} GiB of rows in memory "
                         f"per chunk (at most {MAX_UNIT_BYTES // 2**30} GiB): use --chunk-images {fit} or fewer")
    config = _store_config(cfg, lm, split, items, n_outputs)

    created = False
    try:
        if out.exists():
            writer = _open_existing(out, config)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            created = create_layout(
                out, config=config, classes=classes, row_shape=row_shape, n_outputs=n_outputs,
                chunk_images=cfg.chunk_images, dtype=cfg.dtype,
            )
            writer = StoreWriter(out) if created else _open_existing(out, config)
        units = plan_units(classes, cfg.chunk_images)
        mine = [u for i, u in enumerate(units) if i % shard.count == shard.index]
        done = writer.done_units()
        pending = [u for u in mine if u.name not in done]
        writer.clean_debris(done | {u.name for u in pending})  # what a killed run of this shard left
        n_images = sum(u.stop - u.start for u in pending)
        t_compute = time.perf_counter()
        if pending:
            _run_units(writer, pending, classes, split, lm, cfg, device, crops, per_image, progress, log)
        compute_seconds = time.perf_counter() - t_compute
        complete = bool(writer.attrs.get("complete"))
        if not complete:
            writer.mark_shard_done(shard.index, shard.count)
            missing = writer.missing_units()
            if not missing:
                writer.finalize()
                complete = True
            else:
                _report_missing(out, missing, [u.name for u in units], shard, writer, log)
    except BaseException as e:
        # A store this single run laid out and never got a unit into is removed, so that the corrected
        # command starts afresh (its fingerprint may differ) and no half-made store is left behind.
        if created and shard.count == 1 and not any((out / PROGRESS_DIR).glob("*.json")):
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            kept = "" if not out.exists() else "; the finished chunks are kept: rerun the same command to resume"
            raise C2MFError(f"cannot write the store {str(out)!r}: {os.strerror(e.errno)}"
                            f"{f' ({e.filename})' if e.filename else ''}: free space or choose another --out{kept}"
                            ) from None
        raise
    seconds = time.perf_counter() - t0
    store = ActivationStore.open(out, require_complete=False)
    failures = store.failures if complete else []
    return ExtractResult(
        path=str(out), created=created, complete=complete, shard=shard, units_total=len(units),
        units_done_now=len(pending), units_skipped=len(mine) - len(pending), images=n_images, seconds=seconds,
        compute_seconds=compute_seconds, images_per_second=n_images / seconds if seconds > 0 else 0.0,
        failures=failures, summary=store.summary() if complete else {},
    )


def _check_file_names(items: list[Item]) -> None:
    """The store records every path as UTF-8 JSON: a file name that is not UTF-8 is refused before any work."""
    for it in items:
        try:
            it.path.encode("utf-8")
        except UnicodeEncodeError:
            raise C2MFError(f"image file name {it.path.encode('utf-8', 'surrogateescape')!r} is not UTF-8: rename it "
                            "(for example with `convmv -f latin1 -t utf8`) or move it out of the data folder") from None


def _run_units(
    writer: StoreWriter,
    pending: list[Unit],
    classes: list[ClassPlan],
    split: Split,
    lm: LoadedModel,
    cfg: ExtractConfig,
    device: torch.device,
    crops: CropSpec | None,
    per_image: int,
    progress: ProgressFn,
    log,
) -> None:
    entries: list[tuple[int, str]] = []
    for k, u in enumerate(pending):
        entries.extend((k, p) for p in classes[u.y].paths[u.start : u.stop])
    workers = _default_workers() if cfg.workers is None else cfg.workers
    # In crop mode one image already makes many inputs; batch images so a batch holds about batch_size inputs.
    images_per_batch = max(1, cfg.batch_size // per_image) if crops is not None else cfg.batch_size
    loader = DataLoader(
        _Images(entries, lm.preprocess, crops),
        batch_size=images_per_batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        timeout=LOADER_TIMEOUT_S if workers > 0 else 0,
    )
    model = lm.model.to(device)
    nchw = split.layout == "nchw"
    if cfg.channels_last and nchw:
        model = model.to(memory_format=torch.channels_last)
    g, hd = split.g.to(device), split.h.to(device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.autocast)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    np_dtype = np.float16 if cfg.dtype == "float16" else np.float32

    need = [(u.stop - u.start) for u in pending]
    bufs: dict[int, dict[str, list]] = {}
    advance = progress(f"extract {cfg.layer}", len(entries))
    # Finished units are compressed and written by one background thread while the model computes the next
    # batches (zstd and file writes release the GIL). At most two units wait, so memory stays bounded; a
    # write error surfaces at the next unit or at the end, and markers still follow their data.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="c2mf-writer") as pool:
        writes: list[Future] = []
        try:
            for batch in _batches(loader, workers):
                _compute_batch(batch, g, hd, split, cfg, device, nchw, autocast, crops, bufs, need, log,
                               lambda slot, b: writes.append(pool.submit(_flush, writer, pending[slot], per_image,
                                                                         b, np_dtype)))
                while len(writes) > 2 or (writes and writes[0].done()):
                    writes.pop(0).result()
                advance(len(batch[0]))
            for w in writes:
                w.result()
        except BaseException:
            for w in writes:  # stop at once: queued units are simply recomputed on resume
                w.cancel()
            raise


def _batches(loader: DataLoader, workers: int):
    """The loader's batches; a dead, stuck or failing loading worker ends the run with one error, never a hang
    (torch notices a dead worker; the loader's timeout catches one that stays silent)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            if workers == 0:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise C2MFError(
                f"the image-loading workers failed ({first}): rerun with --workers 0, or give the machine more "
                "shared memory (/dev/shm; docker run --shm-size=2g) and a larger file-size limit (ulimit -f)"
            ) from None
        yield batch


def _compute_batch(batch, g, hd, split: Split, cfg: ExtractConfig, device: torch.device, nchw: bool, autocast,
                   crops: CropSpec | None, bufs: dict[int, dict[str, list]], need: list[int], log, flush) -> None:
    """Run one batch through g and h, and hand every unit whose images are all in to `flush(slot, buffers)`."""
    slots, paths, x, errors, counts = batch
    bad = [e for e in errors if e]
    if bad and cfg.strict:
        raise C2MFError(f"{bad[0]} (--strict stops at the first unreadable image; without it they are skipped)")
    x = x.to(device, non_blocking=True)
    if cfg.channels_last and nchw:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast:
        a = g(x)
        logits = hd(a)
    a = split.pool(a) if crops is not None else split.to_store(a)  # CRAFT pools each crop's map
    a_np = a.float().cpu().numpy()
    l_np = logits.float().cpu().numpy()
    row = 0
    for slot, path, err, n in zip(slots, paths, errors, counts):
        b = bufs.setdefault(slot, {"a": [], "l": [], "v": [], "f": []})
        b["a"].append(a_np[row : row + n])
        b["l"].append(l_np[row : row + n])
        b["v"].append(np.full(n, not err))
        if err:
            b["f"].append({"path": path, "error": err})
            log(f"skipped: {err}")
        row += n
        if len(b["v"]) == need[slot]:
            flush(slot, bufs.pop(slot))


def _flush(writer: StoreWriter, unit: Unit, per_image: int, b: dict[str, list], np_dtype) -> None:
    a = np.concatenate(b["a"], 0)
    logits = np.concatenate(b["l"], 0)
    valid = np.concatenate(b["v"], 0)
    if not valid.all():  # an unreadable image's rows are zeros, not the model's output on a blank input
        a[~valid] = 0
        logits[~valid] = 0
    if not np.isfinite(a).all() or not np.isfinite(logits).all():
        raise C2MFError(
            f"the model produced NaN or inf activations/logits in unit {unit.name}: check the checkpoint and "
            "the preprocessing (or turn off --autocast)"
        )
    if np_dtype == np.float16:
        if a.size and max(-float(a.min()), float(a.max())) >= FLOAT16_INF:
            raise C2MFError(
                f"activations in unit {unit.name} exceed the float16 range (max |a| = {np.abs(a).max():.3g}): "
                "rerun with --dtype float32 and a new --out"
            )
        # torch rounds to nearest even as numpy does, 20-40x faster (vectorised): this runs beside the model
        stored = torch.from_numpy(a).to(torch.float16).numpy()
    else:
        stored = a
    writer.write_unit(unit, per_image, stored, logits, valid, b["f"])


# the smallest float32 magnitude that rounds to inf in float16 (65504 is the largest finite float16; halfway to the
# next step, 65520, rounds up)
FLOAT16_INF = 65520.0
