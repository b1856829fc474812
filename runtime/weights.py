"""Create a timm model with weights from the model hub, a local file, or a seeded random init.

The server and ``tome-eval`` both build their models here, so a weights file means the same to
both. Files go through timm's own checkpoint loader (``timm.models.load_checkpoint``):
safetensors, or a torch file read with ``weights_only=True``; training-checkpoint wrappers and
``module.``/``_orig_mod.`` prefixes are removed; the model family's checkpoint filter runs (key
renames, position embeddings resampled to the model's image size). This module adds the checks
and the messages: only classifier-head weights may be missing.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import load_checkpoint
from torch import nn

RANDOM_SEED = 0
"""``random`` weights are seeded, so every process that asks for them gets the same model."""


class WeightsError(ValueError):
    """The model or its weights cannot be had; the message says why."""


@dataclass(frozen=True)
class WeightedModel:
    model: nn.Module
    source: str
    """'pretrained', 'random' or the path of the weights file."""
    missing_head: list[str] = field(default_factory=list)
    """Classifier-head parameters the file lacked: they keep their random initialisation."""


def create(name: str, weights: str, model_kwargs: dict[str, Any], seed: int = RANDOM_SEED) -> WeightedModel:
    """``weights`` is 'pretrained' (model hub, cached under HF_HOME), 'random', or a file path.

    Errors from the hub itself (no network, say) propagate unchanged, so callers can add advice.
    """
    if not timm.is_model(name):
        raise WeightsError(f"timm has no model named {name!r} (see timm.list_models())")
    if weights == "pretrained":
        return WeightedModel(_timm_model(name, True, model_kwargs), "pretrained")
    path = Path(weights).expanduser()
    if weights != "random" and (filled := _filled_from(name, path, model_kwargs)) is not None:
        return WeightedModel(filled, str(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # also fixes the random head of a file without one
        model = _timm_model(name, False, model_kwargs)
    if weights == "random":
        return WeightedModel(model, "random")
    return WeightedModel(model, str(path), load_file_into(model, path))


def _filled_from(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module | None:
    """``name`` with every tensor from the file at ``path``, skipping timm's random init, which the
    file would overwrite anyway (ViT-S/16: 0.69 -> 0.44 s on one thread). The model is built on the
    meta device, given empty memory, and filled by timm's loader with every key required.

    None when that cannot be done exactly: a file without some tensors (its head keeps the seeded
    init, so the caller builds the model that way), a model with tensors no file holds (non-persistent
    buffers, plain tensor attributes) or whose construction reads tensor values, a ``.npz`` (loaded
    by the model's own loader), or any error, which the caller's slower path reports properly."""
    if not path.is_file() or path.suffix.lower() == ".npz":
        return None
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = _timm_model(name, False, kwargs)
        tensors = {name for name, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        if tensors != set(model.state_dict()):
            return None
        model.to_empty(device="cpu")
        if _meta_attributes(model):
            return None
        family = sys.modules.get(type(model).__module__)
        filter_fn = getattr(family, "checkpoint_filter_fn", None)
        load_checkpoint(model, str(path), strict=True, filter_fn=filter_fn, weights_only=True)
    except Exception:  # the caller's path loads it again and says what is wrong
        return None
    return model


def _meta_attributes(model: nn.Module) -> bool:
    """Whether a module keeps a tensor outside its parameters and buffers (left on the meta device)."""
    return any(
        isinstance(value, torch.Tensor) and value.is_meta
        for module in model.modules()
        for value in vars(module).values()
    )


def _timm_model(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise WeightsError(f"cannot create {name} with {kwargs}: {error}") from error


def load_file_into(model: nn.Module, path: Path) -> list[str]:
    """Load ``path`` into ``model`` with timm's checkpoint loader; returns the head keys it lacked.

    timm reads safetensors or a torch file (``weights_only=True``), unwraps training checkpoints
    (EMA weights first, then ``state_dict`` or ``model``), strips ``module.`` and ``_orig_mod.``
    prefixes (DataParallel, ``torch.compile``) and runs the model family's checkpoint filter. Any
    gap but the classifier head is an error, as is anything that is not a plain state_dict.
    """
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; use 'pretrained', 'random' or the path of a weights file"
        )
    name = model.pretrained_cfg.get("architecture", type(model).__name__)
    family = sys.modules.get(type(model).__module__)
    try:
        incompatible = load_checkpoint(
            model,
            str(path),
            strict=False,
            filter_fn=getattr(family, "checkpoint_filter_fn", None),
            weights_only=True,
        )
    except RuntimeError as error:
        raise _load_error(error, path, name) from error
    except Exception as error:  # every other reader failure means the same to the user
        raise WeightsError(f"cannot read weights from {path}: {_first_line(error)}") from error
    if incompatible is None:  # a numpy (.npz) checkpoint, loaded by the model's own loader
        return []
    head = _head_prefixes(model)
    body_missing = [key for key in incompatible.missing_keys if not key.startswith(head)]
    if body_missing or incompatible.unexpected_keys:
        raise WeightsError(
            f"{path} does not fit {name}: missing {body_missing[:8]}, "
            f"unexpected {incompatible.unexpected_keys[:8]} (is it for another model?)"
        )
    return list(incompatible.missing_keys)


def _load_error(error: RuntimeError, path: Path, name: str) -> WeightsError:
    cause = error.__cause__
    if isinstance(cause, pickle.UnpicklingError):
        if "Unsupported global" in str(cause):  # a pickle of objects, refused by weights_only=True
            return WeightsError(
                f"{path} holds Python objects besides tensors, which are refused (torch.load with "
                "weights_only=True). Save a plain state_dict, or better, a safetensors file. "
                f"({_first_line(cause)})"
            )
        return WeightsError(f"cannot read weights from {path}: {_first_line(cause)}")
    if "size mismatch" in str(error) or "state_dict" in str(error):  # load_state_dict's shape check
        return WeightsError(f"{path} does not fit {name}: {error}")
    return WeightsError(f"cannot read weights from {path}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return (*(f"{name}." for name in names), "fc_norm.")
