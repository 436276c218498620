"""A researcher's own ViT (tests/user_vit.py: a plain nn.Module, no timm attributes) through the whole chain:
the token grid is inferred and said, `c2mf layers` marks and checks its blocks, the split works whatever Python
its forward holds (torch.fx, then torch.export, then hooks), and explain finds the recorded weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from c2mf_cli.artifacts.store import ActivationStore
from c2mf_cli.cli import app
from c2mf_cli.errors import C2MFError
from c2mf_cli.inputs.models import split_model

from .conftest import make_image_folder
from .user_vit import UserViT

runner = CliRunner()
FACTORY = Path(__file__).resolve().parent / "user_vit.py"
INPUT = (3, 32, 32)
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _exact(model: torch.nn.Module, split) -> None:
    x = torch.randn(3, *INPUT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(split.h(split.g(x)), model(x))


# ---------------------------------------------------------------------------------------------------- token grid


def test_token_grid_is_inferred_from_the_patch_embedding():
    model = UserViT().eval()
    split = split_model(model, "transformer.layers.1", INPUT)
    assert split.layout == "tokens" and split.grid == (4, 4) and split.num_prefix_tokens == 1
    assert split.grid_source == "patch embedding" and split.describe()["grid_source"] == "patch embedding"
    assert any("4 x 4 patches" in n and "'patch'" in n and "1 prefix" in n for n in split.notes)
    _exact(model, split)


class _UnfoldViT(torch.nn.Module):
    """Patches cut by unfold + Linear (no convolution to read the grid from): 2 x 2 patches of 16 px + 1 CLS."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3 * 16 * 16, 8)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, 8))
        self.blocks = torch.nn.Sequential(torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        t = self.embed(torch.nn.functional.unfold(x, 16, stride=16).transpose(1, 2))
        t = self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1))
        return self.head(t[:, 0])


def test_an_ambiguous_token_count_stops_and_names_the_attributes_to_declare():
    model = _UnfoldViT().eval()
    # 5 tokens on 32 x 32: 1 prefix + 2 x 2 patches of 16 px, or 4 prefix + 1 patch of 32 px
    with pytest.raises(C2MFError, match=r"cannot tell the token grid.*5 tokens.*num_prefix_tokens.*patch_embed\.grid_size"):
        split_model(model, "blocks.0", INPUT)
    model.num_prefix_tokens = 1
    split = split_model(model, "blocks.0", INPUT)
    assert split.grid == (2, 2) and split.num_prefix_tokens == 1 and split.grid_source == "token count"


def test_extract_says_and_records_the_inferred_grid(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=2, size=(36, 32))
    out = tmp_path / "s.zarr"
    r = _run("extract", "-m", f"{FACTORY}:create", "-l", "transformer.layers.2", "-d", data, "-o", out,
             "--workers", "0", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "token grid inferred: 4 x 4 patches" in r.output
    store = ActivationStore.open(out)
    assert store.grid == (4, 4) and store.num_prefix_tokens == 1
    assert store.config["split_info"]["grid_source"] == "patch embedding"
    info = _run("info", out, "--json")
    assert "(tokens, c), the 1 prefix token(s) first" in json.loads(info.stdout)["row_layout"]


# ---------------------------------------------------------------------------------------------------- layers


def test_layers_marks_and_checks_user_vit_blocks():
    r = _run("layers", f"{FACTORY}:create", "--json")
    assert r.exit_code == 0, r.output
    layers = {d["name"]: d for d in json.loads(r.stdout)["layers"]}
    for i in range(3):
        block = layers[f"transformer.layers.{i}"]
        assert block["role"] == "block" and block["splits"] is True and block["split_method"] == "fx"
    table = _run("layers", f"{FACTORY}:create")
    assert "3 useful of 34 layers" in table.output and "exact" in table.output


def test_layers_says_why_a_layer_does_not_split():
    from c2mf_cli.inputs.models import list_layers

    model = _UnfoldViT().eval()  # its token grid cannot be told: the block is listed with that reason
    infos = {i.name: i for i in list_layers(model, INPUT)}
    block = infos["blocks.0"]
    assert block.role == "block" and block.splits is False
    assert block.split_text.startswith("no: cannot tell the token grid")
    assert not any(i.split_text == "no" for i in infos.values())


# ---------------------------------------------------------------------------------------------------- any forward


def test_a_forward_with_len_a_shape_if_and_an_assert_splits_by_torch_export():
    model = UserViT("export_all").eval()  # len(x), `if x.shape[-1] > 16`, an assert, and a loop over blocks
    split = split_model(model, "transformer.layers.1", INPUT)
    assert split.method == "export" and split.describe()["split_method"] == "export"
    assert any("torch.export" in n and "'len' is not supported" in n for n in split.notes)
    _exact(model, split)
    with torch.no_grad():  # a batch of one, as the last batch of an extract may be
        x = torch.randn(1, *INPUT)
        torch.testing.assert_close(split.h(split.g(x)), model(x))


def test_a_loop_over_blocks_splits_by_torch_fx():
    model = UserViT("plain").eval()
    split = split_model(model, "transformer.layers.0", INPUT)
    assert split.method == "fx" and "split_method" not in split.describe()
    _exact(model, split)


def test_a_branch_on_the_data_splits_by_hooks_and_says_it_is_slower():
    model = UserViT("data_if").eval()
    split = split_model(model, "transformer.layers.1", INPUT)
    assert split.method == "hooks" and split.describe()["split_method"] == "hooks"
    assert any("slower" in n for n in split.notes)
    _exact(model, split)
    a = split.g(torch.randn(2, *INPUT)).detach().requires_grad_(True)
    split.h(a)[:, 0].sum().backward()  # explain's gradients reach the activations through the hooks
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_hooks_refuse_a_skip_connection_over_the_layer():
    class Skip(UserViT):
        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            if bool(x.mean() > 100):  # only the hooks can split this forward
                t = t * 0
            u = self.transformer.layers[0](t)
            return self.head((u + t).mean(1))  # t jumps over the layer

    with pytest.raises(C2MFError, match="not exact"):
        split_model(Skip("plain").eval(), "transformer.layers.0", INPUT)


def test_every_stage_works_on_a_hooks_split(tmp_path):
    """extract, factorize, evaluate and explain on a model only the hooks can split."""
    data = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=4, size=(36, 32))
    model = ["-m", f"{FACTORY}:create_data_if", "-l", "transformer.layers.2", "-d", data, "--workers", "0",
             "--device", "cpu", "-q"]
    for split in ("train", "test"):
        r = _run("extract", *model, "--split", split, "-o", tmp_path / f"{split}.zarr")
        assert r.exit_code == 0, r.output
    assert ActivationStore.open(tmp_path / "train.zarr").config["split_info"]["split_method"] == "hooks"
    d = tmp_path / "d.safetensors"
    r = _run("factorize", tmp_path / "train.zarr", "--method", "c2mf", "--concepts", 2, "--iterations", 3,
             "--device", "cpu", "--quiet", "--out", d)
    assert r.exit_code == 0, r.output
    evaluate = ["evaluate", "--train", tmp_path / "train.zarr", "--test", tmp_path / "test.zarr", "--dict", d,
                "--device", "cpu", "--ig-steps", 4, "--out", tmp_path / "ev", "--json"]
    # the model is code: evaluate and explain run it only when named on the command line, never because a file does
    r = _run(*evaluate)
    assert r.exit_code == 1 and f"--model {FACTORY}:create_data_if" in r.output, r.output
    assert not (tmp_path / "ev").exists()
    r = _run(*evaluate, "--model", f"{FACTORY}:create_data_if")
    assert r.exit_code == 0, r.output
    r = _run("explain", data / "class_0" / "000.png", "--dict", d, "--device", "cpu", "--top", 2, "-q",
             "--out", tmp_path / "ex")
    assert r.exit_code == 1 and f"--model {FACTORY}:create_data_if" in r.output, r.output
    r = _run("explain", data / "class_0" / "000.png", "--dict", d, "--model", f"{FACTORY}:create_data_if",
             "--device", "cpu", "--top", 2, "-q", "--out", tmp_path / "ex")
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------------------------------- explain


def test_explain_with_model_and_no_checkpoint_uses_the_recorded_weights(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=2, size=(36, 32))
    ckpt = tmp_path / "vit.pt"
    weights = UserViT().state_dict()
    torch.manual_seed(5)
    torch.save({k: torch.randn_like(v) * 0.1 if v.is_floating_point() else v for k, v in weights.items()}, ckpt)
    r = _run("extract", "-m", f"{FACTORY}:create", "-c", ckpt, "-l", "transformer.layers.2", "-d", data, "-o",
             tmp_path / "s.zarr", "--workers", "0", "--device", "cpu", "-q", "--class-index", "identity")
    assert r.exit_code == 0, r.output
    d = tmp_path / "d.safetensors"
    r = _run("factorize", tmp_path / "s.zarr", "--method", "pca", "--concepts", 2, "--device", "cpu", "--quiet",
             "--out", d)
    assert r.exit_code == 0, r.output
    image = data / "class_1" / "000.png"
    r = _run("explain", image, "--dict", d, "--model", f"{FACTORY}:create", "--device", "cpu", "--top", 2, "-q",
             "--out", tmp_path / "ex")
    assert r.exit_code == 0, r.output
    ckpt.unlink()
    r = _run("explain", image, "--dict", d, "--model", f"{FACTORY}:create", "--device", "cpu", "--top", 2, "-q",
             "--out", tmp_path / "ex2")
    assert r.exit_code == 1
    assert f"the checkpoint the dictionary was made with, '{ckpt}', is missing" in r.output
    assert "max difference nan" not in r.output and not (tmp_path / "ex2").exists()


def test_splitting_a_model_without_timm_does_not_import_timm():
    """timm's untraceable functions matter only to a model built with timm: splitting another model must not pay
    timm's import (it pulls in torchvision and torch._dynamo: seconds at every extract). A fresh process, since
    other tests import timm here."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom torch import nn\nfrom c2mf_cli.inputs.models import split_model\n"
            "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)).eval()\n"
            "s = split_model(m, '1', (3, 8, 8))\nprint(s.method, 'timm' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["fx", "False"], out.stdout + out.stderr
