"""Tiny versions of every model family tome supports, built from timm's own model names."""

from __future__ import annotations

import timm
import torch

TINY = dict(embed_dim=64, depth=4, num_heads=2)

FAMILIES = {
    "augreg_vit_p16": ("vit_tiny_patch16_224", dict(img_size=64, num_classes=10)),
    "augreg_vit_p32_384": ("vit_small_patch32_384", dict(img_size=128, num_classes=10)),
    "deit": ("deit_tiny_patch16_224", dict(img_size=64, num_classes=10)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64, num_classes=10)),
    "deit3_layerscale": ("deit3_small_patch16_224", dict(img_size=64, num_classes=10)),
    "mae_avg_pool": ("vit_base_patch16_224.mae", dict(img_size=64, num_classes=10, global_pool="avg")),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=56, num_classes=10)),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, num_classes=10)),
    "clip_pre_norm": ("vit_base_patch16_clip_224", dict(img_size=64, num_classes=10)),
    "siglip_map_head": ("vit_base_patch16_siglip_224", dict(img_size=64, num_classes=10)),
    "qk_norm": ("vit_tiny_patch16_224", dict(img_size=64, num_classes=10, qk_norm=True)),
}


def make(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    return make_named(name, seed, **{**TINY, **kwargs, **overrides})


def make_named(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    # timm's init leaves LayerScale tiny, biases zero and the output nearly independent of the image;
    # unit-variance weights make merging visibly change the output, so the comparisons mean something.
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim <= 1:
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, param[0].numel() ** -0.5)
    return model


def images(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator)
