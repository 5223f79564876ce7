"""The switch for the port of PyTorch's own batch-norm tests (tests/test_torch_suite_*.py).

``BATCHNORM_TORCH_SUITE=batchnorm`` (default) aims the ported tests at this library,
``BATCHNORM_TORCH_SUITE=torch`` aims them at torch's own classes and functions: the control run,
which must pass 100% and so proves the port.

The ported tests use only the torch-like names exposed here (``BatchNorm1d``, ``batch_norm``, ...).

``DEVIATIONS`` maps an fnmatch pattern over a test id, ``<file name>::<class>::<test>`` (for a
plain function ``<file name>::<test>``), e.g. ``test_torch_suite_ops.py::TestCommonCPU::test_*``,
to the documented reason why this library deliberately differs from torch there. Matching tests are
marked ``xfail(strict=True)`` when the target is ``batchnorm``, so a deviation that goes away fails
the run too. The table is applied by :func:`apply_deviations` at the bottom of every ported file.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
import os
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import batchnorm
import batchnorm.functional as BF

TARGET = os.environ.get("BATCHNORM_TORCH_SUITE", "batchnorm")
if TARGET not in ("batchnorm", "torch"):
    raise ValueError(f"BATCHNORM_TORCH_SUITE must be 'batchnorm' or 'torch', got {TARGET!r}")

# Test id pattern -> documented reason for a deliberate deviation from torch. Decided by the
# maintainers; applied as xfail(strict=True) only when TARGET == "batchnorm".
DEVIATIONS: dict[str, str] = {}

if TARGET == "torch":
    BatchNorm1d: type[nn.Module] = nn.BatchNorm1d
    BatchNorm2d: type[nn.Module] = nn.BatchNorm2d
    BatchNorm3d: type[nn.Module] = nn.BatchNorm3d
    LazyBatchNorm1d: type[nn.Module] = nn.LazyBatchNorm1d
    LazyBatchNorm2d: type[nn.Module] = nn.LazyBatchNorm2d
    LazyBatchNorm3d: type[nn.Module] = nn.LazyBatchNorm3d
    SyncBatchNorm: type[nn.Module] = nn.SyncBatchNorm
    batch_norm: Callable[..., Tensor] = F.batch_norm
else:
    BatchNorm1d = batchnorm.BatchNorm1d
    BatchNorm2d = batchnorm.BatchNorm2d
    BatchNorm3d = batchnorm.BatchNorm3d
    LazyBatchNorm1d = batchnorm.LazyBatchNorm1d
    LazyBatchNorm2d = batchnorm.LazyBatchNorm2d
    LazyBatchNorm3d = batchnorm.LazyBatchNorm3d
    SyncBatchNorm = batchnorm.SyncBatchNorm
    batch_norm = BF.batch_norm

# torch class -> the target's class of the same name.
CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.LazyBatchNorm1d: LazyBatchNorm1d,
    nn.LazyBatchNorm2d: LazyBatchNorm2d,
    nn.LazyBatchNorm3d: LazyBatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}


def batch_norm_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of ``input`` (N, C, *), from the target."""
    if TARGET == "torch":
        dims = [d for d in range(input.dim()) if d != 1]
        var, mean = torch.var_mean(input, dim=dims, unbiased=False)
        return mean, var
    return BF.batch_norm_stats(input)


def import_torch_testing(*modules: str) -> None:
    """Import ``torch.testing._internal.common_utils`` and the given ``torch.testing._internal``
    modules (which the ported tests build on) without their process-wide side effects on the rest of
    the suite: common_utils loads its own hypothesis profile (10 examples, no database) and freezes the
    ``torch.backends`` flags, hypothesis_utils loads another profile; both are put back.

    Called by each ported file before it imports ``torch.testing._internal``; skips the file when
    ``expecttest`` (which common_utils needs) is not installed."""
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install expecttest)")
    import hypothesis

    profile = hypothesis.settings.get_current_profile_name()
    frozen = torch.backends.flags_frozen()
    for name in ("common_utils", *modules):
        importlib.import_module(f"torch.testing._internal.{name}")
    hypothesis.settings.load_profile(profile)
    if not frozen:
        # The inverse of torch.backends.disable_global_flags(), which common_utils calls on import.
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True


def _deviation(test_id: str) -> str | None:
    for pattern, reason in DEVIATIONS.items():
        if fnmatch.fnmatchcase(test_id, pattern):
            return reason
    return None


def apply_deviations(namespace: dict[str, Any]) -> None:
    """Mark every test of a ported file's ``namespace`` that DEVIATIONS names (target batchnorm only).

    Covers the file's own unittest classes (the device-instantiated ones included; not the base
    classes it imports from torch) and plain test functions.
    """
    if TARGET != "batchnorm" or not DEVIATIONS:
        return
    file = Path(namespace["__file__"]).name
    for name, obj in list(namespace.items()):
        if inspect.isclass(obj) and issubclass(obj, unittest.TestCase) and obj.__module__ == namespace["__name__"]:
            for attr in dir(obj):
                if not attr.startswith("test"):
                    continue
                reason = _deviation(f"{file}::{name}::{attr}")
                if reason is not None:
                    setattr(obj, attr, _xfail(getattr(obj, attr), reason))
        elif name.startswith("test") and inspect.isfunction(obj):
            reason = _deviation(f"{file}::{name}")
            if reason is not None:
                namespace[name] = _xfail(obj, reason)


def _xfail(func: Callable[..., Any], reason: str) -> Callable[..., Any]:
    # A fresh function object, so that the mark does not reach other classes sharing ``func``.
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return pytest.mark.xfail(strict=True, reason=reason)(wrapper)
