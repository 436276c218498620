"""factorize on several processes (gloo on CPU) gives the one-process dictionary; a dead rank ends the run clearly.

The multi-process tests start real processes: one torch.multiprocessing spawn of 3 ranks that fits every
registered method with 3 ranks, then with 2 (ranks 0 and 1 form a new group), and one real CLI process whose
peer dies. The work is tiny; most of the time is each process importing torch.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from c2mf_cli import distributed
from c2mf_cli.artifacts.dictionary import ConceptDictionary
from c2mf_cli.artifacts.sources import ArraySource
from c2mf_cli.artifacts.store import ActivationStore
from c2mf_cli.errors import C2MFError
from c2mf_cli.methods import get_method, list_methods
from c2mf_cli.stages.factorize import factorize

REPO = Path(__file__).resolve().parents[1]

# small settings that still stream several batches per class and run the subsample fit; each method takes
# the ones its config has
SETTINGS = {"concepts": 3, "iterations": 3, "batch_size": 40, "subsample_rows": 60, "checkpoint_every": 1,
            "tol": 0.0, "shift": True}


# the methods whose fits under torch.distributed give the one-process dictionary
DISTRIBUTED = [m for m in list_methods() if get_method(m).supports_distributed]


def _options(method: str) -> dict:
    fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    return {k: v for k, v in SETTINGS.items() if k in fields}


def _store_for(method: str, stores: dict[str, str]) -> str:
    return stores[get_method(method).needs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


class _Stop(Exception):
    pass


def _interrupt_after(passes: int):
    """A progress callback that stops the fit after `passes` passes (their checkpoints written)."""
    def task(label: str, total):
        done = [0]

        def advance(n: int = 1, *, total: int | None = None, note: str | None = None) -> None:
            done[0] += n
            if done[0] > passes:
                raise _Stop

        return advance

    return task


class _CountingRows:
    """A row source counting the rows it hands out for data passes (not the shuffled samples that seed the
    init); its shards add to the same count, so a rank's count is what it streamed."""

    def __init__(self, source, counter: list[int] | None = None) -> None:
        self._source, self.counter = source, counter if counter is not None else [0]
        self.classes, self.n_features, self.mode, self.info = source.classes, source.n_features, source.mode, source.info

    def n_rows(self, y: int) -> int:
        return self._source.n_rows(y)

    def load(self, y: int):
        a = self._source.load(y)
        self.counter[0] += a.shape[0]
        return a

    def batches(self, y: int, batch_size: int, *, shuffle: bool = False, seed: int = 0):
        for b in self._source.batches(y, batch_size, shuffle=shuffle, seed=seed):
            self.counter[0] += 0 if shuffle else b.shape[0]
            yield b

    def shard(self, index: int, count: int) -> "_CountingRows":
        return _CountingRows(self._source.shard(index, count), self.counter)


def _fit_all(rank: int, world: int, port: int, stores: dict[str, str], out: str, resume_ckpt: str) -> None:
    """In every rank: fit each method, save what this rank holds, then resume a checkpoint."""
    torch.set_num_threads(1)
    distributed.start("cpu", 60, env=_env(rank, world, port))
    try:
        for method in DISTRIBUTED:
            source = _CountingRows(ActivationStore.open(_store_for(method, stores)).row_source())
            d = factorize(source, method, device="cpu", **_options(method))
            d.meta["test_rows_streamed"] = source.counter[0]
            d.save(Path(out) / f"{method}-w{world}-r{rank}.safetensors")
        # the SAE trains by gradient steps on global batches (every rank's batch), gradients all-reduced
        d = factorize(ActivationStore.open(stores["full"]).row_source(), "sae", device="cpu", concepts=16,
                      iterations=3, batch_size=40, lr=1e-2, resample_after=2)
        d.save(Path(out) / f"sae-w{world}-r{rank}.safetensors")
        # resume, with this world size, a checkpoint another world size wrote
        ckpt = Path(out) / f"resume-w{world}.ckpt"
        if distributed.is_writer():
            shutil.copy(resume_ckpt, ckpt)
        distributed.all_reduce_sum(torch.zeros(1))  # the copy exists before any rank reads it
        source = ActivationStore.open(stores["full"]).row_source()
        d = factorize(source, "c2mf", device="cpu", checkpoint_path=ckpt, resume=True, **_options("c2mf"))
        d.save(Path(out) / f"resumed-w{world}-r{rank}.safetensors")
    finally:
        distributed.stop()


def _worker(rank: int, ports: tuple[int, int], stores: dict[str, str], out: str, ckpt: str) -> None:
    _fit_all(rank, 3, ports[0], stores, out, ckpt)
    if rank < 2:
        _fit_all(rank, 2, ports[1], stores, out, ckpt)


def _assert_same(a: ConceptDictionary, b: ConceptDictionary, what: str) -> None:
    assert set(a.tensors) == set(b.tensors), what
    for name, t in a.tensors.items():
        u = b.tensors[name]
        if name == "gates":  # logits: compare the gates themselves (logits stretch differences near 0 and 1)
            t, u = torch.sigmoid(t), torch.sigmoid(u)
        torch.testing.assert_close(u, t, rtol=1e-3, atol=1e-4, msg=lambda m: f"{what}, {name}: {m}")


def test_every_method_same_dictionary_on_1_2_3_processes(tmp_path, tiny_store, tiny_crop_store, one_thread):
    stores = {"full": str(tiny_store), "crops": str(tiny_crop_store)}
    # one process: the reference of every method, and a c2mf fit stopped after 2 of its 3 passes
    ref, streamed = {}, {}
    for method in DISTRIBUTED:
        source = _CountingRows(ActivationStore.open(_store_for(method, stores)).row_source())
        ref[method] = factorize(source, method, device="cpu", **_options(method))
        streamed[method] = source.counter[0]
        assert ref[method].meta["distributed"]["world_size"] == 1
    ckpt = tmp_path / "stopped.ckpt"
    with pytest.raises(_Stop):
        factorize(ActivationStore.open(tiny_store).row_source(), "c2mf", device="cpu", checkpoint_path=ckpt,
                  progress=_interrupt_after(2), **_options("c2mf"))
    assert ckpt.is_file()

    torch.multiprocessing.spawn(_worker, args=((_free_port(), _free_port()), stores, str(tmp_path), str(ckpt)),
                                nprocs=3, join=True)

    for world in (2, 3):
        for method in DISTRIBUTED:
            held = [ConceptDictionary.load(tmp_path / f"{method}-w{world}-r{r}.safetensors") for r in range(world)]
            _assert_same(ref[method], held[0], f"{method} on {world} processes")
            for r in range(1, world):  # every rank holds exactly rank 0's dictionary
                for name, t in held[0].tensors.items():
                    assert torch.equal(held[r].tensors[name], t), f"{method}: rank {r} differs from rank 0 ({name})"
            # the ranks divided the rows: together they streamed what one process did, each only a part
            counts = [h.meta["test_rows_streamed"] for h in held]
            assert sum(counts) == streamed[method] and max(counts) < streamed[method], (method, counts)
            fitted = held[0].meta["distributed"]
            assert fitted["world_size"] == world and fitted["backend"] == "gloo" and len(fitted["devices"]) == world
        # the SAE: every rank holds rank 0's dictionary, and it learned on the global batches
        sae = [ConceptDictionary.load(tmp_path / f"sae-w{world}-r{r}.safetensors") for r in range(world)]
        for r in range(1, world):
            assert all(torch.equal(sae[r].tensors[n], t) for n, t in sae[0].tensors.items()), f"sae rank {r}"
        loss = sae[0].meta["history"][0]["loss"]
        assert sae[0].meta["distributed"]["world_size"] == world and 0 < loss[-1]["relative_error"] < 1
        resumed = ConceptDictionary.load(tmp_path / f"resumed-w{world}-r0.safetensors")
        _assert_same(ref["c2mf"], resumed, f"c2mf resumed on {world} processes from a 1-process checkpoint")
        assert len(resumed.meta["history"][0]["loss"]) == SETTINGS["iterations"]


def run_beside_a_dead_peer(args: list[str]) -> None:
    """Run `c2mf ARGS` (with --timeout 60) as rank 0 of 2 whose rank 1 joins, takes part in the first collective
    (`describe`), then is killed; the CLI must end soon with the survivors' one-line error and print nothing."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    peer = ("import os, signal, torch\n"
            "from c2mf_cli import distributed\n"
            "distributed.start('cpu', 60)\n"
            "distributed.describe(torch.device('cpu'))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    cmd = [sys.executable, "-m", "c2mf_cli.cli", *args, "--device", "cpu", "--timeout", "60", "-q"]
    t0 = time.perf_counter()
    main = subprocess.Popen(cmd, env={**env, **_env(0, 2, port)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    dead = subprocess.run([sys.executable, "-c", peer], env={**env, **_env(1, 2, port)}, capture_output=True,
                          timeout=120)
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    stdout, stderr = main.communicate(timeout=120)
    assert time.perf_counter() - t0 < 60 + 60  # well inside its --timeout once the peer has gone (plus startup)
    assert main.returncode == 1, stderr
    assert stderr.startswith("Error: rank 0 of 2: another process of this run stopped"), stderr
    assert "Traceback" not in stderr and stdout == ""


def test_a_dead_rank_ends_the_run_with_a_clear_error(tmp_path, tiny_store):
    out = tmp_path / "d.safetensors"
    run_beside_a_dead_peer(["factorize", "-s", str(tiny_store), "--method", "c2mf", "-k", "3", "--iterations", "50",
                            "-o", str(out)])
    assert not out.exists()


# ----- the pieces, without processes -----
@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h"}, None),
        ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"},
         distributed.Launch(2, 4, 0, "h", 1234, "torchrun")),
        ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1"},
         distributed.Launch(5, 8, 1, "n1", 29500, "srun")),
        # a job script outside an srun step sees SLURM_NTASKS but is one process
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "MASTER_ADDR": "n1"}, None),
    ],
)
def test_launch_is_read_from_torchrun_or_srun(env, expected):
    assert distributed.launch_from_env(env) == expected


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
        ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "rank 3 is outside a world of 2"),
        ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "cannot read the process launch"),
    ],
)
def test_a_bad_launch_is_a_clear_error(env, message):
    with pytest.raises(C2MFError, match=message):
        distributed.launch_from_env(env)


def test_alone_every_helper_is_a_no_op():
    t = torch.ones(3)
    distributed.all_reduce_sum(t)
    distributed.broadcast({"t": t})
    assert torch.equal(t, torch.ones(3))
    assert distributed.all_reduce_min(2.5, torch.device("cpu")) == 2.5
    assert (distributed.rank(), distributed.world_size(), distributed.is_writer()) == (0, 1, True)
    src = ArraySource([np.zeros((2, 3))])
    assert distributed.share(src) is src
    assert distributed.start("cpu", 10, env={}) is None


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_are_disjoint_and_hold_every_row(tiny_store, count):
    full = ActivationStore.open(tiny_store).row_source()
    rng = np.random.default_rng(0)
    arrays = ArraySource([rng.normal(size=(n, 4)) for n in (7, 1, 12)])
    for source in (full, arrays):
        shards = [source.shard(i, count) for i in range(count)]
        for y in range(len(source.classes)):
            parts = [s.load(y) for s in shards]
            assert [p.shape[0] for p in parts] == [s.n_rows(y) for s in shards]
            streamed = [np.concatenate(list(s.batches(y, 5)) or [np.zeros((0, source.n_features))]) for s in shards]
            for p, b in zip(parts, streamed):
                np.testing.assert_array_equal(p, b)
            every = np.concatenate(parts)
            whole = source.load(y)
            assert every.shape == whole.shape
            # the same rows (chunks are dealt out, so compare as sorted sets of rows)
            np.testing.assert_array_equal(np.unique(every, axis=0), np.unique(whole, axis=0))
