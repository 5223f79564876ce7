"""The networks of the experiments, built on this package's batch-norm modules.

- :func:`paper_mlp`: Ioffe & Szegedy (2015), section 4.1: three hidden layers of 100 sigmoid
  units; with batch norm, a :class:`batchnorm.BatchNorm1d` before each sigmoid and no bias in
  the linear layer before it (the norm's shift replaces it). Weights from N(0, 0.01^2).
- :func:`lenet`: LeNet-5 with sigmoids and average pooling on 28x28 input; with batch norm,
  :class:`batchnorm.BatchNorm2d` after each convolution and :class:`batchnorm.BatchNorm1d`
  after the first two dense layers (or any other norm: the variants, torch's). Xavier-uniform
  weights. The one LeNet of the package: the report, ``examples/ddp_train.py`` and
  ``batchnorm bench`` all build it here.

Needs only torch: ``batchnorm.bench`` imports this module without the experiments extra.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..modules import BatchNorm1d, BatchNorm2d

__all__ = ["PAPER_INIT_STD", "Norm", "lenet", "paper_mlp"]

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
