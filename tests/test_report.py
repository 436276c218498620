"""The report page: paper-style tables (methods as rows), the demo's ground-truth recovery section (passed in as an
extension), robustness to missing fields, well-formed self-contained HTML with its sort / filter script."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

from c2mf_cli.demo.report import demo_extension, recovery_section
from c2mf_cli.report.page import build_report, referenced_files, table
from c2mf_cli.report.tables import Col, fmt

_VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr"}


class _Balanced(HTMLParser):
    """Fails on a closing tag that does not close the innermost open element; records every table's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids += [v for k, v in attrs if k == "id" and v]
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-3:]}"
        self.stack.pop()


def well_formed(page: str) -> _Balanced:
    p = _Balanced()
    p.feed(page)
    p.close()
    assert p.stack == [], f"unclosed: {p.stack}"
    assert len(p.ids) == len(set(p.ids)), "duplicate ids"
    for href in re.findall(r"href='#([^']+)'", page):
        assert href in p.ids, f"nav link to missing section #{href}"
    return p


def first_column(page: str, caption_start: str) -> list[str]:
    """The row labels (first cells) of the table whose caption starts with caption_start."""
    i = page.index(f"<caption>{caption_start}")
    body = page[page.index("<tbody>", i): page.index("</tbody>", i)]
    return re.findall(r"<tr[^>]*><td class='k[^']*'>([^<]*)</td>", body)


PRIMS = ["red_disk", "blue_stripes", "green_triangle"]


def _method(name: str, k: int, pearson: float, acc: float, per_class: bool) -> dict:
    return {
        "name": name, "method": name, "k": k, "per_class_dictionary": per_class,
        "similarity": {"pearson_mean": pearson, "pearson_std": 0.01, "cosine_mean": 0.3, "cosine_std": 0.02},
        "reconstruction": {"n_images": 20, "accuracy": {"mean": acc, "std": 0.05, "per_class": {"a": acc, "b": 1.0}},
                           "agreement": {"mean": acc, "std": 0.0, "per_class": {"a": acc, "b": 1.0}}},
        "consistency": {"train_mse": 0.5, "test_mse": 0.52, "difference": -0.02},
        "fit": {"test": {"relative_error": 0.4, "r2": 0.8}},
        "insertion_deletion": {"gradcam": {"insertion": {"x": [0, 0.5, 1], "prob": [0.1, 0.5, 0.9], "prob_auc": 0.7},
                                           "deletion": {"prob_auc": 0.2}}},
    }


def recovery_record() -> dict:
    """The shape c2mf_cli/demo/pipeline.py writes into evaluation.json["recovery"]."""
    def heat(vals: list[float | None], shared: bool) -> dict:
        r = {"primitives": PRIMS, "per_class": {"best_iou": vals, "mean": 0.5,
                                               "by_class": [[vals[0], None, vals[2]], [None, vals[1], None]]}}
        if shared:
            r["shared"] = {"best_iou": [0.6, 0.4, None], "best_concept": [2, 0, 1], "best_sign": [1, 1, 1],
                           "mean": 0.5}
        return r

    return {
        "heatmaps": {"c2mf": heat([0.8, 0.41, 0.05], True), "craft": heat([0.7, 0.52, None], False),
                     "pca": heat([0.6, 0.3, 0.1], False)},
        "threshold": {"method": "relative", "level": 0.5},
        "references": {"grid_ceiling": {"iou": [0.9, 0.9, 0.9], "mean": 0.9},
                       "linear_probe": {"iou": [0.93, 0.7, 0.3], "mean": 0.66}},
        "c2mf_concept_of_primitive": {"best_iou": [0.8, 0.4, 0.05], "best_concept": [2, 0, 1], "mean": 0.42},
        "gates": {"c2mf": {"accuracy": 0.9, "exact": 0.5, "precision": 1.0, "recall": 0.75, "extra_selected": 0.5,
                           "threshold": 0.5, "open_gates": {"a": [2, 1], "b": [0, 3]},
                           "planted_concepts": {"a": [1, 2], "b": [0]}}},
        "planted_dictionary": {"n_features": 64, "rows_per_class": 100, "n_planted": 3,
                               "nonnegative": {"c2mf": {"mean": 0.999, "min": 0.99, "per_planted": [1, 1, 1],
                                                        "gates": {"exact": 1.0}},
                                               "craft": {"mean": 0.98, "min": 0.9}, "pca": {"mean": 0.8, "min": 0.7}},
                               "signed": {"c2mf": {"mean": 0.97, "min": 0.88}, "craft": {"mean": 0.38, "min": 0.16},
                                          "pca": {"mean": 0.9, "min": 0.72}}},
        "class_primitives": {"a": ["red_disk", "green_triangle"], "b": ["blue_stripes"]},
    }


def write_run(root: Path, recovery: dict | None) -> Path:
    ev = root / "evaluation"
    ev.mkdir(parents=True)
    record = {"encoding-type": "c2mf-evaluation", "c2mf_version": "0.1.0", "time_s": 3.25,
              "inputs": {"train": {"path": "train.zarr", "layer": "layer3", "classes": 2, "images": 40,
                                   "fingerprint": "f" * 64},
                         "test": {"path": "test.zarr", "layer": "layer3", "classes": 2, "images": 20},
                         "dictionaries": [{"name": "c2mf", "method": "c2mf", "k": 4, "source_fingerprint": "f" * 64}]},
              "methods": [_method("c2mf", 4, 0.08, 0.95, False), _method("craft", 2, 0.2, 0.6, True),
                          _method("pca", 2, 0.05, 0.9, True)],
              "ood": {"auroc": 0.8, "fpr_at_95_tpr": 0.5}}
    if recovery is not None:
        record["recovery"] = recovery
    (ev / "evaluation.json").write_text(json.dumps(record))
    Image.new("RGB", (40, 20), (0, 128, 255)).save(ev / "accuracy_vs_k.png")
    return ev


def test_fmt_reads_like_a_paper():
    assert fmt(0.93499999) == "0.935"
    assert fmt(1.0) == "1.000"
    assert fmt(-0.0136) == "\u22120.014"
    assert fmt(2.4e-4) == "2.4e-04"
    assert fmt(12800) == "12,800"
    assert fmt(15360.0) == "15,360"
    assert fmt(None) == fmt(float("nan")) == "\u2013"
    assert fmt(True) == "yes"


def test_table_methods_as_rows_best_in_bold_missing_is_dash():
    rows = [("a", {"x": {"y": 0.5}, "z": 1.0}), ("b", {"x": {"y": 0.7}}), ("ref", {"x": {"y": 0.9}})]
    page = table(rows, [Col("Y", "x.y", "high"), Col("Z", "z", "low"), Col("never", "nope")],
                 compare=[True, True, False], ref_rows=[False, False, True], caption="cap")
    well_formed(page)
    assert "never" not in page  # a column no row has is left out
    assert first_column(page, "cap") == ["a", "b", "ref"]
    assert "<td class='best'>0.700</td>" in page  # best of the compared rows, not the yardstick's 0.9
    assert "<td class='best'>0.900</td>" not in page
    assert page.count("\u2013") == 2  # z of b and of ref
    assert "<td class='best'>1.000</td>" not in page  # one value only: nothing to compare


def test_report_with_recovery(tmp_path):
    ev = write_run(tmp_path, recovery_record())
    page = build_report(tmp_path, evaluate_dir=ev, extension=demo_extension(ev)).read_text()
    p = well_formed(page)
    assert {"summary", "recovery", "metrics", "details"} <= set(p.ids)
    assert page.index("id='summary'") < page.index("id='recovery'") < page.index("id='metrics'")
    assert list(referenced_files(page)) == []
    assert "http" not in page
    # methods as rows, in the evaluation's order
    assert first_column(page, "One row per method") == ["c2mf k=4", "craft k=2/class", "pca k=2/class"]
    assert first_column(page, "Test images. For every primitive") == [
        "c2mf", "craft", "pca", "c2mf, shared concept", "masks through the grid*", "supervised linear probe*"]
    for name in ("red disk", "blue stripes", "green triangle", "non-negative W", "signed W", "Gate selection"):
        assert name in page
    # best IoU per primitive in bold among methods; yardsticks never bold
    assert "<td class='best'>0.800</td>" in page and "<td class='best'>0.520</td>" in page
    assert "<td class='best'>0.930</td>" not in page
    # the per-class gate check names what is missing and what is extra
    assert "exact" in page and "extra 3" in page
    # the ground-truth numbers also reach the summary table
    summary = page[page.index("id='summary'"): page.index("id='recovery'")]
    assert "heatmap" in summary and "0.999" in summary and "0.380" in summary


def test_recovery_missing_fields_do_not_break_the_page(tmp_path):
    partial = {
        "heatmaps": {"c2mf": {"primitives": PRIMS, "per_class": {"best_iou": [0.5, None]}},  # short list, no mean
                     "craft": "not a record", "pca": {}},
        "gates": {"c2mf": {"accuracy": 0.5}},  # no open_gates / planted_concepts
        "planted_dictionary": {"signed": {"c2mf": {"mean": 0.9}}},
        "brand_new_check": {"score": 0.42},
    }
    ev = write_run(tmp_path, partial)
    page = build_report(tmp_path, evaluate_dir=ev, extension=demo_extension(ev)).read_text()
    well_formed(page)
    assert "brand_new_check" in page and "0.420" in page  # unknown parts still show
    assert "gates of every class" not in page
    for rec in ({}, {"heatmaps": None, "gates": [], "references": 3}, {"heatmaps": {"c2mf": {"primitives": None}}}):
        html_part = recovery_section(rec, ["c2mf"])
        well_formed(html_part)
    assert "no fields this page knows" in recovery_section({}, [])


def test_report_without_recovery_has_no_recovery_section(tmp_path):
    ev = write_run(tmp_path, None)
    page = build_report(tmp_path, evaluate_dir=ev).read_text()
    p = well_formed(page)
    assert "recovery" not in p.ids and "heatmap IoU" not in page


def test_linked_report_references_only_existing_files(tmp_path):
    ev = write_run(tmp_path / "run", recovery_record())
    at = tmp_path / "run" / "atlas"
    at.mkdir()
    Image.new("RGB", (30, 20)).save(at / "concept_000.png")
    Image.new("RGB", (30, 20)).save(at / "overview.png")
    (at / "atlas.json").write_text(json.dumps({
        "overview": "overview.png", "dictionary": {"method": "c2mf", "concepts": 1},
        "concepts": [{"concept": 0, "png": "concept_000.png", "name": "red_disk (IoU 0.80)",
                      "regions": [{"value": 3.5, "class": "a"}, {"value": 3.0, "class": "a"}]},
                     {"concept": 1, "png": "gone.png"}]}))
    out = tmp_path / "elsewhere"
    page = build_report(out, evaluate_dir=ev, atlas_dir=at, embed=False, extension=demo_extension(ev)).read_text()
    well_formed(page)
    refs = list(referenced_files(page))
    assert len(refs) == 3 and all((out / r).is_file() for r in refs)
    assert "red_disk (IoU 0.80)" in page and "a &times;2" in page and "gone.png" not in page


def test_demo_summary_beside_the_evaluation_adds_the_model_accuracy(tmp_path):
    ev = write_run(tmp_path, recovery_record())
    (tmp_path / "demo.json").write_text(json.dumps({"evaluation": str(ev / "evaluation.json"),
                                                    "model": {"test_accuracy": 0.975}}))
    assert "test accuracy 97.500 %" in build_report(tmp_path, evaluate_dir=ev, extension=demo_extension(ev)).read_text()
    (tmp_path / "demo.json").write_text(json.dumps({"evaluation": "/some/other/evaluation.json",
                                                    "model": {"test_accuracy": 0.5}}))
    assert "test accuracy" not in build_report(tmp_path, evaluate_dir=ev, extension=demo_extension(ev)).read_text()


def test_report_without_the_demo_extension_knows_no_recovery(tmp_path):
    """The generic report renders a demo's evaluation without knowing its schema: the recovery entry is not
    drawn as a section of its own, it lands with the other unknown results."""
    ev = write_run(tmp_path, recovery_record())
    page = build_report(tmp_path, evaluate_dir=ev).read_text()
    p = well_formed(page)
    assert "recovery" not in p.ids and "Other results" in page
    assert "heatmap IoU" not in page[page.index("id='summary'"):page.index("id='metrics'")]


def test_report_says_what_it_measured_and_what_the_numbers_say(tmp_path):
    ev = write_run(tmp_path, None)
    record = json.loads((ev / "evaluation.json").read_text())
    record["inputs"]["train"].update(model="resnet18", data="/data/birds/train")
    record["methods"][1]["reconstruction"]["agreement"]["mean"] = 0.2  # craft no longer behaves like the model
    record["methods"][1]["insertion_deletion"]["gradcam"]["insertion"]["prob_auc"] = 0.99  # best, but meaningless
    record["methods"][2]["insertion_deletion"]["gradcam"]["insertion"]["prob_auc"] = 0.8
    (ev / "evaluation.json").write_text(json.dumps(record))
    page = build_report(tmp_path, evaluate_dir=ev).read_text()
    head = page[: page.index("<nav>")]
    for fact in ("resnet18", "layer3", "/data/birds/train", "40 train / 20 test images", "2 classes"):
        assert fact in head, fact
    says = page[page.index("id='says'"): page.index("id='summary'")]
    assert "<b>c2mf k=4</b> keeps the most" in says and "chance is 0.500" in says
    assert "<b>craft k=2/class</b>: its reconstruction agrees with the model on only 0.200" in says
    assert "<b>pca k=2/class</b> has the most distinct concepts" in says
    # its insertion AUC is the highest, but it is flagged and never bold: the best is among the others
    assert "<td class='best'>0.990" not in page and "0.990 <span class='bad'" in page
    assert "<td class='best' data-v='0.8'>0.800</td>" in page
    assert "Among methods that preserve the decision, <b>pca k=2/class</b>" in says


def test_report_tables_sort_and_filter_in_one_file(tmp_path):
    """The page's own script sorts tables and filters classes: inline, no external file, no server."""
    ev = write_run(tmp_path, None)
    page = build_report(tmp_path, evaluate_dir=ev).read_text()
    well_formed(page)
    assert page.count("<script>") == 1 and "<script src" not in page and list(referenced_files(page)) == []
    assert "table.sortable" in page and "input.filter" in page
    assert page.count("class='sortable'") >= 4
    # per-class tables: classes as rows, exact values for sorting, a filter box bound to the table
    i = page.index("id='per-class-accuracy'")
    assert "data-table='per-class-accuracy'" in page
    body = page[page.index("<tbody>", i): page.index("</tbody>", i)]
    assert re.findall(r"<td class='k'>([^<]*)</td>", body) == ["a", "b"]
    assert "data-v='0.95'" in body


def test_report_embeds_only_files_inside_their_folder(tmp_path):
    """A crafted run folder names files outside it (absolute, `../`, a link out): none reaches the page, and the
    page says which were refused."""
    secret = tmp_path / "private.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(secret)
    run = tmp_path / "run"
    atlas, explain = run / "atlas", run / "explain"
    atlas.mkdir(parents=True)
    explain.mkdir()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(atlas / "concept_000.png")
    (atlas / "atlas.json").write_text(json.dumps({"concepts": [
        {"concept": 0, "png": "concept_000.png"}, {"concept": 1, "png": str(secret)},
        {"concept": 2, "png": "../../private.png"}], "overview": "../../private.png"}))
    (explain / "link.png").symlink_to(secret)
    (explain / "explain.json").write_text(json.dumps({"explained": [{"png": "link.png", "image": "x.jpg"}]}))
    page = build_report(run, atlas_dir=atlas, explain_dir=explain).read_text()
    assert base64.b64encode(secret.read_bytes()).decode() not in page
    assert page.count("<img") == 1  # concept 0 only
    shown = re.search(r"<section id='refused'>(.*?)</section>", page, re.S)
    assert shown and "Files not shown" in shown.group(1)
    for name in (str(secret), "../../private.png", "link.png"):
        assert name in shown.group(1)
    linked = build_report(tmp_path / "elsewhere", atlas_dir=atlas, explain_dir=explain, embed=False).read_text()
    assert list(referenced_files(linked)) == ["../run/atlas/concept_000.png"]


class _BoldCells(HTMLParser):
    """(table title, row label, column) of every bold cell, for the tables under an <h3> title."""

    def __init__(self) -> None:
        super().__init__()
        self.bold: set[tuple[str, str, int]] = set()
        self.title, self.tag, self.label, self.col, self.best = "", "", "", -1, False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tag = tag
        if tag == "tr":
            self.col, self.label = -1, ""
        elif tag == "td":
            self.col += 1
            self.best = ("class", "best") in attrs

    def handle_data(self, data: str) -> None:
        if self.tag == "h3":
            self.title = data
        elif self.tag == "td" and self.col == 0:
            self.label += data
        elif self.tag == "td" and self.best:
            self.bold.add((self.title, self.label, self.col - 1))
            self.best = False

    def handle_endtag(self, tag: str) -> None:
        self.tag = ""
        if tag == "table":
            self.title = ""  # a table not under a title of its own (the per-class details) is not counted


def test_terminal_and_report_bold_the_same_cells_with_significance(tmp_path):
    """`c2mf evaluate` (rich) and `c2mf report` (HTML) draw one builder's tables: the same cells are bold, and a
    best value that is not significantly better than the rest (exact McNemar) is bold in neither."""
    from rich.table import Table

    from c2mf_cli.commands.evaluate import tables

    ev = write_run(tmp_path, None)
    record = json.loads((ev / "evaluation.json").read_text())
    for m, cap in zip(record["methods"], ("shared", "per-class", "per-class")):
        m["capacity"] = cap
    record["methods"][2]["reconstruction"]["agreement"]["mean"] = 0.7  # pca best agreement of its block too

    def pair(measure, a, b, p, better):
        return {"measure": measure, "a": a, "b": b, "p": p, "better": better}

    record["significance"] = {"alpha": 0.05, "pairs": [
        pair("accuracy", "c2mf", "craft", 0.001, "a"), pair("accuracy", "c2mf", "pca", 0.2, None),
        pair("accuracy", "craft", "pca", 0.01, "b"),
        *(pair("agreement", a, b, 0.5, None) for a, b in (("c2mf", "craft"), ("c2mf", "pca"), ("craft", "pca")))]}
    (ev / "evaluation.json").write_text(json.dumps(record))

    terminal: set[tuple[str, str, int]] = set()
    titles = []
    for t in tables(record):
        t = t if isinstance(t, Table) else t.renderables[0]  # a table with notes under it
        titles.append(t.title)
        labels = [cell.plain for cell in t.columns[0]._cells]
        for j, col in enumerate(t.columns[1:]):
            terminal |= {(t.title, labels[i], j) for i, cell in enumerate(col._cells) if cell.style == "bold"}
    page = build_report(tmp_path, evaluate_dir=ev).read_text()
    parser = _BoldCells()
    parser.feed(page)
    html = {b for b in parser.bold if b[0] in titles}
    assert terminal == html and terminal  # the same cells, and some
    block = "k per class: k x classes directions (not the same capacity as the block above)"
    bold_in_block = {(label, j) for title, label, j in terminal if title == block}
    # pca's accuracy is significantly better than craft's: bold; its agreement (0.7 vs 0.6, p = 0.5) is not
    assert ("pca", 5) in bold_in_block and ("pca", 4) not in bold_in_block
    # "At a glance": c2mf has the best accuracy but not significantly better than pca's: not bold
    summary = page[page.index("id='summary'"):page.index("id='metrics'")]
    assert "<td data-v='0.95'>0.950" in summary and "class='best' data-v='0.95'" not in summary


def test_explanations_by_every_dictionary_side_by_side(tmp_path: Path):
    """Several explain folders in a run (one per dictionary): each image's explanations in one row, one column per
    dictionary, matched by the image's path; an image one dictionary did not explain is said so."""
    from typer.testing import CliRunner

    from c2mf_cli.cli import app

    run = tmp_path / "run"
    for name, images in (("c2mf", ["birds/a.jpg", "birds/b.jpg"]), ("pca", ["birds/a.jpg"])):
        ex = run / f"explain-{name}"
        ex.mkdir(parents=True)
        items = []
        for i, img in enumerate(images):
            Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(ex / f"{i:02d}.png")
            items.append({"png": f"{i:02d}.png", "image": img, "prediction": {"label": "wren"},
                          "explained": {"label": "wren", "probability": 0.9}})
        (ex / "explain.json").write_text(json.dumps({"dictionary": f"/x/{name}.safetensors", "explained": items,
                                                     "config": {"importance": "gradcam"}}))
    r = CliRunner().invoke(app, ["report", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["explain_dir"] == [str(run / "explain-c2mf"), str(run / "explain-pca")]
    page = (run / "report.html").read_text()
    well_formed(page)
    rows = re.findall(r"<div class='side'>(.*?)</div>", page, flags=re.S)
    assert len(rows) == 2  # a.jpg, b.jpg
    assert rows[0].count("<figure>") == 2 and "<b>c2mf</b>" in rows[0] and "<b>pca</b>" in rows[0]
    assert rows[1].count("<figure>") == 1 and "<b>pca</b>: not explained here" in rows[1]
    # one folder: as before, no side-by-side rows
    one = build_report(tmp_path / "one", explain_dir=run / "explain-pca").read_text()
    assert "<div class='side'>" not in one and one.count("<figure>") == 1


def test_what_this_says_reads_methods_against_the_class_mean(tmp_path: Path):
    """A method that does not beat the class mean alone is said so; one above it by a difference the exact McNemar
    test does not find significant is said so too."""
    ev = {"chance": 0.1, "methods": [
        {"name": "c2mf", "method": "c2mf", "k": 4, "reconstruction": {"agreement": {"mean": 0.3}, "accuracy": {"mean": 0.3}}},
        {"name": "pca", "method": "pca", "k": 4, "reconstruction": {"agreement": {"mean": 0.92}, "accuracy": {"mean": 0.9}}}],
        "notes": ['c2mf does not beat the reference "predicted class\'s train mean only (k = 0)" under predicted-class '
                  "encoding (agreement 0.300 against 0.900)"],
        "significance": {"alpha": 0.05, "pairs": [
            {"a": "pca", "b": "predicted class's train mean only (k = 0)", "measure": "agreement", "p": 0.4},
            {"a": "c2mf", "b": "pca", "measure": "agreement", "p": 1e-6, "better": "b"}]}}
    ev_dir = tmp_path / "ev"
    ev_dir.mkdir()
    (ev_dir / "evaluation.json").write_text(json.dumps(ev))
    page = build_report(tmp_path / "out", evaluate_dir=ev_dir).read_text()
    says = re.search(r"<ul class='says'>(.*?)</ul>", page, flags=re.S).group(1)
    assert "not beat a class's train mean alone" in says and "<b>c2mf" in says.split("not beat")[0].split("<li>")[-1]
    assert "not significantly different from the predicted class&#x27;s train mean only (k = 0) reference" in says
    assert "p = 0.4" in says
