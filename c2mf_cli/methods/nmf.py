"""NMF on whole-image activations (ablation: C2MF's consistency without its signed, gated dictionary).

    min_{U>=0, W>=0} ||A - U W||^2     per class (default) or one W shared by all classes (pooled rows)

Torch HALS in the streaming alternating engine (`_factorization.py`): codes by NNLS per batch, W by HALS
sweeps on the pass statistics. Needs A >= 0: a signed layer is an error unless the user opts into `shift`
(fit on A - min(A); the offset is stored in the dictionary and applied by encode/decode); never a clamp.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..dictionary import ConceptDictionary
from ..progress import ProgressFn, no_progress
from ..sources import RowSource
from ._factorization import check_common, fit_factorization
from .base import Method, register_method


@dataclass(frozen=True)
class NMFConfig:
    """Settings of an NMF fit (also the `craft` method's, which is always per class).

    Attributes:
        concepts: k per dictionary.
        iterations: passes over the data.
        tol: stop when a pass lowers the relative squared error by less than tol times its value.
        batch_size: rows per streamed batch; None loads each class whole.
        seed: seeds the initial dictionary (k-means++ rows of a sample).
        shared: one dictionary for all classes instead of one per class.
        shift: opt in to fitting on A - min(A) when the activations are signed.
        code_iters: HALS sweeps of the NNLS code step per batch.
        code_solver: "hals" or "fista".
        dict_sweeps: HALS sweeps over W per pass (from the statistics; no data pass).
        subsample_rows: fit first on this many rows drawn evenly from the classes, then refine on all rows
            (skipped when the data has fewer than twice as many; 0 turns it off).
        checkpoint_every: passes between checkpoints.
    """

    concepts: int
    iterations: int = 200
    tol: float = 1e-5
    batch_size: int | None = 32768
    seed: int = 0
    shared: bool = False
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
class NMF(Method):
    name = "nmf"
    description = "ablation: NMF (W >= 0, U >= 0) on whole-image positions, per class or shared"
    needs = "full"
    signed_dictionary = False
    requires_nonnegative_input = True
    config_class = NMFConfig

    def fit(self, source: RowSource, config: NMFConfig, *, device: torch.device,
            progress: ProgressFn = no_progress, checkpoint_path: Path | None = None,
            resume: bool = False) -> ConceptDictionary:
        return fit_factorization(self, source, config, signed=False, shared=config.shared,
                                 shift_opt=config.shift, dict_sweeps=config.dict_sweeps, device=device,
                                 progress=progress, checkpoint_path=checkpoint_path, resume=resume)
