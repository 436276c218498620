"""`c2mf factorize`: learn a concept dictionary from an activation store."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

from ._console import Reporter, check_output_file, err, out, print_json
from ..errors import C2MFError, UsageError
from .options import (REQUIRED, check_input, complete_method, deprecated, deprecated_argument, method_names,
                      option, resolve)

def build_config(method: str, concepts: int, options: dict[str, Any]) -> Any:
    """The method's config from the options the user gave (None = not given); the methods check the rest."""
    from ..methods import config_from_options

    return config_from_options(method, concepts, options)


def factorize(
    store: Optional[Path] = option("store", help="Activation store written by `c2mf extract` (required)."),
    store_positional: Optional[Path] = deprecated_argument("STORE"),
    method: Optional[str] = option("method", help="Factorization method: c2mf, craft, pca, ... (the list: `c2mf methods`; required).",
                                   autocompletion=complete_method),
    method_short: Optional[str] = deprecated("-m", "METHOD"),
    concepts: int = option("concepts", default=REQUIRED),
    out_path: Path = option("out", default=REQUIRED, help="Dictionary file to write (.safetensors); an existing "
                            "file is replaced, atomically, once the fit has succeeded."),
    alpha: Optional[str] = typer.Option(
        None, "--alpha", metavar="auto|F", show_default="auto",
        help="c2mf: L1 weight on the gates, larger = fewer concepts per class: a number (relative squared error a "
        "concept must explain) or 'auto' (alpha-scale x the energy an average concept explains, E_k / k)."),
    alpha_scale: Optional[float] = typer.Option(None, "--alpha-scale", metavar="F", show_default="0.3",
                                                help="c2mf with --alpha auto: the multiple of E_k / k."),
    beta: Optional[float] = typer.Option(None, "--beta", metavar="F", show_default="0.1",
                                         help="c2mf: ridge on the codes."),
    iterations: Optional[int] = typer.Option(None, "--iterations", metavar="N", show_default="the method's",
                                             help="Passes over the data (max)."),
    batch_size: Optional[int] = option("batch_size", default=None, show_default="the method's",
                                       help="Rows per streamed batch."),
    full_batch: bool = typer.Option(False, "--full-batch", help="Load each class whole (small stores)."),
    tol: Optional[float] = typer.Option(None, "--tol", metavar="F", show_default="the method's",
                                        help="Stop when a pass improves the objective by less."),
    seed: Optional[int] = option("seed", default=None, show_default="0", help="Seed of the initial dictionary."),
    shared: Optional[bool] = typer.Option(None, "--shared/--per-class", show_default="the method's",
                                          help="pca, nmf, semi-nmf: one dictionary for all classes or one each."),
    shift: bool = typer.Option(False, "--shift", help="craft, nmf: fit on A - min(A) when the layer is signed."),
    device: str = option("device"),
    checkpoint_every: Optional[int] = typer.Option(
        None, "--checkpoint-every", metavar="N", help="Checkpoint to OUT.ckpt every N passes (kept until the fit "
        "ends)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted fit from OUT.ckpt."),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", metavar="S", show_default="600",  # distributed.DEFAULT_TIMEOUT_S, read when run
        help="Several processes (torchrun, srun): seconds one waits for the others before the run ends with an "
        "error."),
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
    if full_batch and batch_size is not None:
        raise UsageError("give --batch-size or --full-batch, not both")
    options = {"alpha": alpha, "alpha_scale": alpha_scale, "beta": beta, "iterations": iterations,
               "batch_size": batch_size, "tol": tol, "seed": seed, "shared": shared,
               "shift": True if shift else None, "checkpoint_every": checkpoint_every}
    config = build_config(name, concepts, options)
    if full_batch:
        if not any(f.name == "batch_size" for f in dataclasses.fields(config)):
            raise UsageError(f"--full-batch does not apply to --method {name}")
        config = dataclasses.replace(config, batch_size=None)
    check_input(store, "--store")
    check_output_file(out_path)
    replacing = out_path.is_file()
    ckpt = out_path.with_name(out_path.name + ".ckpt")
    use_ckpt = checkpoint_every is not None or resume
    if use_ckpt and not hasattr(config, "checkpoint_every"):
        raise UsageError(f"--method {name} fits in one pass: it has nothing to checkpoint or resume")
    from .. import distributed
    from ..stages.describe import describe_dictionary
    from ..stages.factorize import factorize as run_factorize, open_store_source

    source = open_store_source(store)
    rank_device = distributed.start(device, distributed.DEFAULT_TIMEOUT_S if timeout is None else timeout)
    try:
        writer = distributed.is_writer()
        reporter = Reporter(quiet=quiet or json_out or not writer)
        with reporter.session():
            d = run_factorize(source, name, config, device=rank_device or device, progress=reporter.task,
                              checkpoint_path=ckpt if use_ckpt else None, resume=resume)
    finally:
        distributed.stop()
    if not writer:
        return
    try:
        d.save(out_path)
    except OSError as e:
        raise C2MFError(f"cannot write --out {str(out_path)!r} ({e.strerror or e}): choose another path") from None
    if use_ckpt and ckpt.exists():
        ckpt.unlink()
    summary = describe_dictionary(out_path)
    if json_out:
        print_json(summary)
        return
    rel = summary["relative_error"]
    out.print(
        f"{name}: {summary['concepts']} concepts ({summary['dictionary']}), {summary['classes']} classes, "
        f"relative error {rel:.4f}, {summary['passes']} passes in {summary['fit_seconds']:.1f} s "
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
