"""Row sources: what factorization methods learn from.

Notation: for class y, `A(y)` has one row per spatial position of every image (or one row per crop for a crop
store) and `c` columns (channels). A source hands these rows out per class, whole or in mini-batches, as
float32 numpy arrays, so that a method never needs to know whether they come from memory or a Zarr store.
"""

from __future__ import annotations

from typing import Any, Iterator, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import C2MFError

Mode = Literal["full", "crops"]


@runtime_checkable
class RowSource(Protocol):
    """Per-class activation rows. `mode` is "full" (whole-image positions) or "crops" (pooled crops)."""

    classes: list[str]
    n_features: int
    mode: Mode
    info: dict[str, Any]  # provenance (the store's attributes, or {} for in-memory data)

    def n_rows(self, y: int) -> int: ...

    def load(self, y: int) -> np.ndarray:
        """All rows of class `y`, float32, shape (n_rows(y), n_features)."""
        ...

    def batches(self, y: int, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
        """Rows of class `y` in float32 batches of at most `batch_size` rows (shuffled blocks when asked)."""
        ...


def rebatch(blocks: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Row blocks (e.g. one per chunk read) regrouped into batches of exactly `batch_size` rows (the last one
    shorter), holding at most one block plus one batch."""
    pending: list[np.ndarray] = []
    n_pending = 0
    for rows in blocks:
        pending.append(rows)
        n_pending += rows.shape[0]
        while n_pending >= batch_size:
            block = np.concatenate(pending, 0) if len(pending) > 1 else pending[0]
            yield block[:batch_size]
            rest = block[batch_size:]
            pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
    if n_pending:
        yield np.concatenate(pending, 0) if len(pending) > 1 else pending[0]


# A source that several processes can share also offers `shard(index, count) -> RowSource`: the rows of
# process `index` of `count`, disjoint from the other shards and together all of them (c2mf_cli.distributed).


class ArraySource:
    """A `RowSource` over in-memory arrays, one (n_y, c) array per class (tests, planted data, small stores)."""

    def __init__(
        self,
        arrays: Sequence[np.ndarray],
        classes: Sequence[str] | None = None,
        mode: Mode = "full",
        info: dict[str, Any] | None = None,
    ) -> None:
        if not arrays:
            raise C2MFError("no classes given: a source needs at least one class of activations")
        self._arrays = [np.ascontiguousarray(np.asarray(a, dtype=np.float32)) for a in arrays]
        widths = {a.shape[1] if a.ndim == 2 else -1 for a in self._arrays}
        if len(widths) != 1 or -1 in widths:
            raise C2MFError(f"every class must be a 2-D (rows, channels) array of one width, got {sorted(widths)}")
        self.classes = list(classes) if classes is not None else [str(i) for i in range(len(self._arrays))]
        if len(self.classes) != len(self._arrays):
            raise C2MFError(f"{len(self.classes)} class names for {len(self._arrays)} arrays")
        self.n_features = widths.pop()
        self.mode = mode
        self.info = dict(info or {})

    def n_rows(self, y: int) -> int:
        return self._arrays[y].shape[0]

    def shard(self, index: int, count: int) -> "ArraySource":
        """Rows of process `index` of `count`: a contiguous block of every class (views, no copy)."""
        parts = [a[a.shape[0] * index // count : a.shape[0] * (index + 1) // count] for a in self._arrays]
        return ArraySource(parts, self.classes, self.mode, self.info)

    def load(self, y: int) -> np.ndarray:
        return self._arrays[y]

    def batches(self, y: int, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
        a = self._arrays[y]
        if shuffle:
            order = np.random.default_rng(seed).permutation(a.shape[0])
            for s in range(0, a.shape[0], batch_size):
                yield a[np.sort(order[s : s + batch_size])]
        else:
            for s in range(0, a.shape[0], batch_size):
                yield a[s : s + batch_size]
