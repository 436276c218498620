"""A missing --class-index is caught: outputs that differ in number, and labels a relabelling would fit far better."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from c2mf_cli.cli import app
from c2mf_cli.errors import C2MFError
from c2mf_cli.inputs.class_check import best_relabelling, check_class_count, check_label_agreement

from .conftest import SHARED_DATA

CIFAR = SHARED_DATA / "cifar10"


def _onehot(pred, n_outputs):
    logits = np.zeros((len(pred), n_outputs), np.float32)
    logits[np.arange(len(pred)), pred] = 1.0
    return logits


def test_best_relabelling_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    pred = np.array([5, 5, 1, 0, 0, 0, 2, 5])  # class 0 -> output 5, class 1 -> 0, class 2 -> 2
    share, mapping = best_relabelling(labels, pred)
    assert mapping == {0: 5, 1: 0, 2: 2} and share == pytest.approx(6 / 8)


def test_label_agreement_refuses_permuted_labels_with_evidence():
    labels = np.repeat([0, 1, 2], 4)
    swapped = np.repeat([1, 0, 2], 4)  # folders 0 and 1 are each other's outputs
    with pytest.raises(C2MFError) as e:
        check_label_agreement(labels, _onehot(swapped, 10), label_names={0: "cat", 1: "dog", 2: "eel"})
    msg = str(e.value)
    assert "agree with the assumed labels on 33% of the first 12 images" in msg
    assert "relabelling the classes would make 100% agree" in msg
    assert "class 'cat' (taken as output 0) is mostly predicted as output 1" in msg
    assert "--class-index identity" in msg and "--class-index FILE" in msg
    # a model that is right, or merely weak, or too few images: no error
    check_label_agreement(labels, _onehot(labels, 10))
    noisy = labels.copy()
    noisy[::2] = (noisy[::2] + 1) % 3
    check_label_agreement(labels, _onehot(noisy, 10))
    check_label_agreement(labels[:4], _onehot(swapped[:4], 10))


def test_class_count_must_match_outputs():
    check_class_count(10, 10)
    with pytest.raises(C2MFError, match=r"the model has 965 outputs but the data has 78 classes: .* outputs 0\.\.77"):
        check_class_count(78, 965)


def _folders(root: Path, names: dict[str, str]) -> Path:
    """Class folders named `new` linking to CIFAR's class `old` (renaming changes the name order)."""
    root.mkdir()
    for new, old in names.items():
        os.symlink(CIFAR / "images" / old, root / new)
    return root


@pytest.mark.skipif(not (CIFAR / "resnet20-12fca82f.th").is_file(), reason=f"real data not found at {SHARED_DATA}")
def test_extract_stops_on_folders_in_another_order_and_identity_overrides(tmp_path):
    common = ["extract", "-m", f"{SHARED_DATA / 'models.py'}:cifar_resnet20", "-c", str(CIFAR / "resnet20-12fca82f.th"),
              "-l", "layer3", "--device", "cpu", "--workers", "0", "-q", "--max-images-per-class", "4", "--split", "all"]
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    # the same ten classes, renamed so that name order puts truck first: every label is off by one
    wrong = _folders(tmp_path / "wrong", {f"{chr(98 + i)}_{c}": c for i, c in enumerate(classes[:-1])} |
                     {"a_truck": "truck"})
    r = CliRunner().invoke(app, [*common, "-d", str(wrong), "-o", str(tmp_path / "s1")])
    assert r.exit_code == 1, r.output
    assert "Error: the model's predictions agree with the assumed labels on" in r.output
    assert "class 'a_truck' (taken as output 0) is mostly predicted as output 9" in r.output
    assert not (tmp_path / "s1").exists()
    r = CliRunner().invoke(app, [*common, "-d", str(wrong), "--class-index", "identity", "-o", str(tmp_path / "s2")])
    assert r.exit_code == 0, r.output
    three = _folders(tmp_path / "three", {c: c for c in classes[:3]})
    r = CliRunner().invoke(app, [*common, "-d", str(three), "-o", str(tmp_path / "s3")])
    assert r.exit_code == 1 and "the model has 10 outputs but the data has 3 classes" in r.output
    right = _folders(tmp_path / "right", {c: c for c in classes})
    r = CliRunner().invoke(app, [*common, "-d", str(right), "-o", str(tmp_path / "s4")])
    assert r.exit_code == 0, r.output
