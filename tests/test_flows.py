"""BatchNormFlow: log-determinants against autograd Jacobians, round trips, running statistics.

Oracles: torch.autograd.functional.jacobian + slogdet in float64, float64 formulas written out
here, and torch's own BatchNorm for the running statistics.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchnorm import BatchNormFlow

SHAPES = {"2d": (3, 4), "image": (2, 2, 3, 2), "sequence": (2, 3, 5)}


def trained_flow(shape: tuple[int, ...], seed: int = 0) -> BatchNormFlow:
    """A float64 flow with running statistics and parameters away from their initial values."""
    generator = torch.Generator().manual_seed(seed)
    flow = BatchNormFlow(shape[1], momentum=0.5).double()
    for _ in range(3):
        flow(torch.randn((16, *shape[1:]), generator=generator, dtype=torch.float64) * 3 + 1)
    with torch.no_grad():
        flow.unconstrained_weight.copy_(torch.randn(shape[1], generator=generator, dtype=torch.float64))
        flow.bias.copy_(torch.randn(shape[1], generator=generator, dtype=torch.float64))
    return flow


def slogdet_of_sample_map(flow: BatchNormFlow, sample: Tensor, inverse: bool = False) -> float:
    """log|det J| of the map of one sample (C, *), from autograd's Jacobian."""

    def sample_map(v: Tensor) -> Tensor:
        out = (flow.inverse if inverse else flow)(v.unsqueeze(0))[0]
        return out.squeeze(0)

    jacobian = torch.autograd.functional.jacobian(sample_map, sample)  # (C, *, C, *)
    size = sample.numel()
    sign, logabsdet = torch.linalg.slogdet(jacobian.reshape(size, size))  # (D, D) -> ()
    assert sign != 0
    return float(logabsdet)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_eval_logabsdet_is_the_jacobian_log_determinant(shape: tuple[int, ...], inverse: bool) -> None:
    flow = trained_flow(shape).eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        _, logabsdet = (flow.inverse if inverse else flow)(x)
    assert logabsdet.shape == (shape[0],)
    for i in range(shape[0]):
        assert float(logabsdet[i]) == pytest.approx(slogdet_of_sample_map(flow, x[i], inverse), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_training_logabsdet_uses_the_batch_statistics(shape: tuple[int, ...]) -> None:
    """log|det| of the per-sample map with the batch statistics held fixed, written out in float64."""
    flow = trained_flow(shape)
    x = torch.randn(shape, dtype=torch.float64) * 2 - 1
    z, logabsdet = flow(x)
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    gamma = F.softplus(flow.unconstrained_weight.detach()) + 1e-3
    positions = math.prod(shape[2:])
    expected = positions * (torch.log(gamma) - 0.5 * torch.log(var + flow.eps)).sum()
    assert torch.allclose(logabsdet, expected.expand(shape[0]), rtol=1e-13, atol=0)
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    expected_z = gamma.view(view) * (x - mean.view(view)) / torch.sqrt(var.view(view) + flow.eps) + flow.bias.view(view)
    assert torch.allclose(z, expected_z, rtol=1e-12, atol=1e-12)


def test_training_logabsdet_gradient_flows_through_the_batch_variance() -> None:
    """d logabsdet / dx: without it, layers before the flow could inflate their scale for free."""
    flow = trained_flow((8, 3))
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    flow(x)[1].sum().backward()
    x_oracle = x.detach().clone().requires_grad_(True)
    var = x_oracle.var(dim=0, unbiased=False)
    (-0.5 * torch.log(var + flow.eps).sum() * 8).backward()
    assert x.grad is not None and x_oracle.grad is not None
    assert torch.allclose(x.grad, x_oracle.grad, rtol=1e-12, atol=1e-14)
    assert float(x.grad.abs().max()) > 0.01


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_round_trip(shape: tuple[int, ...], training: bool) -> None:
    flow = trained_flow(shape).train(training)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    with torch.no_grad():
        z, logabsdet = flow(x)
        x_back, inverse_logabsdet = flow.inverse(z)
    assert float((x_back - x).abs().max() / x.abs().max()) <= 1e-12
    assert torch.allclose(inverse_logabsdet, -logabsdet, rtol=1e-14, atol=0)


def test_running_stats_match_torch() -> None:
    flow = BatchNormFlow(3, momentum=0.3)
    reference = nn.BatchNorm2d(3, momentum=0.3, affine=False)
    for seed in range(3):
        x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * 2 + 1
        flow(x)
        reference(x)
    assert torch.allclose(flow.running_mean, reference.running_mean, rtol=1e-6, atol=1e-7)
    assert torch.allclose(flow.running_var, reference.running_var, rtol=1e-6, atol=1e-7)
    assert int(flow.num_batches_tracked) == 3


def test_cumulative_average_when_momentum_is_none() -> None:
    flow = BatchNormFlow(2, momentum=None)
    batches = [torch.randn(6, 2, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for x in batches:
        flow(x)
    expected = torch.stack([x.mean(dim=0) for x in batches]).mean(dim=0)
    assert torch.allclose(flow.running_mean, expected, atol=1e-6)


def test_scale_positive_and_everything_finite_for_extreme_parameters() -> None:
    flow = BatchNormFlow(3)
    with torch.no_grad():
        flow.unconstrained_weight.copy_(torch.tensor([-1e4, 0.0, 1e4]))
        flow.bias.copy_(torch.tensor([1e4, 0.0, -1e4]))
    x = torch.randn(8, 3, 2, 2) * 1e3
    x[:, 1] = 5.0  # a constant channel: var = 0, only eps keeps the scale finite
    for training in (True, False):
        flow.train(training)
        z, logabsdet = flow(x)
        x_back, inverse_logabsdet = flow.inverse(z)
        for value in (z, logabsdet, x_back, inverse_logabsdet):
            assert torch.isfinite(value).all()
    weight = flow.weight.detach()
    assert bool((weight > 0).all())
    assert float(weight[0]) == pytest.approx(1e-3)


def test_initial_flow_is_plain_normalization() -> None:
    flow = BatchNormFlow(2)
    assert torch.allclose(flow.weight, torch.ones(2))
    x = torch.randn(10, 2) * 3 + 1
    z, _ = flow(x)
    assert torch.allclose(z, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5), atol=1e-5)


def test_inverse_in_training_before_any_forward_raises() -> None:
    with pytest.raises(ValueError, match="earlier training forward"):
        BatchNormFlow(2).inverse(torch.randn(3, 2))


def test_failed_call_changes_nothing() -> None:
    flow = BatchNormFlow(3)
    with pytest.raises(ValueError, match=r"expected input with 3 channels.*got 2"):
        flow(torch.randn(4, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        flow(torch.randn(1, 3))
    with pytest.raises(TypeError, match="floating-point"):
        flow(torch.ones(4, 3, dtype=torch.long))
    assert int(flow.num_batches_tracked) == 0 and flow.batch_mean is None
    assert torch.equal(flow.running_mean, torch.zeros(3)) and torch.equal(flow.running_var, torch.ones(3))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_num_features_must_be_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="positive int"):
        BatchNormFlow(bad)  # type: ignore[arg-type]
