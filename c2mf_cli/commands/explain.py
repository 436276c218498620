"""`c2mf explain`, `c2mf atlas`, `c2mf report`: the pictures of a dictionary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._console import Reporter, err, out, print_json
from ..errors import C2MFError, UsageError


def register(app: typer.Typer) -> None:
    @app.command("explain")
    def explain_cmd(
        images: list[Path] = typer.Argument(..., help="Image files to explain."),
        dict_path: Path = typer.Option(..., "--dict", help="Dictionary from `c2mf factorize` (.safetensors)."),
        class_: Optional[str] = typer.Option(
            None, "--class", help="Class to explain: model output index or class name (default: the prediction)."
        ),
        method: str = typer.Option("gradcam", "--method", help="Concept importance: gradcam or ig."),
        top: int = typer.Option(5, "--top", help="Concepts drawn per image (the most important)."),
        ig_steps: int = typer.Option(32, "--ig-steps", help="Points of the Integrated Gradients path."),
        labels: Optional[Path] = typer.Option(
            None, "--labels", help="The model's labels, one a line in output order (default: store class names)."
        ),
        model: Optional[str] = typer.Option(None, "--model", help="Override the model recorded in the dictionary."),
        checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Override the weights file."),
        out_dir: Path = typer.Option(Path("explain"), "--out", help="Folder for one PNG + one JSON per image."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    ) -> None:
        """Show which concepts the model used for each image and where they are.

        The model, checkpoint, layer and preprocessing come from the dictionary. Writes OUT/<image>.png (the
        image, top-5 classes, concept importances and the top concepts' heatmaps), OUT/<image>.json (every
        number) and OUT/explain.json (the batch). An image that cannot be read is reported on stderr (and in
        explain.json) and skipped; the exit code is 0 when at least one image was explained, 1 (and nothing
        written) when none was.

        Example: c2mf explain bird.jpg --dict cub_c2mf.safetensors --method ig --top 5 --out explain/
        """
        from ..stages.explain import ExplainConfig, Explainer, explain_images
        from ._console import check_output_dir

        check_output_dir(out_dir)
        config = ExplainConfig(importance=method.lower(), top=top, target=class_, ig_steps=ig_steps)  # type: ignore[arg-type]
        rep = Reporter(quiet=quiet or json_out)
        rep.log(f"loading the model of {dict_path}")
        explainer = Explainer.create(dict_path, config, model=model, checkpoint=checkpoint, labels=labels,
                                     device=device)
        for w in explainer.warnings:
            err.print(f"Warning: {w}", markup=False)
        with rep.session():
            advance = rep.task("explaining", len(images))
            summary = explain_images(images, explainer, out_dir, target=class_, on_done=advance)
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

    @app.command("atlas")
    def atlas_cmd(
        store_path: Path = typer.Argument(..., help="A full-mode activation store (the training store)."),
        dict_path: Path = typer.Argument(..., help="Dictionary from `c2mf factorize`."),
        top: int = typer.Option(8, "--top", help="Regions shown per concept."),
        class_name: Optional[str] = typer.Option(None, "--class", help="Only this class of the store."),
        window: float = typer.Option(2.0, "--window", help="Crop side, in grid cells."),
        clip_model: Optional[str] = typer.Option(None, "--clip-model", help="open_clip model name (e.g. ViT-B-32)."),
        clip_checkpoint: Optional[Path] = typer.Option(
            None, "--clip-checkpoint", help="LOCAL open_clip weights, to name concepts (never downloads)."
        ),
        vocabulary: Optional[Path] = typer.Option(None, "--vocabulary", help="Candidate names, one a line (CLIP)."),
        out_dir: Path = typer.Option(Path("atlas"), "--out", help="Output folder."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
        json_out: bool = typer.Option(False, "--json", help="Print the atlas record as JSON on stdout."),
    ) -> None:
        """For each concept, the image regions of the store that activate it most.

        Writes OUT/concept_NNN.png (a grid of crops per concept), OUT/overview.png and OUT/atlas.json.

        Example: c2mf atlas train.zarr cub_c2mf.safetensors --top 8 --out atlas/
        """
        from ..stages.atlas import AtlasConfig, build_atlas, clip_names
        from ..artifacts.dictionary import ConceptDictionary
        from ..stages.explain import read_labels
        from ..artifacts.store import ActivationStore
        from ._console import check_output_dir

        clip = {"--clip-model": clip_model, "--clip-checkpoint": clip_checkpoint, "--vocabulary": vocabulary}
        if any(v is not None for v in clip.values()) and not all(v is not None for v in clip.values()):
            lacking = ", ".join(k for k, v in clip.items() if v is None)
            raise UsageError(f"CLIP naming needs --clip-model, --clip-checkpoint and --vocabulary together "
                             f"(missing {lacking})")
        check_output_dir(out_dir)
        config = AtlasConfig(top=top, class_name=class_name, window=window)
        store = ActivationStore.open(store_path)
        d = ConceptDictionary.load(dict_path)
        d.meta["path"] = str(dict_path)  # named in a mismatch error
        rep = Reporter(quiet=quiet or json_out)
        with rep.session():
            n = 1 if class_name else len(store.classes)
            record = build_atlas(store, d, out_dir, config, progress=rep.task("atlas", n))
        if clip_checkpoint and vocabulary and clip_model:
            names = clip_names(record, read_labels(vocabulary), model_name=clip_model, checkpoint=str(clip_checkpoint))
            record = build_atlas(store, d, out_dir, config, names=names)
        if json_out:
            print_json(record)
        else:
            out.print(f"atlas of {len(record['concepts'])} concepts -> {out_dir / record['overview']}", markup=False)
        for m in record["missing"]:
            err.print(f"Missing image: {m['image']}: {m['error']}", markup=False)

    @app.command("report")
    def report_cmd(
        run_dir: Path = typer.Argument(..., help="Folder of a run: its evaluate/, atlas/ and explain/ sub-folders "
                                                 "are found automatically."),
        evaluate_dir: Optional[Path] = typer.Option(None, "--evaluate", help="evaluate output folder."),
        atlas_dir: Optional[Path] = typer.Option(None, "--atlas", help="atlas output folder."),
        explain_dir: Optional[Path] = typer.Option(None, "--explain", help="explain output folder."),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="Where report.html goes (default: RUN_DIR)."),
        json_out: bool = typer.Option(False, "--json", help="Print the report path as JSON."),
    ) -> None:
        """One self-contained HTML page (images embedded, no network) gathering a run.

        Example: c2mf report run/   (reads run/evaluate, run/atlas, run/explain; writes run/report.html)
        """
        from ..report.page import build_report, find_parts
        from ._console import check_output_dir

        if run_dir.is_file():
            raise UsageError(f"{str(run_dir)!r} is a file: give the folder of a run (holding evaluate/, atlas/, "
                             "explain/) or --evaluate/--atlas/--explain folders")
        if out_dir is not None:
            check_output_dir(out_dir)
        parts = find_parts(run_dir, evaluate_dir=evaluate_dir, atlas_dir=atlas_dir, explain_dir=explain_dir)
        path = build_report(out_dir or run_dir, **parts)
        if json_out:
            print_json({"report": str(path), **{k: str(v) if v else None for k, v in parts.items()}})
        else:
            out.print(str(path), markup=False)
