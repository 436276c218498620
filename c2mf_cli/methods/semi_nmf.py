"""Semi-NMF on whole-image activations (ablation: signed W, U >= 0, no gates), per class or shared.

    min_{U>=0, W} ||A - U W||^2

Codes by NNLS per batch, W by exact least squares on the pass statistics. Together with `c2mf` (gates) and
`nmf` (W >= 0) it isolates the effect of a signed dictionary and of the gates.
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
class SemiNMFConfig:
    """Settings of a semi-NMF fit (see NMFConfig; no shift: signed input is fine)."""

    concepts: int
    iterations: int = 200
    tol: float = 1e-5
    batch_size: int | None = 32768
    seed: int = 0
    shared: bool = False
    code_iters: int = 10
    code_solver: str = "hals"
    subsample_rows: int = 20000
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        check_common(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_method
class SemiNMF(Method):
    name = "semi-nmf"
    description = "ablation: signed W, codes U >= 0, no gates, per class or shared"
    needs = "full"
    signed_dictionary = True
    requires_nonnegative_input = False
    config_class = SemiNMFConfig

    def fit(self, source: RowSource, config: SemiNMFConfig, *, device: torch.device,
            progress: ProgressFn = no_progress, checkpoint_path: Path | None = None,
            resume: bool = False) -> ConceptDictionary:
        return fit_factorization(self, source, config, signed=True, shared=config.shared, shift_opt=False,
                                 dict_sweeps=1, device=device, progress=progress,
                                 checkpoint_path=checkpoint_path, resume=resume)
