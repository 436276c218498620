"""Row sources over a store other than its default (one row per position, grouped by the image's label).

- `rows="pooled"`: one row per image, the mean over its positions (ViT: over its patch tokens), as CRAFT's
  reference pools its crops. A crop store's rows are already one per crop: pooling leaves them as they are.
- `group_by="predicted"`: an image's rows go to the store class the model predicts for it (from the stored
  logits), not to its label: the dictionary of class y then describes what the model takes for y, as the C2MF
  paper's text describes. An image whose prediction is no class of the store is left out (counted in
  `info["left_out"]`).

Both read the store one chunk at a time (memory: a chunk plus a batch), and shard by whole chunk pieces for
distributed fits, like the default source.
"""

from __future__ import annotations

from typing import Any, Iterator, Literal

import numpy as np

from ..errors import UsageError
from .sources import rebatch

RowsKind = Literal["positions", "pooled"]
Grouping = Literal["label", "predicted"]
ROWS = ("positions", "pooled")
GROUPINGS = ("label", "predicted")


class RegroupedRows:
    """`RowSource` over a store with pooled rows and/or grouping by the model's prediction (see the module).

    `store` is an `ActivationStore` (not imported here: the store imports this module when asked for these rows).
    """

    def __init__(self, store: Any, rows: str = "positions", group_by: str = "label",
                 part: tuple[int, int] = (0, 1)) -> None:
        if rows not in ROWS:
            raise UsageError(f"--rows must be positions or pooled, got {rows!r}")
        if group_by not in GROUPINGS:
            raise UsageError(f"--group-by must be label or predicted, got {group_by!r}")
        self._store, self._rows, self._group_by, self._part = store, rows, group_by, part
        self.classes = list(store.classes)
        self.mode = store.mode
        self.n_features = int(store.row_shape[-1])
        self._skip = store.num_prefix_tokens
        positions = int(np.prod(store.row_shape[:-1])) - self._skip if len(store.row_shape) > 1 else 1
        self._per_image = 1 if rows == "pooled" else positions
        self._plan, left_out = self._make_plan()
        if group_by == "predicted" and part[1] == 1:
            empty = [self.classes[y] for y in range(len(self.classes)) if not self._plan[y]]
            if empty:
                raise UsageError(
                    f"grouped by the model's prediction, {len(empty)} of {len(self.classes)} classes get no image "
                    f"(e.g. {', '.join(map(repr, empty[:3]))}: the model predicts them for none of the store's images; "
                    f"{left_out} images are predicted as no class of the store): group by label, or use a store "
                    "whose images the model predicts as its classes")
        self.info = dict(store.describe_source(), rows=rows, group_by=group_by, left_out=left_out)

    def _make_plan(self) -> tuple[list[list[tuple[int, slice, np.ndarray]]], int]:
        """plan[y]: (store class, the chunk's rows, indices in the chunk) of the images whose rows class y gets."""
        store = self._store
        out_to_class = {int(o): y for y, o in enumerate(store.class_indices)}
        plan: list[list[tuple[int, slice, np.ndarray]]] = [[] for _ in self.classes]
        left_out = 0
        for s in range(len(self.classes)):
            valid = store._valid(s)
            step = int(store._group(s)["activations"].chunks[0])
            if self._group_by == "label":
                target = np.where(valid, s, -1)
            else:
                predicted = store._read(s, "logits").argmax(axis=1)
                target = np.array([out_to_class.get(int(o), -1) for o in predicted], dtype=np.int64)
                left_out += int((valid & (target < 0)).sum())
                target = np.where(valid, target, -1)
            for start in range(0, target.shape[0], step):
                t = target[start : start + step]
                for y in np.unique(t[t >= 0]):
                    plan[int(y)].append((s, slice(start, start + step), np.nonzero(t == y)[0]))
        index, count = self._part
        if count > 1:
            flat = [(y, e) for y in range(len(plan)) for e in plan[y]]
            plan = [[] for _ in self.classes]
            for j, (y, e) in enumerate(flat):
                if j % count == index:
                    plan[y].append(e)
        return plan, left_out

    def shard(self, index: int, count: int) -> "RegroupedRows":
        """The rows of shard `index` of `count`: the chunk pieces of all classes dealt round-robin."""
        if not 0 <= index < count:
            raise UsageError(f"shard {index} of {count} does not exist")
        return RegroupedRows(self._store, self._rows, self._group_by, (index, count))

    def n_rows(self, y: int) -> int:
        return sum(len(idx) for _, _, idx in self._plan[y]) * self._per_image

    def _flatten(self, a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32, copy=False)
        if a.ndim == 2:
            return a
        if self._skip and a.ndim == 3:
            a = a[:, self._skip :]
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        return a.mean(axis=1, dtype=np.float32) if self._rows == "pooled" else a.reshape(-1, a.shape[-1])

    def load(self, y: int) -> np.ndarray:
        parts = list(self.batches(y, max(1, self.n_rows(y))))
        return parts[0] if parts else np.zeros((0, self.n_features), dtype=np.float32)

    def batches(self, y: int, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
        """One chunk piece at a time (shuffled pieces and rows when asked), in batches of `batch_size` rows."""
        pieces = list(self._plan[y])
        rng = np.random.default_rng(seed)
        if shuffle:
            pieces = [pieces[i] for i in rng.permutation(len(pieces))]

        def blocks() -> Iterator[np.ndarray]:
            for s, chunk, idx in pieces:
                rows = self._flatten(self._store._read(s, "activations", chunk)[idx])
                yield rows[rng.permutation(rows.shape[0])] if shuffle else rows

        return rebatch(blocks(), batch_size)
