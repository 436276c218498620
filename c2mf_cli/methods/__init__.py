"""Factorization methods behind one contract, found by name in a registry.

Importing this package imports every public module of it (each registers its method with `@register_method`),
so a new method is one new file: no list to edit. `c2mf methods` lists them in file-name order. Callers use a
dictionary only through the entry functions here (`encode`, `decode`, `needs_class`, `gates`, `basis`,
`concepts_used`), which dispatch to the method that made it; see docs/methods.md for adding a method.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    CODE_RULES,
    Method,
    MethodOption,
    basis,
    check_dictionary,
    class_free,
    concepts_used,
    config_from_options,
    decode,
    encode,
    gates,
    get_method,
    list_methods,
    load_dictionary,
    method_of,
    method_options,
    method_table,
    needs_class,
    register_method,
)

__all__ = ["CODE_RULES", "Method", "MethodOption", "basis", "check_dictionary", "class_free", "concepts_used",
           "config_from_options", "decode", "encode", "gates", "get_method", "list_methods", "load_dictionary",
           "method_of", "method_options", "method_table", "needs_class", "register_method"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_") and _info.name not in ("base", "solvers"):
        importlib.import_module(f"{__name__}.{_info.name}")
