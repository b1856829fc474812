"""Start-up loading: weights sources, refusals with useful messages, r range and costs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from serverutil import TINY_MODEL_KWARGS
from timm.data import create_transform

import tome
from tome import largest_useful_r
from tome_serve.config import Settings
from tome_serve.loading import StartupError, load_model

NAME = "vit_tiny_patch16_224"


def settings(weights: str = "random", **overrides: object) -> Settings:
    values = {
        "model": NAME,
        "weights": weights,
        "model_kwargs": TINY_MODEL_KWARGS,
        "device": "cpu",
        "dtype": "float32",
    }
    return Settings(**{**values, **overrides})


def tiny(**kwargs: object) -> torch.nn.Module:
    return timm.create_model(NAME, pretrained=False, **{**TINY_MODEL_KWARGS, **kwargs}).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_weights_are_seeded_patched_and_described() -> None:
    first, second = load_model(NAME, settings()), load_model(NAME, settings())
    assert first.weights == "random"
    assert same_weights(first.module, second.module)  # every server process serves the same model
    assert isinstance(first.module, tome.model.ToMeVisionTransformer)
    assert first.num_tokens == 65 and first.depth == 4 and first.patch_size == (8, 8)
    assert first.preprocessor.input_size == (3, 64, 64)
    assert first.labels[1].startswith("goldfish")
    assert first.limits.ceiling == 32 and first.limits.default == "auto"  # TOME_DEFAULT_R's default
    assert load_model(NAME, settings(default_r=16)).limits.default == 16
    costs = {c.r: c for c in first.costs}
    assert sorted(costs) == list(range(33))
    assert costs[0].speedup == 1.0 and costs[0].gmacs == pytest.approx(tome.gmacs(first.module, r=0))
    assert costs[16].gmacs == pytest.approx(tome.gmacs(first.module, r=16))
    assert costs[16].speedup == pytest.approx(costs[0].gmacs / costs[16].gmacs)
    assert costs[16].output_tokens == tome.token_counts(65, 4, 16)[-1]


def test_largest_useful_r_is_where_the_output_stops_shrinking() -> None:
    model = tiny()
    r_max = largest_useful_r(model)
    assert tome.token_counts(65, 4, r_max)[-1] == tome.token_counts(65, 4, 1000)[-1]
    assert tome.token_counts(65, 4, r_max - 1)[-1] > tome.token_counts(65, 4, r_max)[-1]
    small = timm.create_model("vit_small_patch16_224", pretrained=False)  # 197 tokens, 12 blocks
    assert largest_useful_r(small) == 24
    assert tome.token_counts(197, 12, 24)[-1] == 2


def test_max_r_caps_the_range_and_the_default() -> None:
    loaded = load_model(NAME, settings(max_r=6, default_r=6))
    assert loaded.limits.ceiling == 6 and loaded.limits.default == 6
    assert load_model(NAME, settings(max_r=6)).limits.default == "auto"
    assert [c.r for c in loaded.costs] == list(range(7))


def test_safetensors_file(tmp_path: Path) -> None:
    source = tiny()
    save_file(source.state_dict(), tmp_path / "tiny.safetensors")
    loaded = load_model(NAME, settings(str(tmp_path / "tiny.safetensors")))
    assert loaded.weights == str(tmp_path / "tiny.safetensors") and not loaded.notes
    assert same_weights(source, loaded.module)


def test_wrapped_torch_checkpoint(tmp_path: Path) -> None:
    source = tiny()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    assert same_weights(source, load_model(NAME, settings(str(tmp_path / "ckpt.pth"))).module)


def test_file_without_classifier_head_loads_with_a_warning(tmp_path: Path) -> None:
    source = tiny()
    backbone_only = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    torch.save(backbone_only, tmp_path / "b.pth")
    loaded = load_model(NAME, settings(str(tmp_path / "b.pth")))
    assert "head is random" in loaded.weights
    assert loaded.notes and "classifier head" in loaded.notes[0]
    backbone = {k: v for k, v in loaded.module.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in backbone.items())


def test_backbone_without_head_serves_visualize_only(tmp_path: Path) -> None:
    loaded = load_model(NAME, settings(model_kwargs={**TINY_MODEL_KWARGS, "num_classes": 0}))
    assert loaded.num_classes == 0
    assert any("no classifier head" in note for note in loaded.notes)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"weights": tiny().state_dict(), "config": Path("x")}, tmp_path / "pickle.pth")
    with pytest.raises(StartupError, match="weights_only"):
        load_model(NAME, settings(str(tmp_path / "pickle.pth")))


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    save_file(tiny(embed_dim=32).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(StartupError, match="does not fit"):
        load_model(NAME, settings(str(tmp_path / "other.safetensors")))


def test_missing_file_and_unsupported_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="does not exist"):
        load_model(NAME, settings(str(tmp_path / "absent.safetensors")))
    with pytest.raises(StartupError, match="cannot be served with token merging"):
        load_model("resnet18", settings(model_kwargs={}))
    with pytest.raises(StartupError, match="no model named"):
        load_model("vit_does_not_exist", settings())


def test_preprocessing_matches_the_models_own_transform() -> None:
    loaded = load_model(NAME, settings())
    assert loaded.preprocessor.input_size == (3, 64, 64)  # the model's size, not its pretrained config's
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    pixels = loaded.preprocessor(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64)
    timm_transform = create_transform(**loaded.preprocessor.data_config, is_training=False)
    # Resize and crop run as one resampling of the cropped region: at most one uint8 level apart from
    # timm's resize-then-crop on this image (tests/test_server_preprocess_speed.py bounds it everywhere).
    one_level = float((1 / 255 / loaded.preprocessor.std).max())
    torch.testing.assert_close(
        loaded.preprocessor.model_input(image)[0], timm_transform(image), atol=one_level * 1.01, rtol=0
    )
