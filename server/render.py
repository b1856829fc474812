"""Merge map -> PNG bytes (runs in the inference thread that computed the map, beside its pixels)."""

from __future__ import annotations

import io

import torch

import tome


def merge_map_png(pixels: torch.Tensor, source: torch.Tensor, patch_size: tuple[int, int]) -> bytes:
    """Draw which patches of ``pixels`` (the resized, cropped uint8 [3, H, W] model input) merged
    into which token; ``source`` is the final token of every input token."""
    image = tome.visualize(pixels.permute(1, 2, 0).numpy(), source, patch_size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
