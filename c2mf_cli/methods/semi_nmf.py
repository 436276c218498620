"""Semi-NMF on whole-image activations (ablation: signed W, U >= 0, no gates), per class or shared.

    min_{U>=0, W} ||A - U W||^2

Codes by NNLS per batch, W by exact least squares on the pass statistics. Together with `c2mf` (gates) and
`nmf` (W >= 0) it isolates the effect of a signed dictionary and of the gates.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._factorization import FactorizationConfig, FactorizationMethod
from .base import option, register_method


@dataclass(frozen=True)
class SemiNMFConfig(FactorizationConfig):
    """Settings of a semi-NMF fit (no shift: signed input is fine).

    Attributes (besides FactorizationConfig's):
        shared: one dictionary for all classes instead of one per class.
    """

    shared: bool = option(False, flag="--shared/--per-class", help="One dictionary for all classes, or one per class.")


@register_method
class SemiNMF(FactorizationMethod):
    name = "semi-nmf"
    description = "ablation: signed W, codes U >= 0, no gates, per class or shared"
    needs = "full"
    signed_dictionary = True
    requires_nonnegative_input = False
    config_class = SemiNMFConfig
