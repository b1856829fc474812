"""Model creation with random, file and hub weights (the hub itself is unreachable in tests)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models import vision_transformer
from tiny import TINY, write_weights

from tome_runtime import weights as weights_module
from tome_runtime.weights import WeightsError, create
from tome_serve.threads import torch_threads

NAME, KWARGS = "vit_tiny_patch16_224", dict(TINY, img_size=32, num_classes=5)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def test_random_weights_are_seeded():
    first, second = create(NAME, "random", KWARGS), create(NAME, "random", KWARGS)
    assert first.source == "random" and _same(first.model, second.model)
    assert not _same(first.model, create(NAME, "random", KWARGS, seed=1).model)


def test_random_weights_do_not_depend_on_the_loading_threads():
    # The server creates models on one torch thread (tome_serve.threads.loading_threads); the seeded
    # weights must be the same as on every core's thread. Full-width ViT-Ti: its large tensors are
    # split between threads (torch's grain is 32768 elements), the tiny model's are not.
    with torch_threads(1):
        one = create(NAME, "random", {"img_size": 32, "num_classes": 5})
    with torch_threads(3):
        three = create(NAME, "random", {"img_size": 32, "num_classes": 5})
    assert max(p.numel() for p in one.model.parameters()) > 32768
    assert _same(one.model, three.model)


def test_training_checkpoint_wrappers_and_prefixes_are_unwrapped(tmp_path):
    source = create(NAME, "random", KWARGS, seed=3).model
    wrapped = {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    built = create(NAME, str(tmp_path / "ckpt.pth"), KWARGS)
    assert built.source == str(tmp_path / "ckpt.pth") and built.missing_head == []
    assert _same(built.model, source)


def test_compiled_model_checkpoint_loads(tmp_path):
    # torch.compile wraps the model; its state_dict keys start with "_orig_mod." (also inside DDP).
    source = create(NAME, "random", KWARGS, seed=4).model
    state = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "compiled.safetensors")
    torch.save(
        {"model": {f"_orig_mod.module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "c.pth"
    )
    for path in (tmp_path / "compiled.safetensors", tmp_path / "c.pth"):
        built = create(NAME, str(path), KWARGS)
        assert built.missing_head == [] and _same(built.model, source)


def test_a_backbone_file_loads_and_reports_the_missing_head(tmp_path):
    source = create(NAME, "random", KWARGS, seed=3).model
    save_file(
        {k: v for k, v in source.state_dict().items() if not k.startswith("head.")},
        tmp_path / "backbone.safetensors",
    )
    built = create(NAME, str(tmp_path / "backbone.safetensors"), KWARGS)
    assert sorted(built.missing_head) == ["head.bias", "head.weight"]
    assert torch.equal(built.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_a_complete_file_skips_the_random_init(tmp_path, monkeypatch):
    # The random init runs on real memory only when the file lacks a tensor (see the head test below).
    source = create(NAME, "random", KWARGS, seed=3).model
    path = write_weights(tmp_path / "full.safetensors", source)
    inits: list[bool] = []
    init = vision_transformer.trunc_normal_

    def spy(tensor: torch.Tensor, **kwargs: float) -> torch.Tensor:
        inits.append(tensor.is_meta)
        return init(tensor, **kwargs)

    monkeypatch.setattr(vision_transformer, "trunc_normal_", spy)
    built = create(NAME, str(path), KWARGS)
    assert inits and all(inits) and built.missing_head == [] and _same(built.model, source)
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    save_file(backbone, tmp_path / "backbone.safetensors")
    inits.clear()
    create(NAME, str(tmp_path / "backbone.safetensors"), KWARGS)
    assert not all(inits)


def test_a_missing_head_keeps_the_seeded_init(tmp_path):
    source = create(NAME, "random", KWARGS, seed=3).model
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    save_file(backbone, tmp_path / "backbone.safetensors")
    built = create(NAME, str(tmp_path / "backbone.safetensors"), KWARGS).model
    seeded = create(NAME, "random", KWARGS).model
    assert torch.equal(built.head.weight, seeded.head.weight)
    assert torch.equal(built.head.bias, seeded.head.bias)
    assert torch.equal(built.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("kept_as", ["non-persistent buffer", "plain attribute"])
def test_a_tensor_no_file_holds_keeps_the_value_it_was_built_with(tmp_path, monkeypatch, kept_as):
    # A tensor computed in __init__ and never saved would be empty memory (or left on the meta device)
    # if the model were built on the meta device: such a model is built the usual way.
    path = write_weights(tmp_path / "full.safetensors", create(NAME, "random", KWARGS, seed=3).model)
    build = weights_module._timm_model

    def with_grid(name, pretrained, kwargs):
        model = build(name, pretrained, kwargs)
        if kept_as == "plain attribute":
            model.grid = torch.arange(4.0)
        else:
            model.register_buffer("grid", torch.arange(4.0), persistent=False)
        return model

    monkeypatch.setattr(weights_module, "_timm_model", with_grid)
    assert torch.equal(create(NAME, str(path), KWARGS).model.grid, torch.arange(4.0))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"not a checkpoint", "cannot read weights"),
        ({"weights": torch.zeros(1), "config": Path("config.yaml")}, "weights_only"),
        ({"blocks.99.mlp.fc1.weight": torch.zeros(1)}, "does not fit"),
    ],
)
def test_bad_weight_files_are_refused_with_a_reason(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=message):
        create(NAME, str(path), KWARGS)


def test_unknown_models_and_bad_kwargs_are_refused():
    with pytest.raises(WeightsError, match="no model named"):
        create("vit_does_not_exist", "random", {})
    with pytest.raises(WeightsError, match="cannot create"):
        create(NAME, "random", {"no_such_kwarg": 1})
