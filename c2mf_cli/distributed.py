"""Several processes, one result: torch.distributed for the steps that reduce to sums (factorize's passes,
evaluate's metrics).

Each process (rank) streams its own share of the rows (`share`); what a pass accumulates (sums, counts, minima)
is all-reduced, so every rank ends the pass with the statistics of all rows and makes the same update. The
answer is the single-process one up to the order of float additions.

The processes come from `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or from an `srun`
step (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID and a MASTER_ADDR the job script exports). NCCL joins
GPUs, gloo CPUs. Every collective has a timeout: a rank that dies or stalls ends the job on the others with one
`Error:` line, never a hang. Without a process group every helper here is a no-op, so one code path serves both.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .errors import C2MFError

DEFAULT_TIMEOUT_S = 600.0
_NAME_BYTES = 96  # room for "cuda:7@hostname" in the fixed-size tensor each rank sends (no pickled objects)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a multi-process launch, read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" or "srun"


def launch_from_env(env: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch this process belongs to, or None when it runs alone (one process, or not launched by either).

    SLURM_STEP_NUM_TASKS (set inside an `srun` step only) is read rather than SLURM_NTASKS, which a job script
    also sees outside any step: a plain `c2mf factorize` line in an sbatch script is one process, not rank 0
    of tasks that will never come.
    """
    try:
        if "WORLD_SIZE" in env and "RANK" in env:
            world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
            local, launcher = int(env.get("LOCAL_RANK", "0")), "torchrun"
        elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
            world, rank = int(env["SLURM_STEP_NUM_TASKS"]), int(env["SLURM_PROCID"])
            local, launcher = int(env.get("SLURM_LOCALID", "0")), "srun"
        else:
            return None
        port = int(env.get("MASTER_PORT", "29500"))
    except ValueError as e:
        raise C2MFError(f"cannot read the process launch from the environment ({e}): check RANK, WORLD_SIZE, "
                        "LOCAL_RANK, MASTER_PORT (torchrun) or the SLURM_* variables (srun)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise C2MFError(f"rank {rank} is outside a world of {world} processes: check how the job was launched")
    addr = env.get("MASTER_ADDR")
    if not addr:
        raise C2MFError(
            f"{world} processes were launched by {launcher} but MASTER_ADDR is not set: export the first node's "
            "name in the job script, e.g. export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" "
            "| head -n 1) (see examples/slurm_factorize_distributed.sh)"
        )
    return Launch(rank, world, local, addr, port, launcher)


def start(device: str | torch.device = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
          env: Mapping[str, str] = os.environ) -> torch.device | None:
    """Join the process group this process was launched into; returns its device, or None when alone.

    `device` "auto" or "cuda" gives each rank the GPU of its local rank (NCCL); "cpu" uses gloo. A group the
    caller already set up is used as it is (`device` is then resolved as given).
    """
    import torch.distributed as dist

    if timeout_s <= 0:
        raise C2MFError(f"--timeout must be > 0 seconds, got {timeout_s}")
    if dist.is_available() and dist.is_initialized():
        return None
    launch = launch_from_env(env)
    if launch is None:
        return None
    if not dist.is_available():
        raise C2MFError("this PyTorch build has no torch.distributed: run one process, or install a full build")
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise C2MFError(f"--device {device} asked for, but CUDA is not available here: use --device cpu")
        n_gpus = torch.cuda.device_count()
        # one visible GPU: the launcher bound this process to it (srun --gpus-per-task=1)
        index = 0 if n_gpus == 1 else launch.local_rank
        if index >= n_gpus:
            raise C2MFError(f"local rank {launch.local_rank} has no GPU: this node shows it {n_gpus}; launch at "
                            f"most {n_gpus} processes per node (torchrun --nproc-per-node {n_gpus})")
        dev, backend = torch.device("cuda", index), "nccl"
        torch.cuda.set_device(dev)
    elif name == "cpu":
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise C2MFError(f"--device {device} cannot be used by several processes: use auto, cuda or cpu")
    try:
        dist.init_process_group(
            backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}", rank=launch.rank,
            world_size=launch.world_size, timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, ValueError) as e:
        raise C2MFError(
            f"rank {launch.rank} of {launch.world_size} could not join the others at {launch.master_addr}:"
            f"{launch.master_port} within {timeout_s:g} s ({_first_line(e)}): check that every process was "
            "started, MASTER_ADDR / MASTER_PORT, and that the port is free"
        ) from None
    return dev


def stop() -> None:
    """Leave the process group (if any); safe to call when none was started."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _group() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _group() else 1


def is_writer() -> bool:
    """Whether this process writes results and checkpoints (rank 0; the only process when alone)."""
    return rank() == 0


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _collective(what: str, fn: Any, *args: Any) -> None:
    """Run one collective; a peer that died or stalled past the timeout becomes one clear error."""
    try:
        fn(*args)
    except RuntimeError as e:
        raise C2MFError(
            f"rank {rank()} of {world_size()}: another process of this run stopped or did not answer in time "
            f"during {what} ({_first_line(e)}); its own output says why. Fix that and rerun (factorize: with "
            "--resume if a checkpoint was written)"
        ) from None


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over every process, in place."""
    if not _group():
        return
    import torch.distributed as dist

    for t in tensors:
        _collective("an all-reduce", dist.all_reduce, t)


def all_reduce_max(*tensors: torch.Tensor) -> None:
    """The element-wise maximum of each tensor over every process, in place."""
    if not _group():
        return
    import torch.distributed as dist

    for t in tensors:
        _collective("an all-reduce", dist.all_reduce, t, dist.ReduceOp.MAX)


def all_reduce_min(value: float, device: torch.device) -> float:
    """The minimum of `value` over every process."""
    if not _group():
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    _collective("an all-reduce", dist.all_reduce, t, dist.ReduceOp.MIN)
    return float(t)


def broadcast(tensors: Mapping[str, torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's, in place: every rank then holds bit-identical state."""
    if not _group():
        return
    import torch.distributed as dist

    for name in sorted(tensors):  # the same order on every rank
        _collective("a broadcast", dist.broadcast, tensors[name], 0)


def share(source: Any) -> Any:
    """This process's share of a row source's rows (the source itself when alone).

    The source must offer `shard(index, count)` (the in-memory and store sources do): the shares of all
    processes are disjoint and together hold every row.
    """
    if not _group():
        return source
    shard = getattr(source, "shard", None)
    if shard is None:
        raise C2MFError(f"a {type(source).__name__} cannot be split between processes: give it a "
                        "shard(index, count) method, or run one process")
    return shard(rank(), world_size())


def describe(device: torch.device) -> dict[str, Any]:
    """How the work was divided, for a result's metadata: world size, backend, and each rank's device@host."""
    me = f"{device}@{socket.gethostname()}"
    if not _group():
        return {"world_size": 1, "backend": None, "devices": [me]}
    import torch.distributed as dist

    raw = me.encode()[:_NAME_BYTES].ljust(_NAME_BYTES, b"\0")
    mine = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
    every = [torch.empty_like(mine) for _ in range(world_size())]
    _collective("an all-gather", dist.all_gather, every, mine)
    names = [bytes(t.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for t in every]
    return {"world_size": world_size(), "backend": dist.get_backend(), "devices": names}
