"""Model registry and the flat-parameter view used by trajectory matching.

Networks (paper App. D and Table 2; MTT reference ``networks.py`` / ``utils.get_network``, which DATM
and ConTra reuse). "instancenorm" is ``GroupNorm(C, C, affine=True)`` everywhere, as MTT implements it.

==============  ===================================================  =============  ===============
name            network (MTT name)                                   norm           distillable
==============  ===================================================  =============  ===============
``convnet``     ConvNet-D: D x [Conv3x3(width), norm, act, pool],    instancenorm   yes, unless
                linear head (``ConvNet``; DC/MTT ablation variants   (*)            norm=batchnorm
                ``ConvNetD*/W*/A*/N*/P*`` via depth, width,
                activation, norm, pooling)
``resnet18``    ResNet-18, 3x3 stem, no max-pool (``ResNet18``)      instancenorm   yes
``resnet18_bn`` the same with BatchNorm2d (``ResNet18BN``)           batchnorm      no
``vgg11``       VGG-11, one linear head (``VGG11``)                  instancenorm   yes
``vgg11_bn``    the same with BatchNorm2d (``VGG11BN``)              batchnorm      no
``alexnet``     AlexNet for 32 px, no norm (``AlexNet``)             none           yes
``vit_tiny``    ViT, patch image_size/8, dim 192, 12 layers,         layernorm      yes
                3 heads (torchvision ``VisionTransformer``; ``vit``
                is the same network)
``vit_small``   the same, dim 384, 6 heads                           layernorm      yes
``vit_base``    the same, dim 768, 12 heads                          layernorm      yes
==============  ===================================================  =============  ===============

(*) ConvNet's norm, activation and pooling are :class:`ModelSpec` fields (defaults: instancenorm, relu,
avgpooling, the paper's ConvNet); every other network's norm is fixed by its name.

At 32 px every MTT network has exactly MTT's layers and parameter count. MTT hard-codes the input size of
the ResNet/VGG/AlexNet classifiers for 32 px; here it is computed from ``image_size`` (same layers, e.g.
64 px works), which is our extension. MTT has no AlexNet with batch norm (DC's ``AlexNetBN`` is not in
MTT's ``get_network``), so there is no ``alexnet_bn``. The ViT sizes are DeiT's Tiny/Small/Base (the
paper's Table 8 names them but gives no details); the patch size (4 px at 32 px, 64 tokens) is ours.

An expert trajectory stores the parameters of a network as one flat float32 vector per epoch
(``[P]``, ``P = num_params(model)``); :func:`functional_forward` runs the network with such a vector,
so a student can be unrolled with autograd through its parameters (paper Eq. 1). That vector is the
network's whole state only for networks without buffers: batch-norm networks keep running statistics
outside it, so they are evaluation networks, not distillation (expert/student) networks; see
:func:`is_distillable`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.func import functional_call

__all__ = [
    "ModelSpec",
    "MODEL_NAMES",
    "NORMS",
    "ACTIVATIONS",
    "POOLINGS",
    "build_model",
    "is_distillable",
    "flat_params",
    "load_flat_params",
    "functional_forward",
    "num_params",
]

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")  # MTT ConvNet net_norm
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")  # MTT ConvNet net_act
POOLINGS = ("avgpooling", "maxpooling", "none")  # MTT ConvNet net_pooling


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a network: travels with expert stores and distilled artifacts.

    ``norm``, ``activation`` and ``pooling`` are resolved on construction: ``None`` becomes the name's
    default (ConvNet: instancenorm, relu, avgpooling; other networks: their fixed norm, and ``None`` for
    activation and pooling), so ``ModelSpec("convnet") == ModelSpec("convnet", norm="instancenorm")``
    and dicts written before these fields existed load as the networks they described.

    Attributes:
        name: registry key, one of :data:`MODEL_NAMES`.
        num_classes: number of output logits C.
        image_size: input height = width in pixels.
        channels: input channels.
        width: ConvNet channels per layer (ignored by the other networks).
        depth: ConvNet blocks; ``None`` picks 3 for <= 32 px, 4 for 64 px, 5 above.
        norm: one of :data:`NORMS`; a choice for ConvNet only, fixed by the name otherwise.
        activation: ConvNet activation, one of :data:`ACTIVATIONS` (``None`` for other networks).
        pooling: ConvNet pooling, one of :data:`POOLINGS` (``None`` for other networks).

    Raises:
        ValueError: a norm/activation/pooling value that is unknown or that the named network does not
            offer (e.g. ``ModelSpec("resnet18", norm="batchnorm")``: use ``resnet18_bn``; to switch a
            spec to another network use :meth:`for_network`, not ``dataclasses.replace``).
    """

    name: str = "convnet"
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    width: int = 128
    depth: int | None = None
    norm: str | None = None
    activation: str | None = None
    pooling: str | None = None

    def __post_init__(self) -> None:
        arch = _REGISTRY.get(self.name)
        if arch is None:
            return  # build_model names the unknown model
        if arch.norm is None:  # convnet: free choice
            resolved = {"norm": self.norm or "instancenorm", "activation": self.activation or "relu",
                        "pooling": self.pooling or "avgpooling"}
            for field, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("pooling", POOLINGS)):
                if resolved[field] not in allowed:
                    raise ValueError(f"model.{field}={resolved[field]!r}: unknown; known: {', '.join(allowed)}")
        else:
            if self.norm not in (None, arch.norm):
                bn = f"; use {self.name}_bn" if self.norm == "batchnorm" and f"{self.name}_bn" in _REGISTRY else ""
                raise ValueError(f"model.norm={self.norm!r}: {self.name} uses {arch.norm}{bn}")
            for field in ("activation", "pooling"):
                if getattr(self, field) is not None:
                    raise ValueError(f"model.{field}={getattr(self, field)!r}: only convnet has a {field} choice")
            resolved = {"norm": arch.norm, "activation": None, "pooling": None}
        for field, value in resolved.items():
            object.__setattr__(self, field, value)

    def for_network(self, name: str) -> "ModelSpec":
        """The spec of network ``name`` on the same data (classes, image size, channels, ConvNet width).

        ``self`` if ``name == self.name``; otherwise depth, norm, activation and pooling start from
        ``name``'s defaults. (``dataclasses.replace(convnet_spec, name="alexnet")`` would carry ConvNet's
        norm/activation/pooling over and be refused.)
        """
        if name == self.name:
            return self
        return ModelSpec(name, self.num_classes, self.image_size, self.channels, self.width)

    def resolved_depth(self) -> int:
        if self.depth is not None:
            return self.depth
        return 3 if self.image_size <= 32 else 4 if self.image_size <= 64 else 5

    def describe(self) -> str:
        """One line naming the network and its normalization, e.g.
        ``"convnet: ConvNet-D3 width 128, relu, instancenorm, avgpooling"`` or
        ``"resnet18: ResNet-18 (MTT), instancenorm"``."""
        if self.name == "convnet":
            return (f"convnet: ConvNet-D{self.resolved_depth()} width {self.width}, {self.activation}, "
                    f"{self.norm}, {self.pooling}")
        arch = _REGISTRY.get(self.name)
        return f"{self.name}: {arch.summary}, {self.norm}" if arch else f"{self.name}: unknown"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["depth"] = self.resolved_depth() if self.name == "convnet" else self.depth
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """Inverse of :meth:`to_dict`; keys missing from older dicts take their defaults."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# ---------------------------------------------------------------------------------------------- ConvNet

def _act(kind: str) -> nn.Module:
    return {"relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "leakyrelu": nn.LeakyReLU(negative_slope=0.01)}[kind]


def _conv_norm(kind: str, c: int, size: int) -> nn.Module:
    """MTT ``ConvNet._get_normlayer`` for a ``[c, size, size]`` feature map."""
    if kind == "instancenorm":
        return nn.GroupNorm(c, c, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(c, affine=True)
    if kind == "layernorm":
        return nn.LayerNorm([c, size, size], elementwise_affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, c, affine=True)
    raise ValueError(f"model.norm={kind!r}: unknown; known: {', '.join(NORMS)}")


class ConvNet(nn.Module):
    """ConvNet-D of the trajectory-matching literature (MTT ``ConvNet``).

    D blocks of [Conv3x3(width, padding 1) -> norm (unless "none") -> activation -> 2x2 pooling (unless
    "none")], then a linear head on the flattened ``[width, s, s]`` map (``s = image_size / 2^D`` with
    pooling, ``image_size`` without). Defaults (instancenorm, relu, avgpooling) are the paper's ConvNet.
    """

    def __init__(self, channels: int, num_classes: int, width: int, depth: int, image_size: int,
                 norm: str = "instancenorm", activation: str = "relu", pooling: str = "avgpooling"):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = channels, image_size
        for _ in range(depth):
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            if norm != "none":
                layers.append(_conv_norm(norm, width, size))
            layers.append(_act(activation))
            if pooling != "none":
                layers.append(nn.AvgPool2d(2) if pooling == "avgpooling" else nn.MaxPool2d(2))
                size //= 2
            c = width
        if size < 1:
            raise ValueError(f"model.depth={depth} pools image_size={image_size} below one pixel")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _convnet(spec: ModelSpec) -> nn.Module:
    return ConvNet(spec.channels, spec.num_classes, spec.width, spec.resolved_depth(), spec.image_size,
                   spec.norm, spec.activation, spec.pooling)


# ---------------------------------------------------------------------------------------------- MTT ResNet-18

def _norm2d(kind: str, c: int) -> nn.Module:
    """MTT's ResNet/VGG switch: instance norm as ``GroupNorm(c, c, affine=True)``, else ``BatchNorm2d``."""
    return nn.GroupNorm(c, c, affine=True) if kind == "instancenorm" else nn.BatchNorm2d(c)


def _too_small(name: str, image_size: int) -> ValueError:
    return ValueError(f"model.image_size={image_size}: too small for {name}")


class BasicBlock(nn.Module):
    """MTT ``BasicBlock``: two 3x3 convs (no bias) with norm, identity or 1x1-conv+norm shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm2d(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          _norm2d(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """MTT ``ResNet(BasicBlock, [2, 2, 2, 2])`` for small images (``ResNet18`` / ``ResNet18BN``).

    3x3 stride-1 stem without max-pool, stages of 64/128/256/512 channels (stride 2 from the second),
    ``avg_pool2d(kernel 4)``, flatten, linear. At 32 px the last map is 4x4 -> 1x1 (MTT); the classifier's
    input size follows ``image_size`` (64 px: 2x2x512).
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "instancenorm"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = _norm2d(norm, 64)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, norm),
                                        BasicBlock(planes, planes, 1, norm)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        size = image_size
        for _ in range(3):
            size = (size + 1) // 2  # 3x3 conv, stride 2, padding 1
        size //= 4
        if size < 1:
            raise _too_small("resnet18", image_size)
        self.classifier = nn.Linear(512 * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.classifier(F.avg_pool2d(out, 4).flatten(1))


# ---------------------------------------------------------------------------------------------- MTT VGG-11

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """MTT ``VGG('VGG11')``: [Conv3x3 -> norm -> ReLU] per number, MaxPool2x2 per "M", one linear head.

    At 32 px the map after five pools is 1x1x512 (MTT's ``Linear(512, C)``); the head's input size
    follows ``image_size``.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "instancenorm"):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = channels, image_size
        for v in _VGG11:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), _norm2d(norm, v), nn.ReLU()]
                c = v
        layers.append(nn.AvgPool2d(1, 1))  # as MTT (a no-op)
        if size < 1:
            raise _too_small("vgg11", image_size)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512 * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------------- MTT AlexNet

class AlexNet(nn.Module):
    """MTT ``AlexNet`` for 32 px: five convs (5x5, 5x5, 3x3 x3; no norm), three 2x2 max-pools, one linear.

    At 32 px the last map is 4x4x192 (MTT's ``Linear(192 * 4 * 4, C)``); the head's input size follows
    ``image_size``. (MTT pads the first conv by 4 only for 1-channel 28 px MNIST; not supported here.)
    """

    def __init__(self, channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, 5, stride=1, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2))
        size = image_size // 8
        if size < 1:
            raise _too_small("alexnet", image_size)
        self.fc = nn.Linear(192 * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------------- ViT

_VIT_SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # (dim, heads), DeiT


def _vit(kind: str) -> Callable[[ModelSpec], nn.Module]:
    dim, heads = _VIT_SIZES[kind]

    def build(spec: ModelSpec) -> nn.Module:
        patch = max(1, spec.image_size // 8)  # ours: 8x8 = 64 tokens (patch 4 at 32 px, 8 at 64 px)
        if spec.image_size % patch:
            raise ValueError(f"model.image_size={spec.image_size}: {spec.name} needs a multiple of 8")
        m = torchvision.models.VisionTransformer(image_size=spec.image_size, patch_size=patch, num_layers=12,
                                                 num_heads=heads, hidden_dim=dim, mlp_dim=4 * dim,
                                                 num_classes=spec.num_classes)
        if spec.channels != 3:
            m.conv_proj = nn.Conv2d(spec.channels, dim, patch, stride=patch)
        return m

    return build


def _vit_summary(kind: str) -> str:
    dim, heads = _VIT_SIZES[kind]
    return f"ViT-{kind[4:].capitalize()}, patch image_size/8, dim {dim}, 12 layers, {heads} heads"


# ---------------------------------------------------------------------------------------------- registry

@dataclasses.dataclass(frozen=True)
class _Arch:
    build: Callable[[ModelSpec], nn.Module]
    norm: str | None  # None: a ModelSpec choice (convnet)
    summary: str


_REGISTRY: dict[str, _Arch] = {
    "convnet": _Arch(_convnet, None, "ConvNet"),
    "resnet18": _Arch(lambda s: ResNet18(s.channels, s.num_classes, s.image_size, "instancenorm"),
                      "instancenorm", "ResNet-18 (MTT ResNet18)"),
    "resnet18_bn": _Arch(lambda s: ResNet18(s.channels, s.num_classes, s.image_size, "batchnorm"),
                         "batchnorm", "ResNet-18 (MTT ResNet18BN)"),
    "vgg11": _Arch(lambda s: VGG11(s.channels, s.num_classes, s.image_size, "instancenorm"),
                   "instancenorm", "VGG-11 (MTT VGG11)"),
    "vgg11_bn": _Arch(lambda s: VGG11(s.channels, s.num_classes, s.image_size, "batchnorm"),
                      "batchnorm", "VGG-11 (MTT VGG11BN)"),
    "alexnet": _Arch(lambda s: AlexNet(s.channels, s.num_classes, s.image_size), "none", "AlexNet (MTT AlexNet)"),
    "vit": _Arch(_vit("vit_tiny"), "layernorm", _vit_summary("vit_tiny")),
    "vit_tiny": _Arch(_vit("vit_tiny"), "layernorm", _vit_summary("vit_tiny")),
    "vit_small": _Arch(_vit("vit_small"), "layernorm", _vit_summary("vit_small")),
    "vit_base": _Arch(_vit("vit_base"), "layernorm", _vit_summary("vit_base")),
}
MODEL_NAMES = tuple(_REGISTRY)


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialized network for ``spec`` (PyTorch default init; seed with ``torch.manual_seed``).

    Raises:
        ValueError: unknown ``spec.name`` (the message lists the known names).
    """
    if spec.name not in _REGISTRY:
        raise ValueError(f"model.name={spec.name!r} is unknown; known models: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[spec.name].build(spec)


def is_distillable(spec: ModelSpec) -> bool:
    """Whether ``spec`` can be a distillation (expert/student) network: its flat parameter vector is its
    whole state, i.e. it has no buffers. False exactly for batch-norm networks (``*_bn``, ConvNet with
    ``norm="batchnorm"``), whose running statistics are neither in expert trajectories nor in
    :func:`functional_forward`'s parameters (it would run them on batch statistics in train mode and
    update the module's running buffers in place)."""
    return spec.norm != "batchnorm"


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

    Differentiable w.r.t. both ``flat`` and ``x`` (used for the student unroll, Eq. 1). Works for every
    registered network; buffers (batch-norm running statistics) are the module's own and are not in
    ``flat``, so only networks for which :func:`is_distillable` holds are fully described by it.
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
