"""Factorization methods behind one contract, found by name in a registry.

Importing this package registers every built-in method, in the order `c2mf methods` lists them.
"""

from __future__ import annotations

from . import c2mf as _c2mf  # noqa: F401  (registration)
from . import craft as _craft  # noqa: F401
from . import pca as _pca  # noqa: F401
from . import nmf as _nmf  # noqa: F401
from . import semi_nmf as _semi_nmf  # noqa: F401
from .base import Method, get_method, list_methods, method_table, register_method

__all__ = ["Method", "get_method", "list_methods", "method_table", "register_method"]
