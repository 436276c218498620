"""The notebook API: every code block of docs/api.md runs as written, and `import c2mf_cli` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)


def test_the_docs_have_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_each_documented_example_runs(i: int, one_thread):
    exec(compile(BLOCKS[i], f"docs/api.md block {i + 1}", "exec"), {})


def test_import_is_lazy_and_names_resolve():
    code = ("import sys, c2mf_cli; assert 'torch' not in sys.modules; c2mf_cli.fit; "
            "print(sorted(n for n in ('fit', 'encode', 'explain', 'evaluate') if n in dir(c2mf_cli)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['encode', 'evaluate', 'explain', 'fit']"


def test_fit_refuses_bad_input():
    import c2mf_cli as c2mf
    from c2mf_cli.errors import C2MFError

    with pytest.raises(C2MFError, match="2 labels for 3 items of acts: give one label per item"):
        c2mf.fit(np.ones((3, 4)), [0, 1], method="pca", k=2)
    with pytest.raises(C2MFError, match="acts hold NaN"):
        c2mf.fit(np.full((3, 4), np.nan), method="pca", k=2)
    with pytest.raises(AttributeError, match="has no attribute 'fitt'"):
        c2mf.fitt


def test_evaluate_in_memory_refuses_plausible_mistakes(one_thread):
    import timm
    import torch

    import c2mf_cli as c2mf
    from c2mf_cli.errors import C2MFError

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    images = torch.randn(6, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    d = c2mf.fit(np.random.default_rng(0).random((6, 2, 2, 256)), labels, method="pca", k=2)
    with pytest.raises(C2MFError, match="need the model itself"):
        c2mf.evaluate((images, labels), (images, labels), [d], model="resnet18", layer="layer4")
    with pytest.raises(C2MFError, match="one model output index"):
        c2mf.evaluate((images, labels.float()), (images, labels), [d], model=model, layer="layer4")
    with pytest.raises(C2MFError, match="the same store"):  # identical train and test images: nothing held out
        c2mf.evaluate((images, labels), (images, labels), [d], model=model, layer="layer4")
    with pytest.raises(C2MFError, match="an nn.Module goes with images in memory"):
        c2mf.evaluate("train.zarr", "test.zarr", [d], model=model)


def test_images_in_memory_go_through_the_model_only_where_evaluate_reads_them(one_thread):
    """In memory, a process runs only the images of its pieces through the model (evaluate reads a range's
    activations, then its logits: one model pass), and a layer that gives NaN fails on the range that holds it."""
    import torch

    from c2mf_cli.api import _ImageStore
    from c2mf_cli.errors import C2MFError
    from c2mf_cli.stages.evaluate import Piece, _take

    seen: list[int] = []

    class Split:
        layer, layout, num_prefix_tokens = "layer", "nchw", 0
        h = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))

        def g(self, x: torch.Tensor) -> torch.Tensor:
            seen.extend(int(v) for v in x[:, 1, 0, 0])  # image i holds the value i
            return x

        def to_store(self, a: torch.Tensor) -> torch.Tensor:
            return a.permute(0, 2, 3, 1)

    images = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 3, 2, 2).clone()
    store = _ImageStore(Split(), images, np.array([0, 1, 0, 1, 0, 1]), "test", batch_size=1)
    assert store.classes == ["0", "1"] and store.n_images(0) == 3 and seen == []
    A, logits, labels = _take(store, Piece(0, 1, 3))  # class 0's images 2 and 4
    assert seen == [2, 4] and A.shape == (2, 2, 2, 3) and labels.tolist() == [0, 0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, Split.h(images[[2, 4]]).numpy(), rtol=1e-6)
    images[3, 0] = float("nan")
    store = _ImageStore(Split(), images, np.array([0, 1, 0, 1, 0, 1]), "test", batch_size=4)
    assert store.activations(1, rows=slice(0, 1)).shape == (1, 2, 2, 3)  # image 1: fine
    with pytest.raises(C2MFError, match="the layer's output on the test images holds NaN"):
        store.logits(1, rows=slice(1, 3))  # images 3 and 5


def test_evaluate_in_memory_refuses_numpy_images_in_one_line(one_thread):
    """Images in memory as a numpy array (not a tensor) are refused with the one-line error that names the fix,
    not an AttributeError from deep inside."""
    import timm
    import torch

    import c2mf_cli as c2mf
    from c2mf_cli.errors import C2MFError

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    images = np.random.default_rng(0).standard_normal((6, 3, 64, 64)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2])
    d = c2mf.fit(np.random.default_rng(0).random((6, 2, 2, 96)).astype(np.float32), labels, method="pca", k=2)
    with pytest.raises(C2MFError, match=r"train images must be a preprocessed \(m, 3, H, W\) tensor.*ndarray"):
        c2mf.evaluate((images, labels), (images[::-1].copy(), labels), [d], model=model, layer="layer4",
                      device="cpu")
