"""What `c2mf info` prints: a summary of an activation store or of a concept dictionary, as plain dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import C2MFError


def describe_dictionary(path: str | Path) -> dict[str, Any]:
    """What the dictionary is, how it was made, and what each class uses."""
    from ..methods import concepts_used, gates, load_dictionary, method_of

    d = load_dictionary(path)
    gated = method_of(d).gated
    meta = d.meta
    source = meta.get("source", {})
    prov = d.provenance
    history = meta.get("history", [])
    last = [h["loss"][-1] for h in history if h.get("loss")]
    rel = [r["relative_error"] for r in last if "relative_error" in r]
    per_class = []
    for y, name in enumerate(d.classes):
        used = concepts_used(d, y)
        row: dict[str, Any] = {"name": name, "concepts_used": len(used), "concepts": used}
        g = gates(d, y)
        if g is not None:
            row["gates"] = [round(float(v), 4) for v in g]
        per_class.append(row)
    counts = [r["concepts_used"] for r in per_class]
    return {
        "path": str(path),
        "kind": "concept dictionary",
        "method": d.method,
        "concepts": d.n_concepts,
        "channels": d.n_features,
        "dictionary": "per class" if d.per_class else "shared",
        "gated": gated,
        "classes": len(d.classes),
        "concepts_used_per_class": (f"{min(counts)}-{max(counts)} (mean {sum(counts) / len(counts):.1f})"
                                    if counts else "-"),
        "relative_error": round(sum(rel) / len(rel), 5) if rel else None,
        # the passes of one fit (the longest, for per-class dictionaries): what --iterations bounds
        "passes": max((h.get("passes", 0) for h in history), default=0),
        "passes_total": sum(h.get("passes", 0) for h in history),
        "fits": len(history),
        # None where a method has no stopping tolerance (it runs its passes): nothing to say about convergence
        "converged": (None if not history or any(h.get("converged") is None for h in history)
                      else all(h["converged"] for h in history)),
        "fit_seconds": round(float(meta["fit_seconds"]), 2) if "fit_seconds" in meta else None,
        "device": meta.get("device"),
        "model": prov.model,
        "layer": prov.layer,
        "store_mode": source.get("mode"),
        "store_fingerprint": prov.fingerprint,
        "config": meta.get("config", {}),
        "alpha": (meta.get("alpha") or {}).get("alpha", meta.get("config", {}).get("alpha")) if gated else None,
        "c2mf_version": meta.get("c2mf_version"),
        "encoding": f"{meta.get('encoding-type')} v{meta.get('encoding-version')}",
        "per_class_concepts": per_class,
    }


def describe_store(path: str | Path, per_class: bool = False) -> dict[str, Any]:
    """Classes, counts, shapes, disk size, model, layer, mode, and the images that could not be read."""
    from ..artifacts.store import ActivationStore

    store = ActivationStore.open(path, require_complete=False)
    summary = store.summary()
    summary["failed_images"] = store.failures
    if per_class:
        summary["per_class"] = [
            {"name": n, "label": lab, "rows": store.n_images(y)}
            for y, (n, lab) in enumerate(zip(store.classes, store.class_indices))
        ]
    return summary


def describe(path: str | Path, per_class: bool = False) -> dict[str, Any]:
    """The summary of a store (a folder with zarr.json) or a dictionary file."""
    path = Path(path)
    if not path.exists():
        raise C2MFError(f"{str(path)!r} does not exist")
    if (path / "zarr.json").is_file():
        return describe_store(path, per_class)
    if path.is_dir():
        raise C2MFError(
            f"{str(path)!r} is a directory but not an activation store (no zarr.json): give a store made by "
            "`c2mf extract` or a dictionary file made by `c2mf factorize`"
        )
    return describe_dictionary(path)
