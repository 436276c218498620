"""CRAFT (Fel et al. 2023) as its reference code does it: per class, NMF on pooled crop activations, W >= 0.

The crops come from `c2mf extract --mode crops` (a fixed grid of crops, each resized to the input size and its
activations mean-pooled). The NMF is the torch HALS of `nmf.py`; signed activations are an error unless the
user opts into `shift` (A - min(A)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..dictionary import ConceptDictionary
from ..progress import ProgressFn, no_progress
from ..sources import RowSource
from .base import Method, register_method
from ._factorization import check_common, fit_factorization


@dataclass(frozen=True)
class CraftConfig:
    """Settings of a CRAFT fit: those of NMF, always one dictionary per class (see NMFConfig)."""

    concepts: int
    iterations: int = 200
    tol: float = 1e-5
    batch_size: int | None = 32768
    seed: int = 0
    shift: bool = False
    code_iters: int = 10
    code_solver: str = "hals"
    dict_sweeps: int = 10
    subsample_rows: int = 20000
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        check_common(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_method
class Craft(Method):
    name = "craft"
    description = "baseline: per-class NMF (W >= 0) on crop activations, as CRAFT's reference code"
    needs = "crops"
    signed_dictionary = False
    requires_nonnegative_input = True
    config_class = CraftConfig

    def fit(self, source: RowSource, config: CraftConfig, *, device: torch.device,
            progress: ProgressFn = no_progress, checkpoint_path: Path | None = None,
            resume: bool = False) -> ConceptDictionary:
        return fit_factorization(self, source, config, signed=False, shared=False, shift_opt=config.shift,
                                 dict_sweeps=config.dict_sweeps, device=device, progress=progress,
                                 checkpoint_path=checkpoint_path, resume=resume)
