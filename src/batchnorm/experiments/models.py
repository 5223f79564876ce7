"""The networks of the experiments, built on this package's batch-norm modules.

- :func:`paper_mlp`: Ioffe & Szegedy (2015), section 4.1: three hidden layers of 100 sigmoid
  units; with batch norm, a :class:`batchnorm.BatchNorm1d` before each sigmoid and no bias in
  the linear layer before it (the norm's shift replaces it). Weights from N(0, 0.01^2).
- :func:`lenet`: LeNet-5 with sigmoids and average pooling on 28x28 input; with batch norm,
  :class:`batchnorm.BatchNorm2d` after each convolution and :class:`batchnorm.BatchNorm1d`
  after the first two dense layers (or any other norm: the variants, torch's). Xavier-uniform
  weights. The one LeNet of the package: the report, ``examples/ddp_train.py`` and
  ``batchnorm bench`` all build it here.
- :func:`resnet18` and :func:`mobilenet_v2`: torchvision's ResNet-18 and MobileNetV2 with the
  batch norm as a parameter: the networks of ``batchnorm bench``'s end-to-end figures.

Needs only torch: ``batchnorm.bench`` imports this module without the experiments extra.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..modules import BatchNorm1d, BatchNorm2d

__all__ = [
    "PAPER_INIT_STD",
    "BasicBlock",
    "InvertedResidual",
    "Norm",
    "lenet",
    "mobilenet_v2",
    "paper_mlp",
    "resnet18",
]

# Builds a normalization layer for a number of channels (a class such as BatchNorm2d, or a lambda).
Norm = Callable[[int], nn.Module]

# The paper gives no scale ("small random Gaussian values"); 0.01 is the public reproduction's.
PAPER_INIT_STD = 0.01


def _hidden(in_features: int, out_features: int, bn: bool, momentum: float | None) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=not bn)]
    if bn:
        layers.append(BatchNorm1d(out_features, momentum=momentum))
    layers.append(nn.Sigmoid())
    return layers


def paper_mlp(in_features: int, *, bn: bool, momentum: float | None = 0.1, width: int = 100) -> nn.Sequential:
    """The paper's MLP: ``in_features`` -> 3 x (``width`` sigmoid units) -> 10 logits.

    Args:
        in_features: input size (64 for 8x8 digits, 784 for MNIST).
        bn: put a BatchNorm1d before each sigmoid (and drop the linear layer's bias).
        momentum: the batch norms' momentum (None: cumulative average). Default: 0.1.
        width: units per hidden layer. Default: 100.

    Shape:
        input (N, in_features), output (N, 10).

    Example:
        >>> import torch
        >>> model = paper_mlp(64, bn=True)
        >>> model(torch.rand(60, 64)).shape
        torch.Size([60, 10])
        >>> sum(isinstance(m, nn.Sigmoid) for m in model)
        3
    """
    layers = _hidden(in_features, width, bn, momentum) + _hidden(width, width, bn, momentum)
    layers += [*_hidden(width, width, bn, momentum), nn.Linear(width, 10)]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=PAPER_INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def lenet(*, bn: bool = True, norm2d: Norm = BatchNorm2d, norm1d: Norm = BatchNorm1d) -> nn.Sequential:
    """LeNet-5 (sigmoid, average pooling) for (N, 1, 28, 28) input, with or without batch norm.

    conv 1->6 5x5 pad 2 [BN] sigmoid avgpool; conv 6->16 5x5 [BN] sigmoid avgpool;
    dense 400->120 [BN] sigmoid; 120->84 [BN] sigmoid; 84->10. Layers followed by a batch norm
    have no bias. Weights are Xavier-uniform: torch's default scale leaves the sigmoid network
    without batch norm on its initial plateau for thousands of steps (``docs/experiments.md``).

    Args:
        bn: put a normalization layer after each convolution and the first two dense layers.
            Default: True.
        norm2d: builds the layer after a convolution from its channel count. Default:
            :class:`batchnorm.BatchNorm2d`.
        norm1d: builds the layer after a dense layer from its feature count. Default:
            :class:`batchnorm.BatchNorm1d`. The rank-agnostic :class:`batchnorm.BatchNorm` and
            its variants (``BatchRenorm``, ``GhostBatchNorm``) serve as both.

    Shape:
        input (N, 1, 28, 28), output (N, 10).

    Example:
        >>> import torch, batchnorm
        >>> lenet(bn=True)(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 10])
        >>> renorm = lenet(norm2d=batchnorm.BatchRenorm, norm1d=batchnorm.BatchRenorm)
        >>> sum(isinstance(m, batchnorm.BatchRenorm) for m in renorm)
        4
    """

    def norm(build: Norm, channels: int) -> list[nn.Module]:
        return [build(channels)] if bn else []

    model = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2, bias=not bn),  # (N, 1, 28, 28) -> (N, 6, 28, 28)
        *norm(norm2d, 6),
        nn.Sigmoid(),
        nn.AvgPool2d(2),  # -> (N, 6, 14, 14)
        nn.Conv2d(6, 16, kernel_size=5, bias=not bn),  # -> (N, 16, 10, 10)
        *norm(norm2d, 16),
        nn.Sigmoid(),
        nn.AvgPool2d(2),  # -> (N, 16, 5, 5)
        nn.Flatten(),  # -> (N, 400)
        nn.Linear(400, 120, bias=not bn),
        *norm(norm1d, 120),
        nn.Sigmoid(),
        nn.Linear(120, 84, bias=not bn),
        *norm(norm1d, 84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


# ---------------------------------------------------------------------------------------------
# The benchmark's end-to-end networks: torchvision's ResNet-18 and MobileNetV2, written out here
# (torchvision is not a dependency) with the batch norm as a parameter, so that one definition
# builds both the torch-BN and the our-BN network.
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn, plus the (downsampled) input, relu."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm: Norm = BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + identity)
        return result


def resnet18(*, num_classes: int = 10, width: int = 64, norm: Norm = BatchNorm2d) -> nn.Sequential:
    """torchvision's ResNet-18: a 7x7 stride-2 stem and max pool, four stages of two
    :class:`BasicBlock` (widths ``width`` x 1, 2, 4, 8; stride 2 from the second stage), global
    average pool, one linear layer. 20 batch norms. Input (N, 3, H, W), output (N, num_classes).
    """
    widths = [width * 2**stage for stage in range(4)]
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        norm(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    inplanes = width
    for stage, planes in enumerate(widths):
        stride = 1 if stage == 0 else 2
        layers += [BasicBlock(inplanes, planes, stride, norm), BasicBlock(planes, planes, 1, norm)]
        inplanes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    return nn.Sequential(*layers)


def _divisible(channels: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of 8, never down by more than 10%."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int, norm: Norm) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        norm(cout),
        nn.ReLU6(inplace=True),
    ]


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand (1x1, ReLU6), depthwise (3x3, ReLU6), project (1x1, linear);
    the input added back where the shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, norm: Norm = BatchNorm2d) -> None:
        super().__init__()
        hidden = cin * expand
        layers = _conv_bn_relu6(cin, hidden, 1, 1, 1, norm) if expand != 1 else []
        layers += _conv_bn_relu6(hidden, hidden, 3, stride, hidden, norm)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), norm(cout)]
        self.block = nn.Sequential(*layers)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.block(x)
        return out + x if self.has_skip else out


# torchvision's MobileNetV2 table: expansion t, output channels c, repeats n, first stride s.
_MOBILENET_V2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenet_v2(*, num_classes: int = 10, width_mult: float = 1.0, norm: Norm = BatchNorm2d) -> nn.Sequential:
    """torchvision's MobileNetV2: a 3x3 stride-2 stem, 17 :class:`InvertedResidual` blocks with
    ReLU6, a 1x1 convolution to 1280 channels (more when ``width_mult`` > 1), global average pool,
    one linear layer. 52 batch norms. Input (N, 3, H, W), output (N, num_classes).
    """
    cin = _divisible(32 * width_mult)
    last = _divisible(1280 * max(1.0, width_mult))
    layers: list[nn.Module] = _conv_bn_relu6(3, cin, 3, 2, 1, norm)
    for expand, channels, repeats, stride in _MOBILENET_V2:
        cout = _divisible(channels * width_mult)
        for index in range(repeats):
            layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand, norm))
            cin = cout
    layers += _conv_bn_relu6(cin, last, 1, 1, 1, norm)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes)]
    return nn.Sequential(*layers)
