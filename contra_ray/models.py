"""Model registry and the flat-parameter view used by trajectory matching.

Networks (paper App. D; MTT reference `networks.py`):

* ``convnet``: ConvNet-D, D blocks of [Conv3x3(width) -> instance norm -> ReLU -> AvgPool2x2] and a
  linear head. Instance norm is ``GroupNorm(width, width, affine=True)`` as in MTT. Depth 3 for 32 px,
  4 for 64 px.
* ``resnet18``, ``vgg11``, ``alexnet``: torchvision models adapted to small inputs (3x3 stem, no
  max-pool for ResNet; adaptive pooling heads) for cross-architecture evaluation.

An expert trajectory stores the parameters of a network as one flat float32 vector per epoch
(``[P]``, ``P = num_params(model)``); :func:`functional_forward` runs the network with such a vector,
so a student can be unrolled with autograd through its parameters (paper Eq. 1).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
import torchvision
from torch.func import functional_call

__all__ = [
    "ModelSpec",
    "MODEL_NAMES",
    "BATCHNORM_MODELS",
    "build_model",
    "flat_params",
    "load_flat_params",
    "functional_forward",
    "num_params",
]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a network: travels with expert stores and distilled artifacts.

    Attributes:
        name: registry key, one of :data:`MODEL_NAMES`.
        num_classes: number of output logits C.
        image_size: input height = width in pixels.
        channels: input channels.
        width: ConvNet channels per layer (ignored by torchvision models).
        depth: ConvNet blocks; ``None`` picks 3 for <= 32 px, 4 for 64 px, 5 above.
    """

    name: str = "convnet"
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    width: int = 128
    depth: int | None = None

    def resolved_depth(self) -> int:
        if self.depth is not None:
            return self.depth
        return 3 if self.image_size <= 32 else 4 if self.image_size <= 64 else 5

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["depth"] = self.resolved_depth() if self.name == "convnet" else self.depth
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**{k: d[k] for k in ("name", "num_classes", "image_size", "channels", "width", "depth") if k in d})


class ConvNet(nn.Module):
    """ConvNet-D of the trajectory-matching literature (MTT ``ConvNet``, instance norm, avg pooling)."""

    def __init__(self, channels: int, num_classes: int, width: int, depth: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=False), nn.AvgPool2d(2)]
            c, size = width, size // 2
        if size < 1:
            raise ValueError(f"model.depth={depth} pools image_size={image_size} below one pixel")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _convnet(spec: ModelSpec) -> nn.Module:
    return ConvNet(spec.channels, spec.num_classes, spec.width, spec.resolved_depth(), spec.image_size)


def _resnet18(spec: ModelSpec) -> nn.Module:
    m = torchvision.models.resnet18(num_classes=spec.num_classes)
    m.conv1 = nn.Conv2d(spec.channels, 64, 3, 1, 1, bias=False)  # small-image stem (CIFAR ResNet)
    m.maxpool = nn.Identity()
    return m


def _vgg11(spec: ModelSpec) -> nn.Module:
    m = torchvision.models.vgg11_bn(num_classes=spec.num_classes)
    if spec.channels != 3:
        m.features[0] = nn.Conv2d(spec.channels, 64, 3, padding=1)
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Linear(512, spec.num_classes)
    return m


def _alexnet(spec: ModelSpec) -> nn.Module:
    # AlexNet with 3x3/5x5 kernels and stride 1 stem for 32 px inputs (as in DC/DSA's AlexNet).
    m = torchvision.models.alexnet(num_classes=spec.num_classes)
    m.features = nn.Sequential(
        nn.Conv2d(spec.channels, 128, 5, stride=1, padding=4 if spec.image_size <= 32 else 2), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(),
        nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Linear(192, spec.num_classes)
    return m


_REGISTRY: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "convnet": _convnet,
    "resnet18": _resnet18,
    "vgg11": _vgg11,
    "alexnet": _alexnet,
}
MODEL_NAMES = tuple(_REGISTRY)
# networks with batch-norm running statistics: updated in place by every training forward, so their
# students cannot be vmapped together (distill.student_execution=batched); ConvNet's instance norm can
BATCHNORM_MODELS = ("resnet18", "vgg11")


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialized network for ``spec`` (PyTorch default init; seed with ``torch.manual_seed``).

    Raises:
        ValueError: unknown ``spec.name`` (the message lists the known names).
    """
    if spec.name not in _REGISTRY:
        raise ValueError(f"model.name={spec.name!r} is unknown; known models: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[spec.name](spec)


def num_params(model: nn.Module) -> int:
    """P, the length of the flat parameter vector of ``model``."""
    return sum(p.numel() for p in model.parameters())


def flat_params(model: nn.Module) -> torch.Tensor:
    """Parameters of ``model`` concatenated in ``named_parameters`` order: float32 ``[P]`` (detached copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def load_flat_params(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a flat ``[P]`` vector into ``model``'s parameters in place; returns ``model``.

    Raises:
        ValueError: ``flat`` has the wrong length for ``model``.
    """
    if flat.numel() != num_params(model):
        raise ValueError(f"flat parameter vector has {flat.numel()} entries, model needs {num_params(model)}")
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return model


def functional_forward(model: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, C]`` of ``model`` evaluated with parameters taken from ``flat`` (``[P]``).

    Differentiable w.r.t. both ``flat`` and ``x`` (used for the student unroll, Eq. 1). Buffers (e.g.
    batch-norm statistics) are the module's own; ConvNet has none.
    """
    names, shapes, sizes = _layout(model)
    params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
    return functional_call(model, params, (x,))


def _layout(model: nn.Module):
    cached = getattr(model, "_contra_layout", None)
    if cached is None:
        named = list(model.named_parameters())
        cached = ([n for n, _ in named], [p.shape for _, p in named], [p.numel() for _, p in named])
        object.__setattr__(model, "_contra_layout", cached)
    return cached
