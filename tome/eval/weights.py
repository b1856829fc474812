"""Build the timm model to evaluate: hub weights, a local file, or random, then patch it for ToMe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

import tome

from .errors import EvalInputError

_WRAPPER_KEYS = ("state_dict", "model", "module")
_HEAD_PREFIXES = ("head.", "head_dist.", "fc_norm.")


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    """The patched model, in eval mode."""
    weights: str
    """'pretrained', 'random' or the file's path."""
    missing_head_keys: list[str] = field(default_factory=list)
    """Classifier-head parameters the weights file did not have: the head stays randomly initialised."""

    @property
    def head_is_random(self) -> bool:
        return self.weights == "random" or bool(self.missing_head_keys)


def build_model(name: str, weights: str, model_kwargs: dict[str, Any], seed: int = 0) -> LoadedModel:
    """``weights`` is 'pretrained' (model hub), 'random', or a path to a safetensors or torch file."""
    torch.manual_seed(seed)  # random weights are the same on every run with the same seed
    pretrained = weights == "pretrained"
    try:
        model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    except RuntimeError as error:
        if not timm.is_model(name):
            raise EvalInputError(f"unknown timm model {name!r}") from None
        raise EvalInputError(f"could not create {name!r} with {model_kwargs}: {error}") from None
    except (TypeError, ValueError) as error:
        raise EvalInputError(f"could not create {name!r} with {model_kwargs}: {error}") from None
    missing_head: list[str] = []
    if weights not in ("pretrained", "random"):
        missing_head = load_weights_file(model, Path(weights))
    try:
        tome.patch(model)
    except tome.UnsupportedModelError as error:
        raise EvalInputError(str(error)) from None
    return LoadedModel(model.eval(), weights, missing_head)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EvalInputError(f"weights file {path} does not exist "
                             "(use 'pretrained', 'random' or a file path)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure means the same to the user: unreadable weights
        raise EvalInputError(f"cannot read weights from {path}: {error}") from None
    for key in _WRAPPER_KEYS:  # training checkpoints nest the weights one level down
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalInputError(f"{path} does not hold a state_dict of tensors")
    return state


def load_weights_file(model: nn.Module, path: Path) -> list[str]:
    """Load ``path`` into ``model``; returns the head keys it lacked. Any other gap is an error."""
    state = read_state_dict(path)
    if isinstance(model, VisionTransformer):
        # timm's own converter: resizes position embeddings and maps other ViT checkpoint formats.
        state = checkpoint_filter_fn(state, model)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise EvalInputError(f"{path} does not fit this model: {error}") from None
    missing_head = [k for k in result.missing_keys if k.startswith(_HEAD_PREFIXES)]
    missing_body = [k for k in result.missing_keys if not k.startswith(_HEAD_PREFIXES)]
    if missing_body:
        raise EvalInputError(f"{path} lacks {len(missing_body)} of the model's weights outside the head "
                             f"(e.g. {', '.join(missing_body[:3])}): is it for another model?")
    if result.unexpected_keys:
        raise EvalInputError(f"{path} has {len(result.unexpected_keys)} weights this model does not "
                             f"(e.g. {', '.join(result.unexpected_keys[:3])}): is it for another model?")
    return missing_head
