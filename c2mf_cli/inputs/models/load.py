"""Build a classifier: a timm name, or a user's factory (`path/file.py:factory`, `package.module:factory`)."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import C2MFError, UsageError
from .checkpoints import LoadReport, file_sha256, load_checkpoint, state_dict_sha256
from .spec import ModelSpec, Preprocess, preprocess_from_model


@dataclass
class LoadedModel:
    """A model in eval mode, the spec it was built from, its preprocessing and the sha256 of its weights."""

    model: nn.Module
    spec: ModelSpec
    preprocess: Preprocess
    weights_sha256: str
    preprocess_declared: bool = True
    report: LoadReport | None = None


def _import_factory(name: str):
    target, _, attr = name.rpartition(":")
    if not target or not attr:
        raise UsageError(f"model {name!r}: a factory is given as path/to/file.py:factory or package.module:factory")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise C2MFError(f"model file {str(path)!r} does not exist: give path/to/file.py:factory")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        mod_name = f"c2mf_user_model_{path.stem}_{digest}"
        if mod_name in sys.modules:
            module = sys.modules[mod_name]
        else:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise C2MFError(f"cannot import {str(path)!r} as a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[mod_name]
                raise C2MFError(f"importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise C2MFError(f"cannot import module {target!r} for model {name!r}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        available = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(attr, available, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise C2MFError(f"{target!r} has no callable {attr!r}.{hint}")
    return factory


def _unknown_timm_model(name: str) -> C2MFError:
    import timm

    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return C2MFError(
        f"unknown model {name!r}: not a timm architecture, and not a factory (path/file.py:factory).{hint}"
    )


def _create_timm(spec: ModelSpec, num_classes: int | None) -> nn.Module:
    import timm

    arch, _tag = timm.models.split_model_name_tag(spec.name)
    if not timm.is_model(arch):
        raise _unknown_timm_model(spec.name)
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if not spec.pretrained:
        return timm.create_model(spec.name, pretrained=False, **kwargs)
    try:
        return timm.create_model(spec.name, pretrained=True, **kwargs)
    except Exception as e:  # hub errors come in many types (offline, HTTP, missing files)
        raise C2MFError(
            f"could not get the pretrained weights of {spec.name!r} ({type(e).__name__}): no network or no such "
            "weights. Download them where there is a network and pass --checkpoint PATH, or use --no-pretrained"
        ) from None



def load_model(
    spec: ModelSpec,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    preprocess_overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    """Build the model of `spec`, load its weights, put it in eval mode, and resolve its preprocessing.

    Random initialisation (no checkpoint, not pretrained) is seeded so the same spec gives the same weights.
    """
    torch.manual_seed(seed)
    if spec.is_factory:
        if spec.pretrained:
            raise UsageError("--pretrained applies to timm names; a factory model takes its weights from --checkpoint")
        factory = _import_factory(spec.name)
        try:
            model = factory(num_classes=num_classes) if num_classes is not None else factory()
        except Exception as e:
            raise C2MFError(f"the factory {spec.name!r} failed: {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise C2MFError(f"the factory {spec.name!r} returned a {type(model).__name__}, not a torch nn.Module")
    else:
        if spec.pretrained and spec.checkpoint:
            raise UsageError("give either --pretrained or --checkpoint, not both")
        model = _create_timm(spec, num_classes)
    report = None
    if spec.checkpoint:
        report = load_checkpoint(model, spec.checkpoint)
        digest = file_sha256(Path(spec.checkpoint).expanduser())
    else:
        digest = state_dict_sha256(model)
    model.eval()
    preprocess, declared = preprocess_from_model(model, **(preprocess_overrides or {}))
    return LoadedModel(model, spec, preprocess, digest, declared, report)
