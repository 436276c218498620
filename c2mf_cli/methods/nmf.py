"""NMF on whole-image activations (ablation: C2MF's consistency without its signed, gated dictionary).

    min_{U>=0, W>=0} ||A - U W||^2     per class (default) or one W shared by all classes (pooled rows)

Torch HALS in the streaming alternating engine (`_factorization.py`): codes by NNLS per batch, W by HALS
sweeps on the pass statistics. Needs A >= 0: a signed layer is an error unless the user opts into `shift`
(fit on A - min(A); the offset is stored in the dictionary and applied by encode/decode); never a clamp.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._factorization import FactorizationConfig, FactorizationMethod
from .base import option, register_method


@dataclass(frozen=True)
class NMFConfig(FactorizationConfig):
    """Settings of an NMF fit.

    Attributes (besides FactorizationConfig's):
        shared: one dictionary for all classes instead of one per class.
        shift: opt in to fitting on A - min(A) when the activations are signed.
        dict_sweeps: HALS sweeps over W per pass (from the statistics; no data pass).
    """

    shared: bool = option(False, flag="--shared/--per-class", help="One dictionary for all classes, or one per class.")
    shift: bool = option(False, help="Fit on A - min(A) when the layer is signed (NMF needs A >= 0).")
    dict_sweeps: int = 10


@register_method
class NMF(FactorizationMethod):
    name = "nmf"
    description = "ablation: NMF (W >= 0, U >= 0) on whole-image positions, per class or shared"
    needs = "full"
    signed_dictionary = False
    requires_nonnegative_input = True
    config_class = NMFConfig
