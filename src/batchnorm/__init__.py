"""batchnorm: batch normalization from first principles, a drop-in for ``torch.nn.BatchNorm*``.

Example:
    >>> import torch, batchnorm
    >>> bn = batchnorm.BatchNorm2d(16)
    >>> y = bn(torch.randn(8, 16, 4, 4))
    >>> torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-5)
    True
"""

from . import functional
from .activation import BatchNormAct, InPlaceABN
from .backends import get_backend, set_backend, using_backend
from .conv import ConvBatchNorm1d, ConvBatchNorm2d, ConvBatchNorm3d
from .modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "ConvBatchNorm1d",
    "ConvBatchNorm2d",
    "ConvBatchNorm3d",
    "InPlaceABN",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "__version__",
    "functional",
    "get_backend",
    "set_backend",
    "using_backend",
]
