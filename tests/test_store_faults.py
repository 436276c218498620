"""Fault injection on activation stores: every kind of damage is refused with one `Error:` line, never used.

A tiny store is built once per session (conftest's `tiny_store`: 3 classes x 6 images, chunks of 4 images); each
test damages a copy of it, then runs a reader through the CLI and checks the one error line, the exit code, and
that nothing was written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from c2mf_cli.artifacts.store import ENCODING_VERSION, ActivationStore, check_store
from c2mf_cli.cli import app
from c2mf_cli.errors import C2MFError

runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = "c0001/activations/c/0/0/0/0"  # the first chunk of class 1's activations


def _root_attrs(store: Path) -> tuple[dict, Callable[[dict], None]]:
    meta = json.loads((store / "zarr.json").read_text())

    def save(attrs: dict) -> None:
        meta["attributes"] = attrs
        (store / "zarr.json").write_text(json.dumps(meta))

    return meta["attributes"], save


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _edit_root(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        attrs, save = _root_attrs(store)
        edit(attrs)
        save(attrs)

    return damage


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _rename_class(a: dict) -> None:
    a["classes"][1]["name"] = "renamed"


def _drop_class(a: dict) -> None:
    a["classes"].pop()


def _edit_layer(a: dict) -> None:
    a["config"]["layer"] = "layer2"


def _edit_row_shape(a: dict) -> None:
    a["row_shape"] = [16, 192]


def _edit_rows(a: dict) -> None:
    a["classes"][0]["n_images"] = 3


def _unseal(a: dict) -> None:
    del a["manifest"], a["seal"]


def _shorten_paths(store: Path) -> None:
    _edit_json(store / "c0001" / "zarr.json", lambda m: m["attributes"].update(paths=m["attributes"]["paths"][:2]))


def _dtype_int16(store: Path) -> None:
    _edit_json(store / "c0001" / "activations" / "zarr.json", lambda m: m.update(data_type="int16"))


def _shape_edit(store: Path) -> None:
    _edit_json(store / "c0001" / "activations" / "zarr.json", lambda m: m.update(shape=[4, 4, 4, 192]))


def _pickle_codec(store: Path) -> None:
    _edit_json(store / "c0001" / "logits" / "zarr.json",
               lambda m: m["codecs"].insert(1, {"name": "numcodecs.pickle", "configuration": {"protocol": 4}}))


# (id, damage, what the one error line must say, caught by the fast check?)
DAMAGE = [
    ("delete-chunk", lambda s: (s / CHUNK).unlink(), "chunk c/0/0/0/0 of c0001/activations is missing", True),
    ("delete-valid-chunk", lambda s: (s / "c0002/valid/c/1").unlink(), "chunk c/1 of c0002/valid is missing", True),
    ("truncate-chunk", lambda s: (s / CHUNK).write_bytes((s / CHUNK).read_bytes()[:-9]), "bytes, the manifest says", True),
    ("zero-chunk", lambda s: (s / CHUNK).write_bytes(b""), "has 0 bytes", True),
    ("edit-chunk", lambda s: _flip_byte(s / "c0001/valid/c/0"), "chunk c/0 of c0001/valid (class 'class_1') fails its checksum", False),
    ("edit-activations", lambda s: _flip_byte(s / CHUNK), f"chunk {CHUNK[18:]} of c0001/activations (class 'class_1') fails its checksum", False),
    ("rename-class", _edit_root(_rename_class), "class c0001: name is 'renamed'", True),
    ("drop-class", _edit_root(_drop_class), "the root attributes list 2 classes, the manifest 3", True),
    ("edit-layer", _edit_root(_edit_layer), "no longer matches its fingerprint", True),
    ("edit-row-shape", _edit_root(_edit_row_shape), "the root attributes give rows of shape [16, 192]", True),
    ("edit-rows", _edit_root(_edit_rows), "n_images is 3 in the root attributes", True),
    ("forced-complete", _edit_root(_unseal), "marked complete but has no manifest", True),
    ("shorten-paths", _shorten_paths, "group c0001 (class 'class_1'): its list of image paths was edited", True),
    ("dtype-int16", _dtype_int16, "c0001/activations has dtype 'int16', the manifest says 'float16'", True),
    ("shape-edit", _shape_edit, "c0001/activations has shape [4, 4, 4, 192]", True),
    ("drop-group", lambda s: shutil.rmtree(s / "c0002"), "group c0002 (class 'class_2') is missing", True),
    ("pickle-codec", _pickle_codec, "uses codec 'numcodecs.pickle', which c2mf never writes", True),
]


@pytest.fixture
def damaged(request, tiny_store: Path, tmp_path: Path) -> tuple[Path, str, bool]:
    _, damage, message, fast = request.param
    store = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_store, store)
    damage(store)
    return store, message, fast


def _error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True, ids=[d[0] for d in DAMAGE])
def test_library_open_and_read_refuse_damage(damaged):
    store, message, fast = damaged
    with pytest.raises(C2MFError) as e:
        s = ActivationStore.open(store)
        for y in range(len(s.classes)):  # what any reader does: every row, through the row source too
            s.activations(y), s.logits(y)
            list(s.row_source().batches(y, 7))
    assert message in str(e.value) and str(store) in str(e.value)
    assert (not check_store(store, _root_attrs(store)[0])) == (not fast)


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True, ids=[d[0] for d in DAMAGE])
def test_factorize_refuses_damage(damaged, tmp_path: Path):
    store, message, _ = damaged
    out = tmp_path / "out" / "d.safetensors"
    r = runner.invoke(app, ["factorize", "-s", str(store), "--method", "pca", "--concepts", "3", "--device", "cpu",
                            "--out", str(out)])
    assert r.exit_code == 1, r.output
    assert message in _error_line(r.output)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("damaged", [d for d in DAMAGE if d[3]], indirect=True, ids=[d[0] for d in DAMAGE if d[3]])
def test_info_refuses_damage(damaged):
    store, message, _ = damaged
    before = _files(store)
    r = runner.invoke(app, ["info", str(store)])
    assert r.exit_code == 1, r.output
    assert message in _error_line(r.output)
    assert _files(store) == before


def test_a_sound_store_passes_the_fast_check(tiny_store: Path):
    attrs, _ = _root_attrs(tiny_store)
    assert attrs["encoding-version"] == ENCODING_VERSION and attrs["complete"] is True
    assert check_store(tiny_store, attrs) == []
    manifest = attrs["manifest"]
    assert sorted(manifest["arrays"]) == [f"c000{y}/{a}" for y in range(3) for a in ("activations", "logits", "valid")]
    # every chunk of the grid is a file, even one of fill values, and every codec chain ends in crc32c
    act = manifest["arrays"]["c0000/activations"]
    assert sorted(act["chunk_bytes"]) == ["c/0/0/0/0", "c/1/0/0/0"] and act["codecs"][-1] == {"name": "crc32c"}
    assert [c["rows"] for c in manifest["classes"]] == [6, 6, 6]


def test_an_old_version_store_says_re_extract(tiny_store: Path, tmp_path: Path):
    store = tmp_path / "old.zarr"
    shutil.copytree(tiny_store, store)
    _edit_root(lambda a: a.update({"encoding-version": 1}))(store)
    r = runner.invoke(app, ["info", str(store)])
    assert r.exit_code == 1
    line = _error_line(r.output)
    assert "store format version 1" in line and "re-extract it with this version" in line


def test_all_fill_chunks_are_written(image_folder: Path, tmp_path: Path):
    """A unit whose images are all unreadable is all fill values: its chunks must exist all the same."""
    from .conftest import build_store

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    for p in sorted((data / "class_2").iterdir())[:4]:
        p.write_bytes(b"not an image")
    store = build_store(tmp_path / "s.zarr", data)
    s = ActivationStore.open(store)
    assert (store / "c0002/valid/c/0").is_file() and s.n_images(2) == 2
    assert not np.asarray(s._read(2, "valid"))[:4].any()


# ---- c2mf verify

def test_verify_a_sound_store_fast_and_deep(tiny_store: Path):
    for extra in ([], ["--deep"]):
        r = runner.invoke(app, ["verify", str(tiny_store), "--json", "-q", *extra])
        assert r.exit_code == 0, r.output
        [report] = json.loads(r.stdout)
        assert report["ok"] and report["kind"] == "activation store" and report["checked"]["chunk_files"] == 18
        assert report["checked"].get("chunks_decoded", 0) == (18 if extra else 0)


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True, ids=[d[0] for d in DAMAGE])
def test_verify_lists_the_damage(damaged, tiny_store: Path):
    store, message, fast = damaged
    before = _files(store)
    fast_run = runner.invoke(app, ["verify", str(tiny_store), str(store), "-q"])
    deep_run = runner.invoke(app, ["verify", str(tiny_store), str(store), "--deep", "-q"])
    for r, caught in ((fast_run, fast), (deep_run, True)):
        if not caught:  # a flipped byte keeps the file's size: only the deep check decodes it
            assert r.exit_code == 0 and f"ok      {store}" in r.output, r.output
            continue
        assert r.exit_code == 1, r.output
        assert f"ok      {tiny_store}" in r.output and f"DAMAGED {store}" in r.output
        assert message in r.output
        assert "1 of 2 path(s) failed verification" in _error_line(r.output)
    assert _files(store) == before


def test_verify_a_dictionary_and_nan_in_it(tiny_store: Path, tmp_path: Path):
    import torch

    from c2mf_cli.artifacts.dictionary import ConceptDictionary

    out = tmp_path / "d.safetensors"
    r = runner.invoke(app, ["factorize", "-s", str(tiny_store), "--method", "pca", "--concepts", "3", "--device", "cpu",
                            "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(out), "--deep", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["kind"] == "dictionary"
    d = ConceptDictionary.load(out)
    d.tensors["W"] = d.tensors["W"].clone()
    d.tensors["W"][0, 0] = float("nan")
    d.save(tmp_path / "nan.safetensors")
    r = runner.invoke(app, ["verify", str(tmp_path / "nan.safetensors"), "--deep"])
    assert r.exit_code == 1 and ("NaN" in r.output or "nan" in r.output), r.output
    raw = bytearray(out.read_bytes())
    raw[-3] ^= 0x10  # one flipped bit in the tensors: only the recorded sha256 sees it (fast mode too)
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    r = runner.invoke(app, ["verify", str(tmp_path / "flipped.safetensors")])
    assert r.exit_code == 1 and "its tensors do not match the sha256" in r.output, r.output
    r = runner.invoke(app, ["verify", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "does not exist" in r.output


# ---- shards

SHARD_ENV = ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
             "SLURM_ARRAY_TASK_STEP")


@pytest.mark.parametrize("env, message", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 and WORLD_SIZE=4 in the environment: need"),
    ({"RANK": "abc", "WORLD_SIZE": "4"}, "RANK='abc' in the environment is not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK=0 and WORLD_SIZE=0 in the environment: need WORLD_SIZE >= 1"),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"},
     "SLURM array task 2 (min 0, step 1, count 2) does not map to one of 2 shards"),
])
def test_shard_environment_errors(monkeypatch, env, message):
    from c2mf_cli.stages.extract import ShardSpec

    for k in SHARD_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(C2MFError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        ShardSpec.parse(None)
    assert e.value.exit_code == 2


def _extract_args(data: Path, out: Path) -> list[str]:
    from .conftest import TINY_INPUT, TINY_LAYER, TINY_MODEL

    return ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(data), "-o", str(out),
            "--input-size", TINY_INPUT, "--workers", "0", "--split", "all", "--chunk-images", "4", "-q"]


def _chunks(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in store.rglob("c/**/*") if p.is_file()}


def test_slurm_array_with_a_step_fills_the_store(monkeypatch, image_folder: Path, tiny_store: Path, tmp_path: Path):
    """--array=0-3:2 runs tasks 0 and 2 with COUNT=2: they are shards 0/2 and 1/2, and the store completes."""
    for k in SHARD_ENV:
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "s.zarr"
    for task in ("0", "2"):
        env = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_MAX": "2", "SLURM_ARRAY_TASK_STEP": "2"}
        r = runner.invoke(app, _extract_args(image_folder, out), env=env)
        assert r.exit_code == 0, r.output
    assert ActivationStore.open(out).info["complete"]
    assert _chunks(out) == _chunks(tiny_store)  # the same bytes as one process


def test_the_last_shard_refuses_to_leave_units_missing(image_folder: Path, tmp_path: Path):
    out = tmp_path / "s.zarr"
    args = _extract_args(image_folder, out)
    r = runner.invoke(app, args + ["--shard", "1/2"])
    assert r.exit_code == 0, r.output
    lost = sorted((out / "progress").glob("c*.json"))[0]  # a unit of shard 1/2, lost (a partial rsync)
    lost.unlink()
    r = runner.invoke(app, args + ["--shard", "0/2"])
    assert r.exit_code == 1, r.output
    line = _error_line(r.output)
    assert f"incomplete although every shard of 2 has finished: 1 unit(s) missing (e.g. {lost.stem})" in line
    assert "rerun the same command with --shard 1/2" in line
    r = runner.invoke(app, args + ["--shard", "1/2"])
    assert r.exit_code == 0 and ActivationStore.open(out).info["complete"]


# ---- options, file names, disks and workers: one line each, nothing left behind

@pytest.mark.parametrize("extra, message", [
    (["--crop-size", "nan"], "--crop-size must be in (0, 1]"),
    (["--crop-size", "inf"], "--crop-size must be in (0, 1]"),
    (["--crop-size", "-1"], "--crop-size must be in (0, 1]"),
    (["--crop-stride", "nan"], "--crop-stride must be in (0, 1]"),
    (["--crop-stride", "0"], "--crop-stride must be in (0, 1]"),
    (["--mode", "crops", "--crop-size", "0.05", "--crop-stride", "0.05"], "crops per image on a 64x64 input, more than 1024"),
    (["--n-crops", "10000000"], "--n-crops must be between 1 and 1024"),
    (["--seed", "-1"], "--seed must be between 0 and 2**63 - 1"),
    (["--workers", "10000"], "--workers must be between 0 and the"),
    (["--workers", "-1"], "--workers must be between 0 and the"),
    (["--chunk-images", "0"], "--chunk-images must be between 1 and 1,000,000"),
    (["--chunk-images", "1000000000000"], "--chunk-images must be between 1 and 1,000,000"),
    (["--chunk-images", "1e12"], "Invalid value for '--chunk-images'"),
    (["--mean", "nan"], "--mean takes finite numbers, got nan,nan,nan"),
    (["--std", "0,1,1"], "--std takes finite numbers above 0"),
])
def test_bad_option_values_are_refused_before_any_work(image_folder: Path, tmp_path: Path, extra, message):
    out = tmp_path / "out" / "s.zarr"
    r = runner.invoke(app, _extract_args(image_folder, out)[:-1] + extra)
    assert r.exit_code == 2, r.output
    assert message in _error_line(r.output)
    assert not (tmp_path / "out").exists()


def test_a_big_chunk_is_bounded_by_the_class(image_folder: Path, tmp_path: Path, tiny_store: Path):
    """--chunk-images far above a class's size makes one chunk of the class, not a huge empty one."""
    out = tmp_path / "s.zarr"
    r = runner.invoke(app, _extract_args(image_folder, out)[:-2] + ["999999", "-q"])
    assert r.exit_code == 0, r.output
    assert ActivationStore.open(out)._group(0)["activations"].chunks[0] == 6


def test_a_file_name_that_is_not_utf8_is_one_error(image_folder: Path, tmp_path: Path):
    import os

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    bad = os.fsdecode(os.fsencode(str(data / "class_0")) + b"/caf\xe9.png")
    shutil.copy(data / "class_0" / "000.png", bad)
    r = runner.invoke(app, _extract_args(data, tmp_path / "s.zarr"))
    assert r.exit_code == 1, r.output
    assert "caf\\xe9.png' is not UTF-8: rename it" in _error_line(r.output)
    assert not (tmp_path / "s.zarr").exists()


def test_a_data_folder_of_hidden_files_leaves_nothing(tmp_path: Path):
    data = tmp_path / "data"
    (data / ".git").mkdir(parents=True)
    (data / ".DS_Store").write_bytes(b"\0\0")
    r = runner.invoke(app, _extract_args(data, tmp_path / "out" / "s.zarr"))
    assert r.exit_code == 1 and "has no class sub-folders" in _error_line(r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_full_disk_is_one_error_and_the_rerun_finishes(image_folder: Path, tmp_path: Path, tiny_store: Path,
                                                         monkeypatch):
    import errno

    from c2mf_cli.artifacts.store import StoreWriter

    original = StoreWriter.write_unit
    calls = {"n": 0}

    def full_after_two(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "c0001"))
        return original(self, *a, **kw)

    out = tmp_path / "s.zarr"
    monkeypatch.setattr(StoreWriter, "write_unit", full_after_two)
    r = runner.invoke(app, _extract_args(image_folder, out))
    assert r.exit_code == 1, r.output
    line = _error_line(r.output)
    assert f"cannot write the store {str(out)!r}: No space left on device" in line
    assert "the finished chunks are kept: rerun the same command to resume" in line
    monkeypatch.setattr(StoreWriter, "write_unit", original)
    r = runner.invoke(app, _extract_args(image_folder, out))
    assert r.exit_code == 0, r.output
    assert _chunks(out) == _chunks(tiny_store)


def test_a_failure_before_the_first_chunk_removes_the_new_store(image_folder: Path, tmp_path: Path, monkeypatch):
    """The corrected command must start afresh, not meet a half-made store of another fingerprint."""
    from c2mf_cli.artifacts.store import StoreWriter

    def nan(self, unit, *a, **kw):
        raise C2MFError(f"the model produced NaN or inf activations/logits in unit {unit.name}")

    monkeypatch.setattr(StoreWriter, "write_unit", nan)
    r = runner.invoke(app, _extract_args(image_folder, tmp_path / "s.zarr"))
    assert r.exit_code == 1 and "NaN" in _error_line(r.output)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault, message", [
    ("die", "the image-loading workers failed (DataLoader worker (pid"),
    ("hang", "the image-loading workers failed (DataLoader timed out after 2.0 seconds)"),
])
def test_a_dead_or_stuck_loading_worker_ends_the_run(image_folder: Path, tmp_path: Path, monkeypatch, fault, message):
    import os
    import signal
    import time

    import torch.utils.data

    from c2mf_cli.stages import extract as stage

    original = stage._Images.__getitem__

    def broken(self, i):
        if torch.utils.data.get_worker_info() is not None and i >= 4:  # in the worker, after the first batch
            if fault == "die":
                os.kill(os.getpid(), signal.SIGKILL)  # what a full /dev/shm does to a worker (SIGBUS)
            time.sleep(600)
        return original(self, i)

    monkeypatch.setattr(stage._Images, "__getitem__", broken)
    monkeypatch.setattr(stage, "LOADER_TIMEOUT_S", 2.0)
    args = _extract_args(image_folder, tmp_path / "s.zarr")
    args[args.index("--workers") + 1] = "1"
    r = runner.invoke(app, args + ["--batch-size", "4"])
    assert r.exit_code == 1, r.output
    line = _error_line(r.output)
    assert message in line and "rerun with --workers 0" in line and "/dev/shm" in line


# ---- kill -9 at several points of extract: the next run cleans up and ends equal to an uninterrupted run

_KILLER = r"""
import os, signal, sys, pathlib
import torch
torch.set_num_threads(1)
point, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
from c2mf_cli.artifacts import store
from tests.conftest import build_store
count = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def after(n):
    count["n"] += 1
    return count["n"] > n

if point == "layout":  # the layout is made, not yet renamed into place: a `.creating` folder is left
    os.rename = lambda *a: die()
elif point == "chunk":  # zarr wrote a chunk under a temporary name: a `.partial` file is left
    original = pathlib.Path.replace
    def replace(self, target):
        if self.name.endswith(".partial") and after(7):
            die()
        return original(self, target)
    pathlib.Path.replace = replace
elif point == "marker":  # a unit's chunks are written, its marker's temporary file too, not renamed
    original_replace = os.replace
    def os_replace(src, dst):
        if str(dst).endswith(".json") and "progress" in str(dst) and after(2):
            die()
        return original_replace(src, dst)
    os.replace = os_replace
elif point == "finalize":  # every unit done, killed while building the manifest
    store.build_manifest = lambda *a: die()
build_store(pathlib.Path(out), pathlib.Path(data))
"""


@pytest.mark.parametrize("point", ["layout", "chunk", "marker", "finalize"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(point, image_folder: Path, tiny_store: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    from .conftest import build_store

    out = tmp_path / "s.zarr"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _KILLER, point, str(image_folder), str(out)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr
    debris = {"layout": ".creating", "chunk": ".partial", "marker": ".tmp", "finalize": None}[point]
    if debris:
        assert any(debris in f.name for f in tmp_path.rglob("*")), sorted(tmp_path.rglob("*"))
    build_store(out, image_folder)
    assert not [f for f in tmp_path.rglob("*") if f.name.endswith((".creating", ".partial", ".tmp"))]
    store = ActivationStore.open(out)
    assert store.info["manifest"] == ActivationStore.open(tiny_store).info["manifest"]
    assert _chunks(out) == _chunks(tiny_store)


# (kill point in the last shard's run, shard that reruns): the shard's record, the manifest, the final attributes
SHARD_KILLS = [("replace:-of-2.json", 1, "1/2"), ("replace:-of-2.json", 1, "0/2"),
               ("call:c2mf_cli.artifacts.store:build_manifest", 1, "0/2"), ("replace:/zarr.json", 1, "1/2"),
               ("replace:/zarr.json", 1, "0/2")]


@pytest.mark.parametrize("point, n, rerun", SHARD_KILLS,
                         ids=[f"{k[0].split(':')[-1].strip('/')}-rerun-{k[2][0]}" for k in SHARD_KILLS])
def test_kill_9_while_the_last_shard_finalizes(point, n, rerun, image_folder: Path, tiny_store: Path,
                                               tmp_path: Path):
    """Shard 0/2 has finished; shard 1/2, the last, is killed while it records itself done or finalizes. Rerunning
    either shard finishes the store, equal to one uninterrupted process, with no temporary file left."""
    import os
    import subprocess
    import sys

    out = tmp_path / "s.zarr"
    args = _extract_args(image_folder, out)
    r = runner.invoke(app, args + ["--shard", "0/2"])
    assert r.exit_code == 0, r.output
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "tests.kill9", point, str(n), "--", *args, "--shard", "1/2"], env=env,
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr
    assert not ActivationStore.open(out, require_complete=False, check=False).info.get("complete")
    r = runner.invoke(app, args + ["--shard", rerun])
    assert r.exit_code == 0, r.output
    assert not [f for f in out.rglob("*") if f.name.endswith((".partial", ".tmp"))]
    assert ActivationStore.open(out).info["manifest"] == ActivationStore.open(tiny_store).info["manifest"]
    assert _chunks(out) == _chunks(tiny_store)


@pytest.fixture(scope="module")
def pca_dict(tiny_store: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dict") / "pca.safetensors"
    r = runner.invoke(app, ["factorize", "-s", str(tiny_store), "--method", "pca", "--concepts", "3", "--device", "cpu",
                            "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True, ids=[d[0] for d in DAMAGE])
def test_evaluate_refuses_a_damaged_store(damaged, tiny_test_store: Path, pca_dict: Path, tmp_path: Path):
    store, message, _ = damaged
    r = runner.invoke(app, ["evaluate", "--train", str(store), "--test", str(tiny_test_store), "--dict", str(pca_dict),
                            "--out", str(tmp_path / "ev"), "--device", "cpu", "-q"])
    assert r.exit_code == 1, r.output
    assert message in _error_line(r.output)
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True, ids=[d[0] for d in DAMAGE])
def test_atlas_refuses_a_damaged_store(damaged, pca_dict: Path, tmp_path: Path):
    store, message, _ = damaged
    before = _files(store)
    r = runner.invoke(app, ["atlas", "-s", str(store), "--dict", str(pca_dict), "-o", str(tmp_path / "atlas"), "-q"])
    assert r.exit_code == 1, r.output
    assert message in _error_line(r.output)
    assert not (tmp_path / "atlas").exists()
    assert _files(store) == before


def test_evaluate_and_atlas_accept_the_sound_store(tiny_store: Path, tiny_test_store: Path, pca_dict: Path,
                                                   tmp_path: Path):
    """The control for the two tests above: undamaged, the same commands succeed."""
    r = runner.invoke(app, ["evaluate", "--train", str(tiny_store), "--test", str(tiny_test_store), "--dict",
                            str(pca_dict), "--out", str(tmp_path / "ev"), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["atlas", "-s", str(tiny_store), "--dict", str(pca_dict), "-o", str(tmp_path / "atlas"),
                            "-q"])
    assert r.exit_code == 0, r.output


# ---- a real full disk: a tiny tmpfs (needs root and a kernel that lets this container mount one)

@pytest.fixture
def tiny_disk(tmp_path: Path):
    """Mount a tmpfs of the size asked at a fresh folder; skipped where mounting is not allowed."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}): the patched-writer tests "
                        "cover ENOSPC instead")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=True)


def _debris(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*") if f.name.endswith((".partial", ".tmp", ".creating"))]


def test_extract_onto_a_full_disk_then_onto_a_larger_one(tiny_disk, image_folder: Path, tiny_store: Path):
    import subprocess

    disk = tiny_disk("200k")  # the store takes about 340 kB: the disk fills part-way through
    out = disk / "s.zarr"
    r = runner.invoke(app, _extract_args(image_folder, out))
    assert r.exit_code == 1, r.output
    line = _error_line(r.output)
    assert f"cannot write the store {str(out)!r}: No space left on device" in line and "free space" in line
    assert not _debris(disk)
    if out.exists():  # the finished units are kept for the rerun, never taken as a complete store
        assert "the finished chunks are kept: rerun the same command to resume" in line
        assert not ActivationStore.open(out, require_complete=False, check=False).info.get("complete")
    subprocess.run(["mount", "-o", "remount,size=2m", str(disk)], check=True)
    r = runner.invoke(app, _extract_args(image_folder, out))
    assert r.exit_code == 0, r.output
    assert not _debris(disk)
    assert _chunks(out) == _chunks(tiny_store)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["dictionary", "checkpoint"])
def test_factorize_onto_a_full_disk(tiny_disk, tiny_store: Path, checkpoint: bool):
    disk = tiny_disk("8k")
    (disk / "filler").write_bytes(b"\0" * 6000)  # what is left holds no dictionary (about 3.4 kB) nor checkpoint
    out = disk / "d.safetensors"
    args = ["factorize", "-s", str(tiny_store), "--method", "c2mf", "--concepts", "3", "--device", "cpu", "--out",
            str(out), "-q"]
    r = runner.invoke(app, args + (["--checkpoint-every", "2"] if checkpoint else []))
    assert r.exit_code == 1, r.output
    line = _error_line(r.output)
    what = f"the checkpoint {str(out) + '.ckpt'!r}" if checkpoint else f"--out {str(out)!r}"
    assert f"cannot write {what} (" in line and "No space left on device" in line and "free space" in line, line
    assert sorted(f.name for f in disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("command", ["atlas", "explain"])
def test_atlas_and_explain_onto_a_full_disk(tiny_disk, tiny_store: Path, pca_dict: Path, image_folder: Path,
                                            command: str):
    """One line, not a traceback; no temporary file; an atlas folder without its record (atlas.json, written
    last) is never taken for an atlas by explain --atlas."""
    disk = tiny_disk("16k")
    out = disk / "out"
    args = {"atlas": ["atlas", "-s", str(tiny_store), "--dict", str(pca_dict), "-o", str(out), "-q"],
            "explain": ["explain", str(image_folder / "class_0" / "000.png"), "--dict", str(pca_dict), "-o",
                        str(out), "--device", "cpu", "-q"]}[command]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    assert "No space left on device: free space or choose another output folder" in _error_line(r.output)
    assert not _debris(disk) and not (out / "atlas.json").exists() and not (out / "explain.json").exists()
