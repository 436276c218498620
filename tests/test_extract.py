"""`extract`: store content, crops, resume after a crash, shards, fingerprints, bad images, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from c2mf_cli.cli import app
from c2mf_cli.inputs.data import CropSpec, DatasetSpec, resolve_dataset
from c2mf_cli.errors import C2MFError
from c2mf_cli.stages.extract import ShardSpec
from c2mf_cli.inputs.models import ModelSpec, load_model, split_model
from c2mf_cli.artifacts.store import ActivationStore, StoreWriter

from .conftest import SHARED_DATA, TINY_INPUT, TINY_LAYER, TINY_MODEL, build_store, make_image_folder, needs_shared_data

runner = CliRunner()


def _arrays(path: Path) -> dict[str, np.ndarray]:
    store = ActivationStore.open(path)
    out = {}
    for y in range(len(store.classes)):
        out[f"{y}/a"] = store.activations(y)
        out[f"{y}/l"] = store.logits(y)
    return out


def _assert_same_store(a: Path, b: Path) -> None:
    xa, xb = _arrays(a), _arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


def test_store_holds_g_of_x_and_the_models_logits(tiny_store, image_folder):
    store = ActivationStore.open(tiny_store)
    assert store.classes == ["class_0", "class_1", "class_2"]
    assert store.row_shape == (4, 4, 192)
    assert store.layout == "nchw" and store.grid == (4, 4)
    lm = load_model(ModelSpec(TINY_MODEL), preprocess_overrides={"input_size": (3, 64, 64)})
    split = split_model(lm.model, TINY_LAYER, (3, 64, 64))
    paths = store.paths(1)
    x = torch.stack([lm.preprocess(Image.open(p)) for p in paths])
    with torch.no_grad():
        a = split.to_store(split.g(x)).numpy()
        logits = lm.model(x).numpy()
    np.testing.assert_allclose(store.activations(1), a, atol=2e-2, rtol=2e-3)  # float16 storage
    np.testing.assert_allclose(store.logits(1), logits, atol=1e-4, rtol=1e-4)
    assert (store.labels(1) == 1).all()
    rows = store.row_source()
    assert rows.n_rows(1) == 6 * 16
    assert sum(b.shape[0] for b in rows.batches(1, 10, shuffle=True, seed=1)) == 96


def test_crop_store_rows_are_pooled_crops(tiny_crop_store):
    store = ActivationStore.open(tiny_crop_store)
    n_crops = CropSpec().n_crops(64, 64)
    assert n_crops == 16  # CRAFT's grid: 18-px crops at stride 14 on a 64-px input -> 4 x 4
    assert store.mode == "crops"
    assert store.row_shape == (192,)
    assert store.n_images(0) == 6 * n_crops
    assert store.logits(0).shape == (6 * n_crops, 1000)
    assert len(store.paths(0)) == 6 * n_crops


def test_craft_grid_on_a_224_input_matches_the_reference():
    boxes = CropSpec().boxes(224, 224)
    assert {s for _, _, s in boxes} == {64}
    assert sorted({t for t, _, _ in boxes}) == [0, 51, 102, 153]


def test_random_crops_are_seeded_per_image():
    spec = CropSpec(kind="random", count=5, seed=3)
    assert spec.boxes(64, 64, "a.png") == spec.boxes(64, 64, "a.png")
    assert spec.boxes(64, 64, "a.png") != spec.boxes(64, 64, "b.png")
    assert all(t + s <= 64 and l + s <= 64 for t, l, s in spec.boxes(64, 64, "a.png"))


def test_interrupted_run_resumes_to_the_same_store(tmp_path, image_folder, monkeypatch):
    reference = build_store(tmp_path / "ref.zarr", image_folder)
    calls = {"n": 0}
    original = StoreWriter.write_unit

    def crash_after_two(self, *args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run is killed between two units
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write_unit", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_store(tmp_path / "resumed.zarr", image_folder)
    monkeypatch.setattr(StoreWriter, "write_unit", original)
    with pytest.raises(C2MFError, match="incomplete"):
        ActivationStore.open(tmp_path / "resumed.zarr")
    # a chunk written without its marker (killed mid-unit) must not be trusted: poison one
    writer = StoreWriter(tmp_path / "resumed.zarr")
    assert len(writer.done_units()) == 2
    writer.root["c0002"]["activations"][0:4] = np.full((4, 4, 4, 192), 7.0, dtype=np.float16)
    build_store(tmp_path / "resumed.zarr", image_folder)
    _assert_same_store(reference, tmp_path / "resumed.zarr")


def test_two_shards_in_parallel_equal_one_process(tmp_path, image_folder):
    one = build_store(tmp_path / "one.zarr", image_folder)
    cmd = [sys.executable, "-m", "c2mf_cli.cli", "extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d",
           str(image_folder), "-o", str(tmp_path / "sharded.zarr"), "--input-size", TINY_INPUT, "--split", "all",
           "--chunk-images", "4", "--workers", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/2"], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    store = ActivationStore.open(tmp_path / "sharded.zarr")  # finalized by whichever shard finished last
    assert store.info["complete"]
    _assert_same_store(one, tmp_path / "sharded.zarr")


def test_shard_spec_from_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)
    assert ShardSpec.parse(None) == ShardSpec(0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    assert ShardSpec.parse(None) == ShardSpec(2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert ShardSpec.parse(None) == ShardSpec(1, 8)
    assert ShardSpec.parse("3/4") == ShardSpec(3, 4)


def test_store_of_another_configuration_is_refused(tmp_path, image_folder):
    build_store(tmp_path / "s.zarr", image_folder)
    with pytest.raises(C2MFError, match=r"another configuration \(differs in: layer.*\).*another --out"):
        build_store(tmp_path / "s.zarr", image_folder, layer="layer2")


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=3)
    bad = data / "class_1" / "001.png"
    bad.write_bytes(b"not an image at all")
    result = runner.invoke(app, ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(data), "-o",
                                 str(tmp_path / "s.zarr"), "--input-size", TINY_INPUT, "--workers", "0", "--quiet",
                                 "--split", "all"])
    assert result.exit_code == 0, result.output
    assert "1 unreadable image(s) skipped" in result.output
    store = ActivationStore.open(tmp_path / "s.zarr")
    assert [f["path"] for f in store.failures] == [str(bad)]
    assert store.n_images(1) == 2 and len(store.paths(1)) == 2
    valid = store._read(1, "valid")
    assert valid.tolist() == [True, False, True]  # the unreadable image's rows are stored as zeros
    assert not store._read(1, "activations")[~valid].any() and not store._read(1, "logits")[~valid].any()
    assert store._read(1, "activations")[valid].any()
    info = runner.invoke(app, ["info", str(tmp_path / "s.zarr"), "--json"])
    assert json.loads(info.stdout)["failed_images"][0]["path"] == str(bad)
    strict = runner.invoke(app, ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(data), "-o",
                                 str(tmp_path / "t.zarr"), "--input-size", TINY_INPUT, "--workers", "0",
                                 "--strict", "--quiet", "--split", "all"])
    assert strict.exit_code == 1
    assert "Error: cannot read image" in strict.output and "001.png" in strict.output


def test_cli_extract_json_and_info(tmp_path, image_folder):
    out = tmp_path / "s.zarr"
    args = ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(image_folder), "-o", str(out),
            "--input-size", TINY_INPUT, "--workers", "0", "--split", "train", "--json", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["complete"] and summary["summary"]["rows"] == 15  # 5 of 6 per class in train
    again = json.loads(runner.invoke(app, args).stdout)
    assert again["units_done_now"] == 0 and again["complete"]
    info = runner.invoke(app, ["info", str(out), "--json", "--classes"])
    assert info.exit_code == 0
    data = json.loads(info.stdout)
    assert data["layer"] == TINY_LAYER and data["mode"] == "full" and len(data["per_class"]) == 3


@pytest.mark.parametrize(
    "extra,message,code",
    [
        (["-l", "layr3"], "Error: unknown layer 'layr3'. Close matches: layer3", 1),
        (["-l", "layer2.0.conv1"], "skip connection", 1),
        (["--shard", "2/2"], "Error: --shard 2/2: need 0 <= i < n", 2),
        (["--shard", "x"], "Error: --shard must look like i/n", 2),
        (["--crop-size", "0", "--mode", "crops"], "Error:", 2),
        (["--batch-size", "0"], "Error: --batch-size must be at least 1", 2),
    ],
)
def test_cli_user_errors(tmp_path, image_folder, extra, message, code):
    args = ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(image_folder), "-o", str(tmp_path / "s"),
            "--input-size", TINY_INPUT, "--workers", "0", "--quiet"]
    result = runner.invoke(app, args + extra)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_cli_missing_data_and_store(tmp_path):
    result = runner.invoke(app, ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(tmp_path / "none"),
                                 "-o", str(tmp_path / "s")])
    assert result.exit_code == 1 and "Error: --data" in result.output and "does not exist" in result.output
    result = runner.invoke(app, ["info", str(tmp_path / "none")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_cli_layers_lists_useful_layers():
    result = runner.invoke(app, ["layers", "-m", "test_vit", "--json"])
    assert result.exit_code == 0, result.output
    layers = {entry["name"]: entry for entry in json.loads(result.stdout)["layers"]}
    assert {f"blocks.{i}" for i in range(6)} <= set(layers)
    assert layers["blocks.2"]["shape"] == [101, 64] and layers["blocks.2"]["splits"] is True
    # loading and checking splits takes long on a large model: it is said on stderr first, never on stdout
    assert result.stderr.startswith("loading test_vit...")


def test_datasets_cub_csv_split_and_class_index(tmp_path):
    root = make_image_folder(tmp_path / "cub" / "images", n_classes=2, per_class=4)
    cub = tmp_path / "cub"
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    (cub / "images.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(files)))
    (cub / "image_class_labels.txt").write_text("".join(f"{i + 1} {1 + (f.parts[0] == 'class_1')}\n"
                                                        for i, f in enumerate(files)))
    (cub / "classes.txt").write_text("1 class_0\n2 class_1\n")
    (cub / "train_test_split.txt").write_text("".join(f"{i + 1} {int(i % 2 == 0)}\n" for i in range(len(files))))
    train = resolve_dataset(DatasetSpec(str(cub), split="train"))
    test = resolve_dataset(DatasetSpec(str(cub), split="test"))
    assert len(train) == len(test) == 4 and not {i.path for i in train} & {i.path for i in test}
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"classes": {"class_0": {"model_index": 7}, "class_1": {"model_index": 3}}}))
    mapped = resolve_dataset(DatasetSpec(str(cub), class_index=str(index)))
    assert {i.class_name: i.label for i in mapped} == {"class_0": 7, "class_1": 3}
    with pytest.raises(C2MFError, match="outside the model's 5 outputs"):
        resolve_dataset(DatasetSpec(str(cub), class_index=str(index)), num_outputs=5)
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"cub/images/{f},{f.parts[0]}\n" for f in files))
    assert [i.path for i in resolve_dataset(DatasetSpec(str(csv)))] == [i.path for i in resolve_dataset(
        DatasetSpec(str(root)))]


def test_seeded_split_is_deterministic_and_disjoint(image_folder):
    a = resolve_dataset(DatasetSpec(str(image_folder), split="train", seed=1))
    b = resolve_dataset(DatasetSpec(str(image_folder), split="train", seed=1))
    t = resolve_dataset(DatasetSpec(str(image_folder), split="test", seed=1))
    assert a == b
    assert not {i.path for i in a} & {i.path for i in t}
    assert len(a) + len(t) == 18
    assert resolve_dataset(DatasetSpec(str(image_folder), split="train", seed=2)) != a


@needs_shared_data
def test_real_cifar_store_reproduces_the_measured_accuracy(tmp_path):
    args = ["extract", "-m", f"{SHARED_DATA}/models.py:cifar_resnet20", "-c",
            str(SHARED_DATA / "cifar10/resnet20-12fca82f.th"), "-l", "layer3", "-d",
            str(SHARED_DATA / "cifar10/images"), "-o", str(tmp_path / "c.zarr"), "--workers", "1", "--quiet",
            "--split", "all"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(tmp_path / "c.zarr")
    correct = sum(int((store.logits(y).argmax(1) == store.labels(y)).sum()) for y in range(10))
    assert correct / 1000 == pytest.approx(0.804, abs=0.002)  # the data README's measured top-1
    assert store.row_shape == (8, 8, 64)


@needs_shared_data
def test_real_cub_store_with_class_index(tmp_path):
    args = ["extract", "-m", f"{SHARED_DATA}/models.py:mobilenet_v2_inat_birds", "-c",
            str(SHARED_DATA / "cub/mobilenet_v2_inat_birds.pt"), "-l", "blocks.16", "-d",
            str(SHARED_DATA / "cub/images"), "--class-index", str(SHARED_DATA / "cub/class_index.json"),
            "--max-images-per-class", "1", "-o", str(tmp_path / "b.zarr"), "--workers", "1", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(tmp_path / "b.zarr")
    assert len(store.classes) == 78 and store.row_shape == (7, 7, 320)
    index = json.loads((SHARED_DATA / "cub/class_index.json").read_text())["classes"]
    assert store.class_indices == [index[c]["model_index"] for c in store.classes]
    assert (np.concatenate([store.activations(y) for y in range(78)]) < 0).any()  # the signed layer
    # the class index's readable labels travel in the store (the file may not), for the pictures
    prov = store.provenance
    assert prov.labels == tuple(index[c]["model_label"] for c in store.classes)
    goldfinch = index["American_Goldfinch"]
    assert prov.readable()[goldfinch["model_index"]] == goldfinch["model_label"]


def test_bad_files_are_listed_not_lost(tmp_path):
    """Empty files, non-images with an image suffix, truncated JPEGs and broken symlinks are skipped and listed."""
    data = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=2)
    (data / "class_0" / "empty.png").write_bytes(b"")
    (data / "class_0" / "text.jpg").write_text("hello")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "whole.jpg")
    whole = (tmp_path / "whole.jpg").read_bytes()
    (data / "class_1" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (data / "class_1" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (data / "class_1" / "link.png").symlink_to(data / "class_1" / "000.png")
    result = runner.invoke(app, ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(data),
                                 "-o", str(tmp_path / "s.zarr"), "--input-size", TINY_INPUT, "--workers", "0", "-q",
                                 "--split", "all"])
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(tmp_path / "s.zarr")
    failed = {Path(f["path"]).name for f in store.failures}
    assert failed == {"empty.png", "text.jpg", "truncated.jpg", "dangling.png"}
    assert store.n_images(0) == 2 and store.n_images(1) == 3  # the good symlink is read
    assert "4 unreadable image(s) skipped" in result.output


def test_folder_names_with_spaces_brackets_and_non_ascii(tmp_path):
    data = tmp_path / "my data"
    for name in ("cat [domestic]", "dög é"):
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(data / name / f"{i:03d} ü.png")
    (data / "cat [domestic]" / "000 ü.png").write_bytes(b"broken")  # its warning names a path with brackets
    out = tmp_path / "[run 1]" / "s.zarr"
    result = runner.invoke(app, ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(data),
                                 "-o", str(out), "--input-size", TINY_INPUT, "--workers", "0", "--split", "all"])
    assert result.exit_code == 0, result.output
    # printed as is, not eaten as rich markup, and not wrapped
    assert f"skipped: cannot read image '{data / 'cat [domestic]' / '000 ü.png'}'" in result.output
    assert result.stdout.strip() == str(out)
    assert ActivationStore.open(out).classes == ["cat [domestic]", "dög é"]
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "[run 1]" in info.stdout


def test_empty_class_folder_is_an_error_not_a_label_shift(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=2)
    (data / "a_empty").mkdir()
    with pytest.raises(C2MFError, match=r"class folder\(s\) .* hold no images \(e.g. 'a_empty'"):
        resolve_dataset(DatasetSpec(str(data)))


def test_max_per_class_and_splits_without_images(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=3)
    for bad in (0, -1):  # -1 used to drop each class's last image
        with pytest.raises(C2MFError, match="--max-per-class must be at least 1"):
            resolve_dataset(DatasetSpec(str(data), max_per_class=bad))
    for p in list((data / "class_0").iterdir())[1:]:
        p.unlink()
    warnings: list[str] = []
    items = resolve_dataset(DatasetSpec(str(data), split="test"), log=warnings.append)
    assert {it.class_name for it in items} == {"class_1"}
    assert len(warnings) == 1 and "class_0" in warnings[0] and "'test' split" in warnings[0]
    (data / "class_1").rename(tmp_path / "gone")
    make_image_folder(tmp_path / "one", n_classes=1, per_class=1)
    with pytest.raises(C2MFError, match="no images left .* at least 2 images"):
        resolve_dataset(DatasetSpec(str(tmp_path / "one"), split="test"))


def test_cli_error_before_any_work_is_one_line(tmp_path, image_folder):
    result = runner.invoke(app, ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d",
                                 str(image_folder), "-o", str(tmp_path / "s"), "--max-images-per-class", "0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["Error: --max-images-per-class must be at least 1, got 0"]
    assert not list(tmp_path.iterdir())  # no store, no temporary directory


def test_cli_interrupt_then_shards_of_another_count_finish_the_store(tmp_path, image_folder, monkeypatch):
    args = ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(image_folder), "-o",
            str(tmp_path / "s.zarr"), "--input-size", TINY_INPUT, "--workers", "0", "--chunk-images", "2",
            "--split", "all", "-q"]
    original = StoreWriter.write_unit
    calls = {"n": 0}

    def ctrl_c_after_two(self, *a, **kw):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, *a, **kw)

    monkeypatch.setattr(StoreWriter, "write_unit", ctrl_c_after_two)
    result = runner.invoke(app, args)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert "Interrupted: the finished chunks" in result.output and "rerun the same command" in result.output
    monkeypatch.setattr(StoreWriter, "write_unit", original)
    info = runner.invoke(app, ["info", str(tmp_path / "s.zarr")])
    assert info.exit_code == 0 and "incomplete: 2/9 chunks done" in info.output
    # resumed by shards of a count the first run never used: units are the same whatever the shard count
    for shard in ("0/3", "2/3"):
        assert runner.invoke(app, args + ["--shard", shard]).exit_code == 0
    assert not ActivationStore.open(tmp_path / "s.zarr", require_complete=False).info["complete"]
    last = runner.invoke(app, args[:-1] + ["--shard", "1/3"])
    assert last.exit_code == 0 and last.stdout.strip() == str(tmp_path / "s.zarr")
    assert ActivationStore.open(tmp_path / "s.zarr").summary()["chunks_done"] == "9/9"
    again = runner.invoke(app, args[:-1])
    assert "already complete (9 chunks)" in again.output


def test_cli_info_on_things_that_are_not_stores(tmp_path):
    (tmp_path / "plain").mkdir()
    result = runner.invoke(app, ["info", str(tmp_path / "plain")])
    assert result.exit_code == 1 and "is a directory but not an activation store (no zarr.json)" in result.output
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    result = runner.invoke(app, ["info", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and result.output.startswith("Error:") and "Traceback" not in result.output


def test_csv_headers_bom_relative_paths_and_encoding(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=2)
    (tmp_path / "lists").mkdir()
    rows = "".join(f"../imgs/class_{c}/{i:03d}.png,class_{c}\n" for c in range(2) for i in range(2))
    expected = [str(data / f"class_{c}" / f"{i:03d}.png") for c in range(2) for i in range(2)]
    for name, text in {"plain.csv": "path,label\n" + rows, "excel.csv": "\ufeffpath,label\n" + rows,
                       "named.csv": "filename,class\n" + rows, "bare.csv": rows}.items():
        (tmp_path / "lists" / name).write_text(text, encoding="utf-8")
        items = resolve_dataset(DatasetSpec(str(tmp_path / "lists" / name)))
        assert [i.path for i in items] == expected, name  # normalised absolute paths, no header row as an image
        assert {i.class_name for i in items} == {"class_0", "class_1"}, name
    (tmp_path / "lists" / "latin1.csv").write_bytes("path,label\ncaf\xe9.png,a\n".encode("latin-1"))
    with pytest.raises(C2MFError, match="is not UTF-8 text"):
        resolve_dataset(DatasetSpec(str(tmp_path / "lists" / "latin1.csv")))
    (tmp_path / "lists" / "semi.csv").write_text("path;label\nx.png;a\n")
    with pytest.raises(C2MFError, match=r"line 1: expected path,label \(comma-separated\)"):
        resolve_dataset(DatasetSpec(str(tmp_path / "lists" / "semi.csv")))


def test_malformed_cub_files_are_one_clear_error(tmp_path):
    cub = tmp_path / "cub"
    (cub / "images").mkdir(parents=True)
    (cub / "images.txt").write_text("1 a/x.jpg\n2 a/y.jpg\n")
    (cub / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(C2MFError, match=r"image 2 \(a/y.jpg\) has no class id"):
        resolve_dataset(DatasetSpec(str(cub)))
    (cub / "image_class_labels.txt").write_text("1 1\ntwo 1\n")
    with pytest.raises(C2MFError, match="line 2: expected '<id> <value>'"):
        resolve_dataset(DatasetSpec(str(cub)))


def test_cli_vit_store_keeps_prefix_tokens_and_rows_skip_them(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=2)
    out = tmp_path / "vit.zarr"
    result = runner.invoke(app, ["extract", "-m", "test_vit2", "--no-pretrained", "-l", "blocks.3", "-d", str(data),
                                 "-o", str(out), "--input-size", "32,32", "--workers", "0", "-q", "--json",
                                 "--split", "all"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["row_shape"] == [5, 64]  # 1 register token + 2x2 patches
    store = ActivationStore.open(out)
    assert store.layout == "tokens" and store.grid == (2, 2) and store.num_prefix_tokens == 1
    a = store.activations(0)
    assert a.shape == (2, 5, 64)
    rows = store.row_source()
    assert rows.n_rows(0) == 2 * 4
    np.testing.assert_array_equal(rows.load(0), a[:, 1:].reshape(-1, 64))


def test_nhwc_model_crop_store_pools_over_positions(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_classes=1, per_class=2)
    out = build_store(tmp_path / "m.zarr", data, mode="crops", model="test_mambaout", layer="stages.1",
                      dtype="float32", crops=CropSpec(size=0.5, stride=1.0))
    store = ActivationStore.open(out)
    assert store.row_shape == (32,) and store.info["config"]["split_info"]["model_format"] == "NHWC"
    lm = load_model(ModelSpec("test_mambaout"), preprocess_overrides={"input_size": (3, 64, 64)})
    split = split_model(lm.model, "stages.1", (3, 64, 64))
    from c2mf_cli.inputs.data import make_crops
    from c2mf_cli.inputs.images import read_image

    x = lm.preprocess(read_image(store.paths(0)[0]))
    crops = make_crops(x, CropSpec(size=0.5, stride=1.0).boxes(64, 64))
    with torch.no_grad():
        expected = split.g(crops).mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(store.activations(0)[:4], expected, atol=1e-4, rtol=1e-4)


def test_chunk_images_auto_sizes_chunks_by_bytes_and_keeps_a_resumed_stores(tmp_path, image_folder):
    from c2mf_cli.stages.extract import CHUNK_TARGET_BYTES, auto_chunk_images

    assert auto_chunk_images(7 * 7 * 1280 * 2) == 64  # a 224-px CNN's last map: 125 KiB a row, the old default
    assert auto_chunk_images(8 * 8 * 64 * 2) == 1024  # ResNet-20 layer3 at 32 px: 8 KiB a row
    assert auto_chunk_images(16 * 16 * 32 * 4) == 256  # layer2 in float32
    assert auto_chunk_images(16) == 4096  # pooled rows: bounded above
    assert auto_chunk_images(10**9) == 64  # and below
    for b in (1, 100, 3000, 8192, 9000, 200_000):
        n = auto_chunk_images(b)
        assert n & (n - 1) == 0 and (n == 64 or n * b <= CHUNK_TARGET_BYTES)

    # the tiny store's 4x4x192 float16 rows (6 KiB): 1,024 images a chunk, so each class is one chunk
    auto = build_store(tmp_path / "auto.zarr", image_folder, chunk_images=None)
    store = ActivationStore.open(auto)
    assert store.info["config"]["chunk_images"] == 1024 and store.info["plan"]["n_units"] == len(store.classes)
    _assert_same_store(auto, build_store(tmp_path / "four.zarr", image_folder, chunk_images=4))

    # resuming a store made with another chunking (an older default, say) without --chunk-images keeps its plan
    # instead of refusing it as another configuration
    made = tmp_path / "resume.zarr"
    result = runner.invoke(app, ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(image_folder),
                                 "-o", str(made), "--input-size", TINY_INPUT, "--workers", "0", "--quiet", "--split",
                                 "all", "--chunk-images", "4", "--shard", "0/2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(image_folder),
                                 "-o", str(made), "--input-size", TINY_INPUT, "--workers", "0", "--quiet", "--split",
                                 "all", "--shard", "1/2"])
    assert result.exit_code == 0, result.output
    assert ActivationStore.open(made).info["config"]["chunk_images"] == 4
    resumed, whole = _arrays(made), _arrays(tmp_path / "four.zarr")
    for k in whole:  # the shards batch other images together: equal to float rounding
        np.testing.assert_allclose(resumed[k], whole[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_reading_some_valid_rows_reads_only_their_chunks(tmp_path):
    """`activations` / `logits` with `rows` (positions among the valid rows, as evaluate's pieces ask) give the
    same rows as the whole class sliced, and read only the chunks that hold them: a damaged chunk elsewhere in the
    class does not stop them, while reading the whole class still fails on it."""
    from c2mf_cli.artifacts.store import chunk_key

    data = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=5)
    (data / "class_1" / "001.png").write_bytes(b"not an image")
    out = tmp_path / "s.zarr"
    result = runner.invoke(app, ["extract", "-m", TINY_MODEL, "--no-pretrained", "-l", TINY_LAYER, "-d", str(data),
                                 "-o", str(out), "--input-size", TINY_INPUT, "--workers", "0", "--quiet", "--split",
                                 "all", "--chunk-images", "2"])
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(out)
    whole_a, whole_l = store.activations(1), store.logits(1)  # stored rows 0, 2, 3, 4 (row 1 unreadable)
    assert whole_a.shape[0] == 4
    for rows in (slice(1, 3), slice(0, 4), slice(3, 4), slice(2, 2), np.array([True, False, True, False])):
        np.testing.assert_array_equal(store.activations(1, rows=rows), whole_a[rows])
        np.testing.assert_array_equal(store.logits(1, rows=rows), whole_l[rows])
    for chunk in (0, 2):  # valid rows 1-2 are stored rows 2-3: the middle chunk of 2 images
        for name in ("activations", "logits"):
            f = out / "c0001" / name / chunk_key(chunk, 4 if name == "activations" else 2)
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0xFF
            f.write_bytes(bytes(b))
    fresh = ActivationStore.open(out)
    np.testing.assert_array_equal(fresh.activations(1, rows=slice(1, 3)), whole_a[1:3])
    np.testing.assert_array_equal(fresh.logits(1, rows=slice(1, 3)), whole_l[1:3])
    with pytest.raises(C2MFError, match="c0001/activations"):
        fresh.activations(1)
