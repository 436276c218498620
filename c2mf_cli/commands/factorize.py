"""`c2mf factorize`: learn a concept dictionary from an activation store.

Besides its own options (store, method, k, output, device, checkpoints, output format), `c2mf factorize` takes
every option the registered methods declare in their config dataclasses (`methods.base.option`), generated
from the registry: a new method's options appear here with no edit. They are added to the command the first
time its parameters are read (parsing, --help, completion), from methods/options.json (the registry's options
written out, checked against it by a test) so that neither `c2mf --help` nor `c2mf factorize --help` imports the
methods and torch; a methods folder whose modules differ from the manifest's is read from the live registry.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pkgutil
from pathlib import Path
from typing import Any, Optional

import typer
import typer.main
from typer.core import TyperCommand

from ._console import Reporter, check_output_file, err, out, print_json
from .._io import DISK_ERRORS, remove_temporaries
from ..errors import C2MFError, UsageError
from .options import (REQUIRED, SPECS, check_input, complete_method, deprecated, deprecated_argument,
                      method_names, option, resolve)

_METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"
_META_KEY = "c2mf.method_options"  # where FactorizeCommand hands the method options' values to the callback


def method_option_specs() -> list[dict[str, Any]]:
    """The options the registered methods declare, as `methods.base.options_manifest` writes them.

    Read from methods/options.json while it names the folder's modules (cheap: no import); a module added or
    removed since makes it stale, and the live registry (torch) answers instead.
    """
    modules = sorted(i.name for i in pkgutil.iter_modules([str(_METHODS_DIR)]))
    manifest_path = _METHODS_DIR / "options.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is None or manifest.get("modules") != modules:
        from ..methods.base import options_manifest

        manifest = options_manifest()
    return manifest["options"]


def _method_params() -> list[Any]:
    """click options for `method_option_specs`, built by typer from a synthetic signature.

    Values stay raw (a string, or a bool for a flag) and None when not given: `config_from_options` parses them
    with the method's own types and names the option in every refusal. An option the shared table defines
    (`--batch-size/-b`, `--seed`) takes the table's flags and metavar.
    """
    specs = method_option_specs()
    every = {m for spec in specs for m in spec["defaults"]}
    params = []
    for spec in specs:
        table = SPECS.get(spec["name"])
        from_table = table is not None and table.flags[0] == spec["flag"]
        flag = spec["value_types"] == ["bool"]
        methods = list(spec["defaults"])
        scope = "" if set(methods) == every else f"{', '.join(methods)}: "
        info = typer.Option(None, *(table.flags if from_table else (spec["flag"],)), help=scope + spec["help"],
                            show_default=spec["default_text"],
                            metavar=None if flag else table.metavar if from_table else spec["metavar"])
        params.append(inspect.Parameter(spec["name"], inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=Optional[bool] if flag else Optional[str]))

    def declared(**values: Any) -> None:
        """Only its signature is read."""

    declared.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    declared.__annotations__ = {p.name: p.annotation for p in params}
    holder = typer.Typer(add_completion=False)
    holder.command()(declared)
    return list(typer.main.get_command(holder).params)


class FactorizeCommand(TyperCommand):
    """`c2mf factorize` with the registry's method options, added when its parameters are first read.

    `c2mf --help` only reads each command's short help, so it never builds them. Their values reach the
    callback in `ctx.meta`, not as arguments (the callback's signature holds its own options only).
    """

    @property  # type: ignore[override]
    def params(self) -> list[Any]:
        if not self._methods_added:
            self._methods_added = True
            self._own.extend(_method_params())
        return self._own

    @params.setter
    def params(self, value: list[Any]) -> None:
        self._own = value
        self._methods_added = False

    @property
    def declared_params(self) -> list[Any]:
        """The options the callback declares, without reading the registry."""
        return [p for p in self._own if p.name in _callback_names()]

    def invoke(self, ctx: Any) -> Any:
        own = _callback_names()
        ctx.meta[_META_KEY] = {k: ctx.params.pop(k) for k in list(ctx.params) if k not in own}
        return super().invoke(ctx)


def _callback_names() -> set[str]:
    return set(inspect.signature(factorize).parameters)


def _passes(summary: dict[str, Any]) -> str:
    """"40 passes", or for per-class fits "up to 40 passes per class (1,210 in all)": --iterations bounds each."""
    if summary.get("fits", 1) > 1:
        return f"up to {summary['passes']} passes per class ({summary['passes_total']:,} in all)"
    return f"{summary['passes']} passes"


def build_config(method: str, concepts: int, options: dict[str, Any]) -> Any:
    """The method's config from the options the user gave (None = not given); the methods check the rest."""
    from ..methods import config_from_options

    return config_from_options(method, concepts, options)


def factorize(
    ctx: typer.Context,
    store: Optional[Path] = option("store", help="Activation store written by `c2mf extract` (required)."),
    store_positional: Optional[Path] = deprecated_argument("STORE"),
    method: Optional[str] = option("method", help="Factorization method: c2mf, craft, pca, ... (the list: `c2mf methods`; required).",
                                   autocompletion=complete_method),
    method_short: Optional[str] = deprecated("-m", "METHOD"),
    concepts: int = option("concepts", default=REQUIRED),
    out_path: Path = option("out", default=REQUIRED, help="Dictionary file to write (.safetensors); an existing "
                            "file is replaced, atomically, once the fit has succeeded."),
    rows: str = option("rows"),
    group_by: str = option("group_by"),
    full_batch: bool = typer.Option(False, "--full-batch", help="Load each class whole (small stores)."),
    device: str = option("device"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted fit from OUT.ckpt."),
    timeout: Optional[float] = option("timeout", show_default="600"),  # distributed.DEFAULT_TIMEOUT_S, read when run
    json_out: bool = option("json", help="Print the dictionary's summary as JSON on stdout."),
    quiet: bool = option("quiet"),
) -> None:
    """Learn a concept dictionary from an activation store.

    Example: c2mf factorize -s train.zarr --method c2mf -k 10 -o c2mf.safetensors

    On several GPUs or nodes: torchrun --nproc-per-node 4 -m c2mf_cli.cli factorize ... (or srun); every
    process streams its share of the rows and rank 0 writes the dictionary (docs/scale.md).
    """
    store = resolve(store, store_positional, old_name="the positional STORE", new_name="--store/-s", required=True)
    name = resolve(method, method_short, old_name="-m", new_name="--method", required=True)
    known = method_names()  # checked here, not by click, so that `c2mf --help` does not import the methods
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown --method {name!r}: {hint}use one of {', '.join(known)} (see `c2mf methods`)")
    options: dict[str, Any] = ctx.meta[_META_KEY]  # the method options, None where not given
    if full_batch and options.get("batch_size") is not None:
        raise UsageError("give --batch-size or --full-batch, not both")
    config = build_config(name, concepts, options)
    if full_batch:
        if not any(f.name == "batch_size" for f in dataclasses.fields(config)):
            raise UsageError(f"--full-batch does not apply to --method {name}")
        config = dataclasses.replace(config, batch_size=None)
    check_input(store, "--store")
    check_output_file(out_path)
    replacing = out_path.is_file()
    ckpt = out_path.with_name(out_path.name + ".ckpt")
    use_ckpt = options.get("checkpoint_every") is not None or resume
    if use_ckpt and not hasattr(config, "checkpoint_every"):
        raise UsageError(f"--method {name} fits in one pass: it has nothing to checkpoint or resume")
    from .. import distributed
    from ..stages.describe import describe_dictionary
    from ..stages.factorize import factorize as run_factorize, open_store_source

    source = open_store_source(store, rows=rows.strip().lower(), group_by=group_by.strip().lower())
    rank_device = distributed.start(device, distributed.DEFAULT_TIMEOUT_S if timeout is None else timeout)
    try:
        writer = distributed.is_writer()
        reporter = Reporter(quiet=quiet or json_out or not writer)
        with reporter.session():
            try:
                d = run_factorize(source, name, config, device=rank_device or device, progress=reporter.task,
                                  checkpoint_path=ckpt if use_ckpt else None, resume=resume)
            except OSError as e:
                # during the fit only the checkpoint is written (through _io, so a full disk is an OSError)
                if not use_ckpt or e.errno not in DISK_ERRORS:
                    raise
                raise C2MFError(f"cannot write the checkpoint {str(ckpt)!r} ({e.strerror}): free space or choose "
                                "another --out; the last checkpoint written, if any, is kept (rerun with "
                                "--resume)") from None
    finally:
        distributed.stop()
    if not writer:
        return
    try:
        d.save(out_path)
    except OSError as e:
        keep = f"; the checkpoint {str(ckpt)!r} is kept (rerun with --resume)" if use_ckpt and ckpt.exists() else ""
        raise C2MFError(f"cannot write --out {str(out_path)!r} ({e.strerror or e}): free space or choose another "
                        f"path{keep}") from None
    if use_ckpt and ckpt.exists():
        ckpt.unlink()
    for published in (out_path, ckpt):  # what earlier runs killed mid-write left (this run's writes are done)
        remove_temporaries(published)
    summary = describe_dictionary(out_path)
    if json_out:
        print_json(summary)
        return
    rel = summary["relative_error"]
    out.print(
        f"{name}: {summary['concepts']} concepts ({summary['dictionary']}), {summary['classes']} classes, "
        f"relative error {rel:.4f}, {_passes(summary)} in {summary['fit_seconds']:.1f} s "
        f"on {summary['device']} -> {out_path}" if rel is not None else f"{name} -> {out_path}",
        markup=False, soft_wrap=True,
    )
    if replacing and not quiet:
        err.print(f"note: replaced the previous {out_path}", markup=False, soft_wrap=True)
    if summary["gated"]:
        a = summary.get("alpha")
        used = f" (alpha {a:.4g})" if isinstance(a, (int, float)) else ""
        out.print(f"concepts used per class: {summary['concepts_used_per_class']}{used}", markup=False)
    if summary["converged"] is False and not quiet:
        err.print("note: stopped at --iterations before reaching --tol; more passes may lower the error",
                  markup=False)
