"""ConceptDictionary: what `c2mf factorize` writes and `evaluate` / `explain` read.

Notation: A (n, c) activations of one class, W (k, c) the dictionary rows (concepts), U (n, k) codes.

A plain artifact: named float32 tensors plus JSON metadata, saved and loaded. What the tensors mean, and how
activations are encoded and decoded with them, belongs to the method that wrote them (`c2mf_cli.methods`:
each method declares its tensors and owns `encode` / `decode`); this module never imports the methods. Every
method writes W, (k, c) shared or (n_classes, k, c) one dictionary per class, whose rows are the concepts.

File format: one `.safetensors` file; the JSON metadata (method, every hyper-parameter, the source's
provenance, loss history, fit time, device, c2mf version, `encoding-type` "c2mf-dictionary" and
`encoding-version`) sits in the safetensors header under the key "c2mf". Written atomically (temporary name,
then os.replace). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from .._io import dumps, write_safetensors
from .. import __version__
from ..errors import C2MFError
from .provenance import Provenance

ENCODING_TYPE = "c2mf-dictionary"
# 2: the metadata holds `tensors_sha256`, checked on load. Version 1 files (no checksum) are refused: refit.
ENCODING_VERSION = 2
_META_KEY = "c2mf"


class ConceptDictionary:
    """A learned concept dictionary with its provenance.

    Args:
        tensors: see the module docstring; at least "W".
        meta: JSON-able metadata; must contain "method" (the registered method that owns encode / decode) and
            "classes".
        path: the file it was loaded from or saved to, named in messages; never saved (a copy elsewhere is the
            same dictionary).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path | None = None) -> None:
        if "W" not in tensors:
            raise C2MFError("a concept dictionary needs a tensor 'W'")
        self.tensors = {name: t.detach().to(torch.float32).contiguous() for name, t in tensors.items()}
        self.meta = dict(meta)
        self.meta.setdefault("encoding-type", ENCODING_TYPE)
        self.meta.setdefault("encoding-version", ENCODING_VERSION)
        self.meta.setdefault("c2mf_version", __version__)
        self.meta.setdefault("classes", [])
        self.device = self.tensors["W"].device
        self.path = path

    # ----- shape and identity -----
    @property
    def method(self) -> str:
        return str(self.meta.get("method", "?"))

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def per_class(self) -> bool:
        """One dictionary per class (W has a class axis). Whether codes need a class is the method's call."""
        return self.tensors["W"].ndim == 3

    @property
    def n_concepts(self) -> int:
        return int(self.tensors["W"].shape[-2])

    @property
    def n_features(self) -> int:
        return int(self.tensors["W"].shape[-1])

    @property
    def provenance(self) -> Provenance:
        """What produced the activations it was fitted on (the store's record, read back typed)."""
        return Provenance.read((self.meta.get("source") or {}).get("info"))

    def class_index(self, name: str) -> int:
        """Position of class `name` (the `y` every method takes)."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise C2MFError(f"class {name!r} is not in this dictionary; it has: {', '.join(self.classes)}") from None

    def to(self, device: str | torch.device) -> "ConceptDictionary":
        """The same dictionary with its tensors on `device`."""
        return ConceptDictionary({k: v.to(device) for k, v in self.tensors.items()}, self.meta, self.path)

    def check_compatible(self, store_info: dict[str, Any]) -> None:
        """Fail clearly if a store (its `describe_source()` dict) comes from another model, layer or width.

        What identifies the activations is the model's weights (`model.weights_sha256`), the layer and the channel
        count. The checkpoint path, the model's spelling, the store path, its mode (a CRAFT dictionary learnt on
        crops applies to whole images), grid and classes are not compared: the same weights copied elsewhere
        give the same activations. Without a weights hash on both sides the model name is compared instead.
        """
        mine, theirs = self.provenance.identity(), Provenance.read(store_info).identity()
        mine["channels"] = self.n_features
        for key in ("weights_sha256", "model", "layer", "channels"):
            if key == "model" and mine.get("weights_sha256") and theirs.get("weights_sha256"):
                continue  # the weights decide; the name may be spelt differently
            if mine.get(key) is not None and theirs.get(key) is not None and mine[key] != theirs[key]:
                what = {"weights_sha256": "model weights (sha256)", "model": "model", "layer": "layer",
                        "channels": "channels"}[key]
                extra = ""
                if key == "weights_sha256":
                    extra = f" (dictionary: {mine.get('model')!r}; store: {theirs.get('model')!r})"
                raise C2MFError(
                    f"dictionary and store do not match: the dictionary was fitted on {what} {mine[key]!r}, the "
                    f"store has {theirs[key]!r}{extra}; use a dictionary fitted on a store of the same model "
                    "weights and layer"
                )

    # ----- storage -----
    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file atomically (temporary file in the same folder, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        # The file's format is this c2mf's, whatever version a copied meta carried; its checksum is recomputed.
        self.meta["encoding-type"], self.meta["encoding-version"] = ENCODING_TYPE, ENCODING_VERSION
        self.meta["tensors_sha256"] = tensors_sha256(tensors)
        header = {_META_KEY: dumps(self.meta)}
        write_safetensors(path, tensors, header)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "ConceptDictionary":
        """Read a dictionary file, checking that it is one and that this c2mf can read its version."""
        path = Path(path)
        if not path.is_file():
            raise C2MFError(f"no dictionary file at {path}: give the --out path of `c2mf factorize`")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise C2MFError(f"{path} is not a readable c2mf dictionary (safetensors error: {e})") from None
        if _META_KEY not in header:
            raise C2MFError(f"{path} is a safetensors file but not a c2mf dictionary (no '{_META_KEY}' metadata)")
        try:
            meta = json.loads(header[_META_KEY])
        except json.JSONDecodeError as e:
            raise C2MFError(f"{path}: its metadata is not valid JSON ({e}); the file is damaged") from None
        if meta.get("encoding-type") != ENCODING_TYPE:
            raise C2MFError(f"{path} has encoding-type {meta.get('encoding-type')!r}, expected {ENCODING_TYPE!r}")
        version = meta.get("encoding-version")
        if not isinstance(version, int) or isinstance(version, bool) or version > ENCODING_VERSION:
            raise C2MFError(
                f"{path} has dictionary encoding-version {version!r}, this c2mf ({__version__}) reads up to "
                f"{ENCODING_VERSION}: upgrade c2mf or refit the dictionary"
            )
        if version < ENCODING_VERSION:
            raise C2MFError(f"{path} was written by an older c2mf ({meta.get('c2mf_version', '?')}, dictionary "
                            f"version {version}) without a checksum of its tensors: refit it with this c2mf")
        _check_tensors(path, tensors, meta)
        return cls(tensors, meta, path)

    def __repr__(self) -> str:
        kind = "per-class" if self.per_class else "shared"
        return (f"ConceptDictionary(method={self.method!r}, {kind}, k={self.n_concepts}, "
                f"c={self.n_features}, classes={len(self.classes)})")


def mismatch_message(d: "ConceptDictionary", label: str, store_info: Mapping[str, Any], width: int | None,
                     plural: bool = True) -> str:
    """One line naming both sides of a dictionary/store mismatch and the way out (evaluate and atlas use it)."""
    where = f" ({d.path})" if d.path else ""
    store_path = store_info.get("store")
    subject = ("the stores" if plural else "the store") + (f" ({store_path})" if store_path else "")
    return (f"dictionary {label!r}{where} was fitted on {d.provenance.describe(d.n_features)}; {subject} "
            f"{'hold' if plural else 'holds'} {Provenance.read(store_info).describe(width)}: give a dictionary "
            "fitted on a "
            "store of the same model weights and layer (or extract a store with the dictionary's model and layer)")


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (what `save` records)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Refuse a file whose tensors are not the ones saved (checksum), not float32, or not finite."""
    if tensors_sha256(tensors) != meta.get("tensors_sha256"):
        raise C2MFError(f"{path}: its tensors do not match the sha256 recorded in its metadata (the file was changed "
                        "or damaged after it was written): copy it again or refit it")
    if "W" not in tensors:
        raise C2MFError(f"{path} has no tensor 'W': it is not a complete c2mf dictionary; refit it")
    for name, t in sorted(tensors.items()):
        if t.dtype != torch.float32:
            raise C2MFError(f"{path}: tensor {name!r} is {str(t.dtype).replace('torch.', '')}, a dictionary holds "
                            "float32 only: the file was edited; refit it")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise C2MFError(f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s): the fit diverged or "
                            "the file was edited; refit it")
