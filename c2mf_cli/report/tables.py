"""The paper's tables, built once: columns, labels, arrows, number formatting and which cells are bold.

`evaluation_tables(result)` builds the evaluation's tables (`Built`: rows of `Cell`s, bold decided here);
`c2mf evaluate` draws them in the terminal (rich) and `c2mf report` in HTML, so a column added, renamed,
re-formatted or bolded differently changes both. One row per method, one column per measure; `better` says
which direction wins (the arrow in the header, the bold best value). Accuracy and agreement are bold only
where the best method is significantly better than every other of its table (exact McNemar on the same test
images, evaluate's `significance`).

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
        paired: the measure evaluate tested image by image between methods ("accuracy", "agreement"): its best
            is bold only when significantly better than every other row.
    """

    title: str
    path: str | Callable[[Any], Any]
    better: Better = None
    std: str | Callable[[Any], Any] | None = None
    tip: str = ""
    group: str = ""
    arrow: bool = True
    needs_decision: bool = False
    paired: str | None = None

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
    Col("class accuracy", "reconstruction.accuracy.mean", "high", std="reconstruction.accuracy.std",
        paired="accuracy"),
    Col("agreement", "reconstruction.agreement.mean", "high", paired="agreement"),
    Col("train \u2212 test MSE", "consistency.difference", "abs_low"),
    Col("test rel. error", "fit.test.relative_error", "low"),
    Col("insertion AUC", "insertion_deletion.gradcam.insertion.prob_auc", "high",
        tip="probability of the class, concepts ranked by Grad-CAM", needs_decision=True),
    Col("deletion AUC", "insertion_deletion.gradcam.deletion.prob_auc", "low",
        tip="probability of the class, concepts ranked by Grad-CAM", needs_decision=True),
), "One row per method; \u2191 higher is better, \u2193 lower, |\u2193| closest to 0; the best of each column in "
   "bold. Accuracy and agreement: h(UW) on the test images, mean over classes (\u00b1 std). Insertion / deletion: "
   "area under the probability curve, concepts ranked by Grad-CAM. Accuracy and agreement are bold only when "
   "significantly better than every other method (exact McNemar, p < 0.05).")


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


# ---------------------------------------------------------------------------------------------- built tables
# One builder for both renderers: `build` decides every cell's text and which cells are bold; the terminal
# (commands/evaluate.py, rich) and the report (report/page.py, HTML) only draw what it decided.


@dataclass(frozen=True)
class Cell:
    """One cell as both renderers draw it.

    Attributes:
        text: the value as a reader wants it (`fmt`), a dash when missing.
        std: its spread, drawn after a ± ("" when none).
        value: the exact number (the report sorts by it), None for text.
        bold: the best of its column (significantly so where the column is paired, see `Col.paired`).
        flagged: a number from a reconstruction that does not keep the model's decision (never bold).
    """

    text: str
    std: str = ""
    value: float | None = None
    bold: bool = False
    flagged: bool = False


@dataclass(frozen=True)
class Row:
    label: str
    cells: tuple[Cell, ...]
    reference: bool = False  # a yardstick (the model, class means, chance): below a rule, never in the contest


@dataclass(frozen=True)
class Built:
    """A table ready to draw: title, caption, the columns present, rows of cells, and notes under it."""

    title: str
    cols: tuple[Col, ...]
    rows: tuple[Row, ...]
    caption: str = ""
    first: str = "method"
    notes: tuple[str, ...] = ()
    key: str = ""  # which table it is ("reconstruction" for both capacity blocks, else the spec's key)

    def text_column(self, j: int) -> bool:
        """Whether column j holds text (left-aligned) rather than numbers."""
        cells = [r.cells[j] for r in self.rows]
        return all(c.value is None for c in cells) and any(c.text != DASH for c in cells)


@dataclass(frozen=True)
class Significance:
    """Paired tests between the rows of an evaluation (exact McNemar on per-image correctness).

    `pairs[(measure, a, b)]` is the test of row a against row b on `measure` ("accuracy" / "agreement"), with its
    `p` and `better` ("a", "b" or None); both orders are keys.
    """

    alpha: float
    pairs: dict[tuple[str, str, str], dict[str, Any]]

    @classmethod
    def of(cls, result: dict) -> "Significance | None":
        """The evaluation's tests, or None for an evaluation made before they were recorded."""
        sig = result.get("significance") if isinstance(result, dict) else None
        if not isinstance(sig, dict) or not isinstance(sig.get("pairs"), list):
            return None
        pairs = {}
        for p in sig["pairs"]:
            if isinstance(p, dict) and {"measure", "a", "b", "p"} <= set(p):
                pairs[(p["measure"], p["a"], p["b"])] = pairs[(p["measure"], p["b"], p["a"])] = p
        return cls(float(sig.get("alpha", 0.05)), pairs)

    def beats(self, measure: str, a: str, b: str) -> bool:
        """Whether row a is significantly better than row b on `measure`."""
        p = self.pairs.get((measure, a, b))
        return p is not None and p["p"] < self.alpha and p.get("better") == ("a" if p["a"] == a else "b")

    def p(self, measure: str, a: str, b: str) -> float | None:
        p = self.pairs.get((measure, a, b))
        return None if p is None else float(p["p"])


def build(rows: Sequence[tuple[str, Any]], cols: Sequence[Col], *, title: str = "", caption: str = "",
          first: str = "method", compare: Sequence[bool] | None = None, ref_rows: Sequence[bool] | None = None,
          keep_empty: bool = False, significance: Significance | None = None,
          notes: Sequence[str] = (), key: str = "") -> Built:
    """Rows (label, record) against columns: the cells, and the best of each column in bold.

    Columns no row has are left out (unless `keep_empty`). `compare[i]` False keeps row i out of the contest
    (yardsticks); `ref_rows[i]` marks it a reference. A `needs_decision` column leaves out the rows whose
    reconstruction does not keep the model's decision (their numbers are flagged). A `paired` column, when
    `significance` is given, bolds its best row only when that row is significantly better than every other row
    of the contest (exact McNemar, p < alpha): a difference that is not significant is not bold.
    """
    compare = list(compare) if compare is not None else [True] * len(rows)
    ref_rows = list(ref_rows) if ref_rows is not None else [False] * len(rows)
    cols = [c for c in cols if keep_empty or any(c.value(r) is not None for _, r in rows)]
    grid = [[c.value(r) for c in cols] for _, r in rows]
    decided = [keeps_decision(r) for _, r in rows]
    bold: list[set[int]] = []
    for j, c in enumerate(cols):
        idx = [i for i in range(len(rows)) if compare[i] and (decided[i] or not c.needs_decision)]
        best = {idx[b] for b in best_rows([grid[i][j] for i in idx], c.better)}
        if c.paired and significance is not None and best:
            best = _significantly_best(best, idx, [row_name(r) for _, r in rows], grid, j, c.paired, significance)
        bold.append(best)
    built_rows = []
    for i, (label, rec) in enumerate(rows):
        cells = []
        for j, c in enumerate(cols):
            v, sd = grid[i][j], c.spread(rec)
            cells.append(Cell(fmt(v), fmt(sd) if is_num(v) and is_num(sd) else "",
                              float(v) if is_num(v) else None, i in bold[j],
                              c.needs_decision and not decided[i] and is_num(v)))
        built_rows.append(Row(label, tuple(cells), ref_rows[i]))
    return Built(title, tuple(cols), tuple(built_rows), caption, first, tuple(notes), key)


def _significantly_best(best: set[int], idx: list[int], names: list[str | None], grid: list[list[Any]], j: int,
                        measure: str, significance: Significance) -> set[int]:
    """{the best row} when it is significantly better than every other contested row with a value, else {}."""
    if len(best) != 1:
        return set()  # a tie is not a win
    (b,) = best
    others = [i for i in idx if i != b and is_num(grid[i][j])]
    if names[b] is None or any(names[i] is None or not significance.beats(measure, names[b], names[i])
                               for i in others):
        return set()
    return best


def row_name(rec: Any) -> str | None:
    """The name the evaluation's paired tests know a method by."""
    return rec.get("name") if isinstance(rec, dict) and isinstance(rec.get("name"), str) else None


# ---------------------------------------------------------------------------------------------- the evaluation's tables

ENCODING_LABELS = {"predicted": "predicted class", "true": "true class (paper's protocol)", "none": "no class"}
REFERENCE_ROWS = ("model", "class_mean_true", "class_mean_predicted", "global_mean", "chance")
SHARED_TITLE = "Same capacity: shared dictionaries (k directions), per-class reconstruction of test images"
PER_CLASS_TITLE = "k per class: k x classes directions (not the same capacity as the block above)"


def capacity(m: dict) -> str:
    """"shared" (k directions for every class) or "per-class" (k x classes), as evaluate recorded it."""
    return m.get("capacity") or ("per-class" if m.get("per_class_dictionary") else "shared")


def _block_cols(others: Sequence[str]) -> list[Col]:
    cols = [
        Col("k", "k"), Col("directions", lambda r: r.get("directions", r.get("k"))),
        Col("|Pearson|", "similarity.pearson_mean", "low", std="similarity.pearson_std",
            tip="mean |Pearson r| over pairs of dictionary rows (paper: sparsity)"),
        Col("|cosine|", lambda r: "0 (by construction)" if get(r, "similarity.cosine_by_construction")
            else get(r, "similarity.cosine_mean"), "low", std="similarity.cosine_std"),
        Col("agreement (model)", "reconstruction.agreement.mean", "high", std="reconstruction.agreement.std",
            tip="agreement of h(UW) with the model's prediction, mean over classes", paired="agreement"),
        Col("accuracy (labels)", "reconstruction.accuracy.mean", "high", std="reconstruction.accuracy.std",
            tip="accuracy of h(UW) against the labels, mean over classes", paired="accuracy"),
    ]
    for e in others:
        cols.append(Col(f"acc / agr, {ENCODING_LABELS.get(e, e)}", _other_encoding(e)))
    cols.append(Col("p", "p_vs_best", tip="exact McNemar p-value of the agreement against the best of the table"))
    return cols


def _other_encoding(e: str) -> Callable[[dict], Any]:
    def cell(r: dict) -> Any:
        entry = (r.get("by_encoding") or {}).get(e)
        if not isinstance(entry, dict):
            return None
        if "skipped" in entry:
            return "skipped"
        acc, agr = get(entry, "reconstruction.accuracy.mean"), get(entry, "reconstruction.agreement.mean")
        return f"{fmt(acc)} / {fmt(agr)}" if acc is not None or agr is not None else None
    return cell


def _p_text(p: float | None, alpha: float) -> str | None:
    if p is None:
        return None
    return (f"{p:.2g}" if p >= 1e-3 else f"{p:.0e}") + ("" if p < alpha else " n.s.")


def capacity_block(result: dict, methods: Sequence[dict], title: str,
                   significance: Significance | None) -> Built:
    """Accuracy and agreement of h(UW) for the methods of one capacity, read against the references."""
    settings = result.get("settings") or {}
    enc = settings.get("headline_encoding", "true")
    others = [e for e in settings.get("encode_class") or [] if e != enc]
    n, chance = result.get("n_test_images"), result.get("chance")
    bold = ("bold = significantly best of its table (exact McNemar, p < 0.05); p: against the best agreement"
            if significance is not None else "bold = best value (this evaluation records no paired tests)")
    caption = (f"n = {fmt(n)} test images, {round(1 / chance) if is_num(chance) and chance else '?'} classes, "
               f"chance = {fmt(chance)}; codes under the {ENCODING_LABELS.get(enc, enc)}; {bold}")
    scored = [m for m in methods if is_num(get(m, "reconstruction.agreement.mean"))]
    best = max(scored, key=lambda m: get(m, "reconstruction.agreement.mean")) if scored else None
    rows: list[tuple[str, Any]] = []
    for m in methods:
        p = None
        if significance is not None and best is not None and m is not best:
            p = _p_text(significance.p("agreement", best.get("name"), m.get("name")), significance.alpha)
        rows.append((str(m.get("name")), dict(m, p_vs_best="best" if m is best else p)))
    refs = result.get("references") or {}
    for key in REFERENCE_ROWS:
        ref = refs.get(key)
        if not isinstance(ref, dict):
            continue
        label = f"reference: {ref.get('label', key)}"
        if "skipped" in ref:
            rows.append((f"{label} (skipped: {ref['skipped']})", {}))
        else:
            rows.append((label, {"k": 0 if key.startswith(("class", "global")) else None,
                                 "reconstruction": {"agreement": ref.get("agreement"),
                                                    "accuracy": ref.get("accuracy")}}))
    refs_at = [i >= len(methods) for i in range(len(rows))]
    return build(rows, _block_cols(others), title=title, caption=caption, compare=[not r for r in refs_at],
                 ref_rows=refs_at, significance=significance, key="reconstruction")


def evaluation_tables(result: dict) -> list[Built]:
    """The evaluation's tables in reading order, as the terminal and the report both draw them.

    Headline: shared dictionaries (k directions each: c2mf, PCA / semi-NMF --shared, CRAFT clustered to K = k),
    then per-class ones (k x classes directions), each read against the references (the model, class means
    alone, the global mean, chance). Then consistency and fit, insertion / deletion (a method whose
    reconstruction does not keep the model's decision is flagged and never bold), IG completeness where
    measured, the clustering ablation and the out-of-distribution view.
    """
    methods = [m for m in result.get("methods") or [] if isinstance(m, dict)]
    significance = Significance.of(result)
    out = []
    shared = [m for m in methods if capacity(m) == "shared"]
    per_class = [m for m in methods if capacity(m) != "shared"]
    if shared:
        out.append(capacity_block(result, shared, SHARED_TITLE, significance))
    if per_class:
        out.append(capacity_block(result, per_class, PER_CLASS_TITLE, significance))
    labelled = [(method_label(m, i), m) for i, m in enumerate(methods)]
    specs = [FIT, insertion(methods)] + ([IMPORTANCE] if any(get(m, "importance.ig_completeness") for m in methods)
                                         else [])
    for spec in specs:
        notes = [f"\u26a0 {m.get('name')}: {w}" for m in methods for w in m.get("warnings") or []] \
            if spec.key == "insertion" else []
        if methods and spec.present(methods):
            out.append(build(labelled, spec.cols, title=spec.title, caption=spec.caption, notes=notes,
                             key=spec.key))
    clusters = [c for c in result.get("clustering") or [] if isinstance(c, dict)]
    if clusters:
        spec = clustering(clusters)
        out.append(build([(f"K = {c.get('K', '?')}", c) for c in clusters], spec.cols, title=spec.title,
                         caption=spec.caption, first="K", key=spec.key))
    if isinstance(result.get("ood"), dict):
        out.append(build([("whole images vs crops", result["ood"])], OOD.cols, title=OOD.title,
                         caption=OOD.caption, first="", key=OOD.key))
    return out
