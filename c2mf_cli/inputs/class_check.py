"""Catch a missing `--class-index` before it silently turns every label-based number wrong (issue 11).

Without a class index, class folders (sorted by name) become model outputs 0, 1, 2 ...; right for a model
trained on exactly those folders in that order, wrong for any other (a 965-output bird model and 78 species
folders; CIFAR folders in another order). Two signs, each an error that shows the evidence and the fix:

- the model's outputs differ in number from the classes (`check_class_count`, before any image is read);
- on the images computed so far, the model's prediction agrees with the assumed labels far less than it does
  under the best one-to-one relabelling of classes to outputs (`check_label_agreement`, after the first chunk).

`--class-index identity` says "folder i is output i" on purpose and skips both checks; so does an explicit
class-index file (its mapping is the user's statement). A model with random weights has no class meaning to
check against, so it is not checked either.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import C2MFError

IDENTITY = "identity"
FIX = ("give --class-index FILE (a JSON map from each class folder to its model output index), or "
       "--class-index identity if folder number i (in sorted order) really is output i")
# the assumed labels are refused when a relabelling explains the predictions this much better ...
MIN_GAIN = 0.5
# ... on at least this many images (fewer say too little)
MIN_IMAGES = 8


def check_class_count(n_classes: int, n_outputs: int) -> None:
    """Refuse folders taken as outputs 0..n-1 when the model has another number of outputs."""
    if n_classes != n_outputs:
        raise C2MFError(
            f"the model has {n_outputs} outputs but the data has {n_classes} classes: without a class index the "
            f"class folders become outputs 0..{n_classes - 1} in name order, which is almost surely wrong; {FIX}"
        )


def best_relabelling(labels: np.ndarray, predictions: np.ndarray) -> tuple[float, dict[int, int]]:
    """The share of images a one-to-one map label -> output can make right, and that map (Hungarian method)."""
    labels, predictions = np.asarray(labels).reshape(-1), np.asarray(predictions).reshape(-1)
    lab_values, lab_idx = np.unique(labels, return_inverse=True)
    out_values, out_idx = np.unique(predictions, return_inverse=True)
    counts = np.zeros((lab_values.size, out_values.size), dtype=np.int64)
    np.add.at(counts, (lab_idx, out_idx), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    matched = int(counts[rows, cols].sum())
    return matched / max(labels.size, 1), {int(lab_values[r]): int(out_values[c]) for r, c in zip(rows, cols)}


def check_label_agreement(labels: np.ndarray, logits: np.ndarray, class_names: Sequence[str] | None = None,
                          label_names: dict[int, str] | None = None) -> None:
    """Refuse assumed labels that a relabelling of classes to outputs would fit far better.

    labels (n,): the output index each image's class was given; logits (n, n_outputs): the model's logits.
    class_names: the class folder of each label value (label_names maps label -> folder name for the message).
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size < MIN_IMAGES:
        return
    pred = np.asarray(logits).argmax(axis=1)
    assumed = float((pred == labels).mean())
    best, mapping = best_relabelling(labels, pred)
    if best - assumed < MIN_GAIN:
        return
    names = label_names or {}
    moved = [(lab, out) for lab, out in mapping.items() if lab != out]
    examples = "; ".join(f"class {names.get(lab, lab)!r} (taken as output {lab}) is mostly predicted as output {out}"
                         for lab, out in moved[:3])
    raise C2MFError(
        f"the model's predictions agree with the assumed labels on {assumed:.0%} of the first {labels.size} images, "
        f"but relabelling the classes would make {best:.0%} agree ({examples}): the classes are probably not "
        f"outputs 0..n-1 in name order; {FIX}"
    )
