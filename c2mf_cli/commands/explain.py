"""`c2mf explain`: which concepts the model used for each image, and where they are."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._console import Reporter, check_output_dir, err, out, print_json
from ..errors import C2MFError, UsageError
from .options import REQUIRED, check_input, deprecated, option, resolve


def explain(
    images: list[Path] = typer.Argument(..., metavar="IMAGE...", help="Image files to explain."),
    dict_path: Path = option("dict", default=REQUIRED),
    class_: Optional[str] = option("klass", help="Class to explain: model output index or class name (default: "
                                   "the prediction)."),
    importance: Optional[str] = option("importance", default=None, show_default="gradcam"),
    method_old: Optional[str] = deprecated("--method", "gradcam|ig"),
    top: int = option("top", default=5, help="Concepts drawn per image on each side (evidence for, against)."),
    ig_steps: int = option("ig_steps"),
    sobol_designs: int = option("sobol_designs"),
    labels: Optional[Path] = option("labels"),
    model: Optional[str] = option("model", help="Override the model recorded in the dictionary."),
    checkpoint: Optional[Path] = option("checkpoint", help="Override the weights file recorded in the dictionary."),
    atlas_dir: Optional[Path] = typer.Option(
        None, "--atlas", metavar="DIR", help="A `c2mf atlas` folder of this dictionary: each concept's crops (what "
        "it is) are drawn beside its heatmap (where it is)."),
    min_share: float = typer.Option(
        0.1, "--min-share", metavar="F", help="Draw a concept only when its |importance| is at least this fraction "
        "of the largest."),
    out_dir: Path = option("out", default=Path("explain"), help="Folder for one PNG + one JSON per image."),
    device: str = option("device"),
    quiet: bool = option("quiet"),
    json_out: bool = option("json", help="Print the summary as JSON on stdout."),
) -> None:
    """Show which concepts the model used for each image and where they are.

    The model, checkpoint, layer and preprocessing come from the dictionary. Writes OUT/<image>.png (the
    image, top-5 classes, concept importances, and the heatmaps of the concepts that matter: evidence for the
    class, then evidence against it; with --atlas, each beside its atlas crops), OUT/<image>.json (every
    number) and OUT/explain.json (the batch). An image that cannot be read is reported on stderr (and in
    explain.json) and skipped; the exit code is 0 when at least one image was explained, 1 (and nothing
    written) when none was.

    Example: c2mf explain bird.jpg --dict cub_c2mf.safetensors --importance ig --top 5 -o explain/
    """
    how = resolve(importance, method_old, old_name="--method (explain)", new_name="--importance") or "gradcam"
    if how.lower() not in ("gradcam", "ig", "sobol"):
        raise UsageError(f"--importance must be gradcam, ig or sobol, got {how!r}")
    check_input(dict_path, "--dict", kind="file")
    check_input(labels, "--labels", kind="file")
    check_input(checkpoint, "--checkpoint", kind="file")
    check_input(atlas_dir, "--atlas")
    check_output_dir(out_dir)
    from ..stages.explain import AtlasCrops, ExplainConfig, Explainer, explain_images

    config = ExplainConfig(importance=how.lower(), top=top, target=class_, ig_steps=ig_steps,  # type: ignore[arg-type]
                           sobol_designs=sobol_designs, min_share=min_share)
    rep = Reporter(quiet=quiet or json_out)
    rep.log(f"loading the model of {dict_path}")
    explainer = Explainer.create(dict_path, config, model=model, checkpoint=str(checkpoint) if checkpoint else None,
                                 labels=labels, device=device)
    for w in explainer.warnings:
        err.print(f"Warning: {w}", markup=False)
    atlas = AtlasCrops.load(atlas_dir, explainer.dictionary) if atlas_dir is not None else None
    with rep.session():
        advance = rep.task("explaining", len(images))
        summary = explain_images(images, explainer, out_dir, target=class_, atlas=atlas, on_done=advance)
    failed = summary["failed"]
    if not summary["explained"]:
        if len(failed) == 1:
            raise C2MFError(failed[0]["error"])
        for f in failed:
            err.print(f"Failed: {f['image']}: {f['error']}", markup=False, soft_wrap=True)
        raise C2MFError(f"none of the {len(failed)} images could be explained (each is listed above); "
                        "nothing was written")
    if json_out:
        print_json(summary)
    else:
        for e in summary["explained"]:
            out.print(f"{e['image']}: {e['explained']['label']} (p={e['explained']['probability']:.3f}); "
                      f"top concepts {e['top_concepts']} -> {out_dir / e['png']}", markup=False, soft_wrap=True)
    for f in failed:
        err.print(f"Failed: {f['image']}: {f['error']}", markup=False, soft_wrap=True)
