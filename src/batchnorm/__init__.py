"""batchnorm: batch normalization from first principles, a drop-in for ``torch.nn.BatchNorm*``.

Example:
    >>> import torch, batchnorm
    >>> bn = batchnorm.BatchNorm2d(16)
    >>> y = bn(torch.randn(8, 16, 4, 4))
    >>> torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-5)
    True
"""

from . import functional
from .activation import BatchNormAct, BatchNormAct2d, FrozenBatchNormAct, InPlaceABN, SyncBatchNormAct
from .backends import get_backend, set_backend, using_backend
from .conv import ConvBatchNorm1d, ConvBatchNorm2d, ConvBatchNorm3d
from .flows import BatchNormFlow
from .functional import NonInvertibleError
from .inversion import InversionResult, invert
from .modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .sync import SyncBatchNorm
from .tools import fold, fold_conv_bn, fold_linear_bn, freeze, from_torch, fuse_custom_config, recalibrate, to_torch
from .variants import BatchRenorm, FrozenBatchNorm, GhostBatchNorm, renorm_schedule

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchNormAct2d",
    "BatchNormFlow",
    "BatchRenorm",
    "ConvBatchNorm1d",
    "ConvBatchNorm2d",
    "ConvBatchNorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNormAct",
    "GhostBatchNorm",
    "InPlaceABN",
    "InversionResult",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "NonInvertibleError",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "__version__",
    "fold",
    "fold_conv_bn",
    "fold_linear_bn",
    "freeze",
    "from_torch",
    "functional",
    "fuse_custom_config",
    "get_backend",
    "invert",
    "recalibrate",
    "renorm_schedule",
    "set_backend",
    "to_torch",
    "using_backend",
]
