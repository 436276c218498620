"""`c2mf factorize` (learn a concept dictionary from a store) and `c2mf methods` (list the methods)."""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from ._console import Reporter, check_output_file, err, out, print_json
from ..distributed import DEFAULT_TIMEOUT_S
from ..errors import C2MFError, UsageError

# `--method` choices come from the registry
from ..methods import get_method, list_methods, method_table

MethodName = Enum("MethodName", {name: name for name in list_methods()}, type=str)  # type: ignore[misc]

# option flag -> config field
_FLAGS = {
    "alpha": "--alpha",
    "alpha_scale": "--alpha-scale",
    "beta": "--beta",
    "iterations": "--iterations",
    "batch_size": "--batch-size",
    "tol": "--tol",
    "seed": "--seed",
    "shared": "--shared/--per-class",
    "shift": "--shift",
    "checkpoint_every": "--checkpoint-every",
}


def build_config(method: str, concepts: int, options: dict[str, Any]) -> Any:
    """The method's config from the options the user gave; an option the method does not take is an error."""
    m = get_method(method)
    fields = {f.name for f in dataclasses.fields(m.config_class)}
    given = {k: v for k, v in options.items() if v is not None}
    for name in given:
        if name not in fields:
            takes = ", ".join(_FLAGS[f] for f in _FLAGS if f in fields) or "only --concepts"
            raise UsageError(f"{_FLAGS[name]} does not apply to --method {method} (it takes {takes})")
    if isinstance(given.get("alpha"), str) and given["alpha"] != "auto":
        try:
            given["alpha"] = float(given["alpha"])
        except ValueError:
            raise UsageError(f"--alpha must be 'auto' or a number, got {given['alpha']!r}") from None
    for name, value in given.items():
        # nan fails the methods' own range checks, but inf passes them and fits an empty (or degenerate) dictionary
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{_FLAGS[name]} must be a finite number, got {value}")
    return m.make_config(concepts=concepts, **given)


def describe_dictionary(path: str | Path) -> dict[str, Any]:
    """The summary `c2mf info DICT` prints: what the dictionary is, how it was made, what each class uses."""
    from ..artifacts.dictionary import ConceptDictionary

    d = ConceptDictionary.load(path)
    meta = d.meta
    source = meta.get("source", {})
    info = source.get("info", {})
    history = meta.get("history", [])
    last = [h["loss"][-1] for h in history if h.get("loss")]
    rel = [r["relative_error"] for r in last if "relative_error" in r]
    per_class = []
    for y, name in enumerate(d.classes):
        used = d.concepts_used(y)
        row: dict[str, Any] = {"name": name, "concepts_used": len(used), "concepts": used}
        if d.has_gates:
            row["gates"] = [round(float(g), 4) for g in d.gates(y)]
        per_class.append(row)
    counts = [r["concepts_used"] for r in per_class]
    model = info.get("model")
    return {
        "path": str(path),
        "kind": "concept dictionary",
        "method": d.method,
        "concepts": d.n_concepts,
        "channels": d.n_features,
        "dictionary": "per class" if d.per_class else "shared",
        "gated": d.has_gates,
        "classes": len(d.classes),
        "concepts_used_per_class": (f"{min(counts)}-{max(counts)} (mean {sum(counts) / len(counts):.1f})"
                                    if counts else "-"),
        "relative_error": round(sum(rel) / len(rel), 5) if rel else None,
        "passes": sum(h.get("passes", 0) for h in history),
        "converged": all(h.get("converged", False) for h in history) if history else None,
        "fit_seconds": round(float(meta["fit_seconds"]), 2) if "fit_seconds" in meta else None,
        "device": meta.get("device"),
        "model": model.get("name") if isinstance(model, dict) else model,
        "layer": info.get("layer"),
        "store_mode": source.get("mode"),
        "store_fingerprint": info.get("fingerprint"),
        "config": meta.get("config", {}),
        "alpha": (meta.get("alpha") or {}).get("alpha", meta.get("config", {}).get("alpha")) if d.has_gates else None,
        "c2mf_version": meta.get("c2mf_version"),
        "encoding": f"{meta.get('encoding-type')} v{meta.get('encoding-version')}",
        "per_class_concepts": per_class,
    }


def register(app: typer.Typer) -> None:
    @app.command("factorize")
    def factorize_cmd(
        store: Path = typer.Argument(..., help="Activation store written by `c2mf extract`."),
        method: MethodName = typer.Option(..., "--method", "-m", help="Factorization method (see `c2mf methods`)."),
        concepts: int = typer.Option(..., "--concepts", "-k", help="Number of concepts k."),
        out_path: Path = typer.Option(
            ..., "--out", "-o", help="Dictionary file to write (.safetensors); an existing file is replaced, "
            "atomically, once the fit has succeeded."),
        alpha: Optional[str] = typer.Option(
            None, "--alpha", help="c2mf: L1 weight on the gates, larger = fewer concepts per class: a number (relative "
            "squared error a concept must explain) or 'auto' (default: alpha-scale x the energy an average concept "
            "explains, E_k / k)."),
        alpha_scale: Optional[float] = typer.Option(
            None, "--alpha-scale", help="c2mf with --alpha auto: the multiple of E_k / k (default 0.3)."),
        beta: Optional[float] = typer.Option(None, "--beta", help="c2mf: ridge on the codes (default 0.1)."),
        iterations: Optional[int] = typer.Option(None, "--iterations", help="Passes over the data (max)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per streamed batch."),
        full_batch: bool = typer.Option(False, "--full-batch", help="Load each class whole (small stores)."),
        tol: Optional[float] = typer.Option(None, "--tol", help="Stop when a pass improves the objective by less."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the initial dictionary."),
        shared: Optional[bool] = typer.Option(None, "--shared/--per-class",
                                              help="pca, nmf, semi-nmf: one dictionary for all classes or one each."),
        shift: bool = typer.Option(False, "--shift", help="craft, nmf: fit on A - min(A) when the layer is signed."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
        checkpoint_every: Optional[int] = typer.Option(
            None, "--checkpoint-every", help="Checkpoint to OUT.ckpt every N passes (kept until the fit ends)."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted fit from OUT.ckpt."),
        timeout: float = typer.Option(
            DEFAULT_TIMEOUT_S, "--timeout", help="Several processes (torchrun, srun): seconds one waits for the "
            "others before the run ends with an error."),
        json_out: bool = typer.Option(False, "--json", help="Print the dictionary's summary as JSON on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Learn a concept dictionary from an activation store.

        Example: c2mf factorize train.zarr --method c2mf --concepts 10 --out c2mf.safetensors

        On several GPUs or nodes: torchrun --nproc-per-node 4 -m c2mf_cli.cli factorize ... (or srun); every
        process streams its share of the rows and rank 0 writes the dictionary (docs/scale.md).
        """
        from .. import distributed
        from ..stages.factorize import factorize, open_store_source

        name = method.value
        if full_batch and batch_size is not None:
            raise UsageError("give --batch-size or --full-batch, not both")
        options = {"alpha": alpha, "alpha_scale": alpha_scale, "beta": beta, "iterations": iterations, "batch_size": batch_size, "tol": tol,
                   "seed": seed, "shared": shared, "shift": True if shift else None,
                   "checkpoint_every": checkpoint_every}
        config = build_config(name, concepts, options)
        if full_batch:
            if not any(f.name == "batch_size" for f in dataclasses.fields(config)):
                raise UsageError(f"--full-batch does not apply to --method {name}")
            config = dataclasses.replace(config, batch_size=None)
        check_output_file(out_path)
        replacing = out_path.is_file()
        ckpt = out_path.with_name(out_path.name + ".ckpt")
        use_ckpt = checkpoint_every is not None or resume
        if use_ckpt and not hasattr(config, "checkpoint_every"):
            raise UsageError(f"--method {name} fits in one pass: it has nothing to checkpoint or resume")
        source = open_store_source(store)
        rank_device = distributed.start(device, timeout)
        try:
            writer = distributed.is_writer()
            reporter = Reporter(quiet=quiet or json_out or not writer)
            with reporter.session():
                d = factorize(source, name, config, device=rank_device or device, progress=reporter.task,
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

    @app.command("methods")
    def methods_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
        """List the factorization methods `c2mf factorize --method` accepts.

        Example: c2mf methods
        """
        rows = method_table()
        if json_out:
            print_json(rows)
            return
        from rich.table import Table

        table = Table(title="c2mf factorize --method", title_justify="left")
        for col in ("name", "learns from", "dictionary", "needs A >= 0", "description"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], "whole images" if r["learns_from"] == "full" else "crops",
                          "signed" if r["signed_dictionary"] else "W >= 0",
                          "yes" if r["requires_nonnegative_input"] else "no", r["description"])
        out.print(table)
