"""Reopen the model a store or a dictionary was made with: load it, check its weights, split it at the layer.

Every stage that needs the model again (evaluate's tail h, explain's g and h, atlas) goes through `reopen`, so
all of them give the same guarantee: the weights are those recorded (sha256), and f = h o g holds exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import C2MFError
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


def reopen(
    spec: ModelSpec,
    layer: str,
    expected_sha256: str | None,
    *,
    input_size: tuple[int, int, int] | None = None,
    what: str = "the store",
    allow_other_weights: bool = False,
    hint: str = "the checkpoint file changed; give --checkpoint with the original weights",
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

    Raises:
        WeightsMismatch: the weights differ from the recorded ones and `allow_other_weights` is False.
        CannotSplit: the model does not split exactly at `layer`.
        C2MFError: the model cannot be loaded.
    """
    loaded = load_model(spec)
    # the split first: when another architecture was named, that is the cause to report, not its other weights
    try:
        split = split_model(loaded.model, layer, input_size or loaded.preprocess.input_size, verify=True)
    except C2MFError as e:
        raise CannotSplit(str(e)) from None
    warnings: list[str] = []
    if expected_sha256 and loaded.weights_sha256 != expected_sha256:
        mismatch = WeightsMismatch(loaded.weights_sha256, expected_sha256, what, hint)
        if not allow_other_weights:
            raise mismatch
        warnings.append(mismatch.fact)
    return Reopened(loaded, split, warnings)
