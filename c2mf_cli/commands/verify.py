"""`c2mf verify PATH...`: check stores and dictionaries for damage (like `git fsck`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._console import Reporter, out, print_json
from .options import option
from ..errors import C2MFError


def verify(
    paths: list[Path] = typer.Argument(..., metavar="PATH...", help="Activation stores (from extract) and "
                                       "dictionaries (from factorize)."),
    deep: bool = typer.Option(False, "--deep", help="Also decode every chunk (its crc32c checksum) and scan every "
                              "value for NaN/Inf."),
    json_out: bool = option("json", help="Print one JSON report per path on stdout."),
    quiet: bool = option("quiet"),
) -> None:
    """Check stores and dictionaries: exit 0 when every one is sound, 1 when any is damaged.

    The fast mode reads metadata and file sizes only (a store's manifest and seal, every chunk file present with
    its recorded size; a dictionary's own checks); --deep also decodes every chunk and scans every value.

    Example: c2mf verify train.zarr test.zarr c2mf.safetensors --deep
    """
    from ..stages.verify import verify as verify_path

    reporter = Reporter(quiet)
    reports = []
    with reporter.session():
        for p in paths:
            reports.append(verify_path(p, deep=deep, progress=reporter.task))
    if json_out:
        print_json([r.to_dict() for r in reports])
    else:
        mode = "deep" if deep else "fast"
        for r in reports:
            if r.ok:
                what = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in r.checked.items())
                out.print(f"ok      {r.path}  ({r.kind}, {mode} check: {what})", markup=False, soft_wrap=True)
            else:
                out.print(f"DAMAGED {r.path}  ({r.kind}, {mode} check)", markup=False, soft_wrap=True)
                for problem in r.problems:
                    out.print(f"  - {problem}", markup=False, soft_wrap=True)
    bad = [r for r in reports if not r.ok]
    if bad:
        raise C2MFError(f"{len(bad)} of {len(reports)} path(s) failed verification: "
                        f"{', '.join(r.path for r in bad[:5])}{' ...' if len(bad) > 5 else ''}")
