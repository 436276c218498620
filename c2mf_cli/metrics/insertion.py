"""Concept-level insertion and deletion curves (Petsiuk et al. 2018, on concepts; docs/metrics.md, "Insertion / deletion").

Notation: U (n, P, k) codes, `head(U) -> logits`, c the target class of each image. Given a ranking of the k
concepts per image (most important first), deletion sets the codes of the top-t concepts to zero for
t = 0..k, insertion keeps only the top-t concepts. Step t sits at x = t / k on the unit interval, so curves of
dictionaries of different sizes share one axis. At each step we record the softmax probability of class c and
the accuracy (argmax == label). Good concepts give high insertion AUC and low deletion AUC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import C2MFError
from ._common import (Batch, Head, Settings, State, batch_ends, call_head, check_codes, chunk_size, head_ends,
                      trapezoid_auc)
from .importance import DEFAULT_RANKINGS, RANKINGS, ranking


@dataclass(frozen=True)
class CurveResult:
    """One curve family (insertion or deletion) over a set of images.

    image_prob: (n, k+1) probability of the target class at each step, per image. image_correct: (n, k+1)
    whether the prediction equals the label. The properties average over images; `concat` pools image sets
    (e.g. classes evaluated one after another).
    """

    image_prob: np.ndarray
    image_correct: np.ndarray

    @property
    def x(self) -> np.ndarray:
        """Fractions of concepts inserted/deleted, (k+1,)."""
        return np.linspace(0.0, 1.0, self.image_prob.shape[1])

    @property
    def prob(self) -> np.ndarray:
        return self.image_prob.mean(axis=0)

    @property
    def accuracy(self) -> np.ndarray:
        return self.image_correct.mean(axis=0)

    @property
    def prob_auc(self) -> float:
        return trapezoid_auc(self.prob)

    @property
    def accuracy_auc(self) -> float:
        return trapezoid_auc(self.accuracy)

    @property
    def image_prob_auc(self) -> np.ndarray:
        return np.trapezoid(self.image_prob, dx=1.0 / (self.image_prob.shape[1] - 1), axis=1)

    @staticmethod
    def concat(parts: "list[CurveResult]") -> "CurveResult":
        return CurveResult(
            np.concatenate([p.image_prob for p in parts]), np.concatenate([p.image_correct for p in parts])
        )

    def to_dict(self) -> dict:
        return curve_summary(self.prob, self.accuracy, int(self.image_prob.shape[0]))


def curve_summary(prob: np.ndarray, accuracy: np.ndarray, n_images: int) -> dict:
    """A curve's JSON entry from its mean probability and accuracy at each step (k+1,) over n_images images."""
    return {
        "x": np.linspace(0.0, 1.0, prob.shape[0]).tolist(),
        "prob": prob.tolist(),
        "accuracy": accuracy.tolist(),
        "prob_auc": trapezoid_auc(prob),
        "accuracy_auc": trapezoid_auc(accuracy),
        "n_images": n_images,
    }


@dataclass(frozen=True)
class InsertionDeletion:
    insertion: CurveResult
    deletion: CurveResult

    def to_dict(self) -> dict:
        return {"insertion": self.insertion.to_dict(), "deletion": self.deletion.to_dict()}

    @staticmethod
    def concat(parts: "list[InsertionDeletion]") -> "InsertionDeletion":
        return InsertionDeletion(
            CurveResult.concat([p.insertion for p in parts]), CurveResult.concat([p.deletion for p in parts])
        )


def step_masks(order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks (m, k+1, k) of insertion and deletion for rankings `order` (m, k).

    rank[i, j] is the position of concept j in image i's ranking; insertion step t keeps rank < t,
    deletion step t keeps rank >= t.
    """
    m, k = order.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(k, device=order.device).expand(m, k))
    t = torch.arange(k + 1, device=order.device)[None, :, None]
    keep_ins = rank[:, None, :] < t
    return keep_ins, ~keep_ins


def _curve(prob: torch.Tensor, correct: torch.Tensor) -> CurveResult:
    return CurveResult(prob.double().cpu().numpy(), correct.cpu().numpy().astype(np.float64))


@torch.no_grad()
def insertion_deletion(
    U: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    order: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    side: torch.Tensor | None = None,
    batch_size: int = 1024,
    ends: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> InsertionDeletion:
    """Insertion and deletion curves of concepts ranked by `order` (n, k), most important first.

    `labels` (n,) decide accuracy (default: the targets, i.e. agreement with the class explained).
    `batch_size` bounds the rows (image x step) fed to the head at once. `side`: optional per-image input the
    head also needs (see `_common.Head`). `ends`: the logits with every concept and with none
    (`_common.head_ends`) when the caller has them; the two curves share them (insertion's last step is
    deletion's first, and the other way round), so only the k - 1 inner steps of each are fed to the head.
    """
    U, targets = check_codes(U, targets)
    n, _, k = U.shape
    order = torch.as_tensor(order, device=U.device).long()
    if order.shape != (n, k):
        raise C2MFError(f"ranking has shape {tuple(order.shape)}, expected (images, concepts) = {(n, k)}")
    labels = targets if labels is None else torch.as_tensor(labels, device=U.device).long().reshape(-1)
    if k == 0 or n == 0:
        raise C2MFError("insertion/deletion needs at least one image and one concept")
    full, none = head_ends(U, head, side, batch_size) if ends is None else ends
    out: dict[str, tuple[list, list]] = {"insertion": ([], []), "deletion": ([], [])}
    inner = k - 1
    step = chunk_size(2 * inner, batch_size)
    for s in range(0, n, step):
        u, t, lab = U[s : s + step], targets[s : s + step], labels[s : s + step]
        m = u.shape[0]
        keep_ins, keep_del = step_masks(order[s : s + step])
        keep = torch.cat([keep_ins[:, 1:k], keep_del[:, 1:k]], dim=1)  # (m, 2 (k - 1), k)
        if inner:
            X = u[:, None] * keep[:, :, None, :].to(u.dtype)  # (m, 2 (k - 1), P, k)
            rows = torch.arange(m, device=U.device).repeat_interleave(2 * inner)
            sd = None if side is None else side[s : s + step]
            mid = call_head(head, X.reshape(m * 2 * inner, *u.shape[1:]), sd, rows).reshape(m, 2 * inner, -1)
        else:
            mid = full.new_zeros((m, 0, full.shape[1]))
        f, z = full[s : s + step, None].to(mid.dtype), none[s : s + step, None].to(mid.dtype)
        for name, logits in (("insertion", torch.cat([z, mid[:, :inner], f], 1)),
                             ("deletion", torch.cat([f, mid[:, inner:], z], 1))):
            probs = torch.softmax(logits.float(), dim=-1)
            out[name][0].append(probs.gather(2, t[:, None, None].expand(m, k + 1, 1)).squeeze(2))
            out[name][1].append(logits.argmax(dim=-1) == lab[:, None])
    return InsertionDeletion(
        insertion=_curve(torch.cat(out["insertion"][0]), torch.cat(out["insertion"][1])),
        deletion=_curve(torch.cat(out["deletion"][0]), torch.cat(out["deletion"][1])),
    )


class InsertionDeletionMetric:
    """Evaluate's concept insertion/deletion curves, concepts ranked by each importance the batch carries."""

    def __init__(self, W: torch.Tensor, meta: dict[str, Any], settings: Settings) -> None:
        self._batch_size = settings.batch_size
        self._curves: dict[str, list[InsertionDeletion]] = {}
        # the rankings the importance metric may hand over, in its order (fixed: the state's keys)
        self._names = [r for r in RANKINGS if r in getattr(settings, "rankings", DEFAULT_RANKINGS)]
        self._k = int(W.shape[-2])

    def update(self, batch: Batch) -> None:
        importances = batch.shared.get("importance")
        if batch.split != "test" or not importances:
            return
        targets = batch.model_logits.argmax(1)
        for name, imp in importances.items():
            self._curves.setdefault(name, []).append(insertion_deletion(
                batch.U, batch.head, targets, ranking(imp), labels=batch.labels, side=batch.side,
                batch_size=self._batch_size, ends=batch_ends(batch, self._batch_size)))

    def state(self, n_classes: int) -> State:
        """Per ranking: the images seen and, per curve and step, the sums of the target's probability and of
        the correct predictions."""
        sums: dict[str, torch.Tensor] = {}
        for name in self._names:
            parts = self._curves.get(name, [])
            sums[f"{name}.images"] = torch.tensor([sum(p.insertion.image_prob.shape[0] for p in parts)],
                                                  dtype=torch.int64)
            for curve in ("insertion", "deletion"):
                for key, field in (("prob", "image_prob"), ("correct", "image_correct")):
                    total = sum((getattr(getattr(p, curve), field).sum(0) for p in parts), np.zeros(self._k + 1))
                    sums[f"{name}.{curve}.{key}"] = torch.as_tensor(total, dtype=torch.float64)
        return State(sums)

    def result(self, classes: Sequence[str], state: State | None = None) -> dict[str, Any]:
        st = (self.state(len(classes)) if state is None else state).sums
        out = {}
        for name in self._names:
            n = int(st[f"{name}.images"])
            if n:
                out[name] = {curve: curve_summary((st[f"{name}.{curve}.prob"] / n).numpy(),
                                                  (st[f"{name}.{curve}.correct"] / n).numpy(), n)
                             for curve in ("insertion", "deletion")}
        return {"insertion_deletion": out} if out else {}
