"""One self-contained HTML page that gathers a run: metric tables, plots, concept cards, explained images.

Every picture is embedded as a base64 data URI, so the page is one file that opens anywhere, with no network,
no external CSS or JavaScript. The evaluate JSON is rendered generically, so fields added later still show:
a list of records becomes one comparison table (one column per record: a method, a clustering run...), a
record of numbers becomes a two-column table, nested records are flattened to dotted names, and long lists
of numbers are summarised.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import C2MFError

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.k,th.k{text-align:left;font-family:ui-monospace,monospace}
img{max-width:100%;height:auto;border:1px solid #eee}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:1em}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em;background:#fafafa}
.card h4{margin:.1em 0 .4em 0}.muted{color:#777;font-size:.85em}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
nav a{margin-right:1em}
"""

_NAME_KEYS = ("name", "method", "source", "label", "id")


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return _esc(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.3e}"
        return f"{x:.4g}"
    return _esc(x)


def _summarise_list(v: list) -> str:
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
        if len(v) <= 6:
            return "[" + ", ".join(_num(e) for e in v) + "]"
        return f"{len(v)} values, {_num(min(v))} .. {_num(max(v))}"
    if all(isinstance(e, str) for e in v) and len(v) <= 6:
        return _esc(", ".join(v))
    return f"{len(v)} items"


def _flatten(d: dict, prefix: str = "", depth: int = 4) -> dict[str, Any]:
    """Dotted keys -> scalars (lists summarised); records nested deeper than `depth` are skipped."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if depth > 0:
                out.update(_flatten(v, key + ".", depth - 1))
        elif isinstance(v, list):
            if v and all(isinstance(e, dict) for e in v):
                continue  # a table of its own
            out[key] = _summarise_list(v)
        else:
            out[key] = v
    return out


def _record_name(r: dict, i: int) -> str:
    for k in _NAME_KEYS:
        if isinstance(r.get(k), (str, int)):
            extra = f" k={r['k']}" if k in ("name", "method") and "k" in r and f"k={r['k']}" not in str(r[k]) else ""
            return f"{r[k]}{extra}"
    return f"#{i}"


def _cell(v: Any) -> str:
    return _esc(v) if isinstance(v, str) else _num(v)


def records_table(records: list[dict]) -> str:
    """A list of records as one table: a row per (dotted) field, a column per record."""
    flat = [_flatten(r) for r in records]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    head = "".join(f"<th>{_esc(_record_name(r, i))}</th>" for i, r in enumerate(records))
    rows = "".join(
        f"<tr><td class='k'>{_esc(k)}</td>" + "".join(f"<td>{_cell(f.get(k, ''))}</td>" for f in flat) + "</tr>"
        for k in keys
    )
    return f"<table><tr><th class='k'>field</th>{head}</tr>{rows}</table>"


def mapping_table(d: dict) -> str:
    flat = _flatten(d)
    rows = "".join(f"<tr><td class='k'>{_esc(k)}</td><td>{_cell(v)}</td></tr>" for k, v in flat.items())
    return f"<table>{rows}</table>"


def json_sections(obj: dict, level: int = 3) -> str:
    """Render an evaluate-like JSON generically: scalars of the top level first, then one section per key."""
    parts = []
    scalars = {k: v for k, v in obj.items() if not isinstance(v, (dict, list))}
    if scalars:
        parts.append(mapping_table(scalars))
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            inner_lists = {kk: vv for kk, vv in v.items() if isinstance(vv, list) and vv and isinstance(vv[0], dict)}
            parts.append(f"<h{level}>{_esc(k)}</h{level}>" + mapping_table(v))
            for kk, vv in inner_lists.items():
                parts.append(f"<h{level + 1}>{_esc(k)}.{_esc(kk)}</h{level + 1}>" + records_table(vv))
        elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            parts.append(f"<h{level}>{_esc(k)}</h{level}>" + records_table(v))
            for i, r in enumerate(v):  # nested lists of records inside each record (rare)
                for kk, vv in r.items():
                    if isinstance(vv, list) and vv and all(isinstance(e, dict) for e in vv):
                        parts.append(f"<h{level + 1}>{_esc(_record_name(r, i))}: {_esc(kk)}</h{level + 1}>"
                                     + records_table(vv))
        elif isinstance(v, list) and v:
            parts.append(f"<p><b>{_esc(k)}</b>: {_summarise_list(v)}</p>")
    return "\n".join(parts)


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

    Args:
        out_dir: where report.html goes.
        evaluate_dir: a `c2mf evaluate` output (evaluation.json + plots).
        atlas_dir: a `c2mf atlas` output (atlas.json, concept_NNN.png, overview.png).
        explain_dir: a `c2mf explain` output (explain.json, <image>.png/.json).
        embed: embed images as data URIs (one portable file); False links them relative to out_dir.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)
    if evaluate_dir is not None:
        ev = Path(evaluate_dir)
        body = []
        jpath = ev / "evaluation.json"
        if jpath.is_file():
            body.append(json_sections(_read_json(jpath)))
        plots = _pngs(ev)
        if plots:
            body.append("<h3>plots</h3>" + "".join(
                f"<figure>{_img(p, p.stem, embed, out)}<figcaption>{_esc(p.stem)}</figcaption></figure>"
                for p in plots))
        sections.append(("metrics", "Metrics", "\n".join(body) or "<p class='muted'>empty folder</p>"))
    if atlas_dir is not None:
        at = Path(atlas_dir)
        body = []
        rec = _read_json(at / "atlas.json") if (at / "atlas.json").is_file() else {}
        if rec.get("overview") and (at / rec["overview"]).is_file():
            body.append(f"<figure>{_img(at / rec['overview'], 'atlas overview', embed, out)}</figure>")
        cards = []
        concepts = rec.get("concepts") or [{"concept": p.stem, "png": p.name} for p in _pngs(at)
                                            if p.name != "overview.png"]
        for c in concepts:
            png = at / str(c.get("png", ""))
            if not png.is_file():
                continue
            regs = c.get("regions") or []
            classes = sorted({r.get("class") for r in regs if r.get("class")})
            name = f" '{_esc(c['name'])}'" if c.get("name") else ""
            meta = (f"<div class='muted'>{len(regs)} regions; classes: {_esc(', '.join(map(str, classes)))}</div>"
                    if regs else "")
            cards.append(f"<div class='card'><h4>concept {_esc(c['concept'])}{name}</h4>{meta}"
                         + _img(png, "concept " + str(c["concept"]), embed, out) + "</div>")
        if cards:
            body.append("<div class='cards'>" + "".join(cards) + "</div>")
        sections.append(("atlas", "Concept atlas", "\n".join(body) or "<p class='muted'>empty folder</p>"))
    if explain_dir is not None:
        ex = Path(explain_dir)
        body = []
        summary = _read_json(ex / "explain.json") if (ex / "explain.json").is_file() else {}
        items = summary.get("explained") or [{"png": p.name, "image": p.stem} for p in _pngs(ex)]
        for e in items:
            png = ex / str(e.get("png", ""))
            if not png.is_file():
                continue
            cap = _esc(e.get("image", png.stem))
            if e.get("explained"):
                cap += f" &mdash; explained: {_esc(e['explained'].get('label'))}"
            body.append(f"<figure>{_img(png, png.stem, embed, out)}<figcaption>{cap}</figcaption></figure>")
        for f in summary.get("failed") or []:
            body.append(f"<p class='muted'>failed: {_esc(f.get('image'))}: {_esc(f.get('error'))}</p>")
        sections.append(("explain", "Explained images", "\n".join(body) or "<p class='muted'>empty folder</p>"))
    if not sections:
        raise C2MFError("nothing to report: give at least one of the evaluate, atlas or explain folders")
    nav = "".join(f"<a href='#{a}'>{_esc(t)}</a>" for a, t, _ in sections)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1><nav>{nav}</nav>"
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
