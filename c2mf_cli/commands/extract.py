"""`c2mf extract`: run a model over images and write per-class activations at one layer to a Zarr store."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ._console import Reporter, check_output_dir, err, out, print_json
from ..errors import UsageError
from .options import (REQUIRED, check_input, deprecated, option, parse_floats, parse_input_size, resolve)

if TYPE_CHECKING:
    from ..inputs.models import ModelSpec


class Mode(str, Enum):
    full = "full"
    crops = "crops"


class SplitChoice(str, Enum):
    train = "train"
    test = "test"
    all = "all"


class CropKind(str, Enum):
    grid = "grid"
    random = "random"


class DType(str, Enum):
    float16 = "float16"
    float32 = "float32"


class Autocast(str, Enum):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


def model_spec(model: str, checkpoint: Optional[Path], pretrained: Optional[bool]) -> "ModelSpec":
    """timm names default to their pretrained weights unless a checkpoint is given; factories never do."""
    from ..inputs.models import ModelSpec

    is_factory = ":" in model
    if pretrained is None:
        pretrained = not is_factory and checkpoint is None
    return ModelSpec(model, str(checkpoint) if checkpoint else None, pretrained)


def extract(
    model: str = option("model", default=REQUIRED),
    layer: str = option("layer", default=REQUIRED),
    data: Path = option("data", default=REQUIRED),
    out_path: Path = option("out", default=REQUIRED, help="Store directory to create or resume."),
    checkpoint: Optional[Path] = option("checkpoint"),
    pretrained: Optional[bool] = option("pretrained"),
    split: SplitChoice = typer.Option(SplitChoice.train, help="Which images: the dataset's own split (CUB) or a "
                                      "seeded fraction per class. train by default, so that a store made without "
                                      "thinking never holds test images; all overlaps both (evaluate refuses it "
                                      "as a training store next to a test store)."),
    test_fraction: float = typer.Option(0.2, metavar="F", help="Share of each class held out as test (datasets "
                                        "without their own split)."),
    class_index: Optional[Path] = option("class_index"),
    max_images: Optional[int] = option("max_images_per_class"),
    max_per_class: Optional[int] = deprecated("--max-per-class", "N"),
    mode: Mode = typer.Option(Mode.full, help="full: every position of whole images; crops: pooled crops (CRAFT)."),
    crop_kind: Optional[CropKind] = typer.Option(None, "--crop-kind", show_default="grid",
                                                 help="grid: CRAFT's reference grid; random: seeded random crops."),
    crops_old: Optional[CropKind] = deprecated("--crops", "grid|random"),
    crop_size: float = typer.Option(64 / 224, metavar="F", show_default="64/224 = 0.286",
                                    help="Crop side relative to the input (CRAFT's 64 px at 224)."),
    crop_stride: float = typer.Option(0.8, metavar="F", help="Grid stride relative to the crop side (CRAFT: 0.8)."),
    n_crops: int = typer.Option(16, metavar="N", help="Random crops per image."),
    dtype: DType = typer.Option(DType.float16, help="Storage dtype (computation is float32)."),
    batch_size: int = option("batch_size", default=32, help="Images per forward pass."),
    workers: Optional[int] = option("workers"),
    device: str = option("device"),
    autocast: Autocast = typer.Option(Autocast.none, help="Mixed precision on the device (bf16/fp16)."),
    chunk_images: Optional[int] = typer.Option(
        None, metavar="N", help="Images per chunk (the unit of work, resume and sharding). Default: about 8 MiB of "
        "stored rows per chunk (a power of two, 64-4096 images), or the store's own when resuming."),
    shard: Optional[str] = option("shard"),
    seed: int = option("seed", help="Seed for the split, random crops and random weights."),
    strict: bool = typer.Option(False, help="Stop at the first unreadable image instead of skipping it."),
    input_size: Optional[str] = option("input_size"),
    mean: Optional[str] = typer.Option(None, metavar="R,G,B", help="Override the normalisation mean."),
    std: Optional[str] = typer.Option(None, metavar="R,G,B", help="Override the normalisation std."),
    crop_pct: Optional[float] = typer.Option(None, metavar="F", help="Override the centre-crop fraction."),
    interpolation: Optional[str] = typer.Option(None, metavar="NAME", help="Override the resize interpolation "
                                                "(bilinear, bicubic, ...)."),
    json_out: bool = option("json"),
    quiet: bool = option("quiet"),
) -> None:
    """Run a model over images and write per-class activations at one layer to a Zarr store.

    Rerunning the same command resumes an interrupted run; shards (--shard i/n) may run in parallel on
    one store, and the last one to finish finalizes it.

    Example: c2mf extract -m resnet18 -l layer4 -d images/ --split train -o train.zarr
    """
    crops = resolve(crop_kind, crops_old, old_name="--crops (extract)", new_name="--crop-kind") or CropKind.grid
    max_images = resolve(max_images, max_per_class, old_name="--max-per-class", new_name="--max-images-per-class")
    # Everything a user can get wrong is checked here, before the (slow) model load.
    if max_images is not None and max_images < 1:
        raise UsageError(f"--max-images-per-class must be at least 1, got {max_images}")
    check_input(data, "--data")
    if str(class_index) != "identity":
        check_input(class_index, "--class-index", kind="file")
    check_input(checkpoint, "--checkpoint", kind="file")
    check_output_dir(out_path)
    overrides = {
        "input_size": parse_input_size(input_size),
        "mean": parse_floats(mean, 3, "--mean"),
        "std": parse_floats(std, 3, "--std"),
        "crop_pct": crop_pct,
        "interpolation": interpolation,
    }
    from ..inputs.data import CropSpec, DatasetSpec
    from ..stages.extract import ExtractConfig, ShardSpec, extract as run_extract

    shard_spec = ShardSpec.parse(shard)
    cfg = ExtractConfig(
        model=model_spec(model, checkpoint, pretrained),
        layer=layer,
        data=DatasetSpec(str(data), split=split.value, test_fraction=test_fraction, seed=seed,
                         class_index=str(class_index) if class_index else None, max_per_class=max_images),
        out=str(out_path),
        mode=mode.value,
        crops=CropSpec(kind=crops.value, size=crop_size, stride=crop_stride, count=n_crops, seed=seed),
        dtype=dtype.value,
        batch_size=batch_size,
        workers=workers,
        device=device,
        autocast=autocast.value,
        chunk_images=chunk_images,
        seed=seed,
        strict=strict,
        preprocess_overrides={k: v for k, v in overrides.items() if v is not None},
    )
    reporter = Reporter(quiet)
    if shard_spec.count > 1:
        reporter.log(f"shard {shard_spec.index}/{shard_spec.count}")
    try:
        with reporter.session():
            result = run_extract(cfg, shard=shard_spec, progress=reporter.task, log=reporter.log)
    except KeyboardInterrupt:
        err.print(
            f"Interrupted: the finished chunks of {out_path} are kept; rerun the same command to resume",
            markup=False, soft_wrap=True,
        )
        raise typer.Exit(130) from None
    if json_out:
        print_json(result.to_dict())
        return
    if result.failures:  # a warning, so it survives --quiet (which only drops progress and the tally)
        err.print(f"{len(result.failures)} unreadable image(s) skipped (listed in the store and `c2mf info --json`):")
        for f in result.failures[:10]:
            err.print(f"  {f['error']}", markup=False, soft_wrap=True)
        if len(result.failures) > 10:
            err.print(f"  ... and {len(result.failures) - 10} more", markup=False)
    if not quiet:
        status = "complete" if result.complete else "waiting for other shards"
        if not result.units_done_now and result.complete:
            err.print(f"{result.path} is already complete ({result.units_total} chunks)", markup=False, soft_wrap=True)
        else:
            verb = "resumed" if not result.created and result.units_skipped else "created"
            err.print(
                f"{verb} {result.path}: {result.units_done_now} chunk(s) computed, {result.units_skipped} "
                f"already done, {result.images} images at {result.images_per_second:.1f}/s; {status}",
                markup=False, soft_wrap=True,
            )
    if result.complete:
        out.print(result.path, markup=False, soft_wrap=True)
