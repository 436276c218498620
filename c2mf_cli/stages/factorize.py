"""Library entry point of `c2mf factorize`: learn a concept dictionary from a row source or a store.

    from c2mf_cli.stages.factorize import factorize
    d = factorize(source, "c2mf", concepts=10, device="auto")  # alpha="auto": see docs/methods.md
    d.save("dict.safetensors")

The CLI calls exactly these functions. Under torch.distributed (a process group started by the caller, or by
`c2mf_cli.distributed.start()` from torchrun's / srun's environment) every process calls them alike: each streams
its share of the rows and all hold the same dictionary; the caller saves it from rank 0 only
(`c2mf_cli.distributed.is_writer()`), as `c2mf factorize` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_device
from ..distributed import describe
from ..artifacts.dictionary import ConceptDictionary
from ..errors import C2MFError
from ..methods import get_method
from ..progress import ProgressFn, no_progress
from ..artifacts.sources import RowSource


def make_config(method: str, **options: Any) -> Any:
    """The frozen config of `method` from option values; unknown names are an error listing the valid ones."""
    return get_method(method).make_config(**options)


def factorize(
    source: RowSource,
    method: str,
    config: Any | None = None,
    *,
    device: str | torch.device = "auto",
    progress: ProgressFn = no_progress,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    **options: Any,
) -> ConceptDictionary:
    """Fit `method` on `source` and return its dictionary.

    Args:
        source: rows per class (an `ArraySource`, or `ActivationStore.open(path).row_source()`).
        method: a registered name (see `c2mf_cli.methods.list_methods()`).
        config: the method's config; built from `options` (checked by name) when None.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        progress: progress callback (see `c2mf_cli.progress`).
        checkpoint_path: where to checkpoint the fit atomically every `checkpoint_every` passes.
        resume: continue from `checkpoint_path` (same settings and data, or an error).
        **options: settings of the method's config when `config` is None (e.g. concepts=10, alpha=0.05).
    """
    m = get_method(method)
    if config is None:
        config = m.make_config(**options)
    elif options:
        raise C2MFError(f"give either a config or options, not both (got {', '.join(sorted(options))})")
    if not isinstance(config, m.config_class):
        raise C2MFError(f"config for method {method!r} must be a {m.config_class.__name__}, got {type(config).__name__}")
    dev = resolve_device(device)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    fitted_by = describe(dev)  # also the first collective: every process has joined before the data pass
    d = m.fit(source, config, device=dev, progress=progress, checkpoint_path=ckpt, resume=resume)
    d.meta["distributed"] = fitted_by
    return d


def open_store_source(path: str | Path, *, rows: str = "positions", group_by: str = "label") -> RowSource:
    """The row source of an activation store written by `c2mf extract`: one row per position (or per image,
    `rows="pooled"`), grouped by label (or by the model's prediction, `group_by="predicted"`)."""
    from ..artifacts.store import ActivationStore

    return ActivationStore.open(path).row_source(rows=rows, group_by=group_by)
