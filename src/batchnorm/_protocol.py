"""The protocol through which the model tools handle every batch-norm-like class of the package.

A tool (``from_torch``, ``to_torch``, ``SyncBatchNorm.convert_sync_batchnorm``, ``freeze``,
``fold``, ``recalibrate``, ``invert`` with a statistics prior) never names our classes: it asks
the module what it needs to know.

- ``batch_norm_state()``: the module holding the batch-norm state the tools read and write
  (``weight``, ``bias``, ``running_mean``, ``running_var``, ``eps``, ``momentum``): the module
  itself, or the inner ``bn`` of a convolution + batch norm.
- ``fused_activation()`` / ``fused_convolution()``: what the module computes after / before
  its batch norm, or None.
- ``torch_equivalent()``, ``sync_equivalent()``, ``frozen_equivalent()``: the class the module
  becomes under ``to_torch``, ``convert_sync_batchnorm`` and ``freeze``, or :class:`Kept` (the
  tool leaves it as it is, and says why in ``docs/compat.md``), or :class:`Refused` (the tool
  raises a ``ValueError`` naming the module and the reason, before changing anything).
- ``tracks_statistics``: whether training updates running statistics (what ``recalibrate``
  replaces); a frozen batch norm's never move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import nn


@dataclass(frozen=True)
class Kept:
    """A tool's answer for a module it leaves as it is, with the reason."""

    reason: str


@dataclass(frozen=True)
class Refused:
    """A tool's answer for a module it refuses, with the reason (the error message carries it)."""

    reason: str


#: What a tool turns a module into: a class built with the module's configuration and sharing its
#: state, or one of the two answers above.
Equivalent = type[nn.Module] | Kept | Refused


@runtime_checkable
class SupportsBatchNormTools(Protocol):
    """What a class declares so that every tool handles it (see the module docstring)."""

    tracks_statistics: ClassVar[bool]

    def batch_norm_state(self) -> Any: ...

    def fused_activation(self) -> nn.Module | None: ...

    def fused_convolution(self) -> nn.Module | None: ...

    @classmethod
    def torch_equivalent(cls) -> Equivalent: ...

    @classmethod
    def sync_equivalent(cls) -> Equivalent: ...

    @classmethod
    def frozen_equivalent(cls) -> Equivalent: ...


#: Every name of :class:`SupportsBatchNormTools`.
DECLARATIONS = frozenset(
    {
        "tracks_statistics",
        "batch_norm_state",
        "fused_activation",
        "fused_convolution",
        "torch_equivalent",
        "sync_equivalent",
        "frozen_equivalent",
    }
)


class BatchNormProtocol:
    """Defaults of :class:`SupportsBatchNormTools` for a plain batch norm: its own state, nothing
    fused, and no equivalents until a class declares them."""

    tracks_statistics: ClassVar[bool] = True

    def batch_norm_state(self) -> Any:
        return self

    def fused_activation(self) -> nn.Module | None:
        return None

    def fused_convolution(self) -> nn.Module | None:
        return None

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return Kept("torch has no equivalent class")

    @classmethod
    def sync_equivalent(cls) -> Equivalent:
        return Refused("no synchronized form")

    @classmethod
    def frozen_equivalent(cls) -> Equivalent:
        return Refused("no frozen form")
