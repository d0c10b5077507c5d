"""Model registry and the flat-parameter view."""

import pytest
import torch

from contra_ray.models import (MODEL_NAMES, ModelSpec, build_model, flat_params, functional_forward, load_flat_params,
                               num_params)


def test_convnet3_matches_mtt_parameter_count():
    # 3 x [conv3x3 (in*128*9 + 128) + GroupNorm affine (256)] + linear 128*4*4*10 + 10 (MTT ConvNet, CIFAR-10)
    expected = (3 * 128 * 9 + 128 + 256) + 2 * (128 * 128 * 9 + 128 + 256) + 128 * 16 * 10 + 10
    assert num_params(build_model(ModelSpec())) == expected == 320_010


def test_convnet_depth_follows_image_size():
    assert ModelSpec(image_size=32).resolved_depth() == 3
    assert ModelSpec(image_size=64).resolved_depth() == 4
    m = build_model(ModelSpec(image_size=64, num_classes=200, width=8))
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 200)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_classifies_small_images(name):
    torch.manual_seed(0)
    m = build_model(ModelSpec(name, num_classes=10, image_size=32, width=8)).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_functional_forward_equals_module_forward_and_round_trips():
    torch.manual_seed(0)
    m = build_model(ModelSpec(width=8))
    x = torch.randn(4, 3, 32, 32)
    flat = flat_params(m)
    assert flat.shape == (num_params(m),)
    assert torch.allclose(functional_forward(m, flat, x), m(x), atol=1e-6)
    other = build_model(ModelSpec(width=8))
    load_flat_params(other, flat)
    assert torch.equal(flat_params(other), flat)
    with pytest.raises(ValueError, match="flat parameter vector has 3 entries"):
        load_flat_params(other, torch.zeros(3))


def test_unknown_model_named():
    with pytest.raises(ValueError, match="model.name='vit_x' is unknown"):
        build_model(ModelSpec("vit_x"))
