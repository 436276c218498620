"""`c2mf layers`: a model's layers with their output shapes, and which ones split exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._console import err, out, print_json
from .options import check_input, deprecated_argument, option, parse_input_size, resolve


def layers(
    model: Optional[str] = option("model", help="timm name or path/file.py:factory (required)."),
    model_positional: Optional[str] = deprecated_argument("MODEL"),
    checkpoint: Optional[Path] = option("checkpoint"),
    pretrained: bool = typer.Option(False, "--pretrained/--no-pretrained",
                                    help="Load timm's weights (not needed to list layers)."),
    all_layers: bool = typer.Option(False, "--all", help="List every module, not only the useful ones."),
    input_size: Optional[str] = option("input_size"),
    json_out: bool = option("json"),
) -> None:
    """List a model's layers with their output shapes; mark the useful split points.

    Useful layers are stage outputs, ViT blocks and the final feature map, where f = h(g(x)) is exact.

    Example: c2mf layers -m resnet18
    """
    name = resolve(model, model_positional, old_name="the positional MODEL", new_name="--model/-m", required=True)
    check_input(checkpoint, "--checkpoint", kind="file")
    size = parse_input_size(input_size)
    from ..inputs.models import list_layers, load_model
    from .extract import model_spec

    # loading a large model and checking every split point takes a while: say what is happening, on stderr
    err.print(f"loading {name}...", markup=False)
    lm = load_model(model_spec(name, checkpoint, pretrained), preprocess_overrides={"input_size": size} if size else {})
    err.print("listing its layers and checking where f = h(g(x)) splits exactly...", markup=False)
    infos = list_layers(lm.model, lm.preprocess.input_size)
    shown = infos if all_layers else [i for i in infos if i.useful]
    if json_out:
        print_json({"model": name, "input_size": list(lm.preprocess.input_size),
                    "layers": [i.to_dict() for i in shown]})
        return
    from rich.table import Table

    table = Table(title=f"{name}  (input {tuple(lm.preprocess.input_size)})", title_justify="left")
    for col in ("layer", "type", "output (one image)", "role", "split"):
        table.add_column(col)
    for i in shown:
        table.add_row(i.name, i.type, "x".join(map(str, i.shape)) if i.shape else "-", i.role, i.split_text)
    out.print(table)
    if not all_layers:
        err.print(f"{len(shown)} useful of {len(infos)} layers; --all lists every module")
