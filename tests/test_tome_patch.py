"""What patching accepts, refuses and keeps."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
from tiny import TINY, images, make

import tome


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("eva02_tiny_patch14_224", dict(TINY, img_size=56)),
        ("swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))),
        ("resnet18", {}),
        ("vit_small_patch16_18x2_224", dict(TINY, img_size=64)),  # parallel blocks
    ],
)
def test_unsupported_models_are_refused_and_left_untouched(name, kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs)
    before_cls = type(model)
    before_modules = [type(m) for m in model.modules()]
    before_state = copy.deepcopy(model.state_dict())
    with pytest.raises(tome.UnsupportedModelError, match=before_cls.__name__):
        tome.patch(model)
    assert type(model) is before_cls
    assert [type(m) for m in model.modules()] == before_modules
    assert not hasattr(model, "r")
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())


def test_subclass_with_its_own_forward_features_is_refused():
    class Custom(timm.models.vision_transformer.VisionTransformer):
        def forward_features(self, x):
            return super().forward_features(x)

    model = Custom(img_size=32, patch_size=16, **TINY)
    with pytest.raises(tome.UnsupportedModelError, match="Custom has its own forward_features"):
        tome.patch(model)


def test_non_vit_module_is_refused():
    with pytest.raises(tome.UnsupportedModelError, match="Sequential"):
        tome.patch(nn.Sequential(nn.Linear(2, 2)))


def test_patch_keeps_weights_and_state_dict_keys_and_is_idempotent():
    model = make("deit3_layerscale")
    state = copy.deepcopy(model.state_dict())
    patched = tome.patch(model)
    assert patched is model
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    assert model.r == 0
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.r = 4
    cls = type(model)
    tome.patch(model, prop_attn=False)
    assert type(model) is cls and model.r == 4 and model.tome_prop_attn is False
    model.load_state_dict(state)  # loading timm checkpoints into a patched model still works


def test_attention_masks_cannot_be_combined_with_merging():
    model = tome.patch(make("augreg_vit_p16"))
    x = images(model)
    mask = torch.zeros(x.shape[0], 1, 17, 17)
    with torch.no_grad():
        model.forward_features(x, attn_mask=mask)  # fine without merging
        with tome.merging(r=2), pytest.raises(ValueError, match="attention masks"):
            model.forward_features(x, attn_mask=mask)
