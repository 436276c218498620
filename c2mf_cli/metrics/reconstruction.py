"""Reconstruction metrics (docs/metrics.md: "Per-class reconstruction accuracy", "Consistency / fit",
"Planted recovery").

Notation: A (rows, c) activations, A_hat = U W their reconstruction. Per-class reconstruction accuracy feeds
h(U W) and compares its prediction with the labels and with the model's own prediction on A. Consistency is
MSE(A, U W) on train and on test and their difference (train - test). Fit quality is the relative error
||A - A_hat||_F / ||A||_F and R^2 = 1 - SS_res / SS_tot with SS_tot around the per-channel mean.

Stores are read class by class, so MSE and fit quality are accumulated (`FitAccumulator`) in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import C2MFError
from ._common import Batch, Settings, State, as_numpy


def per_class_accuracy(
    recon_logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    model_logits: np.ndarray | torch.Tensor | None = None,
    groups: np.ndarray | torch.Tensor | None = None,
) -> dict:
    """Accuracy of h(U W) for each class and its mean and std over classes.

    recon_logits (n, n_outputs): logits of the reconstructions; labels (n,): true output index; model_logits
    (n, n_outputs): the model's logits on the original activations (for the agreement score); groups (n,): the
    class each image belongs to (default: its label). Returns `accuracy` (vs labels) and, when model logits are
    given, `agreement` (vs the model's prediction), each {mean, std, per_class: {group: value}}; std is the
    population std over classes. Also `n_images`.
    """
    pred = as_numpy(recon_logits).argmax(axis=1)
    model_pred = as_numpy(model_logits).argmax(axis=1) if model_logits is not None else None
    return per_class_accuracy_from_predictions(pred, labels, model_pred, groups)


def per_class_accuracy_from_predictions(
    pred: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    model_pred: np.ndarray | torch.Tensor | None = None,
    groups: np.ndarray | torch.Tensor | None = None,
) -> dict:
    """`per_class_accuracy` from predicted output indices (n,) instead of logits."""
    pred = as_numpy(pred).astype(np.int64).reshape(-1)
    labels = as_numpy(labels).astype(np.int64).reshape(-1)
    if pred.shape[0] != labels.shape[0]:
        raise C2MFError(f"{pred.shape[0]} reconstructions for {labels.shape[0]} labels")
    groups = labels if groups is None else as_numpy(groups).reshape(-1)
    targets = {"accuracy": labels}
    if model_pred is not None:
        targets["agreement"] = as_numpy(model_pred).astype(np.int64).reshape(-1)
    keys = np.unique(groups)
    images = {str(g): int((groups == g).sum()) for g in keys}
    hits = {name: {str(g): int((pred[groups == g] == ref[groups == g]).sum()) for g in keys}
            for name, ref in targets.items()}
    return per_class_accuracy_from_counts(images, hits)


def per_class_accuracy_from_counts(images: dict[str, int], hits: dict[str, dict[str, int]]) -> dict:
    """`per_class_accuracy` from counts: images per class, and per measure ("accuracy", "agreement") the images
    of each class whose prediction hit its target. Counts add across processes; the fractions are taken here."""
    out: dict = {"n_images": int(sum(images.values()))}
    for name, per_hits in hits.items():
        per = {g: per_hits[g] / n for g, n in images.items()}
        vals = np.array(list(per.values()), dtype=np.float64)
        out[name] = {
            "mean": float(vals.mean()) if vals.size else math.nan,
            "std": float(vals.std()) if vals.size else math.nan,
            "per_class": per,
        }
    return out


@dataclass
class FitAccumulator:
    """Streams (A, A_hat) blocks and returns MSE, relative error and R^2 over all of them.

    MSE is the mean over all entries; R^2 uses the per-channel mean of A over every block seen, computed from
    running sums (float64 across blocks, so cancellation is harmless at these sizes; a torch block is reduced in
    its own float32 first, which leaves R^2 within about 1e-5 of an all-float64 sum).
    """

    n_rows: int = 0
    sse: float = 0.0
    sum_sq: float = 0.0
    col_sum: np.ndarray | None = field(default=None, repr=False)

    def update(self, A: np.ndarray | torch.Tensor, A_hat: np.ndarray | torch.Tensor) -> None:
        if tuple(A.shape) != tuple(A_hat.shape) or len(A.shape) != 2:
            raise C2MFError(f"activations {tuple(A.shape)} and reconstruction {tuple(A_hat.shape)} must be equal 2-D")
        if isinstance(A, torch.Tensor) and isinstance(A_hat, torch.Tensor):
            # float64 copies of the rows cost twice the time; torch's cascade sums keep float32 to ~1e-7 relative.
            # One scratch block for the squares: the pass is memory-bound
            A = A.detach()
            R = A - A_hat.detach()
            sse = float(R.square_().sum())
            sum_sq, col = float(torch.mul(A, A, out=R).sum()), A.sum(0).double().cpu().numpy()
        else:
            A64, Ah = as_numpy(A, np.float64), as_numpy(A_hat, np.float64)
            sse, sum_sq, col = float(((A64 - Ah) ** 2).sum()), float((A64**2).sum()), A64.sum(0)
        self.n_rows += int(A.shape[0])
        self.sse += sse
        self.sum_sq += sum_sq
        self.col_sum = col if self.col_sum is None else self.col_sum + col

    def to_tensors(self, n_features: int) -> dict[str, torch.Tensor]:
        """The running sums as float64 tensors (zeros when nothing was seen); they add across processes."""
        col = torch.zeros(n_features, dtype=torch.float64) if self.col_sum is None else \
            torch.as_tensor(self.col_sum, dtype=torch.float64)
        return {"n_rows": torch.tensor([self.n_rows], dtype=torch.float64),
                "sse": torch.tensor([self.sse], dtype=torch.float64),
                "sum_sq": torch.tensor([self.sum_sq], dtype=torch.float64), "col_sum": col}

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor]) -> "FitAccumulator":
        """The accumulator `to_tensors` describes (e.g. after summing those of several processes)."""
        n = int(round(float(t["n_rows"])))
        return FitAccumulator(n, float(t["sse"]), float(t["sum_sq"]), t["col_sum"].cpu().numpy() if n else None)

    def result(self) -> dict:
        """mse, relative_error, r2, n_rows (NaN when nothing was seen)."""
        if self.n_rows == 0 or self.col_sum is None:
            return {"mse": math.nan, "relative_error": math.nan, "r2": math.nan, "n_rows": 0}
        n_entries = self.n_rows * self.col_sum.shape[0]
        ss_tot = self.sum_sq - float((self.col_sum**2).sum()) / self.n_rows
        return {
            "mse": self.sse / n_entries,
            "relative_error": math.sqrt(self.sse / self.sum_sq) if self.sum_sq > 0 else math.nan,
            "r2": 1.0 - self.sse / ss_tot if ss_tot > 0 else math.nan,
            "n_rows": self.n_rows,
        }


def fit_quality(A: np.ndarray | torch.Tensor, A_hat: np.ndarray | torch.Tensor) -> dict:
    """MSE, relative error and R^2 of one (rows, c) reconstruction."""
    acc = FitAccumulator()
    acc.update(A, A_hat)
    return acc.result()


def consistency(train_mse: float, test_mse: float) -> dict:
    """Train and test MSE and their difference (train - test); a smaller |difference| is more consistent."""
    return {"train_mse": train_mse, "test_mse": test_mse, "difference": train_mse - test_mse}


class ReconstructionMetric:
    """Evaluate's per-class reconstruction accuracy and agreement of h(U W) on the test images."""

    def __init__(self, W: torch.Tensor, meta: dict[str, Any], settings: Settings) -> None:
        self._recon: list[torch.Tensor] = []
        self._model: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._groups: list[torch.Tensor] = []

    def update(self, batch: Batch) -> None:
        if batch.split != "test" or batch.recon_logits is None:
            return
        self._recon.append(batch.recon_logits.detach().cpu())
        self._model.append(batch.model_logits.detach().cpu())
        self._labels.append(batch.labels.detach().cpu())
        self._groups.append(batch.group.detach().cpu().long())

    def state(self, n_classes: int) -> State:
        """Per store class: images, hits against the labels (accuracy), hits against the model (agreement)."""
        sums = {key: torch.zeros(n_classes, dtype=torch.int64) for key in ("images", "accuracy", "agreement")}
        if self._recon:
            pred, groups = torch.cat(self._recon).argmax(1), torch.cat(self._groups)
            hits = {"images": torch.ones_like(pred, dtype=torch.bool), "accuracy": pred == torch.cat(self._labels),
                    "agreement": pred == torch.cat(self._model).argmax(1)}
            for key, hit in hits.items():
                sums[key] += torch.bincount(groups[hit], minlength=n_classes)
        return State(sums)

    def result(self, classes: Sequence[str], state: State | None = None) -> dict[str, Any]:
        st = (self.state(len(classes)) if state is None else state).sums
        seen = [y for y in range(len(classes)) if int(st["images"][y]) > 0]
        if not seen:
            return {}
        images = {classes[y]: int(st["images"][y]) for y in seen}
        hits = {key: {classes[y]: int(st[key][y]) for y in seen} for key in ("accuracy", "agreement")}
        return {"reconstruction": per_class_accuracy_from_counts(images, hits)}


class FitMetric:
    """Evaluate's fit quality (MSE, relative error, R^2) on train and test rows, and their consistency."""

    def __init__(self, W: torch.Tensor, meta: dict[str, Any], settings: Settings) -> None:
        self._acc = {"train": FitAccumulator(), "test": FitAccumulator()}
        self._n_features = int(W.shape[-1])

    def update(self, batch: Batch) -> None:
        self._acc[batch.split].update(batch.rows.reshape(-1, batch.rows.shape[-1]), batch.A_hat)

    def state(self, n_classes: int) -> State:
        """The running sums of each split (rows, squared error, squared norm, column sums): they add."""
        return State({f"{split}.{k}": t for split, acc in self._acc.items()
                      for k, t in acc.to_tensors(self._n_features).items()})

    def result(self, classes: Sequence[str], state: State | None = None) -> dict[str, Any]:
        st = (self.state(len(classes)) if state is None else state).sums
        train, test = (FitAccumulator.from_tensors({k: st[f"{split}.{k}"] for k in ("n_rows", "sse", "sum_sq",
                                                                                        "col_sum")}).result()
                       for split in ("train", "test"))
        return {"consistency": consistency(train["mse"], test["mse"]), "fit": {"train": train, "test": test}}
