"""Shared test helpers: torch's own modules are the oracle for every core behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm


class TorchBatchNormAnyRank(nn.modules.batchnorm._BatchNorm):
    """torch's batch norm without a rank check: the oracle for the generic ``BatchNorm``."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


PAIRS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "1d": (batchnorm.BatchNorm1d, nn.BatchNorm1d),
    "2d": (batchnorm.BatchNorm2d, nn.BatchNorm2d),
    "3d": (batchnorm.BatchNorm3d, nn.BatchNorm3d),
    "any": (batchnorm.BatchNorm, TorchBatchNormAnyRank),
}


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float64: {"rtol": 1e-10, "atol": 1e-10}}.get(dtype, {"rtol": 1e-4, "atol": 2e-5})


def assert_state_equal(ours: nn.Module, theirs: nn.Module, **tol: float) -> None:
    """Same state-dict keys and values (buffers and parameters), counters exactly."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype == torch.long:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], **tol, msg=key)


@pytest.fixture(autouse=True)
def _fresh_backend_and_seed() -> None:
    torch.manual_seed(0)
    batchnorm.backends._selected = None
