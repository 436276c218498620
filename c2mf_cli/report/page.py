"""One self-contained HTML page that gathers a run: metric tables, plots, ground-truth recovery, concept cards,
explained images.

Every picture is embedded as a base64 data URI, so the page is one file that opens anywhere, with no network,
no external CSS or JavaScript. Tables follow the paper's layout: one row per method, one column per measure,
arrows saying which direction is better and the best value of each column in bold.

The page reads what it knows by path (`similarity.pearson_mean`, ...) and shows a dash where a field is
missing, so an older or partial evaluation still renders. Fields it does not know are not dropped: every
method field no table uses lands in "Other measures" (one row per method, grouped by its first key), and
unknown top-level entries of evaluation.json are rendered generically, so fields added later still show.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from ..errors import C2MFError

_CSS = """
:root{--fg:#1d1d1f;--muted:#6b6b70;--line:#d9d9de;--head:#f2f2f5;--best:#0b5394}
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1240px;
color:var(--fg);padding:1.5em 1.5em 4em;line-height:1.45}
h1{font-size:1.7em;margin:.2em 0}h2{font-size:1.35em;border-bottom:2px solid var(--line);padding-bottom:.2em;
margin-top:2.2em}h3{font-size:1.08em;margin:1.6em 0 .3em}
.lead{color:var(--muted);margin:.2em 0 .8em}
nav{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid var(--line);z-index:1}
nav a{margin-right:1.2em;text-decoration:none;color:var(--best)}nav a:hover{text-decoration:underline}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.4em 0 .2em;font-size:.88em;font-variant-numeric:tabular-nums}
caption{caption-side:bottom;text-align:left;color:var(--muted);font-size:.9em;padding-top:.35em;max-width:60em}
td,th{border-bottom:1px solid var(--line);padding:.3em .6em;text-align:right;white-space:nowrap}
thead th{background:var(--head);border-bottom:2px solid #b9b9c0;font-weight:600;vertical-align:bottom;
white-space:normal;min-width:3.5em}
th.grp{text-align:center;border-bottom:1px solid #b9b9c0}
td.k,th.k,th.t{text-align:left}td.k{font-weight:600}td.ref{font-weight:400;font-style:italic;color:var(--muted)}
td.t{text-align:left;white-space:normal}td.mono{font-family:ui-monospace,monospace;font-size:.95em}
td.best{font-weight:700;color:var(--best)}tr.sep td{border-top:2px solid #b9b9c0}
.muted{color:var(--muted);font-size:.9em}
img{max-width:100%;height:auto}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:1.2em}
.plots figure{margin:0}.plots img{border:1px solid var(--line)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:1.2em}
.card{border:1px solid var(--line);border-radius:6px;padding:.7em .8em;background:#fbfbfc}
.card h3{margin:.1em 0 .2em;font-size:1.05em}.card .name{color:var(--best)}
figure{margin:1.2em 0}figcaption{font-size:.9em;color:var(--muted);margin-top:.3em}
details{margin:.8em 0}summary{cursor:pointer;color:var(--best)}
.ok{color:#1a7f37}.bad{color:#b42318}
"""

_NAME_KEYS = ("name", "method", "source", "label", "id")
_DASH = "\u2013"
Better = Literal["high", "low", "abs_low"] | None


# ---------------------------------------------------------------------------------------------- formatting


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def fmt(x: Any) -> str:
    """One number as a reader wants it: 3 decimals in the usual range, thousands grouped, tiny values in e-notation."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return _DASH
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
        return _summarise_list(x)
    return _esc(x)


def _summarise_list(v: list) -> str:
    if all(_is_num(e) for e in v):
        if len(v) <= 6:
            return ", ".join(fmt(e) for e in v)
        return f"{len(v)} values, {fmt(min(v))} .. {fmt(max(v))}"
    if all(isinstance(e, str) for e in v) and len(v) <= 8:
        return _esc(", ".join(v))
    return f"{len(v)} items"


def _get(d: Any, path: str) -> Any:
    """d["a"]["b"] for path "a.b"; None where any step is missing."""
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _flatten(d: dict, prefix: str = "", depth: int = 4) -> dict[str, Any]:
    """Dotted keys -> scalars or lists of scalars; lists of records and records deeper than `depth` are skipped."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if depth > 0:
                out.update(_flatten(v, key + ".", depth - 1))
        elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            continue  # a table of its own
        else:
            out[key] = v
    return out


def _short(s: str, n: int = 12) -> str:
    """A long hash shortened, the full value kept as a tooltip."""
    return f"<span title='{_esc(s)}'>{_esc(s[:n])}&hellip;</span>" if len(s) > n + 2 else _esc(s)


def _record_name(r: dict, i: int) -> str:
    for k in _NAME_KEYS:
        if isinstance(r.get(k), (str, int)):
            return str(r[k])
    return f"#{i}"


def _method_label(r: dict, i: int) -> str:
    """A method's row label: its name and k ("c2mf k=10"; per-class dictionaries "craft k=5/class")."""
    name = _record_name(r, i)
    k = r.get("k")
    if k is None or f"k={k}" in name:
        return name
    return f"{name} k={k}" + ("/class" if r.get("per_class_dictionary") else "")


# ---------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Col:
    """One column of a method table: a dotted path into each row's record, optionally with its std beside it."""

    title: str
    path: str | Callable[[Any], Any]
    better: Better = None
    std: str | Callable[[Any], Any] | None = None
    tip: str = ""
    group: str = ""
    arrow: bool = True

    def value(self, rec: Any) -> Any:
        return self.path(rec) if callable(self.path) else _get(rec, self.path)

    def spread(self, rec: Any) -> Any:
        if self.std is None:
            return None
        return self.std(rec) if callable(self.std) else _get(rec, self.std)


def _arrow(better: Better) -> str:
    return {"high": " \u2191", "low": " \u2193", "abs_low": " |\u2193|"}.get(better or "", "")


def _best_rows(values: list[Any], better: Better) -> set[int]:
    nums = [(i, float(v)) for i, v in enumerate(values) if _is_num(v)]
    if better is None or len(nums) < 2:
        return set()
    key = {"high": lambda v: -v, "low": lambda v: v, "abs_low": abs}[better]
    best = min(key(v) for _, v in nums)
    if all(math.isclose(key(v), best, rel_tol=1e-9, abs_tol=1e-12) for _, v in nums):
        return set()  # all equal: nothing stands out
    return {i for i, v in nums if math.isclose(key(v), best, rel_tol=1e-9, abs_tol=1e-12)}


def table(
    rows: Sequence[tuple[str, Any]],
    cols: Sequence[Col],
    *,
    caption: str = "",
    first: str = "method",
    compare: Sequence[bool] | None = None,
    ref_rows: Sequence[bool] | None = None,
    keep_empty: bool = False,
) -> str:
    """Rows (label, record) against columns; columns no row has are left out; the best of each column in bold.

    `compare[i]` False keeps row i out of the best-value contest (yardsticks); `ref_rows[i]` draws it in italics
    below a rule.
    """
    compare = list(compare) if compare is not None else [True] * len(rows)
    ref_rows = list(ref_rows) if ref_rows is not None else [False] * len(rows)
    cols = [c for c in cols if keep_empty or any(c.value(r) is not None for _, r in rows)]
    if not rows or not cols:
        return ""
    grid = [[c.value(r) for c in cols] for _, r in rows]
    text_col = [all(isinstance(row[j], str) or row[j] is None for row in grid)
                and any(isinstance(row[j], str) for row in grid) for j in range(len(cols))]
    bold: list[set[int]] = []
    for j, c in enumerate(cols):
        idx = [i for i in range(len(rows)) if compare[i]]
        best = _best_rows([grid[i][j] for i in idx], c.better)
        bold.append({idx[b] for b in best})
    head = ""
    if any(c.group for c in cols):
        spans: list[tuple[str, int]] = []
        for c in cols:
            if spans and spans[-1][0] == c.group:
                spans[-1] = (c.group, spans[-1][1] + 1)
            else:
                spans.append((c.group, 1))
        head = "<tr><th></th>" + "".join(
            f"<th class='grp' colspan='{n}'>{_esc(g)}</th>" if g else f"<th colspan='{n}'></th>" for g, n in spans
        ) + "</tr>"
    head += f"<tr><th class='k'>{_esc(first)}</th>" + "".join(
        f"<th{' class=t' if text_col[j] else ''}{f' title={chr(39)}{_esc(c.tip)}{chr(39)}' if c.tip else ''}>"
        f"{_esc(c.title)}{_arrow(c.better) if c.arrow else ''}</th>" for j, c in enumerate(cols)) + "</tr>"
    body = []
    for i, (label, rec) in enumerate(rows):
        sep = " class='sep'" if ref_rows[i] and (i == 0 or not ref_rows[i - 1]) else ""
        cells = []
        for j, c in enumerate(cols):
            v = grid[i][j]
            text = fmt(v) if not isinstance(v, str) else _esc(v)
            sd = c.spread(rec)
            if _is_num(v) and _is_num(sd):
                text += f" <span class='muted'>&plusmn; {fmt(sd)}</span>"
            cls = "best" if i in bold[j] else ("t" if isinstance(v, str) else "")
            cells.append(f"<td class='{cls}'>{text}</td>" if cls else f"<td>{text}</td>")
        kcls = "k ref" if ref_rows[i] else "k"
        body.append(f"<tr{sep}><td class='{kcls}'>{_esc(label)}</td>{''.join(cells)}</tr>")
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f"<div class='scroll'><table>{cap}<thead>{head}</thead><tbody>{''.join(body)}</tbody></table></div>"


def _generic_cols(flats: list[dict[str, Any]], strip: str = "") -> list[Col]:
    """Columns for every dotted key of the flattened records, `x.mean` and `x.std` merged into one column."""
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys]
    cols = []
    for k in keys:
        if k.endswith(".std") and k[:-4] + ".mean" in keys:
            continue
        std = k[:-5] + ".std" if k.endswith(".mean") and k[:-5] + ".std" in keys else None
        title = (k[:-5] if std else k)[len(strip):] or k
        cols.append(Col(title.replace("_", " "), (lambda f, k=k: f.get(k)),
                        std=None if std is None else (lambda f, s=std: f.get(s))))
    return cols


def records_table(records: list[dict], *, first: str = "name", caption: str = "",
                  labels: Sequence[str] | None = None) -> str:
    """A list of records as one table: a row per record, a column per (dotted) field; mean/std pairs merged."""
    flats = [{k: v for k, v in _flatten(r).items() if not (isinstance(v, list) and len(v) > 6)} for r in records]
    rows = [(labels[i] if labels else _record_name(r, i), f) for i, (r, f) in enumerate(zip(records, flats))]
    return table(rows, _generic_cols(flats), first=first, caption=caption)


def mapping_table(d: dict, *, caption: str = "") -> str:
    """A record as a two-column table of (dotted) fields and values."""
    flat = _flatten(d)
    rows = "".join(f"<tr><td class='k'>{_esc(k)}</td><td class='t'>"
                   f"{fmt(v) if not isinstance(v, str) else _esc(v)}</td></tr>" for k, v in flat.items())
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f"<div class='scroll'><table>{cap}<tbody>{rows}</tbody></table></div>"


def json_sections(obj: dict, level: int = 3) -> str:
    """Render an unknown JSON generically: top-level scalars first, then one sub-section per key."""
    parts = []
    scalars = {k: v for k, v in obj.items() if not isinstance(v, (dict, list))}
    if scalars:
        parts.append(mapping_table(scalars))
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            parts.append(f"<h{level}>{_esc(k)}</h{level}>" + mapping_table(v))
            for kk, vv in v.items():
                if isinstance(vv, list) and vv and all(isinstance(e, dict) for e in vv):
                    parts.append(f"<h{level + 1}>{_esc(k)}.{_esc(kk)}</h{level + 1}>" + records_table(vv))
        elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            parts.append(f"<h{level}>{_esc(k)}</h{level}>" + records_table(v))
        elif isinstance(v, list) and v:
            parts.append(f"<p><b>{_esc(k)}</b>: {_summarise_list(v)}</p>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- evaluate tables

_SIMILARITY = [
    Col("|Pearson r|", "similarity.pearson_mean", "low", std="similarity.pearson_std",
        tip="mean |Pearson r| over pairs of dictionary rows (paper: sparsity)"),
    Col("|cosine|", "similarity.cosine_mean", "low", std="similarity.cosine_std"),
    Col("pairs", "similarity.n_pairs"),
    Col("degenerate rows", "similarity.n_degenerate"),
]
_RECONSTRUCTION = [
    Col("accuracy", "reconstruction.accuracy.mean", "high", std="reconstruction.accuracy.std",
        tip="accuracy of h(UW) against the labels, mean over classes"),
    Col("agreement", "reconstruction.agreement.mean", "high", std="reconstruction.agreement.std",
        tip="agreement of h(UW) with the model's prediction, mean over classes"),
    Col("test images", "reconstruction.n_images"),
]
_FIT = [
    Col("train", "consistency.train_mse", "low", group="MSE(A, UW)"),
    Col("test", "consistency.test_mse", "low", group="MSE(A, UW)"),
    Col("train \u2212 test", "consistency.difference", "abs_low", group="MSE(A, UW)"),
    Col("train", "fit.train.relative_error", "low", group="relative error \u2016A \u2212 UW\u2016 / \u2016A\u2016"),
    Col("test", "fit.test.relative_error", "low", group="relative error \u2016A \u2212 UW\u2016 / \u2016A\u2016"),
    Col("train", "fit.train.r2", "high", group="R\u00b2"),
    Col("test", "fit.test.r2", "high", group="R\u00b2"),
    Col("test rows", "fit.test.n_rows", group=" "),
]
_IMPORTANCE = [
    Col("target", "importance.target"),
    Col("mean |error|", "importance.ig_completeness.mean_abs_error", "low", group="IG completeness"),
    Col("max |error|", "importance.ig_completeness.max_abs_error", "low", group="IG completeness"),
    Col("mean relative error", "importance.ig_completeness.mean_relative_error", "low", group="IG completeness"),
    Col("max relative error", "importance.ig_completeness.max_relative_error", "low", group="IG completeness"),
    Col("mean |logit(U) \u2212 logit(0)|", "importance.ig_completeness.mean_abs_logit_gap", group="IG completeness"),
]
_RANKING_NAMES = {"gradcam": "Grad-CAM", "ig": "IG", "sobol": "Sobol"}


def _insertion_cols(methods: list[dict]) -> list[Col]:
    rankings: list[str] = []
    for m in methods:
        rankings += [r for r in (m.get("insertion_deletion") or {}) if r not in rankings]
    cols = []
    for r in rankings:
        base, name = f"insertion_deletion.{r}", _RANKING_NAMES.get(r, r)
        for what, title in (("prob", "probability"), ("accuracy", "accuracy")):
            g = f"{name}: {title}"
            cols += [Col("insertion", f"{base}.insertion.{what}_auc", "high", group=g),
                     Col("deletion", f"{base}.deletion.{what}_auc", "low", group=g)]
    if rankings:
        cols.append(Col("images", f"insertion_deletion.{rankings[0]}.insertion.n_images", group=" "))
    return cols


def _summary_cols(recovery: dict | None) -> list[Col]:
    cols = [
        Col("|Pearson r|", "similarity.pearson_mean", "low"),
        Col("class accuracy", "reconstruction.accuracy.mean", "high", std="reconstruction.accuracy.std"),
        Col("agreement", "reconstruction.agreement.mean", "high"),
        Col("train \u2212 test MSE", "consistency.difference", "abs_low"),
        Col("test rel. error", "fit.test.relative_error", "low"),
        Col("insertion AUC", "insertion_deletion.gradcam.insertion.prob_auc", "high",
            tip="probability of the class, concepts ranked by Grad-CAM"),
        Col("deletion AUC", "insertion_deletion.gradcam.deletion.prob_auc", "low",
            tip="probability of the class, concepts ranked by Grad-CAM"),
    ]
    if recovery:
        heat = recovery.get("heatmaps") if isinstance(recovery.get("heatmaps"), dict) else {}
        planted = recovery.get("planted_dictionary") if isinstance(recovery.get("planted_dictionary"), dict) else {}
        cols += [
            Col("heatmap IoU", lambda m: _get(heat, f"{m.get('name')}.per_class.mean"), "high",
                tip="ground truth: concept heatmaps against the planted primitives' masks"),
            Col("planted cos W\u207a", lambda m: _get(planted, f"nonnegative.{m.get('name')}.mean"), "high",
                tip="ground truth: matched cosine to a planted non-negative dictionary"),
            Col("planted cos W\u00b1", lambda m: _get(planted, f"signed.{m.get('name')}.mean"), "high",
                tip="ground truth: matched cosine to a planted signed dictionary"),
        ]
    return cols


def _used_paths(cols: Iterable[Col]) -> set[str]:
    return {p for c in cols for p in (c.path, c.std) if isinstance(p, str)}


# fit.*.mse repeats consistency.*_mse; the row counts are the test one's
_SHOWN_ELSEWHERE = {"fit.train.mse", "fit.test.mse", "fit.train.n_rows"} | {
    f"insertion_deletion.{r}.{d}.n_images" for r in ("gradcam", "ig") for d in ("insertion", "deletion")}
_CURVES = ("insertion_deletion.", "importance.gradcam_mean", "importance.ig_mean")
_SCALAR_KEYS = {"name", "method", "k", "per_class_dictionary", "gated"}


def _other_measures(methods: list[dict], labels: list[str], used: set[str]) -> str:
    """Every method field no table above shows, one table per first key, so new fields show without code."""
    flats = []
    hidden: list[str] = []
    for m in methods:
        f = {}
        for k, v in _flatten(m).items():
            if k in used or k in _SCALAR_KEYS or ".per_class." in k:
                continue
            if isinstance(v, list) and v and all(_is_num(e) or e is None for e in v):
                if k.startswith(_CURVES):
                    continue  # drawn in the plots
                if k not in hidden:
                    hidden.append(k)
                continue
            f[k] = v
        flats.append(f)
    groups = list(dict.fromkeys(k.split(".")[0] for f in flats for k in f))
    parts = []
    loose = [k for k in groups if all("." not in kk for f in flats for kk in f if kk.split(".")[0] == k)]
    if loose:
        rows = [(lab, {k: f.get(k) for k in loose}) for lab, f in zip(labels, flats)]
        parts.append(table(rows, _generic_cols([r for _, r in rows])))
    for g in groups:
        if g in loose:
            continue
        sub = [{k[len(g) + 1:]: v for k, v in f.items() if k.startswith(g + ".")} for f in flats]
        parts.append(f"<h4>{_esc(g.replace('_', ' '))}</h4>" + table(list(zip(labels, sub)), _generic_cols(sub)))
    if hidden:
        parts.append("<p class='muted'>Lists of values, in evaluation.json: "
                     + ", ".join(f"<code>{_esc(k)}</code>" for k in hidden) + ".</p>")
    return "\n".join(p for p in parts if p)


def _per_class_table(methods: list[dict], labels: list[str], path: str, caption: str) -> str:
    per = [_get(m, path) if isinstance(_get(m, path), dict) else {} for m in methods]
    classes: list[str] = []
    for p in per:
        classes += [c for c in p if c not in classes]
    if not classes:
        return ""
    cols = [Col(str(c), (lambda d, c=c: d.get(c))) for c in classes]
    return table(list(zip(labels, per)), cols, caption=caption)


_PLOT_TITLES = {
    "accuracy_vs_k": "Per-class reconstruction accuracy against the number of concepts k",
    "confidence_histograms": "Max-softmax confidence: whole images against crops (OOD view)",
}


def _plot_caption(stem: str) -> str:
    if stem in _PLOT_TITLES:
        return _PLOT_TITLES[stem]
    parts = stem.split("_")
    if stem.startswith("insertion_deletion_") and len(parts) >= 4:
        what = {"prob": "probability of the class", "accuracy": "accuracy"}.get(parts[3], parts[3])
        return f"Concept insertion / deletion ranked by {_RANKING_NAMES.get(parts[2], parts[2])}: {what}"
    return stem.replace("_", " ")


def _plot_order(p: Path) -> tuple[int, str]:
    order = ["accuracy_vs_k", "confidence_histograms"]
    return (order.index(p.stem) if p.stem in order else len(order), p.stem)


# ---------------------------------------------------------------------------------------------- recovery


def recovery_section(rec: dict, methods: Sequence[str] = ()) -> str:
    """The demo's ground-truth recovery: heatmap IoU per primitive, planted-dictionary cosine, c2mf gate selection.

    Reads `evaluation.json["recovery"]` as the demo writes it (c2mf_cli/demo/pipeline.py); any missing part is
    skipped, any part it does not know is shown generically at the end.
    """
    parts: list[str] = []
    heat = rec.get("heatmaps") if isinstance(rec.get("heatmaps"), dict) else {}
    names = list(methods) + [m for m in heat if m not in methods]
    names = [m for m in names if isinstance(heat.get(m), dict)]
    prims: list[str] = []
    for m in names:
        prims += [p for p in heat[m].get("primitives") or [] if p not in prims]
    refs = rec.get("references") if isinstance(rec.get("references"), dict) else {}
    thr = rec.get("threshold") if isinstance(rec.get("threshold"), dict) else {}
    if names and prims:
        rows: list[tuple[str, Any]] = []
        compare, ref_rows = [], []
        for m in names:
            r = heat[m]
            pc = r.get("per_class") if isinstance(r.get("per_class"), dict) else {}
            rows.append((m, {"v": pc.get("best_iou") or [], "mean": pc.get("mean"), "prims": r.get("primitives")}))
            compare.append(True), ref_rows.append(False)
        for m in names:
            sh = heat[m].get("shared")
            if isinstance(sh, dict):
                rows.append((f"{m}, shared concept",
                             {"v": sh.get("best_iou") or [], "mean": sh.get("mean"), "prims": heat[m].get("primitives")}))
                compare.append(False), ref_rows.append(False)
        ref_names = {"linear_probe": "supervised linear probe*", "grid_ceiling": "masks through the grid*"}
        for k, r in refs.items():
            if isinstance(r, dict):
                rows.append((ref_names.get(k, k + "*"), {"v": r.get("iou") or [], "mean": r.get("mean"), "prims": prims}))
                compare.append(False), ref_rows.append(True)

        def at(p: str) -> Callable[[Any], Any]:
            def f(d: dict) -> Any:
                order = d.get("prims") or prims
                i = order.index(p) if p in order else -1
                return d["v"][i] if 0 <= i < len(d["v"]) else None
            return f

        cols = [Col("mean", "mean", "high")] + [Col(p.replace("_", " "), at(p), "high", arrow=False) for p in prims]
        level = thr.get("level")
        how = (f"thresholded at {float(level) * 100:g} % of each map's maximum"
               if _is_num(level) else "thresholded")
        parts.append("<h3>Heatmap IoU with the planted primitives</h3>" + table(
            rows, cols, compare=compare, ref_rows=ref_rows,
            caption=f"Test images. For every primitive, the IoU between the masks where it was drawn and the "
                    f"heatmap of the best-matching concept (codes upsampled to the image, {how}); for each class "
                    "that contains the primitive, the best concept of that class's dictionary, averaged over those "
                    "classes; higher is better. <i>Shared concept</i>: a shared dictionary must use the same concept "
                    "for a primitive in every class (stricter). * Yardsticks, not methods: a ridge probe trained with "
                    "the masks, and the masks themselves pooled to the layer's grid (the best any map on this grid "
                    "can reach). Best method in bold."))
    planted = rec.get("planted_dictionary") if isinstance(rec.get("planted_dictionary"), dict) else {}
    variants = [v for v, r in planted.items() if isinstance(r, dict)]
    pnames = list(dict.fromkeys([m for v in variants for m in planted[v] if isinstance(planted[v][m], dict)]))
    pnames = [m for m in names if m in pnames] + [m for m in pnames if m not in names]
    if variants and pnames:
        vtitle = {"nonnegative": "non-negative W (post-ReLU-like)", "signed": "signed W (ViT-like)"}
        cols = []
        for v in variants:
            g = vtitle.get(v, v)
            cols += [Col("mean cos", f"{v}.mean", "high", group=g), Col("min cos", f"{v}.min", "high", group=g),
                     Col("gates exact", f"{v}.gates.exact", "high", group=g,
                         tip="fraction of classes whose gates open exactly on their planted concepts")]
        rows = [(m, {v: planted[v].get(m) for v in variants}) for m in pnames]
        size = ", ".join(f"{k.replace('_', ' ')} {fmt(planted[k])}" for k in ("n_planted", "n_features",
                                                                             "rows_per_class") if k in planted)
        parts.append("<h3>Planted dictionary: matched cosine</h3>" + table(
            rows, cols, caption="Synthetic activations A = U W<sub>planted</sub> + noise with the world's class "
                                f"structure ({_esc(size)}); each method fitted on them, its concepts matched to the "
                                "planted ones (Hungarian) and compared by cosine (PCA: |cosine|)."))
    gates = rec.get("gates") if isinstance(rec.get("gates"), dict) else {}
    gnames = [m for m, g in gates.items() if isinstance(g, dict)]
    if gnames:
        cols = [Col("accuracy", "accuracy", "high"), Col("precision", "precision", "high"),
                Col("recall", "recall", "high"), Col("exact classes", "exact", "high"),
                Col("extra selected", "extra_selected", "low"), Col("gate threshold", "threshold")]
        parts.append("<h3>Gate selection</h3>" + table(
            [(m, gates[m]) for m in gnames], cols,
            caption="Do a class's gates open on the concepts of that class's primitives? Primitives are matched to "
                    "concepts on the ungated dictionary W* (by heatmap IoU), then each gate is compared with the "
                    "class \u2192 primitive table: accuracy over all (class, primitive) pairs, precision and recall "
                    "of the selected primitives, the fraction of classes matched exactly, and the mean number per "
                    "class of open gates on concepts that match no primitive (extra selected)."))
        cp = rec.get("class_primitives") if isinstance(rec.get("class_primitives"), dict) else {}
        for m in gnames:
            g = gates[m]
            opened = g.get("open_gates") if isinstance(g.get("open_gates"), dict) else {}
            planted_c = g.get("planted_concepts") if isinstance(g.get("planted_concepts"), dict) else {}
            classes = list(dict.fromkeys([*cp, *opened, *planted_c]))
            if not classes or not (opened or planted_c):
                continue

            def ids(v: Any) -> str:
                return ", ".join(str(j) for j in v) if isinstance(v, list) else _DASH

            body = []
            for c in classes:
                o, p = opened.get(c), planted_c.get(c)
                if isinstance(o, list) and isinstance(p, list):
                    miss, extra = sorted(set(p) - set(o)), sorted(set(o) - set(p))
                    verdict = ("<span class='ok'>exact</span>" if not miss and not extra else
                               "<span class='bad'>" + "; ".join(
                                   ([f"missing {ids(miss)}"] if miss else []) + ([f"extra {ids(extra)}"] if extra else [])
                               ) + "</span>")
                else:
                    verdict = _DASH
                prim = cp.get(c)
                body.append(f"<tr><td class='k'>{_esc(c)}</td><td class='t'>"
                            f"{_esc(', '.join(prim)) if isinstance(prim, list) else _DASH}</td>"
                            f"<td>{ids(p)}</td><td>{ids(o)}</td><td class='t'>{verdict}</td></tr>")
            parts.append(
                f"<details><summary>{_esc(m)}: gates of every class</summary><div class='scroll'><table>"
                "<caption>Concept ids. <i>Their concepts</i>: the concepts matched to the class's "
                "primitives; <i>extra</i>: open gates beyond them. The metrics above count primitives, so a concept "
                "matched to two primitives selects both, and an extra gate on a concept matched to no primitive "
                "counts only in <i>extra selected</i>.</caption><thead><tr><th class='k'>class</th>"
                "<th class='k'>planted primitives</th><th>their concepts</th><th>open gates</th>"
                "<th class='k'>match</th></tr></thead><tbody>" + "".join(body) + "</tbody></table></div></details>")
    if names and prims:
        for m in names:
            pc = heat[m].get("per_class") if isinstance(heat[m].get("per_class"), dict) else {}
            by = pc.get("by_class")
            classes = list(rec.get("class_primitives") or {})
            if not isinstance(by, list) or not by:
                continue
            order = heat[m].get("primitives") or prims
            rows = [(classes[i] if i < len(classes) else f"class {i}", {p: (r[j] if j < len(r) else None)
                                                                       for j, p in enumerate(order)})
                    for i, r in enumerate(by) if isinstance(r, list)]
            cols = [Col(p.replace("_", " "), (lambda d, p=p: d.get(p))) for p in order]
            parts.append(f"<details><summary>{_esc(m)}: heatmap IoU by class</summary>"
                         + table(rows, cols, first="class") + "</details>")
    known = {"heatmaps", "threshold", "references", "planted_dictionary", "gates", "class_primitives",
             "c2mf_concept_of_primitive"}
    rest = {k: v for k, v in rec.items() if k not in known}
    if rest:
        parts.append("<details><summary>other recovery fields</summary>" + json_sections(rest, 4) + "</details>")
    if not parts:
        return "<p class='muted'>the recovery entry has no fields this page knows; see evaluation.json</p>"
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- pictures


def _img(path: Path, alt: str, embed: bool, base: Path) -> str:
    if embed:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        src = f"data:image/png;base64,{data}"
    else:
        src = html.escape(os.path.relpath(path, base).replace(os.sep, "/"), quote=True)
    return f"<img src=\"{src}\" alt=\"{_esc(alt)}\" loading=\"lazy\">"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise C2MFError(f"cannot read {path} ({e}): the folder is not a complete c2mf output") from None


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))


def _short_path(p: Any, keep: int = 2) -> str:
    parts = Path(str(p)).parts
    return "/".join(parts[-keep:]) if parts else str(p)


def _atlas_section(at: Path, embed: bool, out: Path) -> str:
    rec = _read_json(at / "atlas.json") if (at / "atlas.json").is_file() else {}
    body = []
    info = []
    d = rec.get("dictionary") if isinstance(rec.get("dictionary"), dict) else {}
    if d.get("method"):
        info.append(f"dictionary <b>{_esc(d['method'])}</b>" + (f" ({_esc(d['concepts'])} concepts)"
                                                                 if d.get("concepts") is not None else ""))
    if rec.get("store"):
        info.append(f"regions from <code>{_esc(_short_path(rec['store'], 1))}</code>")
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    if cfg.get("class_name"):
        info.append(f"class {_esc(cfg['class_name'])} only")
    info.append("each picture: the strongest positions of the concept (at most one per image), a window around "
                "each, with its class and code value")
    body.append("<p class='lead'>" + "; ".join(info) + ".</p>")
    cards = []
    concepts = rec.get("concepts") or [{"concept": p.stem, "png": p.name} for p in _pngs(at)
                                        if p.name != "overview.png"]
    for c in concepts:
        png = at / str(c.get("png", ""))
        if not png.is_file():
            continue
        regs = [r for r in c.get("regions") or [] if isinstance(r, dict)]
        counts: dict[str, int] = {}
        for r in regs:
            if r.get("class") is not None:
                counts[str(r["class"])] = counts.get(str(r["class"]), 0) + 1
        meta = []
        if regs:
            meta.append(f"{len(regs)} regions")
        if counts:
            meta.append("classes: " + ", ".join(f"{_esc(k)}" + (f" &times;{n}" if n > 1 else "")
                                                  for k, n in sorted(counts.items(), key=lambda t: (-t[1], t[0]))))
        vals = [float(r["value"]) for r in regs if _is_num(r.get("value"))]
        if vals:
            meta.append(f"code {max(vals):.3g} .. {min(vals):.3g}")
        name = f" <span class='name'>{_esc(c['name'])}</span>" if c.get("name") else ""
        cards.append(f"<div class='card'><h3>concept {_esc(c.get('concept'))}{name}</h3>"
                     f"<div class='muted'>{' &middot; '.join(meta)}</div>"
                     + _img(png, f"concept {c.get('concept')}", embed, out) + "</div>")
    if cards:
        body.append("<div class='cards'>" + "".join(cards) + "</div>")
    ov = at / str(rec.get("overview") or "overview.png")
    if ov.is_file() and ov.suffix == ".png":
        fig = f"<figure>{_img(ov, 'atlas overview', embed, out)}</figure>"
        body.append(f"<details><summary>all concepts in one figure</summary>{fig}</details>" if cards else fig)
    missing = rec.get("missing")
    if isinstance(missing, list) and missing:
        body.append(f"<p class='muted'>concepts with no region: {_summarise_list(missing)}</p>")
    return "\n".join(body)


def _explain_section(ex: Path, embed: bool, out: Path) -> str:
    summary = _read_json(ex / "explain.json") if (ex / "explain.json").is_file() else {}
    body = []
    cfg = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    if summary.get("dictionary") or cfg.get("importance"):
        body.append(f"<p class='lead'>dictionary <b>{_esc(summary.get('dictionary', '?'))}</b>; concept importance "
                    f"by {_esc(_RANKING_NAMES.get(str(cfg.get('importance')), cfg.get('importance', '?')))} for "
                    "the explained class; the heatmaps are the codes of the top concepts on the model's grid, "
                    "upsampled onto the image.</p>")
    items = summary.get("explained") or [{"png": p.name, "image": p.stem} for p in _pngs(ex)]
    for e in items:
        png = ex / str(e.get("png", ""))
        if not png.is_file():
            continue
        cap = f"<b>{_esc(_short_path(e.get('image', png.stem)))}</b>"
        pred = e.get("prediction") if isinstance(e.get("prediction"), dict) else {}
        expl = e.get("explained") if isinstance(e.get("explained"), dict) else {}
        if pred.get("label") is not None:
            cap += f" &middot; predicted {_esc(pred['label'])}"
        if expl.get("label") is not None:
            cap += f" &middot; explained {_esc(expl['label'])}"
            if _is_num(expl.get("probability")):
                cap += f" (p = {fmt(float(expl['probability']))})"
        if isinstance(e.get("top_concepts"), list):
            cap += " &middot; top concepts " + _esc(", ".join(map(str, e["top_concepts"])))
        body.append(f"<figure>{_img(png, png.stem, embed, out)}<figcaption>{cap}</figcaption></figure>")
    for f in summary.get("failed") or []:
        body.append(f"<p class='muted'>failed: {_esc(f.get('image'))}: {_esc(f.get('error'))}</p>")
    return "\n".join(body)


# ---------------------------------------------------------------------------------------------- the page


_KNOWN_TOP = {"encoding-type", "encoding-version", "c2mf_version", "inputs", "settings", "h_check", "methods",
              "clustering", "ood", "time_s", "recovery", "files"}


def _lead(ev: dict, demo: dict | None) -> str:
    bits = []
    inputs = ev.get("inputs") if isinstance(ev.get("inputs"), dict) else {}
    tr, te = inputs.get("train") or {}, inputs.get("test") or {}
    if isinstance(tr, dict) and tr.get("layer"):
        bits.append(f"layer <b>{_esc(tr['layer'])}</b>")
    if isinstance(tr, dict) and isinstance(te, dict) and (tr.get("images") or te.get("images")):
        s = f"{fmt(tr.get('images'))} train / {fmt(te.get('images'))} test images"
        if tr.get("classes"):
            s += f", {fmt(tr['classes'])} classes"
        bits.append(s)
    if demo and isinstance(demo.get("model"), dict):
        m = demo["model"]
        if _is_num(m.get("test_accuracy")):
            bits.append(f"demo model test accuracy {fmt(100 * float(m['test_accuracy']))} %")
    if ev.get("c2mf_version"):
        bits.append(f"c2mf {_esc(ev['c2mf_version'])}")
    if _is_num(ev.get("time_s")):
        bits.append(f"evaluated in {fmt(float(ev['time_s']))} s")
    return "<p class='lead'>" + " &middot; ".join(bits) + "</p>" if bits else ""


def _metrics_sections(ev: dict, ev_dir: Path, embed: bool, out: Path) -> list[tuple[str, str, str]]:
    methods = [m for m in ev.get("methods") or [] if isinstance(m, dict)]
    labels = [_method_label(m, i) for i, m in enumerate(methods)]
    rows = list(zip(labels, methods))
    recovery = ev.get("recovery") if isinstance(ev.get("recovery"), dict) else None
    secs: list[tuple[str, str, str]] = []
    if methods:
        glance = table(rows, _summary_cols(recovery), caption=(
            "One row per method; \u2191 higher is better, \u2193 lower, |\u2193| closest to 0; the best of each "
            "column in bold. Accuracy and agreement: h(UW) on the test images, mean over classes (&plusmn; std). "
            "Insertion / deletion: area under the probability curve, concepts ranked by Grad-CAM."
            + (" Heatmap IoU and planted cosines: ground-truth recovery, below." if recovery else "")))
        secs.append(("summary", "At a glance", glance))
    if recovery:
        names = [str(m.get("name")) for m in methods]
        secs.append(("recovery", "Ground-truth recovery", recovery_section(recovery, names)))
    body = []
    if methods:
        ins = _insertion_cols(methods)
        body += [
            "<h3>Concept similarity</h3>" + table(rows, _SIMILARITY, caption=(
                "Mean &plusmn; std over pairs of concepts of |Pearson r| and |cosine| between dictionary rows "
                "(the paper's \u201csparsity\u201d); lower means more distinct concepts. PCA is 0 by construction.")),
            "<h3>Per-class reconstruction</h3>" + table(rows, _RECONSTRUCTION, caption=(
                "Test activations projected on each dictionary and fed through the rest of the model, h(UW): "
                "accuracy against the labels and agreement with the model's own prediction, mean &plusmn; std "
                "over classes.")),
            _details("accuracy of every class", _per_class_table(
                methods, labels, "reconstruction.accuracy.per_class", "h(UW) accuracy per class, test images.")),
            _details("agreement of every class", _per_class_table(
                methods, labels, "reconstruction.agreement.per_class", "h(UW) agreement per class, test images.")),
            "<h3>Consistency and fit</h3>" + table(rows, _FIT, caption=(
                "Reconstruction of the activations on train and held-out test rows; a small |train \u2212 test| "
                "means the dictionary generalises.")),
            "<h3>Insertion / deletion</h3>" + table(rows, ins, caption=(
                "Area under the curve as concepts are inserted (from none) or deleted (from all) in order of "
                "importance: probability of the class and accuracy. High insertion and low deletion are good.")),
            "<h3>Concept importance</h3>" + table(rows, _IMPORTANCE, caption=(
                "Integrated Gradients from U = 0: completeness says the attributions sum to "
                "logit(U) \u2212 logit(0)."))
            if any(_get(m, "importance.ig_completeness") for m in methods) else "",
        ]
        used = _used_paths([*_SIMILARITY, *_RECONSTRUCTION, *_FIT, *ins, *_IMPORTANCE]) | _SHOWN_ELSEWHERE
        other = _other_measures(methods, labels, used)
        if other:
            body.append("<h3>Other measures</h3>" + other)
    clustering = [c for c in ev.get("clustering") or [] if isinstance(c, dict)]
    if clustering:
        clabels = [f"{c.get('source', '?')} clustered, K = {c.get('K', '?')}" for c in clustering]
        body.append("<h3>Multi-class clustering ablation</h3>" + records_table(
            clustering, first="dictionary", labels=clabels, caption=(
                "CRAFT-style: k concepts per class pooled and clustered into K shared concepts, against "
                "shared dictionaries of K concepts; per-class reconstruction accuracy / agreement, mean "
                "&plusmn; std over classes.")))
    ood = ev.get("ood") if isinstance(ev.get("ood"), dict) else None
    if ood:
        cols = [Col("AUROC", "auroc", "high"), Col("FPR @ 95 % TPR", "fpr_at_95_tpr", "low"),
                Col("AUPR-In", "aupr_in", "high"), Col("AUPR-Out", "aupr_out", "high"),
                Col("mean conf. images", "histograms.mean_in"), Col("mean conf. crops", "histograms.mean_out"),
                Col("gap", "histograms.mean_gap"), Col("images", "n_in"), Col("crops", "n_out")]
        body.append("<h3>Crops as out-of-distribution inputs</h3>" + table(
            [("whole images vs crops", ood)], cols, first="", caption=(
                "Max-softmax confidence of whole test images (in-distribution) against crops resized to the "
                "input size: how far the crops CRAFT factorises are from what the model was trained on.")))
    plots = sorted(_pngs(ev_dir), key=_plot_order)
    if plots:
        body.append("<h3>Plots</h3><div class='plots'>" + "".join(
            f"<figure>{_img(p, _plot_caption(p.stem), embed, out)}<figcaption>{_esc(_plot_caption(p.stem))}"
            "</figcaption></figure>" for p in plots) + "</div>")
    unknown = {k: v for k, v in ev.items() if k not in _KNOWN_TOP}
    if unknown:
        body.append("<h3>Other results</h3>" + json_sections(unknown, 4))
    if body:
        secs.append(("metrics", "Metrics", "\n".join(b for b in body if b)))
    return secs


def _details(title: str, inner: str) -> str:
    return f"<details><summary>{_esc(title)}</summary>{inner}</details>" if inner else ""


def _run_details(ev: dict) -> str:
    parts = []
    inputs = ev.get("inputs") if isinstance(ev.get("inputs"), dict) else {}
    stores = [(k, v) for k, v in inputs.items() if isinstance(v, dict)]
    if stores:
        cols = [Col("path", "path"), Col("mode", "mode"), Col("layer", "layer"), Col("classes", "classes"),
                Col("images", "images")]
        fp = Col("fingerprint", lambda d: d.get("fingerprint"))
        t = table(stores, cols + [fp], first="store")
        parts.append("<h3>Stores</h3>" + _shorten_hashes(t, [d.get("fingerprint") for _, d in stores]))
    dicts = [d for d in inputs.get("dictionaries") or [] if isinstance(d, dict)]
    if dicts:
        cols = [Col("method", "method"), Col("k", "k"), Col("path", "path"),
                Col("fitted on (fingerprint)", "source_fingerprint")]
        t = table([(_record_name(d, i), d) for i, d in enumerate(dicts)], cols, first="dictionary")
        parts.append("<h3>Dictionaries</h3>" + _shorten_hashes(t, [d.get("source_fingerprint") for d in dicts]))
    for key, title in (("settings", "Settings"), ("h_check", "Check that h(g(x)) = model(x)")):
        if isinstance(ev.get(key), dict) and ev[key]:
            parts.append(f"<h3>{title}</h3>" + mapping_table(ev[key]))
    return "\n".join(parts)


def _shorten_hashes(page: str, hashes: list[Any]) -> str:
    for h in {x for x in hashes if isinstance(x, str) and len(x) > 16}:
        page = page.replace(_esc(h), _short(h))
    return page


def _demo_summary(ev_dir: Path) -> dict | None:
    """The demo's demo.json beside the evaluation folder, when it describes this very evaluation."""
    path = ev_dir.parent / "demo.json"
    if not path.is_file():
        return None
    try:
        demo = json.loads(path.read_text())
        same = Path(str(demo.get("evaluation", ""))).resolve() == (ev_dir / "evaluation.json").resolve()
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return demo if same else None


def find_parts(
    run_dir: str | os.PathLike[str],
    *,
    evaluate_dir: str | os.PathLike[str] | None = None,
    atlas_dir: str | os.PathLike[str] | None = None,
    explain_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Path | None]:
    """The evaluate / atlas / explain folders of a run: given ones, else sub-folders recognised by their JSON."""
    run = Path(run_dir)
    if not run.is_dir():
        raise C2MFError(f"run folder {str(run)!r} does not exist")
    found: dict[str, Path | None] = {"evaluate_dir": None, "atlas_dir": None, "explain_dir": None}
    marks = {"evaluate_dir": "evaluation.json", "atlas_dir": "atlas.json", "explain_dir": "explain.json"}
    for key, mark in marks.items():
        for cand in [run, *sorted(p for p in run.iterdir() if p.is_dir())]:
            if (cand / mark).is_file():
                found[key] = cand
                break
    given = {"evaluate_dir": evaluate_dir, "atlas_dir": atlas_dir, "explain_dir": explain_dir}
    for key, value in given.items():
        if value is not None:
            if not Path(value).is_dir():
                raise C2MFError(f"{key.replace('_dir', '')} folder {str(value)!r} does not exist")
            found[key] = Path(value)
    if not any(found.values()):
        raise C2MFError(f"nothing to report in {str(run)!r}: it has no evaluation.json, atlas.json or explain.json "
                        "(give --evaluate/--atlas/--explain)")
    return found


def build_report(
    out_dir: str | os.PathLike[str],
    evaluate_dir: str | os.PathLike[str] | None = None,
    atlas_dir: str | os.PathLike[str] | None = None,
    explain_dir: str | os.PathLike[str] | None = None,
    *,
    title: str = "c2mf report",
    embed: bool = True,
) -> Path:
    """Write out_dir/report.html and return its path.

    Sections, in reading order: at a glance (one row per method), ground-truth recovery (demo runs), metrics
    (paper-style tables, then plots), concept atlas, explained images, run details (stores, settings).

    Args:
        out_dir: where report.html goes.
        evaluate_dir: a `c2mf evaluate` output (evaluation.json + plots); its "recovery" entry, when present,
            gives the ground-truth section.
        atlas_dir: a `c2mf atlas` output (atlas.json, concept_NNN.png, overview.png).
        explain_dir: a `c2mf explain` output (explain.json, <image>.png/.json).
        embed: embed images as data URIs (one portable file); False links them relative to out_dir.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)
    lead = ""
    details = ""
    if evaluate_dir is not None:
        ev_dir = Path(evaluate_dir)
        jpath = ev_dir / "evaluation.json"
        ev = _read_json(jpath) if jpath.is_file() else {}
        if not isinstance(ev, dict):
            raise C2MFError(f"{jpath} is not an evaluation record (expected a JSON object)")
        lead = _lead(ev, _demo_summary(ev_dir))
        sections += _metrics_sections(ev, ev_dir, embed, out)
        details = _run_details(ev)
        if not sections:
            sections.append(("metrics", "Metrics", "<p class='muted'>empty folder</p>"))
    if atlas_dir is not None:
        sections.append(("atlas", "Concept atlas",
                         _atlas_section(Path(atlas_dir), embed, out) or "<p class='muted'>empty folder</p>"))
    if explain_dir is not None:
        sections.append(("explain", "Explained images",
                         _explain_section(Path(explain_dir), embed, out) or "<p class='muted'>empty folder</p>"))
    if details:
        sections.append(("details", "Run details", details))
    if not sections:
        raise C2MFError("nothing to report: give at least one of the evaluate, atlas or explain folders")
    nav = "".join(f"<a href='#{a}'>{_esc(t)}</a>" for a, t, _ in sections)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_esc(title)}</h1>{lead}</header><nav>{nav}</nav>"
        + "".join(f"<section id='{a}'><h2>{_esc(t)}</h2>{b}</section>" for a, t, b in sections)
        + "</body></html>\n"
    )
    path = out / "report.html"
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".html", dir=out)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def referenced_files(html_text: str) -> Iterable[str]:
    """The non-data src/href targets of a page (what must exist beside it)."""
    from html.parser import HTMLParser

    refs: list[str] = []

    class P(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            for k, v in attrs:
                if k in ("src", "href") and v and not v.startswith(("data:", "#")):
                    refs.append(v)

    P().feed(html_text)
    return refs
