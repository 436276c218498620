"""evaluate feeds the metrics one batch per block of pieces (classes together) and encoding: the numbers do not
depend on how the pieces are blocked, and the calls of the model's tail no longer grow with the classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from c2mf_cli.artifacts.dictionary import ConceptDictionary
from c2mf_cli.stages import evaluate as ev
from c2mf_cli.stages.evaluate import EvaluateConfig, Piece, blocks, evaluate

from .test_evaluate import FakeStore
from .test_evaluate_pinned import N_CLS, PINNED, _case, _compare, _jsonable, _run


def test_blocks_merge_consecutive_pieces_and_never_cut_one():
    pieces = [Piece(0, 0, 5), Piece(1, 0, 2), Piece(2, 0, 9), Piece(3, 3, 4), Piece(4, 0, 1)]
    assert blocks(pieces, 6) == [pieces[:2], pieces[2:3], pieces[3:]]  # 7 and 9 images, then what is left
    assert blocks(pieces, 1) == [[p] for p in pieces]
    assert blocks(pieces, 100) == [pieces]
    assert blocks([], 6) == []
    for at_least in range(1, 20):
        got = blocks(pieces, at_least)
        assert [p for b in got for p in b] == pieces  # every piece once, in order, whole
        assert all(sum(p.size for p in b) >= at_least for b in got[:-1])
        # a block closes as soon as it holds enough
        assert all(sum(p.size for p in b[:-1]) < at_least for b in got)


@pytest.mark.parametrize("block", [1, 6, 64])
@pytest.mark.parametrize("vit", [False, True], ids=["grid", "vit"])
def test_numbers_do_not_depend_on_the_blocks(monkeypatch, vit, block):
    """The pinned numbers (made one class at a time, before blocks) hold with blocks of one class (1) and of two
    classes of the pinned case's four (6 images: pieces of 4) and with one block of all (64, a GPU's default)."""
    monkeypatch.setattr(ev, "BLOCK_IMAGES", {"cpu": block})
    want = json.loads(PINNED.read_text())["vit" if vit else "grid"]
    _compare(_jsonable(_run(vit)), want, "result")


class _Counted:
    """A tail that counts its calls, with and without a gradient recorded."""

    def __init__(self, tail) -> None:
        self.tail, self.calls = tail, {"no_grad": 0, "grad": 0}

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        self.calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return self.tail(a)


def _one_class(store: FakeStore, fp: str) -> FakeStore:
    """The same images as one class."""
    cat = [np.concatenate(x) for x in (store._a, store._l, store._y)]
    return FakeStore([cat[0]], [cat[1]], [cat[2]], fingerprint=fp, layout="nhwc")


def _calls(monkeypatch, block: int, one_class: bool) -> tuple[dict[str, int], dict]:
    monkeypatch.setattr(ev, "BLOCK_IMAGES", {"cpu": block})
    tail, train, test, (c2mf, _, nmf, _) = _case(False)
    if one_class:
        train, test = _one_class(train, "train"), _one_class(test, "test")
        c2mf = ConceptDictionary({"W": c2mf.tensors["W"], "gates": c2mf.tensors["gates"][:1]},
                                 dict(c2mf.meta, classes=["class0"]))
        nmf = ConceptDictionary(dict(nmf.tensors), dict(nmf.meta, classes=["class0"]))
    counted = _Counted(tail)
    cfg = EvaluateConfig(ig_steps=6, rankings=("gradcam", "ig", "sobol"), sobol_designs=4,
                         encode_class=("predicted", "true", "none"))
    return counted.calls, evaluate(train, test, [c2mf, nmf], config=cfg, tail=counted, device="cpu")


def test_tail_calls_do_not_grow_with_the_classes(monkeypatch):
    """One block of every image: as many calls of h for the pinned case's four classes as for the same images in
    one class (a gated c2mf dictionary, whose predicted- and true-class encodings decode with several class
    indices in one call, and a shared NMF). Blocks of one class each make four times the calls of the metrics."""
    together, res = _calls(monkeypatch, 1000, one_class=False)
    alone, _ = _calls(monkeypatch, 1000, one_class=True)
    apart, res_apart = _calls(monkeypatch, 1, one_class=False)
    assert together == alone
    # test pass, per block: the h check, the three references, and per dictionary one reconstruction pass and
    # the metrics' calls (each < --batch-size rows here); the train pass calls no h
    assert apart["grad"] == N_CLS * together["grad"] > 0
    assert apart["no_grad"] == N_CLS * together["no_grad"] > 0
    numbers = [{k: v for k, v in r.items() if k not in ("time_s", "settings")} for r in (res, res_apart)]
    _compare(*map(_jsonable, numbers), "result")
