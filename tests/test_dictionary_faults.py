"""Fault injection on dictionaries and atlas folders: every reader refuses each kind of damage with one `Error:` line.

Two dictionaries are fitted once per module on the session's tiny store (a gated c2mf one and a per-class PCA one),
and one atlas is made of the PCA dictionary. Each case damages a copy (a flipped byte, a truncated file, an edited
tensor or metadata field, with or without a recomputed checksum as a careful tamperer would), then runs every
reader of that file through the CLI: `info`, `verify`, `explain`, `atlas` and `evaluate` for a dictionary,
`explain --atlas` for an atlas folder. Each asserts the one error line (naming the file and the fault), the exit
code, and that nothing was written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file
from typer.testing import CliRunner

from c2mf_cli.artifacts.dictionary import tensors_sha256
from c2mf_cli.cli import app

runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(store: Path, method: str, out: Path) -> Path:
    r = runner.invoke(app, ["factorize", "-s", str(store), "--method", method, "--concepts", "3", "--device", "cpu",
                            "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def sound(tiny_store: Path, tiny_test_store: Path, tmp_path_factory) -> dict[str, Path]:
    """The sound files every case damages a copy of, and the held-out test store evaluate reads."""
    root = tmp_path_factory.mktemp("sound")
    files = {m: _fit(tiny_store, m, root / f"{m}.safetensors") for m in ("c2mf", "pca")}
    r = runner.invoke(app, ["atlas", "-s", str(tiny_store), "--dict", str(files["pca"]), "-o", str(root / "atlas"),
                            "-q"])
    assert r.exit_code == 0, r.output
    return {**files, "atlas": root / "atlas", "test_store": tiny_test_store}


# ---- dictionary damage

def _rewrite(edit_tensors: Callable[[dict], None] | None = None, edit_meta: Callable[[dict], None] | None = None,
             reseal: bool = True) -> Callable[[Path, Path], None]:
    """Damage that rewrites the file with edited tensors or metadata; `reseal` recomputes the tensors' sha256
    (what someone who knows the format would do), otherwise the recorded one is kept."""

    def damage(src: Path, dst: Path) -> None:
        with safe_open(str(src), framework="pt") as f:
            meta = json.loads(f.metadata()["c2mf"])
        tensors = load_file(str(src))
        if edit_tensors:
            edit_tensors(tensors)
        if edit_meta:
            edit_meta(meta)
        if reseal:
            meta["tensors_sha256"] = tensors_sha256(tensors)
        save_file(tensors, str(dst), metadata={"c2mf": json.dumps(meta)})

    return damage


def _raw(edit: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    return lambda src, dst: dst.write_bytes(edit(src.read_bytes()))


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[-3] ^= 0x10  # one bit of the last tensor's data
    return bytes(b)


def _set(name: str, index: tuple[int, ...], value: float) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[name] = t[name].clone()
        t[name][index] = value

    return edit


def _foreign_safetensors(src: Path, dst: Path) -> None:
    save_file({"weight": torch.zeros(2, 2)}, str(dst))


def _meta_not_json(src: Path, dst: Path) -> None:
    save_file(load_file(str(src)), str(dst), metadata={"c2mf": "{not json"})


def _version_1(meta: dict) -> None:
    meta["encoding-version"] = 1
    del meta["tensors_sha256"]


# (id, which sound dictionary, damage, what the one error line says after the path, exit code)
DICT_DAMAGE = [
    ("flip-byte", "c2mf", _raw(_flip), "its tensors do not match the sha256 recorded in its metadata", 1),
    ("truncate", "c2mf", _raw(lambda b: b[: len(b) // 2]), "is not a readable c2mf dictionary (safetensors error", 1),
    ("zero-length", "c2mf", _raw(lambda b: b""), "is not a readable c2mf dictionary (safetensors error", 1),
    ("not-a-dictionary", "c2mf", _foreign_safetensors, "is a safetensors file but not a c2mf dictionary", 1),
    ("metadata-not-json", "c2mf", _meta_not_json, "its metadata is not valid JSON", 1),
    ("newer-version", "c2mf", _rewrite(edit_meta=lambda m: m.update({"encoding-version": 9})),
     "reads up to 2: upgrade c2mf or refit the dictionary", 1),
    ("version-1", "c2mf", _rewrite(edit_meta=_version_1, reseal=False), "without a checksum of its tensors", 1),
    ("W-int32", "c2mf", _rewrite(lambda t: t.update(W=t["W"].to(torch.int32))),
     "tensor 'W' is int32, a dictionary holds float32 only", 1),
    ("W-nan", "c2mf", _rewrite(_set("W", (0, 0), float("nan"))), "tensor 'W' holds 1 NaN or infinite value(s)", 1),
    ("gates-inf", "c2mf", _rewrite(_set("gates", (1, 2), float("inf"))),
     "tensor 'gates' holds 1 NaN or infinite value(s)", 1),
    ("gates-removed", "c2mf", _rewrite(lambda t: t.pop("gates"), reseal=False), "its tensors do not match the sha256", 1),
    ("gates-removed-resealed", "c2mf", _rewrite(lambda t: t.pop("gates")), "c2mf dictionary lacks its tensor 'gates'", 1),
    ("W-transposed-resealed", "c2mf", _rewrite(lambda t: t.update(W=t["W"].T.contiguous())),
     "c2mf dictionary: tensor 'gates' has shape (3, 3), expected (m, k)", 1),
    ("extra-tensor-resealed", "c2mf", _rewrite(lambda t: t.update(extra=torch.zeros(3))),
     "c2mf dictionary holds tensors its method does not declare: extra", 1),
    ("method-unknown", "c2mf", _rewrite(edit_meta=lambda m: m.update(method="magic")),
     "made by method 'magic', which this c2mf does not know", 1),
    ("method-renamed", "c2mf", _rewrite(edit_meta=lambda m: m.update(method="nmf")),
     "nmf dictionary holds tensors its method does not declare: gates", 1),
    ("classes-shortened", "c2mf", _rewrite(edit_meta=lambda m: m.update(classes=m["classes"][:2])),
     "its class list (2 classes) differs from the 3 classes of the store it was fitted on", 1),
    ("pca-mean-removed-resealed", "pca", _rewrite(lambda t: t.pop("mean")), "pca dictionary lacks its tensor 'mean'", 1),
    ("pca-classes-shortened", "pca", _rewrite(edit_meta=lambda m: m.update(classes=m["classes"][:2])),
     "its class list (2 classes) differs from the 3 classes", 1),
]

READERS = ("info", "verify", "explain", "atlas", "evaluate")


def _error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _reader_args(reader: str, dictionary: Path, sound: dict[str, Path], tiny_store: Path, image: Path,
                 out: Path) -> list[str]:
    return {
        "info": ["info", str(dictionary)],
        "verify": ["verify", str(dictionary), "-q"],
        "explain": ["explain", str(image), "--dict", str(dictionary), "-o", str(out), "--device", "cpu", "-q"],
        "atlas": ["atlas", "-s", str(tiny_store), "--dict", str(dictionary), "-o", str(out), "-q"],
        "evaluate": ["evaluate", "--train", str(tiny_store), "--test", str(sound["test_store"]), "--dict",
                     str(dictionary), "--out", str(out), "--device", "cpu", "-q"],
    }[reader]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind, base, damage, message, code", DICT_DAMAGE, ids=[d[0] for d in DICT_DAMAGE])
def test_every_reader_refuses_a_damaged_dictionary(reader, kind, base, damage, message, code, sound, tiny_store: Path,
                                                   image_folder: Path, tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / f"{kind}.safetensors"
    damage(sound[base], path)
    before = _snapshot(folder)
    out = tmp_path / "out"
    r = runner.invoke(app, _reader_args(reader, path, sound, tiny_store, image_folder / "class_0" / "000.png", out))
    assert r.exit_code == code, r.output
    line = _error_line(r.output)
    if reader == "verify":  # the list names the problem, the one error line the damaged path
        assert f"DAMAGED {path}" in r.output and message in r.output, r.output
        assert line == f"Error: 1 of 1 path(s) failed verification: {path}"
    else:
        assert str(path) in line and message in line, line
    assert not out.exists()
    assert _snapshot(folder) == before


def test_the_sound_dictionaries_pass_every_reader(sound, tiny_store: Path, image_folder: Path, tmp_path: Path):
    """The control: the same commands on the undamaged files succeed (so the cases above test the damage)."""
    for reader in READERS:
        out = tmp_path / reader
        r = runner.invoke(app, _reader_args(reader, sound["c2mf"], sound, tiny_store,
                                            image_folder / "class_0" / "000.png", out))
        assert r.exit_code == 0, (reader, r.output)


# ---- atlas folder damage: read by `explain --atlas`

def _edit_atlas(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        rec = json.loads((folder / "atlas.json").read_text())
        edit(rec)
        (folder / "atlas.json").write_text(json.dumps(rec))

    return damage


def _region(field: str, value) -> Callable[[dict], None]:
    return lambda rec: rec["concepts"][0]["regions"][0].update({field: value})


NOT_A_RECORD = "is not an atlas record"
OTHER = "is of another dictionary"

# (id, damage, what the one error line says, exit code)
ATLAS_DAMAGE = [
    ("no-record", lambda f: (f / "atlas.json").unlink(), "has no atlas.json: give the output folder of `c2mf atlas`", 2),
    ("truncated", lambda f: (f / "atlas.json").write_bytes((f / "atlas.json").read_bytes()[:100]),
     f"{NOT_A_RECORD} (JSONDecodeError", 1),
    ("zero-length", lambda f: (f / "atlas.json").write_bytes(b""), f"{NOT_A_RECORD} (JSONDecodeError", 1),
    ("a-list", lambda f: (f / "atlas.json").write_text("[1, 2]"), f"{NOT_A_RECORD} (TypeError", 1),
    ("concepts-removed", _edit_atlas(lambda r: r.pop("concepts")), f"{NOT_A_RECORD} (KeyError: 'concepts')", 1),
    ("concepts-not-a-list", _edit_atlas(lambda r: r.update(concepts="abc")), "'concepts' is a str, not a list", 1),
    ("concept-id-text", _edit_atlas(lambda r: r["concepts"][0].update(concept="x")),
     "concept 'x' is not one of the dictionary's 3", 1),
    ("concept-id-out-of-range", _edit_atlas(lambda r: r["concepts"][0].update(concept=7)),
     "concept 7 is not one of the dictionary's 3", 1),
    ("regions-not-a-list", _edit_atlas(lambda r: r["concepts"][0].update(regions=5)),
     "the regions of concept 0 are a int, not a list", 1),
    ("box-short", _edit_atlas(_region("box", [1, 2])), "crop box [1, 2] is not (left, top, right, bottom)", 1),
    ("box-inverted", _edit_atlas(_region("box", [9, 9, 1, 1])), "crop box [9, 9, 1, 1] is not", 1),
    ("box-text", _edit_atlas(_region("box", "ab")), f"{NOT_A_RECORD} (ValueError: invalid literal for int()", 1),
    ("image-not-a-path", _edit_atlas(_region("image", 3)), "image 3 is not a path", 1),
    ("image-removed", _edit_atlas(lambda r: r["concepts"][0]["regions"][0].pop("image")),
     f"{NOT_A_RECORD} (KeyError: 'image')", 1),
    ("crop-not-a-name", _edit_atlas(_region("crop", 3)), "crop 3 is not a file name", 1),
    ("made-before-crops", _edit_atlas(lambda r: [g.pop("crop") for c in r["concepts"] for g in c["regions"]]),
     "was made before c2mf kept each crop in the atlas folder: rerun `c2mf atlas`", 2),
    ("other-concept-count", _edit_atlas(lambda r: r["dictionary"].update(concepts=5)),
     f"{OTHER} (pca, 5 concepts, tensors sha256 ", 2),
    ("other-method", _edit_atlas(lambda r: r["dictionary"].update(method="nmf")), f"{OTHER} (nmf, 3 concepts", 2),
    ("other-dictionary-same-shape", _edit_atlas(lambda r: r["dictionary"].update(tensors_sha256="ab" * 32)),
     f"{OTHER} (pca, 3 concepts, tensors sha256 abababababab)", 2),
]


@pytest.mark.parametrize("kind, damage, message, code", ATLAS_DAMAGE, ids=[d[0] for d in ATLAS_DAMAGE])
def test_explain_refuses_a_damaged_atlas(kind, damage, message, code, sound, image_folder: Path, tmp_path: Path):
    atlas = tmp_path / "atlas"
    shutil.copytree(sound["atlas"], atlas)
    damage(atlas)
    before = _snapshot(atlas)
    out = tmp_path / "out"
    r = runner.invoke(app, ["explain", str(image_folder / "class_0" / "000.png"), "--dict", str(sound["pca"]),
                            "--atlas", str(atlas), "-o", str(out), "--device", "cpu", "-q"])
    assert r.exit_code == code, r.output
    line = _error_line(r.output)
    assert str(atlas) in line and message in line, line
    assert not out.exists()
    assert _snapshot(atlas) == before


def test_an_atlas_of_another_dictionary_is_refused_by_its_checksum(sound, image_folder: Path, tmp_path: Path):
    """Same method, same number of concepts, other tensors: the atlas's recorded sha256 tells them apart."""
    from c2mf_cli.artifacts.dictionary import ConceptDictionary

    d = ConceptDictionary.load(sound["pca"])
    d.tensors["W"] = -d.tensors["W"]  # the same shapes and method, other concepts
    other = d.save(tmp_path / "other.safetensors")
    r = runner.invoke(app, ["explain", str(image_folder / "class_0" / "000.png"), "--dict", str(other),
                            "--atlas", str(sound["atlas"]), "-o", str(tmp_path / "out"), "--device", "cpu", "-q"])
    assert r.exit_code == 2, r.output
    assert "make the atlas with the same dictionary" in _error_line(r.output)
    assert not (tmp_path / "out").exists()
