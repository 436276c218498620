"""CRAFT (Fel et al. 2023) as its reference code does it: per class, NMF on pooled crop activations, W >= 0.

The crops come from `c2mf extract --mode crops` (a fixed grid of crops, each resized to the input size and its
activations mean-pooled). The NMF is the torch HALS of `_factorization.py`; signed activations are an error
unless the user opts into `shift` (A - min(A)). A class's crops usually fit in one batch: they are read once
and every pass of its fit runs in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._factorization import FactorizationConfig, FactorizationMethod
from .base import option, register_method


@dataclass(frozen=True)
class CraftConfig(FactorizationConfig):
    """Settings of a CRAFT fit: those of NMF, always one dictionary per class.

    Attributes (besides FactorizationConfig's):
        shift: opt in to fitting on A - min(A) when the activations are signed.
        dict_sweeps: HALS sweeps over W per pass (from the statistics; no data pass).
    """

    shift: bool = option(False, help="Fit on A - min(A) when the layer is signed (NMF needs A >= 0).")
    dict_sweeps: int = 10


@register_method
class Craft(FactorizationMethod):
    name = "craft"
    description = "baseline: per-class NMF (W >= 0) on crop activations, as CRAFT's reference code"
    needs = "crops"
    signed_dictionary = False
    requires_nonnegative_input = True
    config_class = CraftConfig
