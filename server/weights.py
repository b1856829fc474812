"""Create a timm model with weights from the model hub, a local file, or a seeded random init.

The server and ``tome-eval`` both build their models here, so a weights file means the same to
both: safetensors, or a torch file read with ``weights_only=True``; training-checkpoint wrappers
are unwrapped; the model family's own checkpoint filter runs (key renames, position embeddings
resampled to the model's image size); and only classifier-head weights may be missing.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

RANDOM_SEED = 0
"""``random`` weights are seeded, so every process that asks for them gets the same model."""

_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # also fixes the random head of a file without one
        model = _timm_model(name, False, model_kwargs)
    if weights == "random":
        return WeightedModel(model, "random")
    path = Path(weights).expanduser()
    return WeightedModel(model, str(path), load_file_into(model, path))


def _timm_model(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise WeightsError(f"cannot create {name} with {kwargs}: {error}") from error


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict from a safetensors file, or a torch file that holds only tensors."""
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; use 'pretrained', 'random' or the path of a weights file"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # not a pickle of objects: just unreadable
            raise WeightsError(f"cannot read weights from {path}: {str(error).splitlines()[0]}") from error
        raise WeightsError(
            f"{path} holds Python objects besides tensors, which are refused (torch.load with "
            "weights_only=True). Save a plain state_dict, or better, a safetensors file. "
            f"({str(error).splitlines()[0]})"
        ) from error
    except Exception as error:  # every reader failure means the same to the user
        raise WeightsError(f"cannot read weights from {path}: {error}") from error
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    # Training checkpoints nest the weights one level down; DataParallel prefixes every key.
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_file_into(model: nn.Module, path: Path) -> list[str]:
    """Load ``path`` into ``model``; returns the head keys it lacked. Any other gap is an error."""
    state = _fit_to_model(model, read_state_dict(path))
    name = model.pretrained_cfg.get("architecture", type(model).__name__)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise WeightsError(f"{path} does not fit {name}: {error}") from error
    head = _head_prefixes(model)
    body_missing = [key for key in missing if not key.startswith(head)]
    if body_missing or unexpected:
        raise WeightsError(
            f"{path} does not fit {name}: "
            f"missing {body_missing[:8]}, unexpected {unexpected[:8]} (is it for another model?)"
        )
    return list(missing)


def _fit_to_model(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    family = sys.modules.get(type(model).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    return filter_fn(state, model) if filter_fn is not None else state


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return (*(f"{name}." for name in names), "fc_norm.")
