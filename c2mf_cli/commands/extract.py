"""`c2mf layers` and `c2mf extract`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ._console import Reporter, err, out, print_json
from ..inputs.data import CropSpec, DatasetSpec
from ..errors import UsageError
from ..stages.extract import ExtractConfig, ShardSpec, extract
from ..inputs.models import ModelSpec, list_layers, load_model


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


def _parse_floats(text: Optional[str], n: int, name: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise UsageError(f"{name} takes {n} comma-separated numbers, got {text!r}") from None
    if len(values) not in (1, n):
        raise UsageError(f"{name} takes 1 or {n} comma-separated numbers, got {text!r}")
    return values * n if len(values) == 1 else values


def _input_size(text: Optional[str]) -> Optional[tuple[int, int, int]]:
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


def model_spec(model: str, checkpoint: Optional[Path], pretrained: Optional[bool]) -> ModelSpec:
    """timm names default to their pretrained weights unless a checkpoint is given; factories never do."""
    is_factory = ":" in model
    if pretrained is None:
        pretrained = not is_factory and checkpoint is None
    return ModelSpec(model, str(checkpoint) if checkpoint else None, pretrained)


ModelOpt = typer.Option(..., "--model", "-m", help="timm name (resnet18), path/file.py:factory or package.module:factory.")
CheckpointOpt = typer.Option(None, "--checkpoint", "-c", help="Local weights (.pth/.pt/.safetensors), loaded with weights_only=True.")
PretrainedOpt = typer.Option(
    None, "--pretrained/--no-pretrained",
    help="Download timm's pretrained weights (default for timm names without --checkpoint; needs the network).",
)


def register(app: typer.Typer) -> None:
    @app.command("layers")
    def layers_cmd(
        model: str = typer.Argument(..., help="timm name or path/file.py:factory."),
        checkpoint: Optional[Path] = CheckpointOpt,
        pretrained: Optional[bool] = typer.Option(
            False, "--pretrained/--no-pretrained", help="Load timm's weights (not needed to list layers)."
        ),
        all_layers: bool = typer.Option(False, "--all", help="List every module, not only the useful ones."),
        input_size: Optional[str] = typer.Option(None, help="Override the input size, H,W."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    ) -> None:
        """List a model's layers with their output shapes; mark the useful split points.

        Useful layers are stage outputs, ViT blocks and the final feature map, where f = h(g(x)) is exact.

        Example: c2mf layers resnet18
        """
        overrides = {"input_size": _input_size(input_size)} if input_size else {}
        lm = load_model(model_spec(model, checkpoint, pretrained), preprocess_overrides=overrides)
        infos = list_layers(lm.model, lm.preprocess.input_size)
        shown = infos if all_layers else [i for i in infos if i.useful]
        if json_out:
            print_json({"model": model, "input_size": list(lm.preprocess.input_size),
                        "layers": [i.to_dict() for i in shown]})
            return
        from rich.table import Table

        table = Table(title=f"{model}  (input {tuple(lm.preprocess.input_size)})", title_justify="left")
        for col in ("layer", "type", "output (one image)", "role", "split"):
            table.add_column(col)
        for i in shown:
            split = {True: "exact", False: "no", None: ""}[i.splits]
            table.add_row(i.name, i.type, "x".join(map(str, i.shape)) if i.shape else "-", i.role, split)
        out.print(table)
        if not all_layers:
            err.print(f"{len(shown)} useful of {len(infos)} layers; --all lists every module")

    @app.command("extract")
    def extract_cmd(
        model: str = ModelOpt,
        layer: str = typer.Option(..., "--layer", "-l", help="Layer to read, see `c2mf layers MODEL`."),
        data: Path = typer.Option(..., "--data", "-d", help="Image folder (one sub-folder per class), CUB-200-2011 folder, or CSV of path,label."),
        out_path: Path = typer.Option(..., "--out", "-o", help="Store directory to create or resume."),
        checkpoint: Optional[Path] = CheckpointOpt,
        pretrained: Optional[bool] = PretrainedOpt,
        split: SplitChoice = typer.Option(SplitChoice.all, help="Which images: the dataset's own split (CUB) or a seeded fraction per class."),
        test_fraction: float = typer.Option(0.2, help="Share of each class held out as test (datasets without their own split)."),
        class_index: Optional[Path] = typer.Option(None, help="JSON mapping class folder names to model output indices."),
        max_per_class: Optional[int] = typer.Option(None, help="Use at most N images per class."),
        mode: Mode = typer.Option(Mode.full, help="full: every position of whole images; crops: pooled crops (CRAFT)."),
        crops: CropKind = typer.Option(CropKind.grid, help="grid: CRAFT's reference grid; random: seeded random crops."),
        crop_size: float = typer.Option(64 / 224, help="Crop side relative to the input (64/224 = CRAFT's 64 px at 224)."),
        crop_stride: float = typer.Option(0.8, help="Grid stride relative to the crop side (CRAFT: 0.8)."),
        n_crops: int = typer.Option(16, help="Random crops per image."),
        dtype: DType = typer.Option(DType.float16, help="Storage dtype (computation is float32)."),
        batch_size: int = typer.Option(32, "--batch-size", "-b"),
        workers: Optional[int] = typer.Option(None, help="DataLoader workers (default: cores - 1, at most 8)."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
        autocast: Autocast = typer.Option(Autocast.none, help="Mixed precision on the device (bf16/fp16)."),
        chunk_images: int = typer.Option(64, help="Images per chunk (the unit of work, resume and sharding)."),
        shard: Optional[str] = typer.Option(None, help="i/n: compute only this shard's chunks (default: torchrun/SLURM array env, else 0/1)."),
        seed: int = typer.Option(0, help="Seed for the split, random crops and random weights."),
        strict: bool = typer.Option(False, help="Stop at the first unreadable image instead of skipping it."),
        input_size: Optional[str] = typer.Option(None, help="Override the model's input size, H,W."),
        mean: Optional[str] = typer.Option(None, help="Override the normalisation mean, r,g,b."),
        std: Optional[str] = typer.Option(None, help="Override the normalisation std, r,g,b."),
        crop_pct: Optional[float] = typer.Option(None, help="Override the centre-crop fraction."),
        interpolation: Optional[str] = typer.Option(None, help="Override the resize interpolation."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Run a model over images and write per-class activations at one layer to a Zarr store.

        Rerunning the same command resumes an interrupted run; shards (--shard i/n) may run in parallel on
        one store, and the last one to finish finalizes it.

        Example: c2mf extract -m resnet18 -l layer4 -d images/ --split train -o train.zarr
        """
        overrides = {
            "input_size": _input_size(input_size),
            "mean": _parse_floats(mean, 3, "--mean"),
            "std": _parse_floats(std, 3, "--std"),
            "crop_pct": crop_pct,
            "interpolation": interpolation,
        }
        cfg = ExtractConfig(
            model=model_spec(model, checkpoint, pretrained),
            layer=layer,
            data=DatasetSpec(str(data), split=split.value, test_fraction=test_fraction, seed=seed,
                             class_index=str(class_index) if class_index else None, max_per_class=max_per_class),
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
        shard_spec = ShardSpec.parse(shard)
        reporter = Reporter(quiet)
        if shard_spec.count > 1:
            reporter.log(f"shard {shard_spec.index}/{shard_spec.count}")
        try:
            with reporter.session():
                result = extract(cfg, shard=shard_spec, progress=reporter.task, log=reporter.log)
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
