"""The contract every factorization method follows, the registry that names them, and shared checks.

Notation: for class y, A(y) (n_y, c) rows from a `RowSource`; W (k, c) dictionary; U (n, k) codes.

A method is a class registered under a name with `@register_method`. It declares what it learns from
(`needs`: "full" whole-image positions or "crops"), whether its dictionary is signed, whether it needs A >= 0,
and a frozen config dataclass. `fit(source, config, device=..., progress=..., checkpoint_path=...)` returns a
`ConceptDictionary`. `--method` choices, `c2mf methods` and the test matrix all come from this registry.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..artifacts.dictionary import ConceptDictionary
from ..errors import C2MFError, UsageError
from ..progress import ProgressFn, no_progress
from ..artifacts.sources import Mode, RowSource

_REGISTRY: dict[str, type["Method"]] = {}


class Method(ABC):
    """One factorization method. Subclasses set the class attributes and implement `fit`."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs: ClassVar[Mode]
    signed_dictionary: ClassVar[bool]
    requires_nonnegative_input: ClassVar[bool]
    config_class: ClassVar[type]

    @abstractmethod
    def fit(
        self,
        source: RowSource,
        config: Any,
        *,
        device: torch.device,
        progress: ProgressFn = no_progress,
        checkpoint_path: Path | None = None,
        resume: bool = False,
    ) -> ConceptDictionary:
        """Learn a dictionary from `source` with `config`; checkpoint atomically if a path is given."""

    def make_config(self, **options: Any) -> Any:
        """Build this method's config from option values, refusing names the method does not take."""
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise UsageError(
                f"method {self.name!r} does not take {', '.join(unknown)}; its settings are: {', '.join(sorted(fields))}"
            )
        return self.config_class(**options)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under `cls.name`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    """An instance of the method registered as `name`; an unknown name is a C2MFError listing the choices."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise C2MFError(f"unknown method {name!r}: choose one of {', '.join(_REGISTRY)}") from None


def method_table() -> list[dict[str, Any]]:
    """One row per method: what `c2mf methods` prints."""
    rows = []
    for name, cls in _REGISTRY.items():
        rows.append(
            {
                "name": name,
                "description": cls.description,
                "learns_from": cls.needs,
                "signed_dictionary": cls.signed_dictionary,
                "requires_nonnegative_input": cls.requires_nonnegative_input,
                "settings": [f.name for f in dataclasses.fields(cls.config_class)],
            }
        )
    return rows


# ----- checks shared by every method -----
def check_source(method: Method, source: RowSource, k: int) -> None:
    """Refuse the inputs a method cannot use: wrong store mode, k > channels, empty classes."""
    if source.mode != method.needs:
        if method.needs == "full":
            raise C2MFError(
                f"method {method.name!r} learns from whole-image activations, but this store holds crops "
                "(extract --mode crops): extract a store with --mode full, or use --method craft"
            )
        raise C2MFError(
            f"method {method.name!r} learns from crop activations (the CRAFT reference), but this store holds "
            "whole images: extract a store with --mode crops, or use --method nmf for NMF on whole images"
        )
    if k < 1:
        raise UsageError(f"--concepts must be at least 1, got {k}")
    if k > source.n_features:
        raise UsageError(
            f"--concepts {k} is larger than the {source.n_features} channels of the layer: use k <= {source.n_features}"
        )
    for y, name in enumerate(source.classes):
        if source.n_rows(y) == 0:
            raise C2MFError(f"class {name!r} has no activations in the store: re-extract it or drop the class")


def check_batch(a: torch.Tensor, class_name: str, *, nonnegative: bool = False, hint: str = "") -> None:
    """Refuse NaN / inf (checked on every batch as it streams) and, where asked, negative values."""
    # a sum is finite iff every entry is (barring overflow past 3e38, which the exact check then confirms);
    # it is also far cheaper than isfinite on a multi-threaded CPU
    if not bool(torch.isfinite(a.sum())) and not bool(torch.isfinite(a).all()):
        raise C2MFError(
            f"class {class_name!r} has NaN or infinite activations in the store: the extraction went wrong "
            "(check the model in float32); re-extract before factorizing"
        )
    if nonnegative:
        lo = float(a.min()) if a.numel() else 0.0
        if lo < 0:
            raise C2MFError(
                f"class {class_name!r} has negative activations (min {lo:.4g}) but NMF needs A >= 0: this layer "
                f"is signed. {hint}".strip()
            )


def to_device(batch: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)


def source_summary(source: RowSource) -> dict[str, Any]:
    """What the dictionary records about the data it was fitted on."""
    return {
        "mode": source.mode,
        "n_features": int(source.n_features),
        "classes": list(source.classes),
        "n_rows": [int(source.n_rows(y)) for y in range(len(source.classes))],
        "info": _jsonable(source.info),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    return str(obj)
