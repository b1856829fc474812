"""Merge map -> PNG bytes (runs in the preprocessing threads, off the event loop)."""

from __future__ import annotations

import io

import torch

import tome

from .models import LoadedModel


def merge_map_png(model: LoadedModel, model_input: torch.Tensor, source: torch.Tensor) -> bytes:
    """Draw which patches of ``model_input`` (the resized, cropped uint8 image) merged into which token."""
    image = tome.visualize(model_input.permute(1, 2, 0).numpy(), source, model.patch_size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
