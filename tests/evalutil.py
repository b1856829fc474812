"""Helpers for the tome-eval tests: a tiny ViT with a classifier that separates the test's colours,
and image folders written with PIL."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import tome

TINY = {"embed_dim": 64, "depth": 4, "num_heads": 2, "img_size": 64}
MODEL = "vit_tiny_patch16_224"
NUM_CLASSES = 8
# One base colour per class folder; the classifier is built so these land in their own class.
BASES = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 50)]


def tiny_model(num_classes: int = NUM_CLASSES, seed: int = 0, **overrides: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False, num_classes=num_classes, **{**TINY, **overrides})
    return tome.patch(model).eval()


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
    return [
        "--model",
        MODEL,
        "--weights",
        str(weights),
        "--model-kwargs",
        json.dumps({**TINY, **overrides, "num_classes": num_classes}),
        "--workers",
        "0",
        "--no-progress",
        "--batch-size",
        "4",
        "--timing-rounds",
        "2",
    ]
