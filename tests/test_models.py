"""Model registry and the flat-parameter view."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from contra_ray.models import (
    MODEL_NAMES,
    ModelSpec,
    build_model,
    flat_params,
    functional_forward,
    is_distillable,
    load_flat_params,
    num_params,
)


def test_convnet3_matches_mtt_parameter_count():
    # 3 x [conv3x3 (in*128*9 + 128) + GroupNorm affine (256)] + linear 128*4*4*10 + 10 (MTT ConvNet, CIFAR-10)
    expected = (3 * 128 * 9 + 128 + 256) + 2 * (128 * 128 * 9 + 128 + 256) + 128 * 16 * 10 + 10
    assert num_params(build_model(ModelSpec())) == expected == 320_010


# Parameter counts for CIFAR-10 (3 x 32 x 32, 10 classes) computed from MTT's networks.py
# (GeorgeCazenavette/mtt-distillation, ``ResNet18``/``ResNet18BN``, ``VGG11``/``VGG11BN``, ``AlexNet``).
# Instance norm is GroupNorm(C, C, affine) and batch norm BatchNorm2d(C): both 2C parameters, so the
# _bn variants have the same count. (Also checked once against MTT's own modules: same shapes, same outputs.)
_RESNET18 = (
    3 * 64 * 9 + 2 * 64                                                        # stem conv (no bias) + norm
    + 2 * (2 * (64 * 64 * 9 + 2 * 64))                                         # layer1: 2 blocks x 2 convs
    + (64 * 128 * 9 + 2 * 128) + (128 * 128 * 9 + 2 * 128) + (64 * 128 + 2 * 128)  # layer2 block 1 + 1x1
    + 2 * (128 * 128 * 9 + 2 * 128)                                            # layer2 block 2
    + (128 * 256 * 9 + 2 * 256) + (256 * 256 * 9 + 2 * 256) + (128 * 256 + 2 * 256)
    + 2 * (256 * 256 * 9 + 2 * 256)
    + (256 * 512 * 9 + 2 * 512) + (512 * 512 * 9 + 2 * 512) + (256 * 512 + 2 * 512)
    + 2 * (512 * 512 * 9 + 2 * 512)
    + 512 * 10 + 10)                                                           # classifier on 1x1x512
_VGG11 = (
    sum(cin * cout * 9 + cout + 2 * cout                                      # conv (bias) + norm
        for cin, cout in [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512),
                          (512, 512)])
    + 512 * 10 + 10)                                                           # classifier on 1x1x512
_ALEXNET = (3 * 128 * 25 + 128 + 128 * 192 * 25 + 192 + 192 * 256 * 9 + 256 + 256 * 192 * 9 + 192
            + 192 * 192 * 9 + 192 + 192 * 4 * 4 * 10 + 10)                    # fc on 4x4x192
# ViT-Tiny (torchvision VisionTransformer, our patch 4 -> 64 tokens + class token, dim 192, mlp 768):
_VIT_TINY = (3 * 192 * 16 + 192 + 192 + 65 * 192                              # patch conv, class token, pos
             + 12 * (2 * 384 + 192 * 576 + 576 + 192 * 192 + 192 + 192 * 768 + 768 + 768 * 192 + 192)
             + 384 + 192 * 10 + 10)                                            # final LayerNorm, head


@pytest.mark.parametrize("name, expected", [
    ("resnet18", _RESNET18), ("resnet18_bn", _RESNET18), ("vgg11", _VGG11), ("vgg11_bn", _VGG11),
    ("alexnet", _ALEXNET), ("vit_tiny", _VIT_TINY), ("vit", _VIT_TINY)])
def test_parameter_counts_match_mtt_definitions(name, expected):
    assert num_params(build_model(ModelSpec(name))) == expected
    assert (_RESNET18, _VGG11, _ALEXNET, _VIT_TINY) == (11_173_962, 9_231_114, 1_872_202, 5_362_762)


def _norm_layers(model: nn.Module) -> dict[str, int]:
    counts = {"instancenorm": 0, "groupnorm": 0, "batchnorm": 0, "layernorm": 0}
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            counts["instancenorm" if m.num_groups == m.num_channels else "groupnorm"] += 1
        elif isinstance(m, nn.BatchNorm2d):
            counts["batchnorm"] += 1
        elif isinstance(m, nn.LayerNorm):
            counts["layernorm"] += 1
    return {k: v for k, v in counts.items() if v}


@pytest.mark.parametrize("spec, expected", [
    (ModelSpec("convnet"), {"instancenorm": 3}),
    (ModelSpec("convnet", norm="batchnorm"), {"batchnorm": 3}),
    (ModelSpec("convnet", norm="layernorm"), {"layernorm": 3}),
    (ModelSpec("convnet", norm="groupnorm"), {"groupnorm": 3}),
    (ModelSpec("convnet", norm="none"), {}),
    (ModelSpec("resnet18"), {"instancenorm": 1 + 8 * 2 + 3}),  # stem + 2 per block + 3 shortcut projections
    (ModelSpec("resnet18_bn"), {"batchnorm": 20}),
    (ModelSpec("vgg11"), {"instancenorm": 8}),  # one per conv
    (ModelSpec("vgg11_bn"), {"batchnorm": 8}),
    (ModelSpec("alexnet"), {}),
    (ModelSpec("vit_tiny"), {"layernorm": 2 * 12 + 1}),  # two per encoder block + the final one
])
def test_norm_layers_and_described_norm(spec, expected):
    assert _norm_layers(build_model(spec)) == expected
    assert spec.describe().endswith(spec.norm if spec.name != "convnet" else f"{spec.norm}, avgpooling")
    assert (spec.norm in expected) or spec.norm == "none"


def test_describe_names_the_norm():
    assert ModelSpec().describe() == "convnet: ConvNet-D3 width 128, relu, instancenorm, avgpooling"
    assert ModelSpec("resnet18").describe() == "resnet18: ResNet-18 (MTT ResNet18), instancenorm"
    assert ModelSpec("vgg11_bn").describe() == "vgg11_bn: VGG-11 (MTT VGG11BN), batchnorm"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_classifies_small_images(name):
    torch.manual_seed(0)
    m = build_model(ModelSpec(name, num_classes=10, image_size=32, width=8)).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["convnet", "resnet18", "vgg11", "alexnet", "vit_tiny"])
def test_64px_forward(name):
    # MTT supports 64 px for ConvNet only (depth 4); for the others the classifier size follows image_size (ours)
    torch.manual_seed(0)
    m = build_model(ModelSpec(name, num_classes=200, image_size=64, width=8)).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 200)


def test_convnet_depth_follows_image_size():
    assert ModelSpec(image_size=32).resolved_depth() == 3
    assert ModelSpec(image_size=64).resolved_depth() == 4
    m = build_model(ModelSpec(image_size=64, num_classes=200, width=8))
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 200)


def test_model_spec_old_dicts_load_and_round_trip():
    old = {"name": "convnet", "num_classes": 10, "image_size": 32, "channels": 3, "width": 128, "depth": 3}
    spec = ModelSpec.from_dict(old)
    assert spec == ModelSpec(depth=3) == ModelSpec(depth=3, norm="instancenorm", activation="relu",
                                                   pooling="avgpooling")
    d = spec.to_dict()
    assert {k: d[k] for k in old} == old and (d["norm"], d["activation"], d["pooling"]) == \
        ("instancenorm", "relu", "avgpooling")
    assert ModelSpec.from_dict(d) == spec
    r = ModelSpec.from_dict({"name": "resnet18", "num_classes": 10})
    assert (r.norm, r.activation, r.pooling) == ("instancenorm", None, None)
    assert ModelSpec.from_dict(r.to_dict()) == r
    v = ModelSpec("convnet", width=32, depth=2, norm="layernorm", activation="sigmoid", pooling="maxpooling")
    assert ModelSpec.from_dict(v.to_dict()) == v and dataclasses.asdict(v)["norm"] == "layernorm"


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "resnet18", "norm": "batchnorm"}, "model.norm='batchnorm': resnet18 uses instancenorm; use resnet18_bn"),
    ({"name": "alexnet", "norm": "instancenorm"}, "model.norm='instancenorm': alexnet uses none"),
    ({"name": "vgg11", "pooling": "maxpooling"}, "model.pooling='maxpooling': only convnet"),
    ({"norm": "weightnorm"}, "model.norm='weightnorm': unknown; known: instancenorm"),
    ({"activation": "gelu"}, "model.activation='gelu': unknown"),
    ({"pooling": "max"}, "model.pooling='max': unknown"),
])
def test_model_spec_refuses_choices_the_network_lacks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(**kwargs)


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


@pytest.mark.parametrize("spec", [
    ModelSpec("convnet", width=8, norm="layernorm", activation="leakyrelu", pooling="maxpooling"),
    ModelSpec("convnet", width=8, norm="none", activation="sigmoid", pooling="none", depth=2),
    ModelSpec("resnet18"), ModelSpec("vgg11"), ModelSpec("alexnet"), ModelSpec("vit_tiny"),
], ids=lambda s: s.describe().split(":")[0] + "-" + str(s.norm))
def test_functional_forward_works_for_distillable_networks(spec):
    # distillable = the flat vector is the whole state (no buffers); gradients reach every parameter
    torch.manual_seed(0)
    m = build_model(spec)
    assert is_distillable(spec) and not list(m.buffers())
    x = torch.randn(2, 3, 32, 32)
    flat = flat_params(m).requires_grad_(True)
    out = functional_forward(m, flat, x)
    assert torch.allclose(out, m(x), atol=1e-5)
    (g,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), flat)  # not out**2: ViT's head starts at 0
    assert g.shape == flat.shape and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("spec", [ModelSpec("resnet18_bn"), ModelSpec("vgg11_bn"),
                                  ModelSpec("convnet", width=8, norm="batchnorm")])
def test_batchnorm_networks_are_evaluation_only(spec):
    assert not is_distillable(spec)
    assert list(build_model(spec).buffers())  # running statistics live outside the flat parameter vector


def test_vit_trains_on_a_few_images():
    # the evaluation loop itself (contra_ray.evaluate.train_and_test), one full batch of 20 images per epoch
    from contra_ray.config import EvalConfig
    from contra_ray.evaluate.training import train_and_test

    torch.manual_seed(0)
    x, y = torch.randn(20, 3, 32, 32), torch.arange(20) % 10
    targets = torch.nn.functional.one_hot(y, 10).float()
    losses = []
    acc = train_and_test(x, targets, 0.01, ModelSpec("vit"), EvalConfig(epochs=4, batch_size=20, dsa=False), x, y,
                         seed=0, on_epoch=lambda ep, lr, loss: losses.append(loss))
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and 0.0 <= acc <= 1.0
    assert losses[0] == pytest.approx(2.302585, abs=1e-5)  # zero-initialised head: uniform logits, log(10)
    assert losses[-1] < losses[0]


def test_unknown_model_named():
    with pytest.raises(ValueError, match="model.name='vit_x' is unknown"):
        build_model(ModelSpec("vit_x"))
