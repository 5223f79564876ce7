"""Module-tree surgery shared by ``SyncBatchNorm.convert_sync_batchnorm`` and :mod:`batchnorm.tools`.

Which modules count as batch norm, how one is rebuilt as another class with the same state, and
how modules are swapped in a tree so that a failure half-way changes nothing: every replacement
is built first, and the tree is only rewired once all of them exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .modules import _BatchNormBase

#: Every module whose state is a batch norm's: torch's (including its SyncBatchNorm) and ours.
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, _BatchNormBase)


def is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, BATCH_NORM_TYPES)


def describe(module: nn.Module, path: str) -> str:
    """'features.1 (BatchNorm2d)', or the class name alone for the root module."""
    return f"{path} ({type(module).__name__})" if path else type(module).__name__


def check_materialized(module: nn.Module, path: str) -> None:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"{describe(module, path)}: expected a materialized batch norm, got a lazy module that has "
            f"not seen an input yet; run one forward pass first"
        )


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """Device and dtype of a batch norm's tensors, so that its replacement is built alike."""
    for tensor in (getattr(module, "weight", None), getattr(module, "running_mean", None)):
        if isinstance(tensor, Tensor):
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def rebuild(old: nn.Module, cls: Callable[..., nn.Module], path: str, **extra: Any) -> nn.Module:
    """A ``cls`` batch norm configured as ``old`` that shares its parameters and buffers.

    Sharing (not copying) keeps optimizers that already hold the parameters working, as torch's
    ``convert_sync_batchnorm`` does; the tools deep-copy the model first.
    """
    check_materialized(old, path)
    affine = bool(old.affine)
    new = cls(
        num_features=old.num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=affine,
        track_running_stats=old.track_running_stats,
        bias=old.bias is not None or not affine,
        **extra,
        **factory_kwargs(old),
    )
    if affine:
        new.weight = old.weight
        new.bias = old.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        # Buffers registered as None stay None: setattr on a registered buffer name keeps it a buffer.
        setattr(new, name, getattr(old, name))
    if isinstance(old, _BatchNormBase) and isinstance(new, _BatchNormBase):
        new.skip_nonfinite = old.skip_nonfinite
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def swap_modules(model: nn.Module, convert: Callable[[nn.Module, str], nn.Module | None]) -> nn.Module:
    """Replace every module for which ``convert(module, path)`` returns a module; returns the root.

    A replaced module's children are not visited. All replacements are built before the first
    one is installed, so that an error raised by ``convert`` leaves ``model`` as it was.
    """
    root = convert(model, "")
    if root is not None:
        return root
    replacements: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}.{name}" if prefix else name
            new = convert(child, path)
            if new is None:
                visit(child, path)
            else:
                replacements.append((parent, name, new))

    visit(model, "")
    for parent, name, new in replacements:
        setattr(parent, name, new)
    return model
