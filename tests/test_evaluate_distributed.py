"""evaluate on several processes (gloo on CPU) gives the one-process evaluation; a rank that fails ends the run.

One torch.multiprocessing spawn of 3 ranks evaluates a small planted world (uneven classes, one without test
images, a shared and a per-class dictionary, the clustering ablation, crops, every ranking and encoding) with 3
ranks, then a world of 2 classes (fewer than the ranks, so classes are split) with 3, then the first world with 2
(ranks 0 and 1 form a new group), then with 2 where rank 1's test store fails on a class. One real CLI process
shows a peer that dies ending the run with a clear error. Most of the time is each process importing torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from c2mf_cli import distributed
from c2mf_cli._io import write_json
from c2mf_cli.artifacts.dictionary import ConceptDictionary
from c2mf_cli.artifacts.store import ActivationStore
from c2mf_cli.errors import C2MFError
from c2mf_cli.stages.evaluate import EvaluateConfig, deal, evaluate
from c2mf_cli.stages.factorize import factorize

from .test_distributed import _env, _free_port, run_beside_a_dead_peer
from .test_evaluate import FakeStore

C, K, H, W_ = 12, 4, 3, 3
TRAIN = [6, 4, 5, 3, 6]
TEST = [5, 3, 0, 4, 2]  # class 2 has no test image
FEW_TRAIN, FEW_TEST = [7, 3], [8, 1]  # fewer classes than processes: every rank gets a piece of class 0
CONFIG = EvaluateConfig(ig_steps=8, batch_size=64, cluster_ks=(2, 4), encode_class=("predicted", "true", "none"),
                        rankings=("gradcam", "ig", "sobol"), sobol_designs=4)


class _Chunks:
    """One class's array read lazily, as a store's are: only a slice reads (and records its range, or fails)."""

    def __init__(self, a: np.ndarray, on_read) -> None:
        self._a, self._on_read, self.shape = a, on_read, a.shape

    def __getitem__(self, index: slice):
        start, stop, step = index.indices(self.shape[0])
        assert step == 1
        self._on_read(start, stop)
        return self._a[index]


class _Counting(FakeStore):
    """A FakeStore that records the ranges of images read from it per class (what a process computed on): the
    activations' (train and test passes) and the logits' (the OOD pass reads a crop store's logits only); it may
    fail on reading one class."""

    def __init__(self, *args, fail_class: int | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.read: list[list[tuple[int, int]]] = [[] for _ in self.classes]
        self.logits_read: list[list[tuple[int, int]]] = [[] for _ in self.classes]
        self.fail_class = fail_class

    def activations(self, y):
        def on_read(start: int, stop: int) -> None:
            if y == self.fail_class:
                raise C2MFError(f"chunk 0 of class {y} is corrupt: extract the store again")
            self.read[y].append((start, stop))

        return _Chunks(super().activations(y), on_read)

    def logits(self, y):
        return _Chunks(super().logits(y), lambda start, stop: self.logits_read[y].append((start, stop)))


def _world(fail_class: int | None = None, train_counts: list[int] = TRAIN, test_counts: list[int] = TEST):
    """Planted dictionary, a tiny h, train / test / crop stores of uneven classes, and two dictionaries."""
    g = torch.Generator().manual_seed(3)
    n_cls = len(train_counts)
    W = torch.rand(K, C, generator=g)
    proj = torch.randn(C, n_cls, generator=g)

    def tail(a: torch.Tensor) -> torch.Tensor:  # (m, H, W, C) -> logits
        return torch.relu(a).mean(dim=(1, 2)) @ proj

    def make(counts, fp, mode="full", scale=1.0, fail=None):
        acts, logits, labels = [], [], []
        for y, n in enumerate(counts):
            U = torch.rand(n, H * W_, K, generator=g)
            U[..., y % K] += 1.0
            A = (U @ W + 0.1 * torch.rand(n, H * W_, C, generator=g)).reshape(n, H, W_, C) * scale
            acts.append(A.numpy())
            logits.append(tail(A).numpy())
            labels.append(np.full(n, y))
        return _Counting(acts, logits, labels, mode=mode, fingerprint=fp, fail_class=fail)

    train, test = make(train_counts, "train"), make(test_counts, "test", fail=fail_class)
    crops = make([3] * n_cls, "crops", mode="crops", scale=0.3)
    classes = [f"class{i}" for i in range(n_cls)]
    shared = ConceptDictionary({"W": W.clone()}, {"method": "nmf", "classes": classes, "codes": "nnls"})
    per_class = ConceptDictionary({"W": torch.rand(n_cls, 2, C, generator=g)},
                                  {"method": "craft", "classes": classes, "codes": "nnls"})
    return tail, train, test, crops, [shared, per_class]


def _evaluate(out_dir: Path | None, fail_class: int | None = None, few: bool = False) -> tuple[dict, dict]:
    """The evaluation, and the ranges each store's arrays were read in (per class)."""
    counts = (FEW_TRAIN, FEW_TEST) if few else (TRAIN, TEST)
    tail, train, test, crops, dicts = _world(fail_class, *counts)
    res = evaluate(train, test, dicts, crops, CONFIG, tail=tail, device="cpu", out_dir=out_dir)
    return res, {"train": train.read, "test": test.read, "crop_logits": crops.logits_read}


def _run(rank: int, world: int, port: int, out: Path, tag: str, fail_class: int | None = None,
         write: bool = True, few: bool = False) -> None:
    distributed.start("cpu", 30, env=_env(rank, world, port))
    try:
        res, read = _evaluate(out / tag if write else None, fail_class, few)
        write_json(out / f"{tag}.json", {"result": res, "read": read})
    except C2MFError as e:  # what the CLI would print as its Error: line
        (out / f"{tag}.error").write_text(str(e))
    finally:
        distributed.stop()


def _worker(rank: int, ports: tuple[int, int, int, int], out: str) -> None:
    torch.set_num_threads(1)
    _run(rank, 3, ports[0], Path(out), f"w3-r{rank}")
    _run(rank, 3, ports[3], Path(out), f"few3-r{rank}", write=False, few=True)
    if rank < 2:
        _run(rank, 2, ports[1], Path(out), f"w2-r{rank}", write=False)  # its result is what rank 0 writes
        # the test pass's 14 images in two ranges of 7: rank 1 takes class 1's last image, class 3 and class 4
        _run(rank, 2, ports[2], Path(out), f"w2-fail-r{rank}", fail_class=3 if rank == 1 else None)


def _same(a, b, path: str = "") -> None:
    """Equal JSON, floats to float tolerance (sums in another order)."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} vs {len(b)} entries"
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or (math.isnan(a) and math.isnan(b)):
            assert a is b or (a is not None and b is not None), f"{path}: {a} vs {b}"
            return
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _numbers(res: dict) -> dict:
    """The result without what may differ between runs: wall time and how the work was divided."""
    res = json.loads(json.dumps(res))
    res.pop("time_s")
    res.pop("files", None)
    assert res["settings"].pop("distributed")["backend"] in (None, "gloo")
    return res


def _check_cover(per_rank: list[list[list[tuple[int, int]]]], counts: list[int], what: str) -> None:
    """The ranges the ranks read (per rank, per class) cover every image of every class exactly once."""
    for y, n in enumerate(counts):
        ranges = sorted(tuple(r) for rank in per_rank for r in rank[y])
        bounds = [0] + [b for _, b in ranges]  # no gap, no overlap, up to the class's last image
        assert [a for a, _ in ranges] == bounds[:-1] and bounds[-1] == n, (what, y, ranges)


def test_evaluate_same_result_on_1_2_3_processes(tmp_path, one_thread):
    ref, one_read = _evaluate(tmp_path / "w1")
    few_ref, _ = _evaluate(None, few=True)
    ref_file = json.loads((tmp_path / "w1" / "evaluation.json").read_text())
    assert ref["settings"]["distributed"]["world_size"] == 1
    # one process reads each class whole, once
    for key, counts in (("train", TRAIN), ("test", TEST), ("crop_logits", [3] * len(TRAIN))):
        assert one_read[key] == [[(0, n)] if n else [] for n in counts], key
    # what the comparison must cover is there
    shared, per_class = ref["methods"][:2]
    assert set(shared["insertion_deletion"]) == {"gradcam", "ig", "sobol"}
    assert shared["importance"]["ig_completeness"]["max_abs_error"] > 0
    assert per_class["by_encoding"]["none"] == {"skipped": per_class["by_encoding"]["none"]["skipped"]}
    assert [m["name"] for m in ref["methods"][2:]] == ["craft k=2 clustered K=2", "craft k=2 clustered K=4"]
    assert ref["significance"]["pairs"] and ref["ood"]["n_in"] == sum(TEST)
    assert "class2" not in shared["reconstruction"]["accuracy"]["per_class"]

    ports = (_free_port(), _free_port(), _free_port(), _free_port())
    torch.multiprocessing.spawn(_worker, args=(ports, str(tmp_path)), nprocs=3, join=True)

    for tag, world, one, counts in (("w", 2, _numbers(ref_file), (TRAIN, TEST)),
                                    ("w", 3, _numbers(ref_file), (TRAIN, TEST)),
                                    ("few", 3, _numbers(few_ref), (FEW_TRAIN, FEW_TEST))):
        held = [json.loads((tmp_path / f"{tag}{world}-r{r}.json").read_text()) for r in range(world)]
        run_by = held[0]["result"]["settings"]["distributed"]
        assert run_by["world_size"] == world and run_by["backend"] == "gloo" and len(run_by["devices"]) == world
        # the one-process evaluation (references, per-image predictions, curves, importance, fit, significance,
        # OOD, clustering), held by every rank
        for r in range(world):
            _same(one, _numbers(held[r]["result"]), f"{tag}: rank {r} of {world}")
        # the ranks divided the images: each read only its pieces, together every image once, balanced
        for key, n in (("train", counts[0]), ("test", counts[1])):
            per_rank = [h["read"][key] for h in held]
            _check_cover(per_rank, n, f"{tag}{world} {key}")
            load = [sum(b - a for cls in rank for a, b in cls) for rank in per_rank]
            assert max(load) - min(load) <= 1 and min(load) > 0, (tag, world, key, load)  # balanced, none idle
        # the OOD pass deals the test images and the crops as one list: every crop read once, by one rank
        _check_cover([h["read"]["crop_logits"] for h in held], [3] * len(counts[0]), f"{tag}{world} crops")
    few = [json.loads((tmp_path / f"few3-r{r}.json").read_text())["read"]["test"] for r in range(3)]
    assert all(rank[0] for rank in few), few  # 2 classes on 3 ranks: class 0 was split over all of them
    # on 3 processes rank 0 wrote the same evaluation.json and plots; the other ranks wrote nothing
    written = json.loads((tmp_path / "w3-r0" / "evaluation.json").read_text())
    _same(_numbers(ref_file), _numbers(written), "evaluation.json on 3 processes")
    assert sorted(p.name for p in (tmp_path / "w3-r0").iterdir()) == sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert not (tmp_path / "w3-r1").exists() and not (tmp_path / "w3-r2").exists()

    # rank 1 failed on its class: it says why, rank 0 ends with the clear error instead of waiting
    assert "class 3 is corrupt" in (tmp_path / "w2-fail-r1.error").read_text()
    survivor = (tmp_path / "w2-fail-r0.error").read_text()
    assert survivor.startswith("rank 0 of 2: another process of this run stopped"), survivor
    assert not (tmp_path / "w2-fail-r0").exists()


def test_a_dead_rank_ends_the_cli_evaluation_with_a_clear_error(tmp_path, tiny_store, tiny_test_store, one_thread):
    d = factorize(ActivationStore.open(tiny_store).row_source(), "nmf", device="cpu", concepts=3, iterations=2)
    d.save(tmp_path / "nmf.safetensors")
    out = tmp_path / "ev"
    run_beside_a_dead_peer(["evaluate", "--train", str(tiny_store), "--test", str(tiny_test_store), "--dict",
                            str(tmp_path / "nmf.safetensors"), "--ig-steps", "2", "-o", str(out)])
    assert not (out / "evaluation.json").exists()


@pytest.mark.parametrize("counts, world", [([5, 3, 0, 4, 2], 2), ([5, 3, 0, 4, 2], 3), ([1, 1], 4),
                                           ([7, 7, 7, 7, 7, 7, 1], 3), ([], 2), ([1000], 7), ([8, 1], 3),
                                           ([0, 0, 3, 0], 2), ([2, 5, 1, 9, 0, 4], 1), ([3, 3, 3], 9)])
def test_deal_cuts_classes_into_pieces_that_cover_every_image_once_and_balance(counts, world):
    dealt = deal(counts, world)
    assert dealt == deal(list(counts), world) and len(dealt) == world  # deterministic: every rank deals alike
    # every image of every class in exactly one piece, no empty piece
    seen = [np.zeros(n, dtype=int) for n in counts]
    for pieces in dealt:
        for p in pieces:
            assert 0 <= p.start < p.stop <= counts[p.y] and p.size == p.stop - p.start
            seen[p.y][p.start : p.stop] += 1
    assert all((s == 1).all() for s in seen)
    # balanced to one image, with at most two partial classes per rank (pieces as large as the balance allows)
    load = [sum(p.size for p in pieces) for pieces in dealt]
    assert max(load) - min(load) <= 1 and sum(load) == sum(counts)
    for pieces in dealt:
        assert sum(p.size < counts[p.y] for p in pieces) <= 2
        # a rank's pieces are one contiguous range of the classes in order
        at = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        ends = [(at[p.y] + p.start, at[p.y] + p.stop) for p in pieces]
        assert all(ends[i][1] == ends[i + 1][0] for i in range(len(ends) - 1)), ends
    if sum(counts) >= world:
        assert min(load) > 0  # no rank idles while there are images to spare
    if world == 1:  # one process: every non-empty class whole, as before any division
        assert [(p.y, p.start, p.stop) for p in dealt[0]] == [(y, 0, n) for y, n in enumerate(counts) if n]


def test_deal_refuses_no_process():
    with pytest.raises(C2MFError, match="0 processes"):
        deal([3], 0)


# ----- the metric contract, without processes -----
def _batches(n_classes: int = 3) -> tuple[torch.Tensor, list[dict]]:
    """A dictionary and the fields of train and test batches of several classes (a tiny linear head)."""
    g = torch.Generator().manual_seed(5)
    W = torch.rand(K, C, generator=g)
    proj = torch.randn(C, n_classes, generator=g)

    def head(U: torch.Tensor) -> torch.Tensor:
        return (U @ W).mean(dim=1) @ proj

    out = []
    for i, (split, y, n) in enumerate([("train", 0, 4), ("test", 0, 3), ("test", 1, 5), ("train", 2, 2),
                                      ("test", 2, 1), ("test", 1, 2)]):
        U = torch.rand(n, H * W_, K, generator=g)
        rows = U @ W + 0.05 * torch.rand(n, H * W_, C, generator=g)
        model_logits = rows.mean(dim=1) @ proj
        out.append(dict(split=split, group=torch.full((n,), y), rows=rows, U=U, A_hat=(U @ W).reshape(-1, C),
                        head=head, side=None,
                        model_logits=model_logits, labels=torch.full((n,), y),
                        recon_logits=head(U) if split == "test" else None, attribute=split == "test"))
    return W, out


def test_metric_states_of_disjoint_batches_merge_to_the_state_of_all():
    """Every metric of EVALUATE_METRICS: the merged states of two processes' batches are the state of all of
    them (so the same entries), and a metric that saw nothing has the same keys and shapes (all-reducible)."""
    from c2mf_cli.metrics import EVALUATE_METRICS, Batch

    n_classes, classes = 3, ["a", "b", "c"]
    W, fields = _batches(n_classes)
    meta = {"method": "nmf", "classes": classes, "codes": "nnls"}
    whole, first, second, idle = ([m(W, meta, CONFIG) for m in EVALUATE_METRICS] for _ in range(4))
    for i, f in enumerate(fields):
        for metrics in (whole, first if i % 2 else second):
            batch = Batch(**f)  # its own `shared`: importance hands its rankings to insertion/deletion
            for m in metrics:
                m.update(batch)
    for w, a, b, none in zip(whole, first, second, idle):
        name = type(w).__name__
        st, merged, empty = w.state(n_classes), a.state(n_classes).merge(b.state(n_classes)), none.state(n_classes)
        for kind in ("sums", "maxima"):
            mine, theirs, nothing = getattr(st, kind), getattr(merged, kind), getattr(empty, kind)
            assert set(mine) == set(theirs) == set(nothing), name
            for key, t in mine.items():
                assert nothing[key].shape == t.shape and nothing[key].dtype == t.dtype, (name, key)
                torch.testing.assert_close(theirs[key], t, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name} {key}: {m}")
        _same(json.loads(json.dumps(w.result(classes))), json.loads(json.dumps(w.result(classes, merged))), name)
    # what the comparison covered
    entries = {k for w in whole for k in w.result(classes)}
    assert entries >= {"reconstruction", "fit", "consistency", "importance", "insertion_deletion", "similarity"}
