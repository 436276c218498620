"""One self-contained HTML page that gathers a run: what was measured on what, a summary in words, metric
tables, plots, concept cards, explained images.

Every picture is embedded as a base64 data URI and the page's small script (sortable tables, a class filter)
is inline, so the page is one file that opens anywhere, with no network and no server. Tables follow the
paper's layout, described once in `report.tables` (the terminal prints the same ones): one row per method, one
column per measure, arrows saying which direction is better and the best value of each column in bold.

The report is generic: a caller with results of its own (the demo's ground-truth recovery) passes them in as
an `Extension` (columns for the summary table, sections, lead lines); this module knows no such schema.

The page reads what it knows by path (`similarity.pearson_mean`, ...) and shows a dash where a field is
missing, so an older or partial evaluation still renders. Fields it does not know are not dropped: every
method field no table uses lands in "Other measures" (one row per method, grouped by its first key), and
unknown top-level entries of evaluation.json are rendered generically, so fields added later still show.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .._io import unique_names, write_text
from ..errors import C2MFError
from .tables import (
    DASH,
    IMPORTANCE,
    RANKING_NAMES,
    SUMMARY,
    Built,
    Col,
    Significance,
    TableSpec,
    best_rows,
    build,
    evaluation_tables,
    fmt,
    get,
    is_num,
    keeps_decision,
    method_label,
    summarise_list,
    used_paths,
)

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
.side{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:1em;align-items:start}
details{margin:.8em 0}summary{cursor:pointer;color:var(--best)}
.ok{color:#1a7f37}.bad{color:#b42318}
th.sort{cursor:pointer}th.sort:after{content:" \\2195";color:#b9b9c0;font-size:.8em}
th.asc:after{content:" \\25B2";color:var(--best)}th.desc:after{content:" \\25BC";color:var(--best)}
input.filter{font:inherit;padding:.25em .5em;margin:.4em 0;border:1px solid var(--line);border-radius:4px;
min-width:18em}
ul.says{margin:.4em 0 1em;padding-left:1.3em}ul.says li{margin:.25em 0}
.warn{background:#fff4e5;border-left:3px solid #e8a33d;padding:.4em .7em;margin:.6em 0}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:.5em 0 1em;font-size:.95em}
.facts dt{color:var(--muted)}.facts dd{margin:0}
"""

# Sort a table by clicking a header (numbers by value, text alphabetically; again to reverse), and keep only
# the rows whose first cell contains a filter box's text. Vanilla JS, inline: the page stays one file.
_SCRIPT = """
(function(){
function val(td){var v=td.getAttribute('data-v');if(v!==null&&v!=='')return parseFloat(v);
 return td.textContent.trim().toLowerCase();}
document.querySelectorAll('table.sortable').forEach(function(t){
 var heads=t.tHead.rows[t.tHead.rows.length-1].cells;
 Array.prototype.forEach.call(heads,function(th,j){th.classList.add('sort');th.addEventListener('click',function(){
  var asc=!th.classList.contains('asc');Array.prototype.forEach.call(heads,function(h){h.classList.remove('asc','desc');});
  th.classList.add(asc?'asc':'desc');var body=t.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
  rows.sort(function(a,b){var x=val(a.cells[j]),y=val(b.cells[j]);var nx=typeof x==='number'&&!isNaN(x),
   ny=typeof y==='number'&&!isNaN(y);if(nx!==ny)return nx?-1:1;if(x<y)return asc?-1:1;if(x>y)return asc?1:-1;
   return 0;});rows.forEach(function(r){body.appendChild(r);});});});});
document.querySelectorAll('input.filter').forEach(function(inp){
 var t=document.getElementById(inp.getAttribute('data-table'));inp.addEventListener('input',function(){
  var q=inp.value.trim().toLowerCase();Array.prototype.forEach.call(t.tBodies[0].rows,function(r){
   r.style.display=(!q||r.cells[0].textContent.toLowerCase().indexOf(q)>=0)?'':'none';});});});
})();
"""

_NAME_KEYS = ("name", "method", "source", "label", "id")
_DASH = DASH


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


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


# ---------------------------------------------------------------------------------------------- tables


def table(
    rows: Sequence[tuple[str, Any]],
    cols: Sequence[Col],
    *,
    caption: str = "",
    first: str = "method",
    compare: Sequence[bool] | None = None,
    ref_rows: Sequence[bool] | None = None,
    keep_empty: bool = False,
    sortable: bool = False,
    table_id: str = "",
    significance: Significance | None = None,
) -> str:
    """Rows (label, record) against columns as HTML (`tables.build` decides the cells and the bold ones).

    `caption` is HTML. `compare[i]` False keeps row i out of the best-value contest (yardsticks); `ref_rows[i]`
    draws it in italics below a rule. `sortable` lets a reader sort by clicking a header (the page's script).
    """
    built = build(rows, cols, first=first, compare=compare, ref_rows=ref_rows, keep_empty=keep_empty,
                  significance=significance)
    return html_table(built, caption_html=caption, sortable=sortable, table_id=table_id)


def html_table(t: Built, *, caption_html: str | None = None, sortable: bool = False, table_id: str = "") -> str:
    """A built table as HTML: bold cells of class 'best', flagged numbers marked (!), references in italics
    below a rule, notes under the table; each numeric cell carries its exact value for sorting."""
    if not t.rows or not t.cols:
        return ""
    head = ""
    if any(c.group for c in t.cols):
        spans: list[tuple[str, int]] = []
        for c in t.cols:
            if spans and spans[-1][0] == c.group:
                spans[-1] = (c.group, spans[-1][1] + 1)
            else:
                spans.append((c.group, 1))
        head = "<tr><th></th>" + "".join(
            f"<th class='grp' colspan='{n}'>{_esc(g)}</th>" if g else f"<th colspan='{n}'></th>" for g, n in spans
        ) + "</tr>"
    text_col = [t.text_column(j) for j in range(len(t.cols))]
    head += f"<tr><th class='k'>{_esc(t.first)}</th>" + "".join(
        f"<th{' class=t' if text_col[j] else ''}{f' title={chr(39)}{_esc(c.tip)}{chr(39)}' if c.tip else ''}>"
        f"{_esc(c.header())}</th>" for j, c in enumerate(t.cols)) + "</tr>"
    body = []
    for i, row in enumerate(t.rows):
        sep = " class='sep'" if row.reference and (i == 0 or not t.rows[i - 1].reference) else ""
        cells = []
        for cell in row.cells:
            text = _esc(cell.text)
            if cell.std:
                text += f" <span class='muted'>&plusmn; {_esc(cell.std)}</span>"
            if cell.flagged:
                text += " <span class='bad' title='h(UW) disagrees with the model: not the model&#39;s reasons'>(!)</span>"
            cls = "best" if cell.bold else ("t" if cell.value is None and cell.text != DASH else "")
            data = f" data-v='{cell.value!r}'" if sortable and cell.value is not None else ""
            cells.append(f"<td class='{cls}'{data}>{text}</td>" if cls else f"<td{data}>{text}</td>")
        kcls = "k ref" if row.reference else "k"
        body.append(f"<tr{sep}><td class='{kcls}'>{_esc(row.label)}</td>{''.join(cells)}</tr>")
    caption = _esc(t.caption) if caption_html is None else caption_html
    cap = f"<caption>{caption}</caption>" if caption else ""
    attrs = (" class='sortable'" if sortable else "") + (f" id='{_esc(table_id)}'" if table_id else "")
    notes = "".join(f"<p class='bad'>{_esc(n)}</p>" for n in t.notes)
    return (f"<div class='scroll'><table{attrs}>{cap}<thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"
            f"</div>{notes}")


def spec_table(spec: TableSpec, rows: Sequence[tuple[str, Any]], *, extra: Sequence[Col] = (),
               caption_extra: str = "", sortable: bool = False, first: str = "method",
               significance: Significance | None = None) -> str:
    """An HTML table from a shared `TableSpec` (plus optional extra columns)."""
    caption = _esc(spec.caption) + (" " + caption_extra if caption_extra else "")
    return table(rows, [*spec.cols, *extra], caption=caption, sortable=sortable, first=first,
                 significance=significance)


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
                   f"{_esc(fmt(v))}</td></tr>" for k, v in flat.items())
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
            parts.append(f"<p><b>{_esc(k)}</b>: {_esc(summarise_list(v))}</p>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- evaluate tables

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
            if isinstance(v, list) and v and all(is_num(e) or e is None for e in v):
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


def _per_class_table(methods: list[dict], labels: list[str], path: str, caption: str, table_id: str) -> str:
    """Classes as rows (sortable, with a class filter above), one column per method."""
    per = [get(m, path) if isinstance(get(m, path), dict) else {} for m in methods]
    classes: list[str] = []
    for p in per:
        classes += [c for c in p if c not in classes]
    if not classes:
        return ""
    rows = [(str(c), {lab: p.get(c) for lab, p in zip(labels, per)}) for c in classes]
    cols = [Col(lab, (lambda d, lab=lab: d.get(lab)), "high", arrow=False) for lab in labels]
    box = (f"<input class='filter' type='search' data-table='{_esc(table_id)}' "
           f"placeholder='filter classes ({len(classes)})' aria-label='filter classes'>")
    return box + table(rows, cols, caption=caption, first="class", sortable=True, table_id=table_id)


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
        return f"Concept insertion / deletion ranked by {RANKING_NAMES.get(parts[2], parts[2])}: {what}"
    return stem.replace("_", " ")


def _plot_order(p: Path) -> tuple[int, str]:
    order = ["accuracy_vs_k", "confidence_histograms"]
    return (order.index(p.stem) if p.stem in order else len(order), p.stem)


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


def _pngs(folder: Path, refused: list[str]) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if not p.name.startswith(".") and _inside(folder, p.name, refused))


def _inside(folder: Path, name: Any, refused: list[str]) -> Path | None:
    """`folder / name` if it lies inside `folder` once links are resolved, else None with `name` noted in `refused`.

    A run folder may come from someone else: the file names its JSON holds must not pull another file of this
    machine (an absolute path, `../`, a link out) into a page that is then shared.
    """
    path = folder / str(name)
    try:
        ok = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop
        ok = False
    if not ok:
        refused.append(str(path))
        return None
    return path


def _short_path(p: Any, keep: int = 2) -> str:
    parts = Path(str(p)).parts
    return "/".join(parts[-keep:]) if parts else str(p)


def _atlas_section(at: Path, embed: bool, out: Path, refused: list[str]) -> str:
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
    concepts = rec.get("concepts") or [{"concept": p.stem, "png": p.name} for p in _pngs(at, refused)
                                        if p.name != "overview.png"]
    for c in concepts:
        png = _inside(at, c.get("png", ""), refused)
        if png is None or not png.is_file():
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
        vals = [float(r["value"]) for r in regs if is_num(r.get("value"))]
        if vals:
            meta.append(f"code {max(vals):.3g} .. {min(vals):.3g}")
        name = f" <span class='name'>{_esc(c['name'])}</span>" if c.get("name") else ""
        cards.append(f"<div class='card'><h3>concept {_esc(c.get('concept'))}{name}</h3>"
                     f"<div class='muted'>{' &middot; '.join(meta)}</div>"
                     + _img(png, f"concept {c.get('concept')}", embed, out) + "</div>")
    if cards:
        body.append("<div class='cards'>" + "".join(cards) + "</div>")
    ov = _inside(at, rec.get("overview") or "overview.png", refused)
    if ov is not None and ov.is_file() and ov.suffix == ".png":
        fig = f"<figure>{_img(ov, 'atlas overview', embed, out)}</figure>"
        body.append(f"<details><summary>all concepts in one figure</summary>{fig}</details>" if cards else fig)
    missing = rec.get("missing")
    if isinstance(missing, list) and missing:
        body.append(f"<p class='muted'>concepts with no region: {summarise_list(missing)}</p>")
    return "\n".join(body)


def _explain_items(ex: Path, refused: list[str]) -> tuple[dict, list[dict]]:
    summary = _read_json(ex / "explain.json") if (ex / "explain.json").is_file() else {}
    summary = summary if isinstance(summary, dict) else {}
    items = summary.get("explained") or [{"png": p.name, "image": p.stem} for p in _pngs(ex, refused)]
    return summary, [e for e in items if isinstance(e, dict)]


def _explain_figure(ex: Path, e: dict, embed: bool, out: Path, refused: list[str], title: str = "") -> str | None:
    """One explained image as a figure with its caption; None when its PNG is missing or outside `ex`."""
    png = _inside(ex, e.get("png", ""), refused)
    if png is None or not png.is_file():
        return None
    cap = f"<b>{_esc(title)}</b> &middot; " if title else ""
    cap += f"<b>{_esc(_short_path(e.get('image', png.stem)))}</b>"
    pred = e.get("prediction") if isinstance(e.get("prediction"), dict) else {}
    expl = e.get("explained") if isinstance(e.get("explained"), dict) else {}
    if pred.get("label") is not None:
        cap += f" &middot; predicted {_esc(pred['label'])}"
    if expl.get("label") is not None:
        cap += f" &middot; explained {_esc(expl['label'])}"
        if is_num(expl.get("probability")):
            cap += f" (p = {fmt(float(expl['probability']))})"
    if e.get("dictionary_class") is not None:  # whose gates / dictionary the codes used
        cap += f" &middot; codes of class {_esc(e['dictionary_class'])}"
    if isinstance(e.get("top_concepts"), list):
        cap += " &middot; concepts drawn " + _esc(", ".join(map(str, e["top_concepts"])) or "none")
    for note in e.get("notes") or []:
        cap += f"<br><span class='bad'>{_esc(note)}</span>"
    return f"<figure>{_img(png, png.stem, embed, out)}<figcaption>{cap}</figcaption></figure>"


def _explain_lead(summary: dict) -> str:
    cfg = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    if not (summary.get("dictionary") or cfg.get("importance")):
        return ""
    return (f"dictionary <b>{_esc(summary.get('dictionary', '?'))}</b>; concept importance by "
            f"{_esc(RANKING_NAMES.get(str(cfg.get('importance')), cfg.get('importance', '?')))}")


def _explain_section(folders: Sequence[Path], embed: bool, out: Path, refused: list[str]) -> str:
    """Explained images; with several explain folders (one per dictionary), each image's explanations side by
    side, matched by the image's path, one column per folder."""
    read = [(ex, *_explain_items(ex, refused)) for ex in folders]
    body = []
    if len(read) == 1:
        ex, summary, items = read[0]
        lead = _explain_lead(summary)
        if lead:
            body.append(f"<p class='lead'>{lead} for the explained class; the heatmaps are the codes of the top "
                        "concepts on the model's grid, upsampled onto the image.</p>")
        body += [f for f in (_explain_figure(ex, e, embed, out, refused) for e in items) if f]
    else:
        titles = unique_names([Path(str(summary.get("dictionary") or ex.name)).stem or ex.name
                                 for ex, summary, _ in read])
        body.append("<p class='lead'>The same images explained with each dictionary, side by side (one column per "
                    "explain folder): " + "; ".join(f"<b>{_esc(t)}</b>: {_explain_lead(summary) or _esc(ex.name)}"
                                                    for t, (ex, summary, _) in zip(titles, read)) + ".</p>")
        order: list[str] = []
        by_image: list[dict[str, dict]] = []
        for _, _, items in read:
            index = {}
            for e in items:
                key = str(e.get("image", e.get("png", "")))
                index[key] = e
                if key not in order:
                    order.append(key)
            by_image.append(index)
        for key in order:
            cells = []
            for title, (ex, _, _), index in zip(titles, read, by_image):
                fig = _explain_figure(ex, index[key], embed, out, refused, title) if key in index else None
                cells.append(fig or f"<p class='muted'><b>{_esc(title)}</b>: not explained here</p>")
            body.append(f"<div class='side'>{''.join(cells)}</div>")
    for ex, summary, _ in read:
        for f in summary.get("failed") or []:
            body.append(f"<p class='muted'>failed ({_esc(ex.name)}): {_esc(f.get('image'))}: "
                        f"{_esc(f.get('error'))}</p>")
    return "\n".join(body)


# ---------------------------------------------------------------------------------------------- the page


_KNOWN_TOP = {"encoding-type", "encoding-version", "c2mf_version", "inputs", "settings", "h_check", "methods",
              "clustering", "ood", "time_s", "files"}


@dataclass(frozen=True)
class Section:
    """A section of the page: its anchor (for the navigation), heading and HTML body."""

    anchor: str
    title: str
    html: str


@dataclass(frozen=True)
class Extension:
    """What a caller adds to the generic report (the demo: its ground-truth recovery).

    Attributes:
        summary_cols: extra columns of the "At a glance" table (they read each method's record).
        sections: placed right after "At a glance".
        lead: extra facts for the head of the page, (label, plain text) pairs.
        says: extra sentences for "What this says" (HTML).
        keys: top-level keys of evaluation.json the extension renders (not shown again generically).
    """

    summary_cols: tuple[Col, ...] = ()
    sections: tuple[Section, ...] = ()
    lead: tuple[tuple[str, str], ...] = ()
    says: tuple[str, ...] = ()
    keys: frozenset[str] = frozenset()


def _facts(ev: dict, extension: Extension) -> str:
    """Model, layer, data, dictionaries and how they were measured, at the top of the page."""
    inputs = ev.get("inputs") if isinstance(ev.get("inputs"), dict) else {}
    tr = inputs.get("train") if isinstance(inputs.get("train"), dict) else {}
    te = inputs.get("test") if isinstance(inputs.get("test"), dict) else {}
    facts: list[tuple[str, str]] = []
    if tr.get("model") or te.get("model"):
        facts.append(("model", str(tr.get("model") or te.get("model"))))
    if tr.get("layer"):
        facts.append(("layer", str(tr["layer"])))
    data = [f"{k} {d['data']}" for k, d in (("train", tr), ("test", te)) if d.get("data")]
    counts = []
    if tr.get("images") is not None or te.get("images") is not None:
        counts.append(f"{fmt(tr.get('images'))} train / {fmt(te.get('images'))} test images")
    if tr.get("classes"):
        counts.append(f"{fmt(tr['classes'])} classes")
    if data or counts:
        facts.append(("data", "; ".join([*data, ", ".join(counts)] if counts else data)))
    dicts = [d for d in inputs.get("dictionaries") or [] if isinstance(d, dict)]
    if dicts:
        facts.append(("dictionaries", ", ".join(f"{d.get('name', d.get('method', '?'))} (k = {d.get('k', '?')})"
                                               for d in dicts)))
    facts += list(extension.lead)
    meta = []
    if ev.get("c2mf_version"):
        meta.append(f"c2mf {ev['c2mf_version']}")
    if is_num(ev.get("time_s")):
        meta.append(f"evaluated in {fmt(float(ev['time_s']))} s")
    if meta:
        facts.append(("run", ", ".join(meta)))
    if not facts:
        return ""
    return "<dl class='facts'>" + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in facts) + "</dl>"


def _against_references(ev: dict, labels: list[str], methods: list[dict]) -> list[str]:
    """Sentences reading the methods against the class mean alone (k = 0): the ones that do not beat it, and the
    ones above it only by a difference the exact McNemar test does not find significant. `labels` are shown;
    evaluate's notes and tests name each method by its record's "name"."""
    notes = [str(n) for n in ev.get("notes") or []]
    names = [str(m.get("name", lab)) for lab, m in zip(labels, methods)]
    shown = dict(zip(names, labels))
    below = [shown[n] for n in names if any(x.startswith(f"{n} does not beat the reference") for x in notes)]
    out = []
    if below:
        out.append("<span class='bad'>" + ", ".join(f"<b>{_esc(x)}</b>" for x in below) + (" does" if len(below) == 1
                   else " do") + " not beat a class's train mean alone (k = 0, no concept at all) under at least one "
                   "encoding: what those numbers show, the class mean already gives (see the reference rows).</span>")
    sig = ev.get("significance") or {}
    pairs, alpha = sig.get("pairs") or [], float(sig.get("alpha", 0.05))
    for name in names:
        lab = shown[name]
        if lab in below:
            continue
        for pr in pairs:
            other = pr.get("b") if pr.get("a") == name else pr.get("a") if pr.get("b") == name else None
            if (pr.get("measure") == "agreement" and isinstance(other, str) and "mean only" in other
                    and is_num(pr.get("p")) and float(pr["p"]) >= alpha):
                out.append(f"<b>{_esc(lab)}</b>'s agreement with the model is not significantly different from the "
                           f"{_esc(other)} reference (exact McNemar p = {fmt(float(pr['p']))}): its fidelity may be "
                           "the class mean's, not its concepts'.")
    return out


def _says(ev: dict, labels: list[str], methods: list[dict], extension: Extension) -> str:
    """"What this says": a few sentences computed from the numbers (best method per question, warnings)."""
    out: list[str] = []
    inputs = ev.get("inputs") if isinstance(ev.get("inputs"), dict) else {}
    n_classes = get(inputs, "train.classes")
    chance = ev.get("chance") if is_num(ev.get("chance")) else (
        1.0 / n_classes if is_num(n_classes) and n_classes > 0 else None)

    def best(path: str, better: str) -> tuple[str, float] | None:
        vals = [get(m, path) for m in methods]
        idx = best_rows(vals, better)  # type: ignore[arg-type]
        if len(idx) != 1:
            return None
        i = next(iter(idx))
        return labels[i], float(vals[i])

    b = best("reconstruction.accuracy.mean", "high")
    if b:
        s = f"<b>{_esc(b[0])}</b> keeps the most of the model's accuracy when the activations are replaced by " \
            f"their reconstruction (class accuracy {fmt(b[1])}"
        out.append(s + (f"; chance is {fmt(chance)})." if chance is not None else ")."))
    out += _against_references(ev, labels, methods)
    low = [(lab, get(m, "reconstruction.agreement.mean")) for lab, m in zip(labels, methods) if not keeps_decision(m)]
    for lab, a in low:
        agrees = f"agrees with the model on only {fmt(float(a))} of the test images" if is_num(a) else \
            "does not keep the model's decision"
        out.append(f"<span class='bad'><b>{_esc(lab)}</b>: its reconstruction {agrees}, so its insertion / "
                   "deletion numbers describe another "
                   "model than yours (marked (!), never bold); do not read them as the model's reasons.</span>")
    ok = [i for i, m in enumerate(methods) if keeps_decision(m)]
    ins = [(labels[i], get(methods[i], "insertion_deletion.gradcam.insertion.prob_auc")) for i in ok]
    ins = [(lab, float(v)) for lab, v in ins if is_num(v)]
    if len(ins) >= 2:
        lab, v = max(ins, key=lambda t: t[1])
        out.append(f"Among methods that preserve the decision, <b>{_esc(lab)}</b>'s concepts explain the class "
                   f"best: inserting them in order of importance brings the class probability back fastest "
                   f"(insertion AUC {fmt(v)}).")
    b = best("similarity.pearson_mean", "low")
    if b:
        out.append(f"<b>{_esc(b[0])}</b> has the most distinct concepts (mean |Pearson r| {fmt(b[1])} between "
                   "dictionary rows; PCA's are uncorrelated by construction).")
    gaps = [(lab, get(m, "consistency.train_mse"), get(m, "consistency.test_mse")) for lab, m in zip(labels, methods)]
    over = [lab for lab, a, t in gaps if is_num(a) and is_num(t) and a > 0 and t > 1.25 * a]
    if over:
        out.append("Test reconstruction error is more than 25 % above train for " + ", ".join(
            f"<b>{_esc(x)}</b>" for x in over) + ": these dictionaries fit their training rows better than new ones.")
    out += list(extension.says)
    if not out:
        return ""
    return "<ul class='says'>" + "".join(f"<li>{x}</li>" for x in out) + "</ul>"


def _metrics_sections(ev: dict, ev_dir: Path, embed: bool, out: Path, extension: Extension,
                      refused: list[str]) -> list[Section]:
    methods = [m for m in ev.get("methods") or [] if isinstance(m, dict)]
    labels = [method_label(m, i) for i, m in enumerate(methods)]
    rows = list(zip(labels, methods))
    secs: list[Section] = []
    says = _says(ev, labels, methods, extension)
    if says:
        secs.append(Section("says", "What this says", says))
    if methods:
        glance = spec_table(SUMMARY, rows, extra=extension.summary_cols, sortable=True,
                            significance=Significance.of(ev))
        secs.append(Section("summary", "At a glance", glance))
    secs += list(extension.sections)
    body = []
    built = evaluation_tables(ev)  # the tables `c2mf evaluate` prints, drawn here in HTML
    last_block = max((i for i, t in enumerate(built) if t.key == "reconstruction"), default=None)
    for i, t in enumerate(built):
        body.append(f"<h3>{_esc(t.title)}</h3>" + html_table(t, sortable=True))
        if i == last_block:  # after the reconstruction blocks: every class's numbers
            body += [
                _details("accuracy of every class", _per_class_table(
                    methods, labels, "reconstruction.accuracy.per_class",
                    "h(UW) accuracy per class, test images; click a header to sort.", "per-class-accuracy")),
                _details("agreement of every class", _per_class_table(
                    methods, labels, "reconstruction.agreement.per_class",
                    "h(UW) agreement per class, test images; click a header to sort.", "per-class-agreement")),
            ]
    if methods:
        used = used_paths(c for t in built for c in t.cols) | used_paths(IMPORTANCE.cols) | _SHOWN_ELSEWHERE
        other = _other_measures(methods, labels, used)
        if other:
            body.append("<h3>Other measures</h3>" + other)
    plots = sorted(_pngs(ev_dir, refused), key=_plot_order)
    if plots:
        body.append("<h3>Plots</h3><div class='plots'>" + "".join(
            f"<figure>{_img(p, _plot_caption(p.stem), embed, out)}<figcaption>{_esc(_plot_caption(p.stem))}"
            "</figcaption></figure>" for p in plots) + "</div>")
    unknown = {k: v for k, v in ev.items() if k not in _KNOWN_TOP | extension.keys}
    if unknown:
        body.append("<h3>Other results</h3>" + json_sections(unknown, 4))
    if body:
        secs.append(Section("metrics", "Metrics", "\n".join(b for b in body if b)))
    return secs


def _details(title: str, inner: str) -> str:
    return f"<details><summary>{_esc(title)}</summary>{inner}</details>" if inner else ""


def _run_details(ev: dict) -> str:
    parts = []
    inputs = ev.get("inputs") if isinstance(ev.get("inputs"), dict) else {}
    stores = [(k, v) for k, v in inputs.items() if isinstance(v, dict)]
    if stores:
        cols = [Col("path", "path"), Col("model", "model"), Col("data", "data"), Col("mode", "mode"),
                Col("layer", "layer"), Col("classes", "classes"), Col("images", "images")]
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


def find_parts(
    run_dir: str | os.PathLike[str],
    *,
    evaluate_dir: str | os.PathLike[str] | None = None,
    atlas_dir: str | os.PathLike[str] | None = None,
    explain_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """The evaluate / atlas / explain folders of a run: given ones, else sub-folders recognised by their JSON.

    Every explain folder found (one per dictionary) is kept, in name order: the report shows them side by side.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise C2MFError(f"run folder {str(run)!r} does not exist")
    found: dict[str, Any] = {"evaluate_dir": None, "atlas_dir": None, "explain_dir": None}
    marks = {"evaluate_dir": "evaluation.json", "atlas_dir": "atlas.json", "explain_dir": "explain.json"}
    candidates = [run, *sorted(p for p in run.iterdir() if p.is_dir())]
    for key, mark in marks.items():
        hits = [cand for cand in candidates if (cand / mark).is_file()]
        if hits:
            found[key] = hits if key == "explain_dir" else hits[0]
    given = {"evaluate_dir": evaluate_dir, "atlas_dir": atlas_dir, "explain_dir": explain_dir}
    for key, value in given.items():
        if value is None or (key == "explain_dir" and isinstance(value, (list, tuple)) and not value):
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if not Path(v).is_dir():
                raise C2MFError(f"{key.replace('_dir', '')} folder {str(v)!r} does not exist")
        found[key] = [Path(v) for v in values] if key == "explain_dir" else Path(values[0])
    if not any(found.values()):
        raise C2MFError(f"nothing to report in {str(run)!r}: it has no evaluation.json, atlas.json or explain.json "
                        "(give --evaluate/--atlas/--explain)")
    return found


def build_report(
    out_dir: str | os.PathLike[str],
    evaluate_dir: str | os.PathLike[str] | None = None,
    atlas_dir: str | os.PathLike[str] | None = None,
    explain_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    title: str = "c2mf report",
    embed: bool = True,
    extension: Extension = Extension(),
) -> Path:
    """Write out_dir/report.html and return its path.

    Sections, in reading order: the model, layer and data at the top; what this says (a few sentences from the
    numbers); at a glance (one row per method); the extension's sections; metrics (paper-style tables, then
    plots); concept atlas; explained images; run details (stores, settings).

    Args:
        out_dir: where report.html goes.
        evaluate_dir: a `c2mf evaluate` output (evaluation.json + plots).
        atlas_dir: a `c2mf atlas` output (atlas.json, concept_NNN.png, overview.png).
        explain_dir: a `c2mf explain` output (explain.json, <image>.png/.json), or several (one per dictionary,
            shown side by side image by image).
        embed: embed images as data URIs (one portable file); False links them relative to out_dir.
        extension: what a caller adds (the demo passes its ground-truth recovery).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    refused: list[str] = []  # files the folders' JSON name outside their folder
    lead = ""
    details = ""
    if evaluate_dir is not None:
        ev_dir = Path(evaluate_dir)
        jpath = ev_dir / "evaluation.json"
        ev = _read_json(jpath) if jpath.is_file() else {}
        if not isinstance(ev, dict):
            raise C2MFError(f"{jpath} is not an evaluation record (expected a JSON object)")
        lead = _facts(ev, extension)
        sections += _metrics_sections(ev, ev_dir, embed, out, extension, refused)
        details = _run_details(ev)
        if not sections:
            sections.append(Section("metrics", "Metrics", "<p class='muted'>empty folder</p>"))
    if atlas_dir is not None:
        sections.append(Section("atlas", "Concept atlas", _atlas_section(Path(atlas_dir), embed, out, refused)
                                or "<p class='muted'>empty folder</p>"))
    if explain_dir is not None:
        folders = [Path(p) for p in explain_dir] if isinstance(explain_dir, (list, tuple)) else [Path(explain_dir)]
        sections.append(Section("explain", "Explained images", _explain_section(folders, embed, out, refused)
                                or "<p class='muted'>empty folder</p>"))
    if details:
        sections.append(Section("details", "Run details", details))
    if refused:
        sections.append(Section("refused", "Files not shown", "<p>These files are named by the run folder's JSON but "
                                "lie outside their folder, so they were not put into this page:</p><ul>"
                                + "".join(f"<li><code>{_esc(r)}</code></li>" for r in refused) + "</ul>"))
    if not sections:
        raise C2MFError("nothing to report: give at least one of the evaluate, atlas or explain folders")
    nav = "".join(f"<a href='#{s.anchor}'>{_esc(s.title)}</a>" for s in sections)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_esc(title)}</h1>{lead}</header><nav>{nav}</nav>"
        + "".join(f"<section id='{s.anchor}'><h2>{_esc(s.title)}</h2>{s.html}</section>" for s in sections)
        + f"<script>{_SCRIPT}</script></body></html>\n"
    )
    return write_text(out / "report.html", page)


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
