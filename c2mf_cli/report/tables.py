"""The paper's tables, described once: columns, labels, arrows and number formatting.

`c2mf evaluate` prints them in the terminal (rich) and `c2mf report` draws them in HTML, both from the
`TableSpec`s here, so a column added, renamed or re-formatted changes both. One row per method, one column
per measure; `better` says which direction wins (the arrow in the header, the bold best value in HTML).

A column reads its value by a dotted path into each method's record of evaluation.json (or a function); a
missing value shows as a dash, so an older or partial evaluation still renders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

Better = Literal["high", "low", "abs_low"] | None
DASH = "\u2013"


def is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def fmt(x: Any) -> str:
    """One value as a reader wants it (plain text): 3 decimals in the usual range, thousands grouped, tiny
    values in e-notation, a true minus sign, a dash for missing or non-finite values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        a = abs(x)
        if a == 0:
            return "0"
        if a >= 1000:
            s = f"{x:,.0f}"
        elif a >= 100:
            s = f"{x:.1f}"
        elif a >= 1e-3:
            s = f"{x:.3f}"
        else:
            s = f"{x:.1e}"
        return s.replace("-", "\u2212", 1) if x < 0 else s
    if isinstance(x, list):
        return summarise_list(x)
    return str(x)


def summarise_list(v: list) -> str:
    if all(is_num(e) for e in v):
        if len(v) <= 6:
            return ", ".join(fmt(e) for e in v)
        return f"{len(v)} values, {fmt(min(v))} .. {fmt(max(v))}"
    if all(isinstance(e, str) for e in v) and len(v) <= 8:
        return ", ".join(v)
    return f"{len(v)} items"


def get(d: Any, path: str) -> Any:
    """d["a"]["b"] for path "a.b"; None where any step is missing."""
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


@dataclass(frozen=True)
class Col:
    """One column: a dotted path into each row's record (or a function of it), optionally with its std beside it.

    Attributes:
        title: the header; `group` is a header spanning consecutive columns of the same group.
        better: "high", "low", "abs_low" (closest to 0) or None (not a contest).
        tip: a longer explanation (HTML tooltip).
        arrow: show the direction arrow in the header.
        needs_decision: the measure only means something when the reconstruction keeps the model's decision
            (insertion / deletion): a method whose h(UW) disagrees with the model is kept out of its contest.
    """

    title: str
    path: str | Callable[[Any], Any]
    better: Better = None
    std: str | Callable[[Any], Any] | None = None
    tip: str = ""
    group: str = ""
    arrow: bool = True
    needs_decision: bool = False

    def value(self, rec: Any) -> Any:
        return self.path(rec) if callable(self.path) else get(rec, self.path)

    def spread(self, rec: Any) -> Any:
        if self.std is None:
            return None
        return self.std(rec) if callable(self.std) else get(rec, self.std)

    def header(self) -> str:
        return self.title + (arrow(self.better) if self.arrow else "")

    def text(self, rec: Any) -> str:
        """The cell as plain text: the value, and its std after a ± when the column has one."""
        v, sd = self.value(rec), self.spread(rec)
        s = fmt(v)
        return f"{s} \u00b1 {fmt(sd)}" if is_num(v) and is_num(sd) else s


def arrow(better: Better) -> str:
    return {"high": " \u2191", "low": " \u2193", "abs_low": " |\u2193|"}.get(better or "", "")


def best_rows(values: list[Any], better: Better) -> set[int]:
    """Indices of the best values (ties all win); none when fewer than two numbers or all are equal."""
    nums = [(i, float(v)) for i, v in enumerate(values) if is_num(v)]
    if better is None or len(nums) < 2:
        return set()
    key = {"high": lambda v: -v, "low": lambda v: v, "abs_low": abs}[better]
    best = min(key(v) for _, v in nums)
    if all(math.isclose(key(v), best, rel_tol=1e-9, abs_tol=1e-12) for _, v in nums):
        return set()  # all equal: nothing stands out
    return {i for i, v in nums if math.isclose(key(v), best, rel_tol=1e-9, abs_tol=1e-12)}


@dataclass(frozen=True)
class TableSpec:
    """A table of methods as rows: its title (terminal and HTML heading), columns and caption (HTML)."""

    key: str
    title: str
    cols: tuple[Col, ...]
    caption: str = ""

    def present(self, records: Sequence[Any]) -> list[Col]:
        """The columns at least one record has a value for."""
        return [c for c in self.cols if any(c.value(r) is not None for r in records)]


# Below this agreement with the model's own prediction, h(UW) is not the model any more: its insertion /
# deletion curves measure the reconstruction's behaviour, not the model's reasons.
AGREEMENT_FLOOR = 0.5


def keeps_decision(rec: Any) -> bool:
    """False when the method's reconstruction does not keep the model's decision: evaluate's own verdict
    (`preserves_decision`) when recorded, else agreement below AGREEMENT_FLOOR; unknown: True."""
    if isinstance(rec, dict) and isinstance(rec.get("preserves_decision"), bool):
        return rec["preserves_decision"]
    a = get(rec, "reconstruction.agreement.mean")
    return not (is_num(a) and a < AGREEMENT_FLOOR)


def method_label(r: dict, i: int) -> str:
    """A method's row label: its name and k ("c2mf k=10"; per-class dictionaries "craft k=5/class")."""
    name = next((str(r[k]) for k in ("name", "method", "source", "label", "id") if isinstance(r.get(k), (str, int))),
                f"#{i}")
    k = r.get("k")
    if k is None or f"k={k}" in name:
        return name
    return f"{name} k={k}" + ("/class" if r.get("per_class_dictionary") else "")


# ---------------------------------------------------------------------------------------------- the paper's tables

MSE = "MSE(A, UW)"
REL = "relative error \u2016A \u2212 UW\u2016 / \u2016A\u2016"
RANKING_NAMES = {"gradcam": "Grad-CAM", "ig": "IG", "sobol": "Sobol"}

SIMILARITY = TableSpec("similarity", "Concept similarity", (
    Col("|Pearson r|", "similarity.pearson_mean", "low", std="similarity.pearson_std",
        tip="mean |Pearson r| over pairs of dictionary rows (paper: sparsity)"),
    Col("|cosine|", "similarity.cosine_mean", "low", std="similarity.cosine_std"),
    Col("pairs", "similarity.n_pairs"),
    Col("degenerate rows", "similarity.n_degenerate"),
), "Mean \u00b1 std over pairs of concepts of |Pearson r| and |cosine| between dictionary rows (the paper's "
   "\u201csparsity\u201d); lower means more distinct concepts. PCA is 0 by construction.")

RECONSTRUCTION = TableSpec("reconstruction", "Per-class reconstruction", (
    Col("accuracy", "reconstruction.accuracy.mean", "high", std="reconstruction.accuracy.std",
        tip="accuracy of h(UW) against the labels, mean over classes"),
    Col("agreement", "reconstruction.agreement.mean", "high", std="reconstruction.agreement.std",
        tip="agreement of h(UW) with the model's prediction, mean over classes"),
    Col("test images", "reconstruction.n_images"),
), "Test activations projected on each dictionary and fed through the rest of the model, h(UW): accuracy "
   "against the labels and agreement with the model's own prediction, mean \u00b1 std over classes.")

FIT = TableSpec("fit", "Consistency and fit", (
    Col("train", "consistency.train_mse", "low", group=MSE),
    Col("test", "consistency.test_mse", "low", group=MSE),
    Col("train \u2212 test", "consistency.difference", "abs_low", group=MSE),
    Col("train", "fit.train.relative_error", "low", group=REL),
    Col("test", "fit.test.relative_error", "low", group=REL),
    Col("train", "fit.train.r2", "high", group="R\u00b2"),
    Col("test", "fit.test.r2", "high", group="R\u00b2"),
    Col("test rows", "fit.test.n_rows", group=" "),
), "Reconstruction of the activations on train and held-out test rows; a small |train \u2212 test| means the "
   "dictionary generalises.")

IMPORTANCE = TableSpec("importance", "Concept importance", (
    Col("target", "importance.target"),
    Col("mean |error|", "importance.ig_completeness.mean_abs_error", "low", group="IG completeness"),
    Col("max |error|", "importance.ig_completeness.max_abs_error", "low", group="IG completeness"),
    Col("mean relative error", "importance.ig_completeness.mean_relative_error", "low", group="IG completeness"),
    Col("max relative error", "importance.ig_completeness.max_relative_error", "low", group="IG completeness"),
    Col("mean |logit(U) \u2212 logit(0)|", "importance.ig_completeness.mean_abs_logit_gap", group="IG completeness"),
), "Integrated Gradients from U = 0: completeness says the attributions sum to logit(U) \u2212 logit(0).")

OOD = TableSpec("ood", "Crops as out-of-distribution inputs", (
    Col("AUROC", "auroc", "high"), Col("FPR @ 95 % TPR", "fpr_at_95_tpr", "low"),
    Col("AUPR-In", "aupr_in", "high"), Col("AUPR-Out", "aupr_out", "high"),
    Col("mean conf. images", "histograms.mean_in"), Col("mean conf. crops", "histograms.mean_out"),
    Col("gap", "histograms.mean_gap"), Col("images", "n_in"), Col("crops", "n_out"),
), "Max-softmax confidence of whole test images (in-distribution) against crops resized to the input size: how "
   "far the crops CRAFT factorises are from what the model was trained on.")

CLUSTERING_CAPTION = ("CRAFT-style: k concepts per class pooled and clustered into K shared concepts, against shared "
                      "dictionaries of K concepts; per-class reconstruction accuracy, mean \u00b1 std over classes.")


def insertion(methods: Sequence[dict]) -> TableSpec:
    """Insertion / deletion AUCs for every ranking the evaluation used (Grad-CAM, IG ...)."""
    rankings: list[str] = []
    for m in methods:
        rankings += [r for r in (m.get("insertion_deletion") or {}) if r not in rankings]
    cols = []
    for r in rankings:
        base, name = f"insertion_deletion.{r}", RANKING_NAMES.get(r, r)
        for what, title in (("prob", "probability"), ("accuracy", "accuracy")):
            g = f"{name}: {title}"
            cols += [Col("insertion", f"{base}.insertion.{what}_auc", "high", group=g, needs_decision=True),
                     Col("deletion", f"{base}.deletion.{what}_auc", "low", group=g, needs_decision=True)]
    if rankings:
        cols.append(Col("images", f"insertion_deletion.{rankings[0]}.insertion.n_images", group=" "))
    return TableSpec("insertion", "Insertion / deletion", tuple(cols),
                     "Area under the curve as concepts are inserted (from none) or deleted (from all) in order of "
                     "importance: probability of the class and accuracy. High insertion and low deletion are good.")


SUMMARY = TableSpec("summary", "At a glance", (
    Col("|Pearson r|", "similarity.pearson_mean", "low"),
    Col("class accuracy", "reconstruction.accuracy.mean", "high", std="reconstruction.accuracy.std"),
    Col("agreement", "reconstruction.agreement.mean", "high"),
    Col("train \u2212 test MSE", "consistency.difference", "abs_low"),
    Col("test rel. error", "fit.test.relative_error", "low"),
    Col("insertion AUC", "insertion_deletion.gradcam.insertion.prob_auc", "high",
        tip="probability of the class, concepts ranked by Grad-CAM", needs_decision=True),
    Col("deletion AUC", "insertion_deletion.gradcam.deletion.prob_auc", "low",
        tip="probability of the class, concepts ranked by Grad-CAM", needs_decision=True),
), "One row per method; \u2191 higher is better, \u2193 lower, |\u2193| closest to 0; the best of each column in "
   "bold. Accuracy and agreement: h(UW) on the test images, mean over classes (\u00b1 std). Insertion / deletion: "
   "area under the probability curve, concepts ranked by Grad-CAM.")


def method_tables(methods: Sequence[dict]) -> list[TableSpec]:
    """The per-method tables of an evaluation, in reading order (IG completeness only when it was measured)."""
    specs = [SIMILARITY, RECONSTRUCTION, FIT, insertion(methods)]
    if any(get(m, "importance.ig_completeness") for m in methods):
        specs.append(IMPORTANCE)
    return specs


def used_paths(cols: Iterable[Col]) -> set[str]:
    """The dotted paths the columns read (so that "Other measures" shows only the rest)."""
    return {p for c in cols for p in (c.path, c.std) if isinstance(p, str)}


def clustering(records: Sequence[dict]) -> TableSpec:
    """The multi-class clustering ablation: rows are K values, the clustered source against shared dictionaries."""
    shared: list[str] = []
    for r in records:
        shared += [n for n in (r.get("shared") or {}) if n not in shared]
    g = "shared dictionaries with K concepts"
    cols = [Col("source", "source"),
            Col("clustered per class", "clustered_accuracy.mean", "high", std="clustered_accuracy.std",
                group="accuracy")]
    cols += [Col(n, _shared(n, "mean"), "high", std=_shared(n, "std"), group=g) for n in shared]
    return TableSpec("clustering", "Multi-class clustering ablation", tuple(cols), CLUSTERING_CAPTION)


def _shared(name: str, what: str) -> Callable[[dict], Any]:
    return lambda r: ((r.get("shared") or {}).get(name) or {}).get(what)
