"""TopK sparse autoencoder (Makhzani and Frey 2013; Gao et al. 2024), one dictionary shared by all classes.

Notation: A (n, c) rows, W = W_dec (k, c) the dictionary (unit-norm rows, the concepts), U (n, k) codes.

    encode  U = TopK(ReLU((A - b_dec) W_enc + b_enc))     the top_k largest pre-activations of a row, >= 0
    decode  A_hat = U W_dec + b_dec

k may exceed c (an overcomplete dictionary, the usual choice for SAEs, e.g. k = 4c). Trained with Adam on
||A - A_hat||^2 over mini-batches that mix every class's rows, streamed from the source (or held on the device
when they fit in memory), on cpu or cuda. After each step the rows of W_dec are put back on the unit sphere, so
the codes carry the scale. Training runs on rows scaled to a mean squared entry of 1 (one scalar from a sample);
the scale is folded back into b_enc and b_dec at the end (ReLU and TopK commute with a positive scale), so the
dictionary works on the store's activations as they are.

Dead latents: a concept that has not fired on any row for `resample_after` steps is re-initialised toward the
rows the autoencoder reconstructs worst (Bricken et al. 2023): its decoder row becomes the normalised residual of
a row drawn with probability proportional to its squared error, its encoder column that direction at the mean
encoder norm (a TopK latent must win a place among the top_k to fire again), its bias 0 and its Adam moments 0.

Seeded (initialisation, row order, resampling); a checkpoint after every `checkpoint_every` passes holds the
parameters, Adam's moments, the resampling counters and the random stream, so a resumed fit continues the same
trajectory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, safe_open

from .._io import write_safetensors
from ..artifacts.dictionary import ConceptDictionary
from ..artifacts.sources import RowSource
from ..distributed import all_reduce_sum, broadcast, is_writer, share, world_size
from ..errors import C2MFError, UsageError
from ..progress import ProgressFn, no_progress
from ._alternating import sample_rows
from .base import Method, check_batch, check_source, option, register_method, source_summary, to_device

CHECKPOINT_TYPE = "c2mf-sae-checkpoint"
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
IN_MEMORY_BYTES = 1 << 30  # rows below this size are read once and shuffled on the device


@dataclass(frozen=True)
class SAEConfig:
    """Settings of a TopK SAE fit.

    Attributes:
        concepts: k, the number of latents (may exceed the channels).
        top_k: latents active per row; None: min(32, max(1, k // 4)).
        iterations: passes over the data (epochs).
        batch_size: rows per mini-batch (Adam step), drawn from every class in proportion to its rows.
        lr: Adam learning rate (on rows scaled to a mean squared entry of 1).
        seed: seeds the initialisation, the row order and the resampling.
        resample_after: steps a latent may stay silent before it is resampled (0: never).
        checkpoint_every: passes between checkpoints (when a checkpoint path is given).
    """

    concepts: int
    top_k: int | None = option(None, metavar="N", shown="min(32, k / 4)", help="Latents active per row.")
    iterations: int = option(20, help="Passes over the data (at most).", metavar="N")
    batch_size: int | None = option(4096, help="Rows per streamed batch (--full-batch: each class whole).",
                                    metavar="N")
    lr: float = option(1e-3, metavar="F", help="Adam learning rate.")
    seed: int = option(0, help="Seed of the initial dictionary.", metavar="INT")
    resample_after: int = option(
        500, metavar="N", help="Resample a latent that has not fired for N steps toward the worst-"
        "reconstructed rows (0: never).")
    checkpoint_every: int = option(
        10, help="Checkpoint to OUT.ckpt every N passes (kept until the fit ends; --resume continues from it).", metavar="N")

    def __post_init__(self) -> None:
        if self.top_k is not None and not 1 <= self.top_k <= self.concepts:
            raise UsageError(f"--top-k must be between 1 and --concepts ({self.concepts}), got {self.top_k}")
        if self.iterations < 1:
            raise UsageError(f"--iterations must be at least 1, got {self.iterations}")
        if self.batch_size is None:
            raise UsageError("the sae trains on mini-batches: give --batch-size N, not --full-batch")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if self.resample_after < 0:
            raise UsageError(f"--resample-after must be >= 0, got {self.resample_after}")
        if self.checkpoint_every < 1:
            raise UsageError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")

    @property
    def active(self) -> int:
        """The top_k in use."""
        return self.top_k if self.top_k is not None else min(32, max(1, self.concepts // 4))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def topk_codes(z: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest entries of each row of z, ReLU'd; zeros elsewhere."""
    vals, idx = z.topk(top_k, dim=1)
    return torch.zeros_like(z).scatter_(1, idx, vals.clamp_min(0.0))


def _forward(p: dict[str, torch.Tensor], x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    U = topk_codes((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], top_k)
    return U, U @ p["W_dec"] + p["b_dec"]


def _mixed_batches(source: RowSource, batch_size: int, seed: int) -> Iterator[list[tuple[int, Any]]]:
    """Rounds of per-class parts, about batch_size rows in all, each class in proportion to its rows (shuffled)."""
    total = sum(source.n_rows(y) for y in range(len(source.classes)))
    its = {y: source.batches(y, max(1, round(batch_size * source.n_rows(y) / total)), shuffle=True, seed=seed + y)
           for y in range(len(source.classes)) if source.n_rows(y)}
    while its:
        parts = []
        for y in list(its):
            b = next(its[y], None)
            if b is None:
                del its[y]
            else:
                parts.append((y, b))
        if parts:
            yield parts


class _Rows:
    """The training rows, one pass at a time: from the device when they fit in memory, else from the source."""

    def __init__(self, source: RowSource, batch_size: int, device: torch.device) -> None:
        self.source, self.batch_size, self.device = source, batch_size, device
        total = sum(source.n_rows(y) for y in range(len(source.classes)))
        self.X: torch.Tensor | None = None
        if total * source.n_features * 4 <= IN_MEMORY_BYTES:
            parts = []
            for y in range(len(source.classes)):
                a = to_device(source.load(y), device)
                check_batch(a, source.classes[y])
                parts.append(a)
            self.X = torch.cat(parts)

    def epoch(self, seed: int) -> Iterator[torch.Tensor]:
        if self.X is not None:
            order = torch.randperm(self.X.shape[0], generator=torch.Generator().manual_seed(seed)).to(self.device)
            for s in range(0, order.shape[0], self.batch_size):
                yield self.X[order[s : s + self.batch_size]]
            return
        for parts in _mixed_batches(self.source, self.batch_size, seed):
            batch = []
            for y, b in parts:
                a = to_device(b, self.device)
                check_batch(a, self.source.classes[y])
                batch.append(a)
            yield torch.cat(batch)


def _fingerprint(source: RowSource) -> dict[str, Any]:
    return {"classes": list(source.classes), "n_rows": [int(source.n_rows(y)) for y in range(len(source.classes))],
            "n_features": int(source.n_features), "info": str(source.info.get("fingerprint", ""))}


def _save_checkpoint(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      {"c2mf": json.dumps(state)})


def _load_checkpoint(path: Path, config: dict[str, Any], fingerprint: dict[str, Any]
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {}).get("c2mf", "{}"))
        # copies: tensors mapped from the file may be misaligned, which changes the last bits of later sums
        tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise C2MFError(f"cannot read checkpoint {path} ({e}): delete it and fit again without --resume") from None
    if state.get("encoding-type") != CHECKPOINT_TYPE:
        raise C2MFError(f"{path} is not a sae checkpoint: delete it or give another --checkpoint path")
    if state.get("config") != config or state.get("source") != fingerprint:
        raise C2MFError(f"checkpoint {path} was written by a fit with other settings or data: rerun with the same "
                        "options and store, or drop --resume to start afresh")
    return state, tensors


@register_method
class SAE(Method):
    name = "sae"
    description = "TopK sparse autoencoder (Adam, dead-latent resampling), shared, overcomplete allowed, codes >= 0"
    needs = "full"
    signed_dictionary = True
    requires_nonnegative_input = False
    config_class = SAEConfig
    tensor_shapes = {"W": ("k c",), "W_enc": ("c k",), "b_enc": ("k",), "b_dec": ("c",)}
    supports_overcomplete = True
    batch_invariant = False  # stochastic gradient: the mini-batches are part of the fit
    # under torch.distributed each process streams its share and the gradients of each global batch (every
    # process's batch together) are all-reduced; the batches differ with the number of processes, so the dictionary
    # is not the one-process one bit for bit (as for any data-parallel SGD)
    supports_distributed = False

    def needs_class(self, d: ConceptDictionary) -> bool:
        return False  # one encoder for every class

    def encode(self, d: ConceptDictionary, A: torch.Tensor, y: int | None, *, iters: int) -> torch.Tensor:
        """The encoder, TopK(ReLU((A - b_dec) W_enc + b_enc)): codes >= 0, at most top_k per row (iters unused)."""
        t = d.tensors
        return topk_codes((A - t["b_dec"]) @ t["W_enc"] + t["b_enc"], int(d.meta["top_k"]))

    def decode(self, d: ConceptDictionary, U: torch.Tensor, y: int | None) -> torch.Tensor:
        return U @ d.tensors["W"] + d.tensors["b_dec"]

    def fit(self, source: RowSource, config: SAEConfig, *, device: torch.device,
            progress: ProgressFn = no_progress, checkpoint_path: Path | None = None,
            resume: bool = False) -> ConceptDictionary:
        check_source(self, source, config.concepts)
        t0 = time.perf_counter()
        k, c, top_k = config.concepts, source.n_features, config.active
        cfg, fingerprint = config.to_dict(), _fingerprint(source)
        gen = torch.Generator().manual_seed(config.seed)
        if resume:
            if checkpoint_path is None or not checkpoint_path.exists():
                raise C2MFError(f"--resume given but there is no checkpoint at {checkpoint_path}: drop --resume")
            state, saved = _load_checkpoint(checkpoint_path, cfg, fingerprint)
            scale, start, history = float(state["scale"]), int(state["passes"]), state["history"]
            params = {n: saved[n].to(device) for n in PARAMS}
            silent = saved["silent"].to(device)
            gen.set_state(saved["generator"])
        else:
            sample = torch.cat(sample_rows(source, list(range(len(source.classes))), 20000, config.seed, device))
            scale = float(torch.rsqrt(sample.pow(2).mean().clamp_min(1e-30)))
            W_dec = torch.randn(k, c, generator=gen).to(device)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(k, device=device), "W_dec": W_dec,
                      "b_dec": (sample * scale).mean(0)}
            silent = torch.zeros(k, dtype=torch.long, device=device)  # steps since each latent last fired
            start, history = 0, []
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(list(params.values()), lr=config.lr)
        if resume:
            opt.load_state_dict({"state": {i: {"step": saved[f"{n}.step"], "exp_avg": saved[f"{n}.exp_avg"].to(device),
                                               "exp_avg_sq": saved[f"{n}.exp_avg_sq"].to(device)}
                                           for i, n in enumerate(PARAMS)},
                                 "param_groups": opt.state_dict()["param_groups"]})
        rows = _Rows(share(source), config.batch_size, device)  # this process's rows (all of them when alone)
        advance = progress("sae", config.iterations)
        advance(start)
        empty = torch.zeros(0, c, device=device)
        for epoch in range(start, config.iterations):
            e0 = time.perf_counter()
            err, energy, resampled, steps = 0.0, 0.0, 0, 0
            batches = rows.epoch(config.seed + 7919 * epoch)
            while True:
                batch = next(batches, None)
                # the global batch: every process's batch; a process out of rows adds an empty one until all are
                count = torch.tensor([0.0 if batch is None else 1.0, 0.0 if batch is None else float(batch.shape[0])],
                                     device=device)
                all_reduce_sum(count)
                if count[0] == 0:
                    break
                x = (batch if batch is not None else empty) * scale
                U, x_hat = _forward(params, x, top_k)
                sq = (x - x_hat).pow(2).sum(1)
                opt.zero_grad(set_to_none=False)
                (sq.sum() / count[1]).backward()  # the mean over the global batch
                _sum_gradients(params)
                opt.step()
                with torch.no_grad():
                    params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12)
                    fired = (U > 0).any(0).float()
                    all_reduce_sum(fired)
                    silent = torch.where(fired > 0, torch.zeros_like(silent), silent + 1)
                    if config.resample_after:
                        resampled += _resample_shared(params, opt, silent, config.resample_after, x, x_hat, sq, gen)
                    err += float(sq.sum())
                    energy += float(x.pow(2).sum())
                steps += 1
            sums = torch.tensor([err, energy], dtype=torch.float64, device=device)
            all_reduce_sum(sums)
            err, energy = float(sums[0]), float(sums[1])
            history.append({"pass": epoch + 1, "steps": steps, "train_relative_error": math.sqrt(err / max(energy, 1e-30)),
                            "resampled": resampled, "seconds": time.perf_counter() - e0})
            advance(1)
            if checkpoint_path is not None and is_writer() and ((epoch + 1) % config.checkpoint_every == 0
                                                                or epoch + 1 == config.iterations):
                tensors = {n: params[n] for n in PARAMS}
                for i, n in enumerate(PARAMS):
                    st = opt.state_dict()["state"][i]
                    tensors.update({f"{n}.step": st["step"], f"{n}.exp_avg": st["exp_avg"],
                                    f"{n}.exp_avg_sq": st["exp_avg_sq"]})
                tensors.update({"silent": silent, "generator": gen.get_state()})
                _save_checkpoint(checkpoint_path, {"encoding-type": CHECKPOINT_TYPE, "config": cfg,
                                                   "source": fingerprint, "passes": epoch + 1, "scale": scale,
                                                   "history": history}, tensors)
        with torch.no_grad():
            # fold the training scale back (ReLU and TopK commute with it): the dictionary takes raw activations
            tensors = {"W": params["W_dec"].detach().clone(), "W_enc": params["W_enc"].detach().clone(),
                       "b_enc": params["b_enc"].detach() / scale, "b_dec": params["b_dec"].detach() / scale}
        meta = {
            "method": self.name,
            "config": cfg,
            "top_k": top_k,
            "train_scale": scale,
            "shared": True,
            "classes": list(source.classes),
            "source": source_summary(source),
            "device": str(device),
        }
        d = ConceptDictionary(tensors, meta)
        final = _evaluate(d, rows, self)
        d.meta["history"] = [{"classes": list(source.classes), "passes": len(history), "converged": None,
                              "loss": history + [final]}]
        d.meta["dead_fraction"] = final["dead_fraction"]
        d.meta["fit_seconds"] = time.perf_counter() - t0
        return d


def _sum_gradients(params: dict[str, torch.Tensor]) -> None:
    """Sum each parameter's gradient over the processes (each already divided by the global batch's rows)."""
    grads = []
    for p in params.values():
        if p.grad is None:  # a process whose batch was empty
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_sum(*grads)


def _resample_shared(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, silent: torch.Tensor, after: int,
                     x: torch.Tensor, x_hat: torch.Tensor, sq: torch.Tensor, gen: torch.Generator) -> int:
    """`_resample` on the first process's batch, its result given to every process (alone: `_resample` itself)."""
    if world_size() == 1:
        return _resample(params, opt, silent, after, x, x_hat, sq, gen)
    done = torch.zeros(1, device=silent.device)
    if is_writer():
        done[0] = _resample(params, opt, silent, after, x, x_hat, sq, gen)
    broadcast({"done": done})
    if done[0] > 0:
        state = {n: params[n] for n in ("W_dec", "W_enc", "b_enc")}
        for n in ("W_dec", "W_enc", "b_enc"):
            st = opt.state.get(params[n]) or {}
            state.update({f"{n}.{k}": st[k] for k in ("exp_avg", "exp_avg_sq") if k in st})
        broadcast(state)  # in place: every process now holds the resampled latents and their reset moments
        silent[silent >= after] = 0
    return int(done[0])


def _resample(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, silent: torch.Tensor, after: int,
              x: torch.Tensor, x_hat: torch.Tensor, sq: torch.Tensor, gen: torch.Generator) -> int:
    """Re-initialise the latents silent for `after` steps toward high-error rows of this batch; returns how many."""
    dead = torch.nonzero(silent >= after).flatten()
    if dead.numel() == 0 or float(sq.sum()) <= 0:
        return 0
    # with replacement: a batch may hold fewer rows with an error than there are dead latents
    pick = torch.multinomial(sq.detach().double().cpu() / float(sq.sum()), dead.numel(), replacement=True,
                             generator=gen).to(x.device)
    r = (x - x_hat)[pick].detach()
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = torch.ones_like(silent, dtype=torch.bool)
    alive[dead] = False
    enc_norm = float(params["W_enc"][:, alive].norm(dim=0).mean()) if bool(alive.any()) else 1.0
    params["W_dec"][dead] = r
    params["W_enc"][:, dead] = r.T * enc_norm
    params["b_enc"][dead] = 0.0
    for p, cols in ((params["W_dec"], (dead,)), (params["W_enc"], (slice(None), dead)), (params["b_enc"], (dead,))):
        st = opt.state.get(p)
        if st:
            st["exp_avg"][cols] = 0.0
            st["exp_avg_sq"][cols] = 0.0
    silent[dead] = 0
    return int(dead.numel())


def _evaluate(d: ConceptDictionary, rows: _Rows, method: SAE) -> dict[str, Any]:
    """One pass with the final dictionary: the exact relative error and the fraction of latents that never fire."""
    err, energy = 0.0, 0.0
    fired = torch.zeros(d.n_concepts, dtype=torch.bool, device=d.device)
    with torch.no_grad():
        for a in rows.epoch(0):
            U = method.encode(d, a, None, iters=0)
            err += float((a - method.decode(d, U, None)).pow(2).sum())
            energy += float(a.pow(2).sum())
            fired |= (U > 0).any(0)
    sums = torch.tensor([err, energy], dtype=torch.float64, device=d.device)
    seen = fired.float()
    all_reduce_sum(sums, seen)  # every process's rows (alone: its own)
    err, energy = float(sums[0]), float(sums[1])
    return {"evaluation": "final dictionary, every row", "relative_error": math.sqrt(err / max(energy, 1e-30)),
            "dead_fraction": 1.0 - float((seen > 0).float().mean())}
