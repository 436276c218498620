"""`c2mf evaluate`: every metric for several dictionaries side by side, as tables, JSON and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ._console import Reporter, check_output_dir, err, out, print_json
from ..errors import UsageError
from .options import REQUIRED, check_input, option

if TYPE_CHECKING:
    from ..report.tables import Built


def rich_table(t: Built) -> RenderableType:
    """A built table (report/tables.py decides every cell and what is bold) drawn for the terminal, its notes
    under it."""
    table = Table(title=t.title, caption=t.caption)
    table.add_column(t.first, justify="left")
    for j, c in enumerate(t.cols):
        group = c.group.strip()
        table.add_column(f"{group}: {c.header()}" if group else c.header(),
                         justify="left" if t.text_column(j) else "right")
    for i, row in enumerate(t.rows):
        if row.reference and (i == 0 or not t.rows[i - 1].reference):
            table.add_section()
        cells = [Text(row.label)]
        for cell in row.cells:
            text = cell.text + (f" ± {cell.std}" if cell.std else "") + (" (!)" if cell.flagged else "")
            cells.append(Text(text, style="bold" if cell.bold else ""))
        table.add_row(*cells, style="dim" if row.reference else None)
    if not t.notes:
        return table
    return Group(table, *(Text(note, style="yellow") for note in t.notes))


def tables(result: dict[str, Any]) -> list[RenderableType]:
    """The evaluation's tables as `c2mf report` draws them (`report.tables.evaluation_tables`), for the terminal."""
    from ..report.tables import evaluation_tables  # imported here: `c2mf --help` does not build the table specs

    return [rich_table(t) for t in evaluation_tables(result)]


def evaluate(
    train: Path = option("train", default=REQUIRED),
    test: Path = option("test", default=REQUIRED),
    dicts: list[Path] = option("dict", default=REQUIRED, help="Dictionary file from `c2mf factorize`; repeat the "
                               "option to compare several."),
    out_dir: Path = option("out", default=REQUIRED, help="Folder for evaluation.json and the PNG plots; an "
                           "existing folder is reused: its evaluation.json and plots are replaced, other files are "
                           "left alone."),
    crops: Optional[Path] = option("crops"),
    model: Optional[str] = option("model", help="Override the model the stores record; needed when they record it "
                                  "as code (path/file.py:factory), which c2mf never runs because a file names it."),
    checkpoint: Optional[Path] = option("checkpoint", help="Override the weights file the stores record (its sha256 "
                                        "is then not required to match: a warning says so)."),
    json_out: bool = option("json", help="Print the full result as JSON on stdout."),
    device: str = option("device"),
    max_images: Optional[int] = option("max_images_per_class"),
    ig_steps: int = option("ig_steps"),
    importance: str = option("importance", default="gradcam,ig", help="The importances that rank concepts for "
                             "insertion/deletion, comma-separated among gradcam, ig, sobol (CRAFT's total Sobol "
                             "indices: designs x (k + 2) model calls per image, so asked for by name)."),
    sobol_designs: int = option("sobol_designs"),
    codes: str = option("codes"),
    batch_size: int = option("batch_size", default=1024, help="Rows (image x step) per call of the model's tail."),
    seed: int = option("seed", help="Seed of the clustering ablation's k-means."),
    encode_class: str = typer.Option(
        "predicted,true", "--encode-class", metavar="ENCODINGS",
        help="Which class picks gates, per-class dictionaries and means when codes are solved, comma-separated: "
        "predicted (the model's prediction, as explain does: the headline), true (the label: the paper's "
        "protocol, which hands the answer to the reconstruction), none (all concepts ungated)."),
    attribution: bool = typer.Option(
        True, "--attribution/--no-attribution",
        help="Compute concept importance and insertion/deletion (the slow part); --no-attribution for a quick "
        "reconstruction and fidelity check."),
    min_agreement: float = typer.Option(
        0.5, "--min-agreement", metavar="FRACTION",
        help="Below this agreement with the model, a method's reconstruction is flagged as not keeping the "
        "model's decision (its insertion/deletion numbers are then not bolded)."),
    timeout: Optional[float] = option("timeout", show_default="600"),  # distributed.DEFAULT_TIMEOUT_S, read when run
    quiet: bool = option("quiet"),
) -> None:
    """Measure concept dictionaries side by side with every metric of the C2MF paper.

    Example: c2mf evaluate --train cub-train --test cub-test --crops cub-crops
    --dict c2mf-k10.safetensors --dict craft-k10.safetensors --dict pca-k10.safetensors -o eval/

    On several GPUs or nodes: torchrun --nproc-per-node 4 -m c2mf_cli.cli evaluate ... (or srun); each process
    takes an equal share of the images (classes split where needed) and rank 0 writes the results (docs/scale.md).
    """
    if not dicts:
        raise UsageError("give at least one --dict")
    for p, name in [(train, "--train"), (test, "--test"), (crops, "--crops"), (checkpoint, "--checkpoint")] + [
            (d, "--dict") for d in dicts]:
        check_input(p, name)
    check_output_dir(out_dir)
    from .. import distributed
    from ..artifacts.store import ActivationStore
    from ..methods import load_dictionary
    from ..stages.evaluate import EvaluateConfig, evaluate as run_evaluate

    config = EvaluateConfig(max_images_per_class=max_images, ig_steps=ig_steps, batch_size=batch_size, seed=seed,
                            encode_class=tuple(e.strip() for e in encode_class.split(",") if e.strip()),
                            min_agreement=min_agreement, attribution=attribution,
                            rankings=tuple(r.strip().lower() for r in importance.split(",") if r.strip()),
                            sobol_designs=sobol_designs, codes=codes.strip().lower())
    train_s, test_s = ActivationStore.open(train), ActivationStore.open(test)
    crops_s = ActivationStore.open(crops) if crops is not None else None
    loaded = [load_dictionary(p) for p in dicts]  # each knows its file (d.path), named in errors
    names = [p.stem for p in dicts] if len({p.stem for p in dicts}) == len(dicts) else None
    rank_device = distributed.start(device, distributed.DEFAULT_TIMEOUT_S if timeout is None else timeout)
    try:
        writer = distributed.is_writer()
        reporter = Reporter(quiet or not writer)
        with reporter.session():
            result = run_evaluate(train_s, test_s, loaded, crops_s, config, reporter.task, names=names,
                                  device=rank_device or device, model=model,
                                  checkpoint=str(checkpoint) if checkpoint else None, out_dir=out_dir)
    finally:
        distributed.stop()
    if not writer:
        return
    console = err if json_out else out
    if not (json_out and quiet):
        for t in tables(result):
            console.print(t)
        for note in result.get("notes", []):
            console.print(f"note: {note}", markup=False)
        console.print(f"results in {out_dir} ({result['time_s']:.1f} s)", markup=False)
    if json_out:
        print_json(result)  # strict JSON: a NaN metric (e.g. one concept) is null, as in the file
