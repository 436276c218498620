"""Bad and unusual input along the chain factorize -> evaluate / explain / atlas / report, through the CLI.

Each user error must end as one `Error:` line that names the problem and the way out, exit 1 (2 for a bad option
value), no traceback, and nothing half-written. Small stores of conftest (test_resnet at 64 px, layer3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

from c2mf_cli.cli import app
from c2mf_cli.artifacts.dictionary import ConceptDictionary

from c2mf_cli.artifacts.store import StoreWriter

from .conftest import build_store

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _error_line(result) -> str:
    """The one `Error:` line of a failed command (click mixes stderr into output); no traceback."""
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def _fit(store: Path, out: Path, method: str = "c2mf") -> Path:
    r = _run("factorize", "-s", store, "--method", method, "--concepts", 3, "--iterations", 3, "--quiet", "--device",
             "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory, image_folder) -> dict[str, Path]:
    """Train and held-out test stores (disjoint), a layer2 store, and c2mf dictionaries on layer3 and layer2."""
    root = tmp_path_factory.mktemp("chain")
    train = build_store(root / "train.zarr", image_folder, split="train")
    test = build_store(root / "test.zarr", image_folder, split="test")
    l2 = build_store(root / "l2.zarr", image_folder, layer="layer2")
    return {"root": root, "train": train, "test": test, "dict": _fit(train, root / "c2mf.safetensors"),
            "dict_l2": _fit(l2, root / "l2.safetensors")}


def _edited_dictionary(src: Path, out: Path, edit) -> Path:
    """A copy of a dictionary with its recorded metadata changed by `edit(meta)` (as if made elsewhere)."""
    d = ConceptDictionary.load(src)
    edit(d.meta)
    d.save(out)
    return out


def _other_weights(meta: dict) -> None:
    meta["source"]["info"]["weights_sha256"] = "f" * 64


# ------------------------------------------------------------------------------------------------ factorize


@pytest.mark.parametrize("option", ["--alpha", "--alpha-scale"])
def test_factorize_infinite_alpha_is_a_usage_error(tiny_store, tmp_path, option):
    # inf passed the range checks and fitted a dictionary with every gate closed (relative error 1)
    r = _run("factorize", "-s", tiny_store, "--method", "c2mf", "--concepts", 3, option, "inf", "--out",
             tmp_path / "d.safetensors")
    assert r.exit_code == 2
    assert f"{option} must be a finite number, got inf" in _error_line(r)
    assert not (tmp_path / "d.safetensors").exists()


def test_factorize_out_that_cannot_be_a_file_fails_before_fitting(tiny_store, tmp_path):
    (tmp_path / "folder").mkdir()
    r = _run("factorize", "-s", tiny_store, "--method", "pca", "--concepts", 3, "--out", tmp_path / "folder")
    assert r.exit_code == 2 and "is a folder: give a file path" in _error_line(r)
    (tmp_path / "a_file").write_text("x")
    r = _run("factorize", "-s", tiny_store, "--method", "pca", "--concepts", 3, "--out", tmp_path / "a_file" / "d.st")
    assert r.exit_code == 2 and "is a file, not a folder" in _error_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "folder"]


def test_factorize_write_failure_is_one_error_line(tiny_store, tmp_path, monkeypatch):
    def fail(self, path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ConceptDictionary, "save", fail)
    r = _run("factorize", "-s", tiny_store, "--method", "pca", "--concepts", 3, "-q", "--out", tmp_path / "d.safetensors")
    assert r.exit_code == 1 and "cannot write --out" in _error_line(r) and "Permission denied" in r.output


def test_factorize_replaces_an_existing_out_and_says_so(tiny_store, tmp_path):
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"old")
    r = _run("factorize", "-s", tiny_store, "--method", "pca", "--concepts", 3, "--out", out)
    assert r.exit_code == 0, r.output
    assert "note: replaced the previous" in r.output
    assert ConceptDictionary.load(out).n_concepts == 3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_craft_on_a_signed_crop_store_points_to_shift(tiny_crop_store, tmp_path):
    signed = tmp_path / "signed.zarr"
    shutil.copytree(tiny_crop_store, signed)
    root = zarr.open_group(str(signed), mode="r+", zarr_format=3)
    arr = root[sorted(root.group_keys())[0]]["activations"]
    arr[:] = np.asarray(arr[:]) - 1.0
    StoreWriter(signed).finalize()  # sealed again: a store made so, not one damaged since
    r = _run("factorize", "-s", signed, "--method", "craft", "--concepts", 3, "--iterations", 2, "-q", "--out",
             tmp_path / "d.safetensors")
    assert r.exit_code == 1
    assert "negative activations" in (line := _error_line(r)) and "--shift" in line
    assert not (tmp_path / "d.safetensors").exists()


def test_factorize_incomplete_store_and_plain_folder(tiny_store, image_folder, tmp_path):
    broken = tmp_path / "incomplete.zarr"
    shutil.copytree(tiny_store, broken)
    root = zarr.open_group(str(broken), mode="r+", zarr_format=3)
    root.attrs["complete"] = False
    r = _run("factorize", "-s", broken, "--method", "pca", "--concepts", 3, "--out", tmp_path / "d.safetensors")
    assert r.exit_code == 1 and "incomplete" in (line := _error_line(r)) and "rerun" in line
    r = _run("factorize", "-s", image_folder, "--method", "pca", "--concepts", 3, "--out", tmp_path / "d.safetensors")
    assert r.exit_code == 1 and str(image_folder.name) in _error_line(r)
    assert not (tmp_path / "d.safetensors").exists()


# ------------------------------------------------------------------------------------------------- evaluate


def _evaluate(chain, *extra, out=None):
    return _run("evaluate", "--train", chain["train"], "--test", chain["test"], "--out", out, "--device", "cpu",
                "--ig-steps", 2, "--max-images-per-class", 1, "-q", *extra)


def test_evaluate_dictionary_of_other_weights_names_both(chain, tmp_path):
    other = _edited_dictionary(chain["dict"], tmp_path / "other.safetensors", _other_weights)
    r = _evaluate(chain, "--dict", other, out=tmp_path / "ev")
    line = _error_line(r)
    assert r.exit_code == 1
    assert "dictionary 'other'" in line and str(other) in line and "weights ffffffffffff" in line
    assert f"({chain['test']})" in line and "same model weights and layer" in line
    assert not (tmp_path / "ev").exists()


def test_evaluate_dictionary_of_other_layer_names_both_layers(chain, tmp_path):
    r = _evaluate(chain, "--dict", chain["dict_l2"], out=tmp_path / "ev")
    line = _error_line(r)
    assert r.exit_code == 1 and "layer 'layer2' (48 channels)" in line and "layer 'layer3' (192 channels)" in line


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--ig-steps", "1"], "--ig-steps must be at least 2"),
    (["--max-images-per-class", "0"], "--max-images-per-class must be at least 1"),
])
def test_evaluate_bad_option_values_exit_2(chain, tmp_path, args, message):
    r = _evaluate(chain, "--dict", chain["dict"], *args, out=tmp_path / "ev")
    assert r.exit_code == 2 and message in _error_line(r)


def test_evaluate_out_is_a_file(chain, tmp_path):
    (tmp_path / "ev").write_text("x")
    r = _evaluate(chain, "--dict", chain["dict"], out=tmp_path / "ev")
    assert r.exit_code == 2 and "is a file: give a folder path" in _error_line(r)


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_evaluate_reused_folder_drops_stale_plots_and_json_is_strict_and_stdout_only(chain, tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "confidence_histograms.png")  # from an earlier run with --crops
    (out / "notes.txt").write_text("mine")
    one = tmp_path / "pca1.safetensors"  # one concept: its similarity metrics are NaN (printed as NaN before)
    r = _run("factorize", "-s", chain["train"], "--method", "pca", "--concepts", 1, "-q", "--out", one)
    assert r.exit_code == 0, r.output
    r = _evaluate(chain, "--dict", one, "--json", out=out)
    assert r.exit_code == 0, r.output
    result = _strict(r.stdout)  # stdout holds the JSON alone, and it is strict JSON
    assert result["methods"][0]["method"] == "pca" and result["methods"][0]["similarity"]["pearson_mean"] is None
    assert not (out / "confidence_histograms.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert {p.name for p in out.glob("*.png")} == set(result["files"].values())


# -------------------------------------------------------------------------------------------------- explain


def _image(path: Path, mode: str = "RGB", size=(48, 40)) -> Path:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) + ((len(mode),) if len(mode) > 1 else ())
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return path


def _explain(*args):
    return _run("explain", *args, "--device", "cpu", "--top", 2, "-q")


def test_explain_all_images_failing_is_one_error_and_writes_nothing(chain, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    r = _explain(bad, tmp_path / "missing.png", tmp_path, "--dict", chain["dict"], "--out", out)
    assert r.exit_code == 1
    assert "none of the 3 images could be explained" in _error_line(r)
    assert r.output.count("Failed: ") == 3 and "is a folder, not an image" in r.output
    assert not out.exists()
    r = _explain(bad, "--dict", chain["dict"], "--out", out)
    assert r.exit_code == 1 and "cannot read image" in _error_line(r) and not out.exists()


def test_explain_odd_images_and_a_bad_one_among_them(chain, tmp_path):
    imgs = [_image(tmp_path / "gray.png", "L"), _image(tmp_path / "rgba.png", "RGBA"),
            _image(tmp_path / "thin.png", size=(300, 1))]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    r = _explain(*imgs, bad, "--dict", chain["dict"], "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "Failed: " in r.output and "Error:" not in r.output
    summary = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert len(summary["explained"]) == 3 and summary["failed"][0]["image"] == str(bad)


def test_explain_labels_of_the_wrong_length(chain, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    r = _explain(_image(tmp_path / "x.png"), "--dict", chain["dict"], "--labels", labels, "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert "has 2 labels but the model has 1000 outputs" in _error_line(r)
    assert not (tmp_path / "o").exists()


def test_explain_class_out_of_range_and_unknown_name(chain, tmp_path):
    img = _image(tmp_path / "x.png")
    r = _explain(img, "--dict", chain["dict"], "--class", 1000, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--class 1000 is out of range" in _error_line(r)
    r = _explain(img, "--dict", chain["dict"], "--class", "zebra", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "'zebra' is not a known class name" in _error_line(r)
    assert not (tmp_path / "o").exists()


def test_explain_model_file_moved_points_to_checkpoint(chain, tmp_path):
    gone = str(tmp_path / "weights-that-moved.safetensors")

    def moved(meta):
        meta["source"]["info"]["checkpoint"] = gone

    d = _edited_dictionary(chain["dict"], tmp_path / "moved.safetensors", moved)
    r = _explain(_image(tmp_path / "x.png"), "--dict", d, "--out", tmp_path / "o")
    line = _error_line(r)
    assert r.exit_code == 1 and gone in line and "give --checkpoint NEW_PATH" in line and "--model" in line


def test_explain_model_override_without_the_layer(chain, tmp_path):
    r = _explain(_image(tmp_path / "x.png"), "--dict", chain["dict"], "--model", "test_vit", "--out", tmp_path / "o")
    line = _error_line(r)
    assert r.exit_code == 1 and "made at layer 'layer3'" in line and "--model 'test_vit'" in line


def test_explain_out_is_a_file(chain, tmp_path):
    (tmp_path / "o").write_text("x")
    r = _explain(_image(tmp_path / "x.png"), "--dict", chain["dict"], "--out", tmp_path / "o")
    assert r.exit_code == 2 and "is a file: give a folder path" in _error_line(r)


# ---------------------------------------------------------------------------------------------- atlas, report


def test_atlas_refuses_a_dictionary_of_other_weights(chain, tmp_path):
    # the old check read the weights from a key dictionaries do not record, so this drew a meaningless atlas
    other = _edited_dictionary(chain["dict"], tmp_path / "other.safetensors", _other_weights)
    r = _run("atlas", "-s", chain["train"], "--dict", other, "-q", "--out", tmp_path / "atlas")
    line = _error_line(r)
    assert r.exit_code == 1 and "weights ffffffffffff" in line and str(chain["train"]) in line
    assert not (tmp_path / "atlas").exists()


def test_atlas_bad_inputs(chain, tiny_crop_store, tmp_path):
    r = _run("atlas", "-s", tiny_crop_store, "--dict", chain["dict"], "-q", "--out", tmp_path / "a")
    assert r.exit_code == 1 and "needs a store of whole images" in _error_line(r)
    r = _run("atlas", "-s", chain["train"], "--dict", chain["dict"], "--class", "zebra", "-q", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "--class 'zebra' is not in the store" in _error_line(r)
    r = _run("atlas", "-s", chain["train"], "--dict", chain["dict"], "--clip-model", "ViT-B-32", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "missing --clip-checkpoint, --vocabulary" in _error_line(r)
    # a missing CLIP checkpoint fails before the atlas is written (it used to write the whole atlas, then exit 1)
    (tmp_path / "words.txt").write_text("red\ngreen\n")
    r = _run("atlas", "-s", chain["train"], "--dict", chain["dict"], "--clip-model", "ViT-B-32", "--clip-checkpoint",
             tmp_path / "gone.bin", "--vocabulary", tmp_path / "words.txt", "-q", "--out", tmp_path / "a")
    assert r.exit_code == 1 and "CLIP checkpoint" in _error_line(r) and "does not exist" in _error_line(r)
    (tmp_path / "f").write_text("x")
    r = _run("atlas", "-s", chain["train"], "--dict", chain["dict"], "--out", tmp_path / "f")
    assert r.exit_code == 2 and "is a file" in _error_line(r)
    assert not (tmp_path / "a").exists()


def test_report_on_an_empty_folder_a_file_and_an_out_file(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _run("report", tmp_path / "empty")
    assert r.exit_code == 1 and "nothing to report" in _error_line(r)
    (tmp_path / "f").write_text("x")
    r = _run("report", tmp_path / "f")
    assert r.exit_code == 2 and "is a file: give the folder of a run" in _error_line(r)
    r = _run("report", tmp_path / "empty", "--out", tmp_path / "f")
    assert r.exit_code == 2 and "is a file" in _error_line(r)
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("command", ["factorize", "methods", "evaluate", "explain", "atlas", "report"])
def test_help_has_an_example(command):
    r = _run(command, "--help")
    assert r.exit_code == 0 and f"Example: c2mf {command}" in r.stdout


def test_explain_an_image_above_pils_pixel_limit_is_skipped_not_a_crash(chain, tmp_path, monkeypatch):
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS (~179 MP) with an exception that is not an OSError: it ended
    # the whole batch with a traceback. A small limit stands in for a huge file here.
    good = _image(tmp_path / "small.png", size=(20, 20))
    huge = _image(tmp_path / "huge.png", size=(300, 300))
    # refused above 40,000 px; the 64 px input is 4,096 and the figure's widest text line about 25,000 (PIL checks
    # the masks it draws text into against the same limit)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    r = _explain(huge, good, "--dict", chain["dict"], "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "Failed: " in r.output and "safety limit" in r.output and "downscale" in r.output
