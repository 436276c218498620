"""`verify`: check activation stores and dictionaries the way `git fsck` checks a repository.

The fast mode reads metadata and file sizes only (a store's manifest and seal, every chunk present with its
recorded size; a dictionary's own load checks and its method's contract); `deep` also decodes every chunk (so its
crc32c checksum is tested) and scans every value for NaN and infinities. Problems are collected, not raised: one report lists them all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import C2MFError
from ..progress import ProgressFn, no_progress
from ..artifacts.store import ARRAYS, ActivationStore, check_store, chunk_key, group_name, planned_unit_names


@dataclass
class VerifyReport:
    path: str
    kind: str  # "activation store", "dictionary" or "unknown"
    deep: bool
    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)  # what was looked at: chunks, bytes, tensors

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify(path: str | Path, *, deep: bool = False, progress: ProgressFn = no_progress) -> VerifyReport:
    """Check one store (a folder with zarr.json) or dictionary (a file); never raises for what it finds."""
    p = Path(path).expanduser()
    if (p / "zarr.json").is_file():
        return _verify_store(p, deep, progress)
    if p.is_file():
        return _verify_dictionary(p, deep)
    what = "does not exist" if not p.exists() else "is a folder but not an activation store (no zarr.json)"
    return VerifyReport(str(p), "unknown", deep, [f"{str(p)!r} {what}"])


def _verify_store(p: Path, deep: bool, progress: ProgressFn) -> VerifyReport:
    report = VerifyReport(str(p), "activation store", deep)
    try:
        store = ActivationStore.open(p, require_complete=False, check=False)
    except C2MFError as e:
        report.problems.append(str(e))
        return report
    attrs = store.info
    if attrs.get("complete") is not True:
        done = store._n_units_done()
        total = len(planned_unit_names(attrs))
        report.problems.append(f"incomplete: {done} of {total} units done; rerun the same `c2mf extract` command "
                               "(every shard of it) to resume and finalize it")
        return report
    report.problems.extend(check_store(p, attrs))
    manifest = attrs.get("manifest") or {}
    arrays = manifest.get("arrays", {}) if isinstance(manifest, dict) else {}
    report.checked["chunk_files"] = sum(len(a.get("chunk_bytes", {})) for a in arrays.values())
    report.checked["bytes"] = sum(sum(a.get("chunk_bytes", {}).values()) for a in arrays.values())
    if not deep or report.problems:  # a store whose metadata is wrong cannot be decoded meaningfully
        return report
    advance = progress(f"verify {p.name}", report.checked["chunk_files"])
    decoded = 0
    for y in range(len(store.classes)):
        g = group_name(y)
        for name in ARRAYS:
            arr = store._group(y)[name]
            step = int(arr.chunks[0])
            for i in range(-(-arr.shape[0] // step)):
                where = f"chunk {chunk_key(i, arr.ndim)} of {g}/{name} (class {store.classes[y]!r})"
                try:
                    values = np.asarray(arr[i * step : (i + 1) * step])
                except Exception as e:  # zarr raises ValueError for a bad checksum, others for bad zstd frames
                    why = "fails its checksum" if "checksum" in str(e).lower() else f"cannot be decoded ({e})"
                    report.problems.append(f"{where} {why}")
                else:
                    decoded += 1
                    if values.dtype.kind == "f" and not np.isfinite(values).all():
                        bad = int((~np.isfinite(values)).sum())
                        report.problems.append(f"{where} holds {bad} NaN or infinite value(s)")
                advance(1)
    report.checked["chunks_decoded"] = decoded
    return report


def _verify_dictionary(p: Path, deep: bool) -> VerifyReport:
    from ..methods import load_dictionary

    report = VerifyReport(str(p), "dictionary", deep)
    try:
        # what every reader checks: format, version, tensors' sha256, float32, finite, the method's contract
        d = load_dictionary(p)
    except C2MFError as e:
        report.problems.append(str(e))
        return report
    report.checked["tensors"] = len(d.tensors)
    return report
