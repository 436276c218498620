"""The demo's part of the report: its ground-truth recovery, passed into the generic report as an Extension.

`c2mf report` and the demo call `demo_extension(evaluate_dir)`: when evaluation.json holds the "recovery" entry
the demo writes (c2mf_cli/demo/pipeline.py), it gives the ground-truth columns of the summary table, the
"Ground-truth recovery" section and, when the demo's demo.json sits beside, the demo model's accuracy.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from ..report.page import Extension, Section, json_sections, table
from ..report.tables import DASH as _DASH
from ..report.tables import Col, fmt, get, is_num


def demo_extension(evaluate_dir: str | Path) -> Extension:
    """The demo's additions to the report of `evaluate_dir`; an empty Extension for any other evaluation."""
    ev_dir = Path(evaluate_dir)
    try:
        ev = json.loads((ev_dir / "evaluation.json").read_text())
    except (OSError, json.JSONDecodeError):
        return Extension()  # the report itself says what is wrong with the file
    recovery = ev.get("recovery") if isinstance(ev, dict) and isinstance(ev.get("recovery"), dict) else None
    if recovery is None:
        return Extension()
    names = [str(m.get("name")) for m in ev.get("methods") or [] if isinstance(m, dict)]
    lead: tuple[tuple[str, str], ...] = ()
    demo = _demo_summary(ev_dir)
    if demo and isinstance(demo.get("model"), dict) and is_num(demo["model"].get("test_accuracy")):
        lead = (("demo model", f"test accuracy {fmt(100 * float(demo['model']['test_accuracy']))} %"),)
    return Extension(
        summary_cols=tuple(summary_columns(recovery)),
        sections=(Section("recovery", "Ground-truth recovery", recovery_section(recovery, names)),),
        lead=lead,
        says=tuple(_says(recovery)),
        keys=frozenset({"recovery"}),
    )


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _says(recovery: dict) -> list[str]:
    """The ground truth in one sentence: which method's heatmaps find the planted primitives best."""
    heat = recovery.get("heatmaps") if isinstance(recovery.get("heatmaps"), dict) else {}
    ious = [(m, get(r, "per_class.mean")) for m, r in heat.items() if isinstance(r, dict)]
    ious = [(m, float(v)) for m, v in ious if is_num(v)]
    if not ious:
        return []
    m, v = max(ious, key=lambda t: t[1])
    ceiling = get(recovery, "references.grid_ceiling.mean")
    s = (f"Ground truth: <b>{_esc(m)}</b>'s heatmaps find the planted primitives best (IoU {fmt(v)}"
         + (f"; the best any map on this grid can reach is {fmt(float(ceiling))}" if is_num(ceiling) else "") + ").")
    return [s]


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


def summary_columns(recovery: dict) -> list[Col]:
    """Ground-truth columns for the summary table (they read each method's record by its name)."""
    heat = recovery.get("heatmaps") if isinstance(recovery.get("heatmaps"), dict) else {}
    planted = recovery.get("planted_dictionary") if isinstance(recovery.get("planted_dictionary"), dict) else {}
    return [
        Col("heatmap IoU", lambda m: get(heat, f"{m.get('name')}.per_class.mean"), "high",
            tip="ground truth: concept heatmaps against the planted primitives' masks"),
        Col("planted cos W\u207a", lambda m: get(planted, f"nonnegative.{m.get('name')}.mean"), "high",
            tip="ground truth: matched cosine to a planted non-negative dictionary"),
        Col("planted cos W\u00b1", lambda m: get(planted, f"signed.{m.get('name')}.mean"), "high",
            tip="ground truth: matched cosine to a planted signed dictionary"),
    ]


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
               if is_num(level) else "thresholded")
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
