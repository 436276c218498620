"""c2mf: concept discovery for vision models (C2MF, CRAFT, PCA) with heatmaps and metrics.

    import c2mf_cli as c2mf
    d = c2mf.fit(acts, labels, method="c2mf", k=10)

The names below load on first use (module `__getattr__`), so `import c2mf_cli` and `c2mf --help` stay fast.
See docs/api.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "fit": "c2mf_cli.api",
    "encode": "c2mf_cli.api",
    "decode": "c2mf_cli.api",
    "explain": "c2mf_cli.api",
    "evaluate": "c2mf_cli.api",
    "Explanation": "c2mf_cli.api",
    "ConceptDictionary": "c2mf_cli.artifacts.dictionary",
    "ActivationStore": "c2mf_cli.artifacts.store",
    "ArraySource": "c2mf_cli.artifacts.sources",
    "list_methods": "c2mf_cli.methods",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'c2mf_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
