"""Provenance: what produced a store's activations, as one typed, versioned record.

The store holds it (built from its extract configuration by `Provenance.from_store`), `ActivationStore.provenance`
returns it, a dictionary records its `to_dict()` (under `source.info` of its metadata) and reads it back with
`Provenance.read` (`ConceptDictionary.provenance`); explain, evaluate, atlas, sweep and info read provenance
through these functions only.

`read` is the one place that accepts the shapes older dictionaries recorded (a flat `describe_source()` dict
without `encoding-type`, or a store's whole attribute dict with its `config`); a field an old record lacks is None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..errors import C2MFError

ENCODING_TYPE = "c2mf-provenance"
ENCODING_VERSION = 2  # 2: labels (readable class labels from the class index)


@dataclass(frozen=True)
class Provenance:
    """What produced a store's activations. Any field may be None in a record written before it existed.

    Attributes:
        model: the model spec as given to extract (timm name or `path/file.py:factory`, path made absolute).
        checkpoint, pretrained: where its weights came from; weights_sha256: the weights actually loaded.
        layer: the layer the model was split at (stored once); layout ("nchw", "tokens", "vector"), grid,
            num_prefix_tokens and channels describe its output.
        preprocess: the eval preprocessing (`Preprocess.to_dict()`); mode: "full" or "crops"; crops: the crop spec.
        split: the data split extracted ("train", "test", "all"); files_sha256: digest of the image list.
        seed, c2mf_version: of the extract run. classes, class_indices: store classes and their model outputs;
            labels: each class's readable label from the class index (CUB's `model_label`), "" where it has none.
        store, fingerprint: where the store was and its fingerprint (the path is not part of its identity).
        rows, group_by, left_out: how a dictionary's rows were drawn from the store when not one per position
            grouped by label (`artifacts/rows.py`: "pooled" rows, grouped by the "predicted" class, images left out);
            None in a store's own record.
    """

    model: str | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    weights_sha256: str | None = None
    layer: str | None = None
    layout: str | None = None
    grid: tuple[int, int] | None = None
    num_prefix_tokens: int = 0
    channels: int | None = None
    preprocess: dict[str, Any] | None = None
    mode: str | None = None
    crops: dict[str, Any] | None = None
    split: str | None = None
    files_sha256: str | None = None
    seed: int | None = None
    c2mf_version: str | None = None
    classes: tuple[str, ...] = ()
    class_indices: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()
    store: str | None = None
    fingerprint: str | None = None
    rows: str | None = None
    group_by: str | None = None
    left_out: int | None = None

    # ----- writing and reading
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid) if self.grid is not None else None
        d["classes"], d["class_indices"], d["labels"] = list(self.classes), list(self.class_indices), list(self.labels)
        return {"encoding-type": ENCODING_TYPE, "encoding-version": ENCODING_VERSION, **d}

    @classmethod
    def from_store(cls, attrs: Mapping[str, Any], path: str | None = None) -> "Provenance":
        """The record of a store, from its root attributes (the extract configuration and the class list)."""
        cfg = attrs["config"]
        split_info = cfg.get("split_info") or {}
        model = cfg.get("model") or {}
        shape = attrs.get("row_shape") or []
        names = tuple(str(c["name"]) for c in attrs.get("classes", []))
        readable = (cfg.get("data") or {}).get("labels") or {}
        return cls(
            model=model.get("name"), checkpoint=model.get("checkpoint"), pretrained=bool(model.get("pretrained")),
            weights_sha256=model.get("weights_sha256"), layer=cfg.get("layer"), layout=split_info.get("layout"),
            grid=_grid(split_info.get("grid")), num_prefix_tokens=int(split_info.get("num_prefix_tokens") or 0),
            channels=int(shape[-1]) if shape else _int(split_info.get("channels")),
            preprocess=cfg.get("preprocess"), mode=cfg.get("mode"), crops=cfg.get("crops"),
            split=(cfg.get("data") or {}).get("split"), files_sha256=cfg.get("files_sha256"), seed=cfg.get("seed"),
            c2mf_version=cfg.get("c2mf_version"), classes=names,
            class_indices=tuple(int(c["label"]) for c in attrs.get("classes", [])),
            labels=tuple(str(readable.get(n, "")) for n in names) if readable else (), store=path,
            fingerprint=attrs.get("fingerprint"),
        )

    @classmethod
    def read(cls, info: Mapping[str, Any] | None) -> "Provenance":
        """The record a dictionary holds (its `meta["source"]["info"]`), whichever shape it was written in."""
        info = dict(info or {})
        kind = info.get("encoding-type")
        if kind == ENCODING_TYPE:
            version = info.get("encoding-version")
            if not isinstance(version, int) or version > ENCODING_VERSION:
                raise C2MFError(f"the provenance record has version {version!r}, this c2mf reads up to "
                                f"{ENCODING_VERSION}: upgrade c2mf")
            fields = {k: v for k, v in info.items() if k not in ("encoding-type", "encoding-version")}
            unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
            if unknown:
                raise C2MFError(f"the provenance record has unknown fields {unknown}: it was edited or comes from "
                                "another program")
            fields["grid"] = _grid(fields.get("grid"))
            fields["classes"] = tuple(fields.get("classes") or ())
            fields["class_indices"] = tuple(int(i) for i in fields.get("class_indices") or ())
            fields["labels"] = tuple(str(x) for x in fields.get("labels") or ())
            return cls(**fields)
        if kind is not None:
            raise C2MFError(f"a provenance record of type {kind!r}, expected {ENCODING_TYPE!r}")
        # older shapes: a store's attributes ({"config": ..., "classes": [{"name", "label"}]}) ...
        if isinstance(info.get("config"), Mapping):
            return cls.from_store(info, info.get("store"))
        # ... or the flat describe_source() of c2mf before this record
        model = info.get("model")
        model = model if isinstance(model, Mapping) else {"name": model}
        classes = list(info.get("classes") or [])
        if classes and isinstance(classes[0], Mapping):
            names, indices = [str(c["name"]) for c in classes], [int(c["label"]) for c in classes]
        else:
            names = [str(c) for c in classes]
            indices = [int(i) for i in info.get("class_indices") or range(len(names))]
        shape = info.get("row_shape") or []
        return cls(
            model=model.get("name"), checkpoint=model.get("checkpoint"), pretrained=bool(model.get("pretrained")),
            weights_sha256=model.get("weights_sha256") or info.get("weights_sha256"), layer=info.get("layer"),
            layout=info.get("layout"), grid=_grid(info.get("grid")),
            num_prefix_tokens=int(info.get("num_prefix_tokens") or 0),
            channels=_int(info.get("n_features", info.get("channels", shape[-1] if shape else None))),
            preprocess=info.get("preprocess"), mode=info.get("mode"), classes=tuple(names),
            class_indices=tuple(indices), store=info.get("store"), fingerprint=info.get("fingerprint"),
        )

    def readable(self) -> dict[int, str]:
        """Model output index -> the readable name of each store class (its class-index label, else its name)."""
        labels = self.labels or ("",) * len(self.classes)
        return {i: (lab or name) for i, name, lab in zip(self.class_indices, self.classes, labels)}

    def model_record(self) -> dict[str, Any]:
        """The model as `inputs.models.recorded.reopen_recorded` takes it (name, checkpoint, pretrained, sha256)."""
        return {"name": self.model, "checkpoint": self.checkpoint, "pretrained": self.pretrained,
                "weights_sha256": self.weights_sha256}

    # ----- what identifies the activations
    def identity(self) -> dict[str, Any]:
        """Weights hash, model name, layer and channels: what two sets of activations must share to be comparable."""
        return {"weights_sha256": self.weights_sha256, "model": self.model, "layer": self.layer,
                "channels": self.channels}

    def describe(self, channels: int | None = None) -> str:
        """'model (weights abcdef123456) at layer 'L' (C channels)'."""
        text = str(self.model or "an unrecorded model")
        if self.weights_sha256:
            text += f" (weights {self.weights_sha256[:12]})"
        text += f" at layer {self.layer!r}"
        ch = channels if channels is not None else self.channels
        return text + (f" ({ch} channels)" if ch is not None else "")


def _grid(g: Any) -> tuple[int, int] | None:
    return (int(g[0]), int(g[1])) if isinstance(g, (list, tuple)) and len(g) == 2 else None


def _int(v: Any) -> int | None:
    return int(v) if v is not None else None
