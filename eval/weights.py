"""Build the timm model to evaluate: hub weights, a local file, or random, then patch it for ToMe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

import tome
import tome_runtime.weights

from .errors import EvalInputError


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
    try:
        built = tome_runtime.weights.create(name, weights, model_kwargs, seed)
        tome.patch(built.model)
    except (tome_runtime.weights.WeightsError, tome.UnsupportedModelError) as error:
        raise EvalInputError(str(error)) from None
    except Exception as error:  # the hub client raises many kinds of network and cache errors
        if weights != "pretrained":
            raise
        raise EvalInputError(_no_pretrained(name, error)) from None
    return LoadedModel(built.model.eval(), built.source, built.missing_head)


def _no_pretrained(name: str, error: Exception) -> str:
    reason = (str(error).strip().splitlines() or [""])[0]
    return (
        f"could not obtain pretrained weights for {name} ({type(error).__name__}: {reason}); without "
        "the model hub, pass --weights with a local .safetensors or .pth file, or --weights random"
    )
