"""The test suite's one tiny ViT, its per-family variants, and the images the tests feed it.

Every test model is a timm model name built with :data:`TINY` (4 blocks, 64 channels, 2 heads) and
random weights: :func:`tiny_vit` is the one builder. Fixtures that share these live in conftest.py;
this module holds the plain functions, because pytest's conftest files are not meant to be imported.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import tome

TINY = dict(embed_dim=64, depth=4, num_heads=2)
"""The tiny configuration every test model shares."""
NAME = "vit_tiny_patch16_224"
"""The timm name the tiny model is built from when a test needs no particular family."""

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
"""A tiny version of every model family tome supports, from timm's own model names."""


def tiny_vit(name: str = NAME, seed: int = 0, **kwargs) -> torch.nn.Module:
    """``name`` built with :data:`TINY` (overridden by ``kwargs``), seeded random weights, eval mode."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **{**TINY, **kwargs}).eval()


def make(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """The tiny model of one family, with weights that make merging visibly change the output."""
    name, kwargs = FAMILIES[family]
    return make_named(name, seed, **{**TINY, **kwargs, **overrides})


def make_named(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """``name`` as timm builds it with ``kwargs`` (full size without them), with those weights."""
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


def with_reference(
    model: torch.nn.Module, batch: int = 2, **patch_kwargs: object
) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """``model`` patched in place, an unpatched copy of it to compare with, and images for both."""
    reference = copy.deepcopy(model)
    tome.patch(model, **patch_kwargs)
    return model, reference, images(model, batch=batch)


def images(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator)


# --- tome-eval: a classifier that separates the tests' colours, and image folders ---------------

EVAL_KWARGS = dict(img_size=64)
"""tome-eval's tiny model: 64 px with 16 px patches, 17 tokens."""
NUM_CLASSES = 8
BASES = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 50)]
"""One base colour per class folder; the classifier is built so these land in their own class."""


def eval_model(num_classes: int = NUM_CLASSES, seed: int = 0, **overrides: int) -> torch.nn.Module:
    return tome.patch(tiny_vit(NAME, seed, num_classes=num_classes, **{**EVAL_KWARGS, **overrides}))


def solid_tensor(model: torch.nn.Module, rgb: tuple[int, int, int]) -> torch.Tensor:
    """The model input for a one-colour image, built by hand from the model's mean and std."""
    mean = torch.tensor(model.pretrained_cfg["mean"])
    std = torch.tensor(model.pretrained_cfg["std"])
    value = (torch.tensor(rgb, dtype=torch.float32) / 255 - mean) / std
    return value[:, None, None].expand(3, *model.patch_embed.img_size).clone()


def give_colour_classifier(model: torch.nn.Module) -> None:
    """Nearest-class-mean head over the base colours: clear margins, so int8 or compile noise
    does not flip predictions by chance, while off-colour images can still be misclassified."""
    with torch.inference_mode():
        inputs = torch.stack([solid_tensor(model, rgb) for rgb in BASES])
        features = model.forward_head(model.forward_features(inputs), pre_logits=True)
        centred = features - features.mean(dim=0)
        weight = torch.randn(model.num_classes, features.shape[1]) * 0.01
        weight[: len(BASES)] = centred / centred.norm(dim=1, keepdim=True)
        model.head.weight.copy_(weight * 10)
        model.head.bias.zero_()


def write_weights(path: Path, model: torch.nn.Module) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def solid_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (80, 72)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def pattern_image(path: Path, rgb: tuple[int, int, int], seed: int) -> None:
    """A base colour with a blocky random pattern, so tokens differ and merging has choices to make."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(-60, 61, (8, 8, 3), generator=generator)
    pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize((72, 72), Image.NEAREST).save(path)


def shade(rgb: tuple[int, int, int], delta: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + delta)) for c in rgb)  # type: ignore[return-value]


def labelled_pattern_folder(root: Path, per_class: int = 5) -> None:
    for label, rgb in enumerate(BASES):
        for i in range(per_class):
            pattern_image(root / str(label) / f"img{i}.png", rgb, seed=100 * label + i)


def labelled_solid_folder(root: Path) -> dict[Path, tuple[int, tuple[int, int, int]]]:
    """Three one-colour images per class folder, one of them deliberately in the wrong folder's
    colour, so accuracy is neither 0 nor 1. Returns each file's label and colour."""
    written = {}
    for label, rgb in enumerate(BASES):
        colours = [shade(rgb, -15), shade(rgb, 20), BASES[(label + 1) % len(BASES)]]
        for i, colour in enumerate(colours):
            path = root / str(label) / f"img{i}.png"
            solid_image(path, colour)
            written[path] = (label, colour)
    return written


def model_args(weights: Path, num_classes: int = NUM_CLASSES, **overrides: int) -> list[str]:
    """tome-eval's arguments for the tiny model with ``weights``: small batches, two timing rounds."""
    kwargs = {**TINY, **EVAL_KWARGS, **overrides, "num_classes": num_classes}
    return ["--model", NAME, "--weights", str(weights), "--model-kwargs", json.dumps(kwargs)] + [
        "--workers",
        "0",
        "--no-progress",
        "--batch-size",
        "4",
        "--timing-rounds",
        "2",
    ]
