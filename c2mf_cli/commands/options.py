"""The one table of option names shared by every command: flags, short flag, metavar, help and default.

A command declares an option with `option("out", help=...)`; the flags and metavar always come from here, so
`-o` is `--out` and `-m` is `--model` in every command. A command may give its own help text (what `--out`
writes differs) and its own default (a batch of images is not a batch of rows); the README's options table is
generated from the live commands by `options_markdown` and a test keeps the two equal.

Old spellings still work for one release: they are hidden options (`deprecated("max-per-class")`) that
`resolve` merges into the new one with a note on stderr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from ..errors import C2MFError, UsageError

REQUIRED: Any = ...  # typer's marker for a required option

# The release that drops the deprecated spellings below.
REMOVED_IN = "0.3"


@dataclass(frozen=True)
class OptionSpec:
    """One option as every command spells it. `flags` are the long flag(s) then the short one, if any."""

    flags: tuple[str, ...]
    help: str
    metavar: str | None = None  # None for flags (booleans), which take no value
    default: Any = None


SPECS: dict[str, OptionSpec] = {
    # inputs
    "model": OptionSpec(("--model", "-m"), "timm name (resnet18), path/file.py:factory or package.module:factory.",
                        "MODEL"),
    "checkpoint": OptionSpec(("--checkpoint", "-c"),
                             "Local weights (.pth/.pt/.safetensors), loaded with weights_only=True.", "FILE"),
    "pretrained": OptionSpec(("--pretrained/--no-pretrained",),
                             "Download timm's pretrained weights (default for timm names without --checkpoint; "
                             "needs the network)."),
    "layer": OptionSpec(("--layer", "-l"), "Layer to read, see `c2mf layers -m MODEL`.", "LAYER"),
    "data": OptionSpec(("--data", "-d"), "Image folder (one sub-folder per class), CUB-200-2011 folder, or CSV of "
                       "path,label.", "PATH"),
    "class_index": OptionSpec(("--class-index",), "JSON file mapping class folders to model outputs, in one of "
                              "three shapes: {\"folder\": 3}, {\"folder\": {\"model_index\": 3}} (also under a "
                              "\"classes\" key), or Keras' {\"3\": [\"folder\", \"label\"]}; see docs/extract.md. "
                              "'identity': folder i (in name order) is output i, on purpose (without a class index, "
                              "extract stops when the model's outputs or predictions show otherwise).",
                              "FILE"),
    "max_images_per_class": OptionSpec(("--max-images-per-class",), "Use at most N images per class.", "N"),
    "store": OptionSpec(("--store", "-s"), "Activation store written by `c2mf extract`.", "STORE"),
    "train": OptionSpec(("--train",), "Activation store of the training images (whole images).", "STORE"),
    "test": OptionSpec(("--test",), "Held-out activation store (whole images, same model and layer).", "STORE"),
    "crops": OptionSpec(("--crops",), "Crop store (extract --mode crops), for the out-of-distribution view.",
                        "STORE"),
    "dict": OptionSpec(("--dict",), "Dictionary file from `c2mf factorize` (.safetensors).", "DICT"),
    "labels": OptionSpec(("--labels",), "The model's labels, one a line in output order (default: the store's "
                         "class names).", "FILE"),
    # outputs
    "out": OptionSpec(("--out", "-o"), "Where to write.", "PATH"),
    "json": OptionSpec(("--json",), "Print machine-readable JSON on stdout.", default=False),
    "quiet": OptionSpec(("--quiet", "-q"), "No progress on stderr.", default=False),
    # computation
    "method": OptionSpec(("--method",), "Factorization method (see `c2mf methods`).", "METHOD"),
    "concepts": OptionSpec(("--concepts", "-k"), "Number of concepts k.", "K"),
    "batch_size": OptionSpec(("--batch-size", "-b"), "Batch size.", "N"),
    "device": OptionSpec(("--device",), "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.", "DEVICE",
                         "auto"),
    "seed": OptionSpec(("--seed",), "Random seed.", "INT", 0),
    "workers": OptionSpec(("--workers",), "DataLoader workers (default: the machine's cores - 1, at most 8; "
                          "on a cluster pass what the job was given, e.g. $SLURM_CPUS_PER_TASK - 1).", "N"),
    "shard": OptionSpec(("--shard",), "i/n: compute only this shard's chunks (default: torchrun or SLURM array "
                        "environment, else 0/1).", "I/N"),
    "input_size": OptionSpec(("--input-size",), "Override the model's input size, H,W.", "H,W"),
    "klass": OptionSpec(("--class",), "Class: model output index or class name.", "CLASS"),
    "top": OptionSpec(("--top",), "How many to show.", "N"),
    "importance": OptionSpec(("--importance",), "Concept importance: gradcam, ig or sobol (CRAFT's total Sobol "
                             "indices: unsigned, designs x (k + 2) model calls per image).", "gradcam|ig|sobol",
                             "gradcam"),
    "ig_steps": OptionSpec(("--ig-steps",), "Integrated Gradients steps (>= 32 advised).", "N", 32),
    "rows": OptionSpec(("--rows",), "What whole-image methods learn from: one row per position, or one per image "
                       "(pooled: the mean over its positions).", "positions|pooled", "positions"),
    "group_by": OptionSpec(("--group-by",), "Group training rows by the image's label, or by the model's prediction "
                           "(the C2MF paper's wording).", "label|predicted", "label"),
    "codes": OptionSpec(("--codes",), "How codes of test and train images are solved: fit (the rule the dictionary "
                        "was fitted with: ridge NNLS for c2mf, NNLS for NMF/CRAFT, the projection for PCA, the encoder "
                        "for an SAE), nnls (no ridge) or lstsq (signed least squares).", "fit|nnls|lstsq", "fit"),
    "timeout": OptionSpec(("--timeout",), "Several processes (torchrun, srun): seconds one waits for the others "
                          "before the run ends with an error.", "S"),
    "sobol_designs": OptionSpec(("--sobol-designs",), "Sobol design size: designs x (k + 2) model calls per image "
                                "(32: CRAFT's default).", "N", 32),
}

# Old spelling -> (new spelling, metavar of the old one or None for a flag). Removed in REMOVED_IN.
DEPRECATED: dict[str, tuple[str, str | None]] = {
    "--max-per-class": ("--max-images-per-class", "N"),
    "--crops (extract)": ("--crop-kind", "grid|random"),
    "-m (factorize)": ("--method", "METHOD"),
    "--method (explain)": ("--importance", "gradcam|ig"),
    "STORE (factorize, atlas: positional)": ("--store", "STORE"),
    "DICT (atlas: positional)": ("--dict", "DICT"),
    "MODEL (layers: positional)": ("--model", "MODEL"),
}


def method_names() -> list[str]:
    """The registry's method names. Imports the methods (and torch): call it only when a command runs or
    completes, never at import, so that `c2mf --help` stays fast."""
    from ..methods import list_methods

    return list(list_methods())


def complete_method(incomplete: str) -> list[str]:
    """Shell completion of `--method`."""
    return [m for m in method_names() if m.startswith(incomplete)]


_TABLE_DEFAULT: Any = object()


def option(name: str, *, default: Any = _TABLE_DEFAULT, help: str | None = None, show_default: bool | str = True,
           **kwargs: Any) -> Any:
    """The typer option `name` of SPECS. A command may give its own `default` (REQUIRED for a required option)
    and `help`; flags and metavar always come from the table."""
    spec = SPECS[name]
    value = spec.default if default is _TABLE_DEFAULT else default
    return typer.Option(value, *spec.flags, help=help or spec.help, metavar=spec.metavar,
                        show_default=show_default if value is not None or isinstance(show_default, str) else False, **kwargs)


def deprecated(flag: str, metavar: str | None = None) -> Any:
    """A hidden option keeping an old spelling (e.g. "--max-per-class", "-m") working for one release."""
    return typer.Option(None, flag, hidden=True, metavar=metavar)


def deprecated_argument(metavar: str) -> Any:
    """A hidden, optional positional argument keeping an old positional spelling working for one release."""
    return typer.Argument(None, hidden=True, metavar=metavar, show_default=False)


def resolve(new: Any, old: Any, *, old_name: str, new_name: str, required: bool = False) -> Any:
    """The value of an option that has a deprecated spelling; the old one prints a note on stderr.

    Giving both is an error (they could disagree); `required` makes giving neither an error.
    """
    if old is not None:
        if new is not None and new != old:
            raise UsageError(f"give {new_name} only ({old_name} is its old spelling)")
        from ._console import err

        err.print(f"Deprecated: {old_name} is now {new_name} ({old_name} stops working in c2mf {REMOVED_IN})",
                  markup=False, soft_wrap=True)
        return old
    if new is None and required:
        raise UsageError(f"missing option {new_name}")
    return new


def options_markdown(app: Any) -> str:
    """The README's options table, built from the live commands: every shared option, its flags, metavar,
    meaning, and the commands that take it with their defaults."""
    import typer.main

    group = typer.main.get_command(app)
    used: dict[str, list[str]] = {}
    for cmd_name, cmd in group.commands.items():  # type: ignore[attr-defined]
        for p in cmd.params:
            if getattr(p, "hidden", False) or p.name == "help" or not p.opts[0].startswith("--"):
                continue
            key = spec_key(p)
            if key is None:
                continue
            default = p.default
            if p.required or "(required)" in (p.help or ""):  # required, or required once old spellings go
                shown = f"{cmd_name} (required)"
            elif isinstance(default, bool) or default is None:
                shown = cmd_name
            else:
                shown = f"{cmd_name} (default `{_fmt_default(default)}`)"
            used.setdefault(key, []).append(shown)
    lines = ["| option | value | meaning | commands |", "|---|---|---|---|"]
    for key, spec in SPECS.items():
        if key not in used:
            continue
        flags = ", ".join(f"`{f}`" for f in spec.flags)
        value = f"`{spec.metavar}`".replace("|", "\\|") if spec.metavar else ""
        lines.append(f"| {flags} | {value} | {spec.help.replace('|', '/')} | "
                     f"{', '.join(used[key])} |")
    lines += ["", "Old spellings still accepted, with a note on stderr, until c2mf " + REMOVED_IN + ":", ""]
    lines += [f"- `{old}` -> `{new}`" for old, (new, _) in DEPRECATED.items()]
    return "\n".join(lines) + "\n"


def spec_key(param: Any) -> str | None:
    """The SPECS entry a click parameter was declared from (by its flags), or None for a command's own option."""
    for key, spec in SPECS.items():
        if set(_flag_names(spec.flags)) == set(param.opts) | set(getattr(param, "secondary_opts", [])):
            return key
    return None


def _flag_names(flags: tuple[str, ...]) -> list[str]:
    return [f for flag in flags for f in flag.split("/") if f]


def _fmt_default(value: Any) -> str:
    if hasattr(value, "value"):  # an Enum choice
        value = value.value
    return str(value)


# Parsers of option values shared by several commands.

def parse_floats(text: str | None, n: int, name: str) -> tuple[float, ...] | None:
    """`r,g,b` (or one number for all n) as floats."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise UsageError(f"{name} takes {n} comma-separated numbers, got {text!r}") from None
    if len(values) not in (1, n):
        raise UsageError(f"{name} takes 1 or {n} comma-separated numbers, got {text!r}")
    return values * n if len(values) == 1 else values


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """`--input-size` as C,H,W from S, H,W or C,H,W."""
    if text is None:
        return None
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise UsageError(f"--input-size takes H,W or C,H,W (for example 224,224), got {text!r}") from None
    if len(parts) == 1:
        parts = [3, parts[0], parts[0]]
    elif len(parts) == 2:
        parts = [3, *parts]
    if len(parts) != 3:
        raise UsageError(f"--input-size takes H,W or C,H,W, got {text!r}")
    return parts[0], parts[1], parts[2]


def check_input(path: Path | None, option: str, *, kind: str = "any") -> None:
    """Fail at once, before any model is loaded, when an input path given to `option` does not exist."""
    if path is None:
        return
    if not path.exists():
        raise C2MFError(f"{option} {str(path)!r} does not exist")
    if kind == "file" and not path.is_file():
        raise C2MFError(f"{option} {str(path)!r} is a folder: give a file")
