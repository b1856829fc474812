"""The fast preprocessing paths give what timm's evaluation transform gives, within a few levels.

Two shortcuts save most of the per-image CPU on large uploads: the resize and the centre crop run as
one resampling of the cropped region (``Image.resize(box=...)``), and a JPEG much larger than the
model input is decoded at 1/2, 1/4 or 1/8 scale (``decode_image(..., reduce_to=...)``). Both are
compared here with the model's own transform (``timm.data.create_transform``) on a full decode.
The images are synthetic but photo-like: smooth colour, sharp-edged shapes, fine texture.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from timm.data import create_transform, resolve_model_data_config

from tome_serve.images import DRAFTED_FROM, Preprocessor, decode_image

MODELS = {
    "vit_small_patch16_224": {},  # crop_pct 0.9: resize 248, crop 224
    "vit_base_patch16_clip_224": {"depth": 1},  # crop_pct 0.95: resize 235, crop 224
    "vit_tiny_patch16_224": {"depth": 1, "img_size": 64, "patch_size": 8},  # a 64x64 input
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_preprocessor(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, Preprocessor]:
    model = timm.create_model(request.param, pretrained=False, **MODELS[request.param]).eval()
    return model, Preprocessor.for_model(model)


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(smooth).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    texture = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + texture, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def timm_pixels(model: torch.nn.Module, preprocessor: Preprocessor, image: Image.Image) -> torch.Tensor:
    """The model's own evaluation transform, undone back to uint8 levels (0..255)."""
    config = resolve_model_data_config(model)
    config["input_size"] = preprocessor.input_size
    tensor = create_transform(**config, is_training=False)(image)
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    return tensor * std + mean


def level_difference(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max, mean) absolute difference in uint8 levels."""
    difference = (ours.float() - reference * 255.0).abs()
    return float(difference.max()), float(difference.mean())


@pytest.mark.parametrize("size", [(320, 320), (640, 427), (427, 640), (1000, 701), (255, 700), (2000, 1333)])
def test_one_pass_resize_and_crop_equals_timm(model_and_preprocessor, size: tuple[int, int]) -> None:
    model, preprocessor = model_and_preprocessor
    image = photo_like(*size)
    worst, mean = level_difference(preprocessor(image), timm_pixels(model, preprocessor, image))
    assert preprocessor(image).shape == (3, *preprocessor.input_size[1:])
    # Measured: at most 1 level and a mean of 0.0004 for most sizes; at some sizes Pillow's kernel
    # window over the box lands one source row differently (mean 0.22 levels, at most 6 at sharp edges).
    assert worst <= 8 and mean <= 0.3, (worst, mean)


@pytest.mark.parametrize("size", [(100, 80), (224, 224), (230, 300)])
def test_small_images_take_the_transform_itself(model_and_preprocessor, size: tuple[int, int]) -> None:
    """Enlarging (and padding) run timm's own steps: equal to a rounding."""
    model, preprocessor = model_and_preprocessor
    image = photo_like(*size)
    worst, _ = level_difference(preprocessor(image), timm_pixels(model, preprocessor, image))
    assert worst <= 1.01  # timm rounds in float, ours in uint8: one level at most


def test_other_modes_are_converted(model_and_preprocessor) -> None:
    model, preprocessor = model_and_preprocessor
    grey = photo_like(500, 400).convert("L")
    worst, _ = level_difference(preprocessor(grey), timm_pixels(model, preprocessor, grey.convert("RGB")))
    assert worst <= 3.5


@pytest.mark.parametrize("size", [(1600, 1200), (1200, 1600), (3000, 2002), (4032, 3024)])
def test_reduced_scale_jpeg_decoding_stays_close_to_a_full_decode(size: tuple[int, int]) -> None:
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1).eval()
    preprocessor = Preprocessor.for_model(model)
    data = jpeg(photo_like(*size, seed=sum(size)))
    full = decode_image(data, 10**8)
    reduced = decode_image(data, 10**8, reduce_to=preprocessor.resize_short_side)
    assert full.size == size
    assert min(reduced.size) >= 2 * preprocessor.resize_short_side  # never reduced below twice
    assert reduced.width * reduced.height * 4 <= size[0] * size[1]  # a quarter of the pixels or fewer
    assert reduced.info[DRAFTED_FROM][:2] == size
    worst, mean = level_difference(preprocessor(reduced), timm_pixels(model, preprocessor, full))
    assert worst <= 12 and mean <= 0.6, (worst, mean)  # measured on photos: <= 9 levels, mean <= 0.48


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_turned_jpeg_keeps_its_geometry_when_reduced(orientation: int) -> None:
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1).eval()
    preprocessor = Preprocessor.for_model(model)
    image = photo_like(2001, 1333, seed=5)  # odd sides: the drafted image ends in partial blocks
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    full = decode_image(buffer.getvalue(), 10**8)
    reduced = decode_image(buffer.getvalue(), 10**8, reduce_to=preprocessor.resize_short_side)
    assert (full.height > full.width) == (orientation >= 5) == (reduced.height > reduced.width)
    worst, mean = level_difference(preprocessor(reduced), timm_pixels(model, preprocessor, full))
    assert worst <= 12 and mean <= 0.6, (worst, mean)


def test_small_and_non_jpeg_images_are_decoded_in_full() -> None:
    small = decode_image(jpeg(photo_like(600, 400)), 10**8, reduce_to=248)
    assert small.size == (600, 400) and DRAFTED_FROM not in small.info
    buffer = io.BytesIO()
    photo_like(2000, 1500).save(buffer, format="PNG")
    png = decode_image(buffer.getvalue(), 10**8, reduce_to=248)
    assert png.size == (2000, 1500)


def test_pixel_limit_applies_to_the_declared_size() -> None:
    from tome_serve.images import ImageError

    with pytest.raises(ImageError) as caught:
        decode_image(jpeg(photo_like(2000, 1500)), 2_000_000, reduce_to=248)
    assert caught.value.status_code == 413
