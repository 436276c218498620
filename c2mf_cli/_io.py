"""Atomic file writes and strict JSON: the one way c2mf publishes a file.

A file is written under a temporary name in its own folder, flushed to disk (fsync), renamed over the target
(os.replace: atomic on POSIX) and the folder is flushed too, so that the rename survives a power loss. A reader sees
the old file or the new one, never half of one; a failure while writing leaves the old file and no temporary file.
New files get the mode the umask allows (0644 under umask 022), like any other tool's output on a shared cluster
(tempfile.mkstemp alone would make them 0600). `DISK_ERRORS` are the errno values of a disk that refuses a write.

JSON is strict: NaN and infinities become null (strict JSON has no NaN, and browsers' JSON.parse refuses it),
numpy scalars become numbers, tuples lists, paths strings; anything else is refused rather than written as a repr.
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any, Iterator

import numpy as np


DISK_ERRORS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EFBIG, errno.EPERM})
TMP_SUFFIX = ".tmp"  # a temporary file of `path` is `.NAME.<random>.tmp` in the same folder


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary path next to `path`; when the block ends without error, publish it as `path`.

    For writers that want a file name (safetensors, matplotlib, zipfile). The temporary file exists (empty) when the
    block starts; it is removed whatever happens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
    # os.open with 0o666 lets the kernel apply the umask, as open() does for any other file; the mode it got is
    # set again after the writer, as some writers (safetensors) replace the file with one of mode 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def remove_temporaries(path: str | os.PathLike[str]) -> int:
    """Remove the temporary files that writers of `path` killed mid-write (kill -9, power loss) left beside it;
    returns how many. Call it only when no other process is writing `path`."""
    path = Path(path)
    removed = 0
    for f in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        f.unlink(missing_ok=True)
        removed += 1
    return removed


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_safetensors(path: str | os.PathLike[str], tensors: dict[str, Any], metadata: dict[str, str]) -> Path:
    """Write torch tensors as one .safetensors file atomically; returns the path.

    The file is serialized in memory and written by Python (dictionaries and checkpoints are small), so a full disk
    is an OSError (ENOSPC) like any other write, not safetensors' own error type.
    """
    from safetensors.torch import save

    return write_bytes(path, save(tensors, metadata=metadata))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write `obj` as strict JSON (see `dumps`) to `path` atomically; returns the path."""
    return write_text(path, dumps(obj, indent=indent) + "\n")


def dumps(obj: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    """Strict JSON text of `obj`: NaN/inf are null, numpy scalars numbers; an unknown type raises TypeError."""
    return json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def jsonable(obj: Any) -> Any:
    """A copy of `obj` made of JSON types only: NaN/inf -> None, numpy scalars -> numbers, tuples -> lists,
    sets -> sorted lists, paths -> str, dict keys -> str."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [jsonable(v) for v in sorted(obj)]
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON: {obj!r}")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file written by another library (zarr's chunks) before something publishes it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries, so that a rename in it is on disk. Not possible on Windows."""
    if os.name != "posix":
        return
    try:
        fsync_file(folder)
    except OSError as e:
        # some network file systems do not support fsync on a folder; the rename itself is still atomic there
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def unique_names(names: list[str]) -> list[str]:
    """The names, with a repeat numbered ("pca", "pca #2"): rows, columns and files must be told apart."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out
