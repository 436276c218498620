"""`c2mf atlas`: for each concept, the image regions of a store that activate it most."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._console import Reporter, check_output_dir, err, out, print_json
from ..errors import UsageError
from .options import check_input, deprecated_argument, option, resolve


def atlas(
    store: Optional[Path] = option("store", help="A full-mode activation store, the training store (required)."),
    dict_path: Optional[Path] = option("dict", help="Dictionary from `c2mf factorize` (required)."),
    store_positional: Optional[Path] = deprecated_argument("STORE"),
    dict_positional: Optional[Path] = deprecated_argument("DICT"),
    top: int = option("top", default=8, help="Regions shown per concept."),
    class_name: Optional[str] = option("klass", help="Only this class of the store."),
    window: float = typer.Option(2.0, "--window", metavar="F", help="Crop side, in grid cells."),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", metavar="NAME",
                                             help="open_clip model name (e.g. ViT-B-32)."),
    clip_checkpoint: Optional[Path] = typer.Option(
        None, "--clip-checkpoint", metavar="FILE", help="LOCAL open_clip weights, to name concepts (never downloads)."
    ),
    vocabulary: Optional[Path] = typer.Option(None, "--vocabulary", metavar="FILE",
                                              help="Candidate names, one a line (CLIP)."),
    out_dir: Path = option("out", default=Path("atlas"), help="Output folder."),
    quiet: bool = option("quiet"),
    json_out: bool = option("json", help="Print the atlas record as JSON on stdout."),
) -> None:
    """For each concept, the image regions of the store that activate it most.

    Writes OUT/concept_NNN.png (a grid of crops per concept), OUT/overview.png and OUT/atlas.json.

    Example: c2mf atlas -s train.zarr --dict cub_c2mf.safetensors --top 8 -o atlas/
    """
    store = resolve(store, store_positional, old_name="the positional STORE", new_name="--store/-s", required=True)
    dict_path = resolve(dict_path, dict_positional, old_name="the positional DICT", new_name="--dict",
                        required=True)
    clip = {"--clip-model": clip_model, "--clip-checkpoint": clip_checkpoint, "--vocabulary": vocabulary}
    if any(v is not None for v in clip.values()) and not all(v is not None for v in clip.values()):
        lacking = ", ".join(k for k, v in clip.items() if v is None)
        raise UsageError(f"CLIP naming needs --clip-model, --clip-checkpoint and --vocabulary together "
                         f"(missing {lacking})")
    check_input(store, "--store")
    check_input(dict_path, "--dict", kind="file")
    check_output_dir(out_dir)
    from ..artifacts.store import ActivationStore
    from ..methods import load_dictionary
    from ..stages.atlas import AtlasConfig, build_atlas, check_clip, clip_names
    from ..stages.explain import read_labels

    if clip_checkpoint is not None:
        check_clip(clip_checkpoint)  # before the atlas is written, not after

    config = AtlasConfig(top=top, class_name=class_name, window=window)
    opened = ActivationStore.open(store)
    d = load_dictionary(dict_path)
    rep = Reporter(quiet=quiet or json_out)
    with rep.session():
        n = 1 if class_name else len(opened.classes)
        record = build_atlas(opened, d, out_dir, config, progress=rep.task("atlas", n))
    if clip_checkpoint and vocabulary and clip_model:
        names = clip_names(record, read_labels(vocabulary), model_name=clip_model, checkpoint=str(clip_checkpoint))
        record = build_atlas(opened, d, out_dir, config, names=names)
    if json_out:
        print_json(record)
    else:
        out.print(f"atlas of {len(record['concepts'])} concepts -> {out_dir / record['overview']}", markup=False)
    for m in record["missing"]:
        err.print(f"Missing image: {m['image']}: {m['error']}", markup=False)
