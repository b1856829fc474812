"""Merge maps as in the ToMe paper: patches of one final token share their mean colour and a border."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _as_rgb_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    array = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.permute(1, 2, 0) * 255.0  # a [3, H, W] tensor in [0, 1]
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {tuple(array.shape)}")
    return array


def _palette(num_colors: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(40, 256, (num_colors, 3), generator=generator).float()


def _boundaries(labels: torch.Tensor) -> torch.Tensor:
    edge = torch.zeros_like(labels, dtype=torch.bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge


def visualize(
    image: Image.Image | np.ndarray | torch.Tensor,
    source: torch.Tensor,
    patch_size: int | tuple[int, int],
    *,
    scale: int = 1,
    border: bool = True,
    seed: int = 0,
) -> Image.Image:
    """Draw which patches were merged into which final token.

    ``image`` is the model input (after resizing and cropping) as a PIL image, an HxWx3 array, or
    a 3xHxW tensor in [0, 1]. ``source`` is one image's row of ``MergeInfo.source`` ([N_in], prefix
    tokens first). Every final token's patches are filled with their mean colour, and with ``border``
    each group is outlined in a colour of its own. ``scale`` enlarges the output (nearest neighbour).
    """
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    pixels = _as_rgb_tensor(image)
    grid_h, grid_w = pixels.shape[0] // ph, pixels.shape[1] // pw
    source = torch.as_tensor(source).reshape(-1).cpu()
    num_prefix = source.numel() - grid_h * grid_w
    if num_prefix < 0:
        raise ValueError(f"source has {source.numel()} tokens, fewer than the {grid_h}x{grid_w} patch grid")
    pixels = pixels[: grid_h * ph, : grid_w * pw]
    labels = source[num_prefix:].view(grid_h, grid_w)
    labels = torch.unique(labels, return_inverse=True)[1]  # dense ids 0..G-1

    patch_means = pixels.view(grid_h, ph, grid_w, pw, 3).mean(dim=(1, 3)).reshape(-1, 3)
    num_groups = int(labels.max()) + 1
    flat = labels.reshape(-1)
    group_sum = torch.zeros(num_groups, 3).index_add_(0, flat, patch_means)
    group_mean = group_sum / torch.bincount(flat, minlength=num_groups)[:, None]

    pixel_labels = labels.repeat_interleave(ph * scale, 0).repeat_interleave(pw * scale, 1)
    out = group_mean[pixel_labels]
    if border:
        edge = _boundaries(pixel_labels)
        out[edge] = _palette(num_groups, seed)[pixel_labels[edge]]
    return Image.fromarray(out.round().clamp(0, 255).to(torch.uint8).numpy())
