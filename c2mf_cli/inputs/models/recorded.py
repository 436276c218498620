"""Reopen the model a store or a dictionary was made with: load it, check its weights, split it at the layer.

Every stage that needs the model again (evaluate's tail h, explain's g and h, atlas) goes through `reopen`, so
all of them give the same guarantee: the weights are those recorded (sha256), and f = h o g holds exactly.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import C2MFError, UsageError
from .load import LoadedModel, load_model
from .spec import ModelSpec
from .split import Split, split_model


class WeightsMismatch(C2MFError):
    """The weights loaded are not those the recorded sha256 names."""

    def __init__(self, loaded: str, recorded: str, what: str, hint: str) -> None:
        self.loaded, self.recorded = loaded, recorded
        self.fact = f"the weights loaded ({loaded[:12]}) are not those {what} was made with ({recorded[:12]})"
        super().__init__(f"{self.fact}: {hint}")


class CannotSplit(C2MFError):
    """The model loaded but does not split exactly at the layer (another architecture, or no such layer)."""


@dataclass
class Reopened:
    """The loaded model, its split at the layer, and what a caller should tell the user."""

    loaded: LoadedModel
    split: Split
    warnings: list[str] = field(default_factory=list)


def recorded_spec(
    recorded: Mapping[str, Any],
    *,
    model: str | None,
    checkpoint: str | None,
    what: str,
    command: str,
) -> ModelSpec:
    """The model to reopen: the one `recorded` (a store's or dictionary's "model" record), or the user's override.

    A store or dictionary may come from someone else, so code it names is never run because it names it: a
    recorded factory (path/file.py:factory, package.module:factory) is refused unless the user passes `model`,
    and the refusal shows the command that would run it. Without `checkpoint`, the recorded weights file is used
    (also with `model`: its hash then says whether it fits).

    Args:
        recorded: the record ({"name", "checkpoint", "pretrained", ...}).
        model, checkpoint: the user's --model / --checkpoint, or None.
        what: what holds the record, for messages ("the dictionary", "the test store").
        command: the command line to show with --model appended ("c2mf explain DICT IMAGE...").

    Raises:
        C2MFError: nothing recorded and nothing given; a recorded factory not named by the user; the recorded
            checkpoint file is missing.
    """
    name = recorded.get("name")
    if model is None and not name:
        raise C2MFError(f"{what} does not record its model: give --model (and --checkpoint)")
    recorded_ckpt = recorded.get("checkpoint") if not recorded.get("pretrained") else None
    if model is None and ModelSpec(name=str(name)).is_factory:
        # without --checkpoint the recorded weights are used and their sha256 checked: only --model is needed
        raise C2MFError(
            f"{what} records its model as code, {name!r}, and c2mf never runs code because a file names it: if you "
            f"trust that file, pass it yourself: {command} --model {shlex.quote(str(name))}"
            + (f" --checkpoint {shlex.quote(str(checkpoint))}" if checkpoint else "")
        )
    if checkpoint is None and recorded_ckpt and not Path(str(recorded_ckpt)).expanduser().is_file():
        want = recorded.get("weights_sha256")
        raise C2MFError(f"the checkpoint {what} was made with, {recorded_ckpt!r}, is missing: if it moved, give "
                        f"--checkpoint NEW_PATH (weights sha256 {str(want)[:12]}...), and --model for a factory "
                        "file (path/file.py:factory) that moved")
    return ModelSpec(
        name=model or str(name),
        checkpoint=checkpoint if checkpoint is not None else recorded_ckpt,
        pretrained=bool(recorded.get("pretrained", False)) if model is None else False,
    )


def reopen(
    spec: ModelSpec,
    layer: str,
    expected_sha256: str | None,
    *,
    input_size: tuple[int, int, int] | None = None,
    what: str = "the store",
    allow_other_weights: bool = False,
    hint: str = "the checkpoint file changed; give --checkpoint with the original weights",
    verify: bool = True,
) -> Reopened:
    """Load `spec`, check its weights against `expected_sha256`, and split it at `layer` (verified exact).

    Args:
        spec: the model as recorded (or as the user overrides it).
        layer: the layer the activations come from.
        expected_sha256: the recorded `weights_sha256`; None skips the check (records older than the hash).
        input_size: the recorded model input (channels, height, width); default the model's own.
        what: what recorded the hash, for messages ("the store", "the dictionary").
        allow_other_weights: the user chose other weights on purpose: a mismatch is a warning, not an error.
        hint: the way out named by the mismatch error.
        verify: run the model and the split on a random batch to check h(g(x)) == f(x) (`split_model`); a
            caller that checks h on real data itself may skip it for a torch.fx split, whose graph already
            proves h reads only the layer's output (other splits are always verified).

    Raises:
        WeightsMismatch: the weights differ from the recorded ones and `allow_other_weights` is False.
        CannotSplit: the model does not split exactly at `layer`.
        C2MFError: the model cannot be loaded.
    """
    loaded = load_model(spec)
    # the split first: when another architecture was named, that is the cause to report, not its other weights
    try:
        split = split_model(loaded.model, layer, input_size or loaded.preprocess.input_size, verify=verify)
    except C2MFError as e:
        raise CannotSplit(str(e)) from None
    warnings: list[str] = []
    if expected_sha256 and loaded.weights_sha256 != expected_sha256:
        mismatch = WeightsMismatch(loaded.weights_sha256, expected_sha256, what, hint)
        if not allow_other_weights:
            raise mismatch
        warnings.append(mismatch.fact)
    return Reopened(loaded, split, warnings)


def reopen_recorded(
    recorded: Mapping[str, Any],
    layer: str,
    *,
    model: str | None,
    checkpoint: str | None,
    what: str,
    command: str,
    input_size: tuple[int, int, int] | None = None,
    verify: bool = True,
) -> Reopened:
    """`recorded_spec` then `reopen` (`verify` as there), with every failure turned into one error that names the
    way out.

    The weights are checked against the record's sha256; weights the user chose with `checkpoint` may differ
    (a warning in `Reopened.warnings`). `what`, `command`: as in `recorded_spec` ("the dictionary", ...).
    """
    spec = recorded_spec(recorded, model=model, checkpoint=checkpoint, what=what, command=command)
    if model is None and checkpoint is None:
        way_out = ("if the model's file moved, give --checkpoint NEW_PATH (and --model for a factory file, "
                   "path/file.py:factory, that moved)")
    else:
        way_out = "check --model/--checkpoint"
    try:
        return reopen(spec, layer, recorded.get("weights_sha256"), input_size=input_size, what=what,
                      allow_other_weights=checkpoint is not None,
                      hint="the checkpoint file changed; give --checkpoint to use these weights anyway", verify=verify)
    except (WeightsMismatch, UsageError):
        raise
    except CannotSplit as e:
        if model is None:
            raise C2MFError(str(e)) from None
        raise C2MFError(f"{what} was made at layer {layer!r}, which --model {model!r} cannot be split at "
                        f"({str(e).rstrip('. ')}): --model must name the architecture {what} was made with") from None
    except C2MFError as e:
        raise C2MFError(f"cannot load the model of {what}, {spec.name!r}: {str(e).rstrip('. ')}; {way_out}") from None
    except (OSError, ImportError, RuntimeError, ValueError, KeyError) as e:
        raise C2MFError(
            f"cannot load the model of {what}, {spec.name!r} ({type(e).__name__}: {e}); {way_out}"
        ) from None
