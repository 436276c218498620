"""The contract every factorization method follows, the registry that names them, and the one entry callers use.

Notation: for class y, A(y) (n_y, c) rows from a `RowSource`; W (k, c) dictionary; U (n, k) codes.

A method is a class registered under a name with `@register_method`. It declares what it learns from
(`needs`: "full" whole-image positions or "crops"), whether its dictionary is signed, whether it needs A >= 0,
the tensors its dictionaries hold (`tensor_shapes`), and a frozen config dataclass whose fields (with their
`metadata`: flag, help) are its command-line options. It owns the three operations on its dictionaries:
`fit(source, config, ...)` returns a `ConceptDictionary`; `encode(d, A, y)` gives codes, `decode(d, U, y)` the
reconstruction. Callers never branch on the method: they call `encode(d, A, y)` / `decode(d, U, y)` /
`needs_class(d)` / `gates(d, y)` of this module, which find the method by the dictionary's recorded name.
`--method` choices, `c2mf methods` and the test matrix all come from this registry.
"""

from __future__ import annotations

import dataclasses
import math
import pkgutil
import types
import typing
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..artifacts.dictionary import ConceptDictionary
from ..errors import C2MFError, UsageError
from ..progress import ProgressFn, no_progress
from ..artifacts.sources import Mode, RowSource

Array = np.ndarray | torch.Tensor

_REGISTRY: dict[str, type["Method"]] = {}


class Method(ABC):
    """One factorization method. Subclasses set the class attributes and implement `fit` and `encode`.

    `tensor_shapes` declares the tensors a dictionary of this method holds: name -> the shapes it may have,
    written in the symbols m (classes), k (concepts), c (channels); "" is a scalar. Names in
    `optional_tensors` may be absent. `check_dictionary` refuses any other tensor or shape.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs: ClassVar[Mode]
    signed_dictionary: ClassVar[bool]
    requires_nonnegative_input: ClassVar[bool]
    config_class: ClassVar[type]
    tensor_shapes: ClassVar[dict[str, tuple[str, ...]]]
    optional_tensors: ClassVar[frozenset[str]] = frozenset()
    signed_codes: ClassVar[bool] = False  # codes may be negative (PCA projections); otherwise U >= 0
    gated: ClassVar[bool] = False  # per-class gates decide which concepts a class uses
    supports_overcomplete: ClassVar[bool] = False  # may learn more concepts than the layer has channels
    batch_invariant: ClassVar[bool] = True  # the fit does not depend on how rows are batched (streaming == full)
    supports_distributed: ClassVar[bool] = True  # fits under torch.distributed give the one-process dictionary

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

    @abstractmethod
    def encode(self, d: ConceptDictionary, A: torch.Tensor, y: int | None, *, iters: int) -> torch.Tensor:
        """Codes (n, k) of float32 rows A (n, c) on d's device for class y (None where `needs_class` is False).

        `iters` bounds an iterative code solver (NNLS); closed-form encoders ignore it.
        """

    def decode(self, d: ConceptDictionary, U: torch.Tensor, y: int | None) -> torch.Tensor:
        """Reconstruction (n, c) of codes U (n, k): U times the basis of class y (differentiable in U)."""
        return U @ self.basis(d, y)

    def basis(self, d: ConceptDictionary, y: int | None) -> torch.Tensor:
        """The (k, c) dictionary class y is coded on: W, or W[y] for a per-class dictionary."""
        W = d.tensors["W"]
        return W[y] if W.ndim == 3 else W

    def needs_class(self, d: ConceptDictionary) -> bool:
        """Whether encode / decode of this dictionary depend on the class (the one place that decides it)."""
        return d.tensors["W"].ndim == 3

    def gates(self, d: ConceptDictionary, y: int) -> torch.Tensor | None:
        """sigma(lambda_y) (k,) for a gated method; None for the others (every concept open to every class)."""
        return None

    def class_free(self, d: ConceptDictionary) -> ConceptDictionary | None:
        """The dictionary that codes any row without a class (every concept open), or None where the method's
        dictionaries are per class. Default: `d` itself when it needs no class."""
        return None if self.needs_class(d) else d

    def make_config(self, **options: Any) -> Any:
        """Build this method's config from option values, refusing names the method does not take."""
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise UsageError(
                f"method {self.name!r} does not take {', '.join(unknown)}; its settings are: {', '.join(sorted(fields))}"
            )
        return self.config_class(**options)


# ----- options: a config field with help is a `c2mf factorize` option -----
def option(default: Any, *, help: str, flag: str | None = None, metavar: str | None = None,
           shown: str | None = None) -> Any:
    """A config field that `c2mf factorize` offers as an option (`--field-name` unless `flag` says otherwise).

    A bool field becomes `--name/--no-name` (or the `flag` given, e.g. "--shared/--per-class"). `shown` is the
    default as --help says it, where the value itself would not tell (e.g. None meaning "from k"). Fields declared
    without `option` are settings for the library only.
    """
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar,
                                                        "shown": shown})


@dataclasses.dataclass(frozen=True)
class MethodOption:
    """One `c2mf factorize` option, gathered from the config fields of every method that takes it.

    Attributes:
        name: the config field.
        flag: "--alpha", or "--shared/--per-class" for a bool.
        help: the first method's help text (methods sharing a field share its meaning).
        value_types: the types a value may take, tried in order (e.g. (float, str) for alpha: a number or "auto");
            (bool,) for a flag.
        metavar: what the value looks like in --help.
        defaults: method name -> that method's default.
        shown: method name -> how --help shows that default, where the value would not tell.
    """

    name: str
    flag: str
    help: str
    value_types: tuple[type, ...]
    metavar: str | None
    defaults: dict[str, Any]
    shown: dict[str, str]  # method name -> its default as --help says it, where given

    @property
    def is_flag(self) -> bool:
        return self.value_types == (bool,)

    def default_text(self) -> str:
        """The defaults per method, for --help: "0.1" or "100 (c2mf), 200 (craft, nmf)"."""
        by_value: dict[str, list[str]] = {}
        for method, value in self.defaults.items():
            by_value.setdefault(self.shown.get(method) or str(value), []).append(method)
        if len(by_value) == 1:
            return next(iter(by_value))
        return ", ".join(f"{v} ({', '.join(ms)})" for v, ms in by_value.items())

    def parse(self, value: Any) -> Any:
        """A command-line value as the config takes it: the first of `value_types` that reads it."""
        if not isinstance(value, str) or str in self.value_types and len(self.value_types) == 1:
            out = value
        else:
            for kind in self.value_types:
                try:
                    out = kind(value)
                    break
                except ValueError:
                    continue
            else:
                names = " or ".join(t.__name__ for t in self.value_types)
                raise UsageError(f"{self.flag} must be {names}, got {value!r}")
        # nan fails the methods' own range checks, but inf passes them and fits a degenerate dictionary
        if isinstance(out, float) and not math.isfinite(out):
            raise UsageError(f"{self.flag} must be a finite number, got {value}")
        return out


def _value_types(hint: Any) -> tuple[type, ...]:
    """(float, str) for `float | str`, (int,) for `int | None`: the types a command-line value may take."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    kinds = tuple(a for a in args if a is not type(None))
    if not kinds or not all(k in (bool, int, float, str) for k in kinds):
        raise TypeError(f"an option must be bool, int, float or str (or a union of them), got {hint!r}")
    return tuple(sorted(kinds, key=lambda k: (k is str,)))  # numbers first: "0.5" is a float before a str


def method_options() -> list[MethodOption]:
    """Every option the registered methods' configs declare, one entry per field name, in first-seen order.

    Methods that share a field name must agree on its flag and type (a ValueError otherwise: one flag, one
    meaning).
    """
    found: dict[str, MethodOption] = {}
    for name, cls in _REGISTRY.items():
        hints = typing.get_type_hints(cls.config_class)
        for f in dataclasses.fields(cls.config_class):
            if "help" not in f.metadata:
                continue
            kinds = _value_types(hints[f.name])
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            if kinds == (bool,) and "/" not in flag:
                flag = f"{flag}/--no-{flag[2:]}"
            default = None if f.default is dataclasses.MISSING else f.default
            seen = found.get(f.name)
            shown = {name: f.metadata["shown"]} if f.metadata.get("shown") else {}
            if seen is None:
                found[f.name] = MethodOption(f.name, flag, f.metadata["help"], kinds, f.metadata.get("metavar"),
                                             {name: default}, shown)
            elif (seen.flag, seen.value_types) != (flag, kinds):
                raise ValueError(f"option {f.name!r}: method {name!r} declares {flag} {kinds}, another "
                                 f"{seen.flag} {seen.value_types}: one flag must keep one meaning")
            else:
                seen.defaults[name] = default
                seen.shown.update(shown)
    return list(found.values())


def config_from_options(method: str, concepts: int, given: dict[str, Any]) -> Any:
    """The config of `method` from command-line values (field name -> raw value; None = not given).

    An option the method does not take is a UsageError naming the ones it does.
    """
    m = get_method(method)
    options = {o.name: o for o in method_options()}
    fields = {f.name for f in dataclasses.fields(m.config_class)}
    values = {}
    for name, raw in given.items():
        if raw is None:
            continue
        opt = options.get(name)
        if opt is None:
            raise UsageError(f"unknown option {name!r} for --method {method}")
        if name not in fields:
            takes = ", ".join(o.flag for o in options.values() if o.name in fields) or "only --concepts"
            raise UsageError(f"{opt.flag} does not apply to --method {method} (it takes {takes}); "
                             f"{opt.flag} is an option of {', '.join(opt.defaults)}")
        values[name] = opt.parse(raw)
    return m.make_config(concepts=concepts, **values)


# The registry's options as JSON, kept beside this file so that `c2mf factorize --help` can list them without
# importing the methods (and torch, ~3 s); tests/test_cli_options.py checks it against the live registry.
OPTIONS_MANIFEST = Path(__file__).with_name("options.json")


def options_manifest() -> dict[str, Any]:
    """The method modules and every option they declare (`method_options`), as plain JSON."""
    return {
        "methods": list_methods(),
        # every module of the folder: a file added or removed since makes the manifest stale
        "modules": sorted(i.name for i in pkgutil.iter_modules([str(OPTIONS_MANIFEST.parent)])),
        "options": [
            {"name": o.name, "flag": o.flag, "help": o.help, "value_types": [t.__name__ for t in o.value_types],
             "metavar": o.metavar, "defaults": o.defaults, "shown": o.shown, "default_text": o.default_text()}
            for o in method_options()
        ],
    }


def write_options_manifest() -> Path:
    """Rewrite `OPTIONS_MANIFEST` from the live registry (after adding a method or changing an option)."""
    from .._io import write_json

    return write_json(OPTIONS_MANIFEST, options_manifest())


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


def overcomplete_methods() -> list[str]:
    """Registered methods that may learn more concepts than channels."""
    return [name for name, cls in _REGISTRY.items() if cls.supports_overcomplete]


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
                "overcomplete": cls.supports_overcomplete,
                "settings": [f.name for f in dataclasses.fields(cls.config_class)],
                "options": [o.flag for o in method_options() if name in o.defaults],
            }
        )
    return rows


# ----- the one entry callers use on a dictionary -----
def method_of(d: ConceptDictionary) -> Method:
    """The registered method that made `d` (and owns its encode / decode)."""
    cls = _REGISTRY.get(d.method)
    if cls is None:
        raise C2MFError(f"this dictionary was made by method {d.method!r}, which this c2mf does not know (it knows "
                        f"{', '.join(_REGISTRY)}): upgrade c2mf or refit the dictionary")
    return cls()


def needs_class(d: ConceptDictionary) -> bool:
    """Whether `d` codes each class differently (gates, per-class dictionaries or means): y is then required."""
    return method_of(d).needs_class(d)


def _class_arg(d: ConceptDictionary, y: int | None, method: Method) -> int | None:
    if y is None:
        if method.needs_class(d):
            raise C2MFError(f"this {d.method} dictionary codes each class differently: give the class index y")
        return None
    if not 0 <= int(y) < len(d.classes):
        raise C2MFError(f"class index {y} out of range: the dictionary has {len(d.classes)} classes")
    return int(y)


def _to_tensor(x: Array, device: torch.device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    return x.to(device=device, dtype=torch.float32)


def _like(result: torch.Tensor, template: Array) -> Array:
    """numpy for numpy input; a tensor (on the dictionary's device) for tensor input."""
    return result.detach().cpu().numpy() if isinstance(template, np.ndarray) else result


CODE_RULES = ("fit", "nnls", "lstsq")
"""How codes are solved at encoding: `fit`, the rule the dictionary was fitted with (ridge NNLS for c2mf, NNLS
for NMF / CRAFT / semi-NMF, the projection for PCA, the encoder for an SAE); `nnls`, non-negative least squares
without a ridge; `lstsq`, unconstrained (signed) least squares, minimum-norm for an overcomplete dictionary.
The other two solve against the same decoder, `decode(U) = U B_y + offset_y`, so reconstruction and importance
read them alike."""


def encode(d: ConceptDictionary, A: Array, y: int | None = None, *, iters: int = 100, codes: str = "fit") -> Array:
    """Codes (n, k) of activations A (n, c) for class y, by the method that made `d` (numpy in, numpy out).

    `codes` picks the code rule (`CODE_RULES`): the fit's own by default.
    """
    if codes not in CODE_RULES:
        raise UsageError(f"unknown code rule {codes!r}: use one of {', '.join(CODE_RULES)}")
    m = method_of(d)
    y = _class_arg(d, y, m)
    a = _to_tensor(A, d.device)
    if a.ndim != 2 or a.shape[1] != d.n_features:
        raise C2MFError(f"activations of shape {tuple(a.shape)} do not match the dictionary's "
                        f"{d.n_features} channels: expected (n, {d.n_features})")
    if codes == "fit":
        return _like(m.encode(d, a, y, iters=iters), A)
    return _like(_solve_codes(m, d, a, y, codes, iters), A)


def _solve_codes(m: Method, d: ConceptDictionary, a: torch.Tensor, y: int | None, rule: str,
                 iters: int) -> torch.Tensor:
    """Codes by `rule` against the method's decoder: decode(U) = U B_y + offset_y, offset_y = decode(0)."""
    from .solvers.nnls import nnls

    B = m.basis(d, y)
    offset = m.decode(d, torch.zeros(1, B.shape[0], device=a.device, dtype=a.dtype), y)
    r = a - offset
    if rule == "nnls":
        return nnls(r, B, ridge=0.0, iters=iters)
    return r @ torch.linalg.pinv(B)  # (c, k): the least-squares codes, minimum-norm when k > c


def decode(d: ConceptDictionary, U: Array, y: int | None = None) -> Array:
    """Reconstruction (n, c) of codes U (n, k) for class y, by the method that made `d`."""
    m = method_of(d)
    y = _class_arg(d, y, m)
    u = _to_tensor(U, d.device)
    if u.ndim != 2 or u.shape[1] != d.n_concepts:
        raise C2MFError(f"codes of shape {tuple(u.shape)} do not match the dictionary's {d.n_concepts} concepts")
    return _like(m.decode(d, u, y), U)


def basis(d: ConceptDictionary, y: int | None = None) -> torch.Tensor:
    """The (k, c) dictionary class y is coded on (for c2mf diag(sigma(lambda_y)) W*)."""
    m = method_of(d)
    return m.basis(d, _class_arg(d, y, m))


def gates(d: ConceptDictionary, y: int) -> torch.Tensor | None:
    """How much class y uses each concept, (k,) in (0, 1), for a gated method; None otherwise."""
    m = method_of(d)
    return m.gates(d, _class_arg(d, y, m))  # type: ignore[arg-type]


def class_free(d: ConceptDictionary) -> ConceptDictionary | None:
    """`d` without its class dependence (c2mf without gates), or None for per-class dictionaries."""
    return method_of(d).class_free(d)


def concepts_used(d: ConceptDictionary, y: int, threshold: float = 0.5) -> list[int]:
    """Concepts class y uses: those whose gate exceeds `threshold`; every concept for ungated methods."""
    g = gates(d, y)
    if g is None:
        return list(range(d.n_concepts))
    return [int(j) for j in torch.nonzero(g > threshold).flatten().tolist()]


def load_dictionary(path: str | Path, device: str | torch.device = "cpu") -> ConceptDictionary:
    """Read a dictionary file as every reader must: the file's own checks (`ConceptDictionary.load`: format,
    version, tensors' sha256, float32, finite), then its method's contract (`check_dictionary`: a known method,
    the tensors it declares with their shapes, the class list). An edited file is refused here, by name, before
    any number is computed from it."""
    d = ConceptDictionary.load(path, device)
    try:
        check_dictionary(d)
    except C2MFError as e:
        raise C2MFError(f"{path}: {e}") from None
    return d


def check_dictionary(d: ConceptDictionary) -> None:
    """Refuse a dictionary whose tensors are not the ones its method declares (names and shapes), or whose class
    list differs from the one its source recorded (the checksum covers the tensors, not the metadata)."""
    m = method_of(d)
    recorded = (d.meta.get("source") or {}).get("classes")
    if recorded is not None and list(recorded) != d.classes:
        raise C2MFError(f"{d.method} dictionary: its class list ({len(d.classes)} classes) differs from the "
                        f"{len(recorded)} classes of the store it was fitted on: the metadata was edited; refit it")
    W = d.tensors["W"]
    if W.ndim not in (2, 3):
        raise C2MFError(f"{d.method} dictionary: W has shape {tuple(W.shape)}, expected (k, c) or (classes, k, c)")
    sizes = {"m": len(d.classes), "k": int(W.shape[-2]), "c": int(W.shape[-1])}
    extra = sorted(set(d.tensors) - set(m.tensor_shapes))
    if extra:
        raise C2MFError(f"{d.method} dictionary holds tensors its method does not declare: {', '.join(extra)}")
    for name, shapes in m.tensor_shapes.items():
        t = d.tensors.get(name)
        if t is None:
            if name in m.optional_tensors:
                continue
            raise C2MFError(f"{d.method} dictionary lacks its tensor {name!r}: the file is incomplete; refit it")
        allowed = [tuple(sizes[s] for s in shape.split()) for shape in shapes]
        if tuple(t.shape) not in allowed:
            want = " or ".join(f"({', '.join(shape.split())})" for shape in shapes)
            raise C2MFError(f"{d.method} dictionary: tensor {name!r} has shape {tuple(t.shape)}, expected {want} "
                            f"with m={sizes['m']} classes, k={sizes['k']}, c={sizes['c']}")


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
    if k > source.n_features and not method.supports_overcomplete:
        raise UsageError(
            f"--concepts {k} is larger than the {source.n_features} channels of the layer: use k <= {source.n_features} "
            f"(or a method that learns overcomplete dictionaries: {', '.join(overcomplete_methods()) or 'none'})"
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
