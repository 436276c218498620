"""Row sources other than the default: pooled rows per image, grouping by the model's prediction."""

from __future__ import annotations

import numpy as np
import pytest

from c2mf_cli.artifacts.store import ActivationStore
from c2mf_cli.errors import UsageError


COLOUR_NET = '''import torch
from torch import nn


class ColourNet(nn.Module):
    """Predicts from the mean colour in a shuffled order (red -> 2, green -> 0, blue -> 1); a fourth output, which
    no store class has, wins where the colour is faint."""

    def __init__(self):
        super().__init__()
        self.layer3 = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 4)
        with torch.no_grad():
            self.layer3.weight.copy_(torch.eye(3)[:, :, None, None])
            self.layer3.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0], [0.3, 0.3, 0.3]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0, 0, 0.5]))

    def forward(self, x):
        return self.fc(self.layer3(x).mean((2, 3)))


def net():
    return ColourNet()
'''


@pytest.fixture(scope="module")
def store(tiny_store):
    return ActivationStore.open(tiny_store)


@pytest.fixture(scope="module")
def colour_store(tmp_path_factory, image_folder):
    """A store whose model predicts every class of the store but in another order, and an output of none."""
    from tests.conftest import build_store

    root = tmp_path_factory.mktemp("colour")
    (root / "colour_net.py").write_text(COLOUR_NET)
    return ActivationStore.open(build_store(root / "s.zarr", image_folder, model=f"{root / 'colour_net.py'}:net"))


def test_default_grouping_by_label_matches_the_store(store):
    """positions + label through the regrouping source gives exactly the default source's rows."""
    from c2mf_cli.artifacts.rows import RegroupedRows

    default, regrouped = store.row_source(), RegroupedRows(store, "positions", "label")
    for y in range(len(store.classes)):
        assert regrouped.n_rows(y) == default.n_rows(y)
        np.testing.assert_array_equal(regrouped.load(y), default.load(y))
        got = np.concatenate(list(regrouped.batches(y, 5)))
        np.testing.assert_array_equal(got, default.load(y))


def test_pooled_rows_are_image_means(store):
    src = store.row_source(rows="pooled")
    assert src.info["rows"] == "pooled" and src.info["group_by"] == "label"
    for y in range(len(store.classes)):
        a = store.activations(y)  # (n, h, w, c)
        expected = a.reshape(a.shape[0], -1, a.shape[-1]).mean(axis=1)
        assert src.n_rows(y) == a.shape[0]
        np.testing.assert_allclose(src.load(y), expected, rtol=1e-6, atol=1e-6)
        assert sum(b.shape[0] for b in src.batches(y, 2, shuffle=True, seed=1)) == a.shape[0]


def test_grouping_by_prediction_follows_the_stored_logits(colour_store):
    """Class y gets the rows of every image the model predicts as y (any label); others are counted as left out."""
    store = colour_store
    src = store.row_source(rows="pooled", group_by="predicted")
    out_to_class = {o: y for y, o in enumerate(store.class_indices)}
    expected = {y: [] for y in range(len(store.classes))}
    left_out = 0
    for s in range(len(store.classes)):
        a = store.activations(s)
        pooled = a.reshape(a.shape[0], -1, a.shape[-1]).mean(axis=1)
        for row, o in zip(pooled, store.logits(s).argmax(1)):
            if int(o) in out_to_class:
                expected[out_to_class[int(o)]].append(row)
            else:
                left_out += 1
    assert src.info["left_out"] == left_out and 0 < left_out < 18  # the fixture's model: some, not all
    assert all(len(rows) for rows in expected.values())  # and every class gets images of another label
    assert sum(src.n_rows(y) for y in expected) + left_out == sum(store.n_images(s) for s in expected)
    for y, rows in expected.items():
        got = src.load(y)
        assert got.shape[0] == len(rows) == src.n_rows(y)
        if rows:
            np.testing.assert_allclose(got, np.stack(rows), rtol=1e-6, atol=1e-6)


def test_shards_partition_the_rows(colour_store):
    store = colour_store
    src = store.row_source(group_by="predicted")
    shards = [src.shard(i, 3) for i in range(3)]
    for y in range(len(store.classes)):
        assert sum(s.n_rows(y) for s in shards) == src.n_rows(y)
        parts = [s.load(y) for s in shards if s.n_rows(y)]
        together = np.concatenate(parts) if parts else np.zeros((0, src.n_features), np.float32)
        key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731  (order-free comparison)
        np.testing.assert_array_equal(key(together), key(src.load(y)))


def test_bad_values_are_named(store):
    with pytest.raises(UsageError, match="--rows must be positions or pooled"):
        store.row_source(rows="tokens")
    with pytest.raises(UsageError, match="--group-by must be label or predicted"):
        store.row_source(group_by="model")


def test_a_fit_on_predicted_groups_records_its_rows(colour_store, store):
    from c2mf_cli.stages.factorize import factorize

    d = factorize(colour_store.row_source(rows="pooled", group_by="predicted"), "pca", concepts=2, device="cpu")
    info = d.meta["source"]["info"]
    assert info["rows"] == "pooled" and info["group_by"] == "predicted" and info["left_out"] > 0
    assert d.meta["source"]["n_rows"] == [colour_store.row_source(rows="pooled", group_by="predicted").n_rows(y)
                                          for y in range(3)]
    with pytest.raises(UsageError, match="3 of 3 classes get no image"):  # the tiny random model predicts none
        store.row_source(group_by="predicted")


def test_factorize_cli_takes_rows_and_grouping(tiny_store, tmp_path):
    from typer.testing import CliRunner

    from c2mf_cli.artifacts.dictionary import ConceptDictionary
    from c2mf_cli.cli import app

    out = tmp_path / "pooled.safetensors"
    r = CliRunner().invoke(app, ["factorize", "-s", str(tiny_store), "--method", "pca", "-k", "2", "--rows", "pooled",
                                 "--device", "cpu", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = ConceptDictionary.load(out)
    assert d.meta["source"]["info"]["rows"] == "pooled" and d.meta["source"]["n_rows"] == [6, 6, 6]
    r = CliRunner().invoke(app, ["factorize", "-s", str(tiny_store), "--method", "pca", "-k", "2", "--group-by",
                                 "labels", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "--group-by must be label or predicted, got 'labels'" in r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_read_ahead_keeps_order_raises_in_place_and_stops_on_close():
    import threading
    import time

    from c2mf_cli.artifacts.store import read_ahead

    def slow(k: int) -> int:
        time.sleep(0.002 * (5 - k % 5))  # later keys often finish first
        return k * k

    for depth in (1, 2, 4):
        assert list(read_ahead(slow, list(range(13)), depth)) == [k * k for k in range(13)]
    assert list(read_ahead(slow, [], 4)) == []

    def failing(k: int) -> int:
        if k == 3:
            raise ValueError("chunk 3 is damaged")
        return k

    got = []
    with pytest.raises(ValueError, match="chunk 3"):
        for v in read_ahead(failing, list(range(8)), 3):
            got.append(v)
    assert got == [0, 1, 2]  # the values before the failing key arrive first, the error where its value would

    started = []
    lock = threading.Lock()

    def counted(k: int) -> int:
        with lock:
            started.append(k)
        time.sleep(0.001)
        return k

    it = read_ahead(counted, list(range(100)), 3)
    assert [next(it) for _ in range(2)] == [0, 1]
    it.close()  # the consumer stops: at most `depth` reads beyond those taken were started
    assert len(started) <= 2 + 3

    started.clear()
    it = read_ahead(counted, list(range(100)), 3, first=1)
    assert next(it) == 0
    it.close()  # one value taken, all a first batch needs (a start sample's one batch of a class): one read
    assert started == [0]
    started.clear()
    it = read_ahead(counted, list(range(100)), 3, first=1)
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    time.sleep(0.05)
    assert sorted(started) == list(range(7))  # once the caller came back for more: 3 reads ahead of the 4 taken
    it.close()


@pytest.mark.parametrize("shuffle", [False, True])
def test_rows_read_ahead_equal_rows_read_one_chunk_at_a_time(tiny_store, monkeypatch, shuffle):
    from c2mf_cli.artifacts import store as store_module

    source = ActivationStore.open(tiny_store).row_source()
    out = {}
    for depth in (1, 3):
        monkeypatch.setattr(store_module, "READ_AHEAD", depth)
        out[depth] = [b for y in range(len(source.classes)) for b in source.batches(y, 5, shuffle=shuffle, seed=7)]
    assert len(out[1]) == len(out[3]) > len(source.classes)  # several chunks and batches per class
    for a, b in zip(out[1], out[3]):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_read_ahead_is_bounded_in_bytes(tiny_store, monkeypatch):
    """A store made with large chunks (--chunk-images up to 8 GiB of rows a chunk) is not read READ_AHEAD chunks
    ahead: the chunks read ahead hold at most READ_AHEAD_BYTES of float32 rows, and one chunk at a time when a
    chunk alone passes it (memory: a chunk plus a batch, as the row sources promise)."""
    from c2mf_cli.artifacts import store as store_module

    depths: list[int] = []
    real = store_module.read_ahead

    def spy(read, keys, depth, first=None):
        depths.append(depth)
        return real(read, keys, depth, first)

    monkeypatch.setattr(store_module, "read_ahead", spy)
    monkeypatch.setattr(store_module, "READ_AHEAD", 4)
    store = ActivationStore.open(tiny_store)
    chunk_bytes = int(store._group(0)["activations"].chunks[0]) * int(np.prod(store.row_shape)) * 4
    source = store.row_source()
    whole = np.concatenate(list(source.batches(0, 5)))
    for budget, want in ((100 * chunk_bytes, 4), (2 * chunk_bytes, 2), (chunk_bytes - 1, 1)):
        monkeypatch.setattr(store_module, "READ_AHEAD_BYTES", budget)
        depths.clear()
        np.testing.assert_array_equal(np.concatenate(list(source.batches(0, 5))), whole)
        assert depths == [want], budget


def test_read_ahead_one_reader_at_a_time():
    """Row sources read side by side (SAE's `_mixed_batches` keeps one per class open) do not each start `depth`
    threads and hold `depth` chunks (1,000 classes: 4,000 threads): one reads ahead, the others read in the
    caller's thread."""
    import threading

    from c2mf_cli.artifacts.store import read_ahead

    lock = threading.Lock()
    threads: list[tuple[str, int]] = []

    def where(k: int) -> int:
        with lock:
            threads.append((threading.current_thread().name, threading.get_ident()))
        return k

    its = [read_ahead(where, list(range(20)), 4) for _ in range(10)]
    got: list[list[int]] = [[] for _ in its]
    for _ in range(20):  # round-robin, as SAE interleaves its classes
        for i, it in enumerate(its):
            got[i].append(next(it))
    assert got == [list(range(20))] * 10
    readers = {t for t in threads if t[0].startswith("c2mf-read")}  # threads alive at once: distinct ids
    assert len(readers) <= 4, readers
    for it in its:
        it.close()
    # once those are closed, the next source reads ahead again
    threads.clear()
    assert list(read_ahead(where, list(range(20)), 4)) == list(range(20))
    assert any(t[0].startswith("c2mf-read") for t in threads)


def test_one_batch_taken_reads_only_what_it_needs(tiny_store, monkeypatch):
    """A caller that takes one batch of a class (fit's start sample) makes the row source read the chunks that
    batch needs, not READ_AHEAD more; one that reads on gets every chunk."""
    from c2mf_cli.artifacts import store as store_module

    monkeypatch.setattr(store_module, "READ_AHEAD", 4)
    store = ActivationStore.open(tiny_store)
    reads: list[tuple[int, str]] = []
    real = store._read

    def spy(y, name, sel=slice(None)):
        reads.append((y, name))
        return real(y, name, sel)

    monkeypatch.setattr(store, "_read", spy)
    source = store.row_source()
    for batch in source.batches(0, 5):  # 5 rows: less than one chunk (4 images of 4 x 4 positions)
        break
    assert reads.count((0, "activations")) == 1
    reads.clear()
    n = sum(b.shape[0] for b in source.batches(0, 5))
    assert reads.count((0, "activations")) == 2 and n == source.n_rows(0)  # 6 images: chunks of 4 and 2
