"""GhostBatchNorm, BatchRenorm, renorm_schedule and FrozenBatchNorm against formulas written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm import BatchNorm, BatchRenorm, FrozenBatchNorm, GhostBatchNorm, renorm_schedule

EPS = 1e-5


def normalize_with(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """w * (x - mean) / sqrt(var + eps) + b, per channel of x (N, C, *), written out."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return w.view(shape) * (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS) + b.view(shape)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean, biased variance (two passes) and count per channel of x (N, C, *)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (N, C, *) -> (C, M)
    mean = flat.mean(1)
    return mean, ((flat - mean[:, None]) ** 2).mean(1), flat.shape[1]


def random_affine(bn: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# GhostBatchNorm
# ---------------------------------------------------------------------------------------------

GHOST_CASES = {
    # name: (input shape, virtual_batch_size, expected chunk sizes)
    "even_2d": ((16, 3), 4, [4, 4, 4, 4]),
    "uneven_2d": ((10, 3), 4, [5, 5]),
    "uneven_rest": ((11, 2), 3, [4, 4, 3]),
    "smaller_than_virtual": ((3, 3), 4, [3]),
    "4d": ((8, 3, 2, 3), 2, [2, 2, 2, 2]),
}


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "momentum_none"])
@pytest.mark.parametrize("name", list(GHOST_CASES))
def test_ghost_equals_per_chunk_normalization(name: str, momentum: float | None) -> None:
    shape, virtual, sizes = GHOST_CASES[name]
    gen = torch.Generator().manual_seed(0)
    bn = GhostBatchNorm(shape[1], virtual, momentum=momentum, dtype=torch.float64)
    random_affine(bn, gen)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).requires_grad_(True)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = bn(x)
    (y * dy).sum().backward()

    ref_x = x.detach().clone().requires_grad_(True)
    w = bn.weight.detach().clone().requires_grad_(True)
    b = bn.bias.detach().clone().requires_grad_(True)
    running_mean, running_var = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    outputs = []
    for k, chunk in enumerate(ref_x.split(sizes)):
        mean, var, count = channel_stats(chunk)
        outputs.append(normalize_with(chunk, mean, var, w, b))
        factor = 1 / (k + 1) if momentum is None else momentum
        running_mean = (1 - factor) * running_mean + factor * mean.detach()
        running_var = (1 - factor) * running_var + factor * var.detach() * count / (count - 1)
    expected = torch.cat(outputs)
    (expected * dy).sum().backward()

    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(bn.weight.grad, w.grad)
    torch.testing.assert_close(bn.bias.grad, b.grad)
    torch.testing.assert_close(bn.running_mean, running_mean)
    torch.testing.assert_close(bn.running_var, running_var)
    assert bn.num_batches_tracked.item() == len(sizes)
    # Ghost batches are not the whole batch (unless there is only one).
    whole = normalize_with(x.detach(), *channel_stats(x.detach())[:2], w.detach(), b.detach())
    assert torch.allclose(y, whole) == (len(sizes) == 1)


def test_ghost_eval_is_batchnorm_eval() -> None:
    ghost, plain = GhostBatchNorm(3, 2), BatchNorm(3)
    x = torch.randn(8, 3) * 3 + 1
    ghost(x)
    plain.load_state_dict(ghost.state_dict())
    ghost.eval(), plain.eval()
    assert torch.equal(ghost(x), plain(x))


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, None])
def test_ghost_refuses_a_virtual_batch_size_that_is_not_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match=r"GhostBatchNorm: expected virtual_batch_size to be a positive int, got"):
        GhostBatchNorm(3, bad)  # type: ignore[arg-type]


def test_ghost_with_a_one_value_virtual_batch_raises_before_changing_anything() -> None:
    bn = GhostBatchNorm(2, virtual_batch_size=1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(4, 2))
    assert bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.running_mean, torch.zeros(2)) and torch.equal(bn.running_var, torch.ones(2))


# ---------------------------------------------------------------------------------------------
# BatchRenorm
# ---------------------------------------------------------------------------------------------


def test_renorm_with_rmax_1_and_dmax_0_is_batchnorm() -> None:
    gen = torch.Generator().manual_seed(1)
    renorm = BatchRenorm(4, rmax=1.0, dmax=0.0, momentum=0.5, dtype=torch.float64)
    plain = BatchNorm(4, momentum=0.5, dtype=torch.float64)
    random_affine(renorm, gen)
    plain.load_state_dict(renorm.state_dict())
    for _ in range(3):  # running statistics away from (0, 1) after the first step
        x = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64) * 4 - 2
        dy = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = renorm(x1), plain(x2)
        (y1 * dy).sum().backward()
        (y2 * dy).sum().backward()
        assert torch.equal(y1, y2)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(renorm.weight.grad, plain.weight.grad, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(renorm.bias.grad, plain.bias.grad, rtol=1e-14, atol=1e-14)
    assert torch.equal(renorm.running_var, plain.running_var)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "not_affine"])
def test_renorm_follows_the_formula_with_r_and_d_constant_in_backward(affine: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    channels = 5
    bn = BatchRenorm(channels, affine=affine, rmax=1.5, dmax=0.5, dtype=torch.float64)
    if affine:
        random_affine(bn, gen)
    # Running statistics such that some channels clip r and d and others do not.
    mu = torch.tensor([0.0, 2.0, -1.0, 0.3, 5.0], dtype=torch.float64)
    sigma2 = torch.tensor([1.0, 0.2, 9.0, 1.5, 4.0], dtype=torch.float64)
    bn.running_mean.copy_(mu)
    bn.running_var.copy_(sigma2)
    x = (torch.randn(8, channels, 3, generator=gen, dtype=torch.float64) * 1.3 + 0.5).requires_grad_(True)
    dy = torch.randn(8, channels, 3, generator=gen, dtype=torch.float64)
    y = bn(x)
    (y * dy).sum().backward()

    ref_x = x.detach().clone().requires_grad_(True)
    w = (bn.weight.detach().clone() if affine else torch.ones(channels, dtype=torch.float64)).requires_grad_(True)
    b = (bn.bias.detach().clone() if affine else torch.zeros(channels, dtype=torch.float64)).requires_grad_(True)
    mean, var, count = channel_stats(ref_x)
    sigma_b = torch.sqrt(var + EPS)
    sigma = torch.sqrt(sigma2 + EPS)
    r = torch.clamp(sigma_b / sigma, 1 / 1.5, 1.5).detach()
    d = torch.clamp((mean - mu) / sigma, -0.5, 0.5).detach()
    assert (r == 1.5).any() and (r < 1.5).any() and (d.abs() == 0.5).any() and (d.abs() < 0.5).any()
    shape = (1, -1, 1)
    expected = w.view(shape) * ((ref_x - mean.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape))
    expected = expected + b.view(shape)
    (expected * dy).sum().backward()

    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.grad, ref_x.grad)
    if affine:
        torch.testing.assert_close(bn.weight.grad, w.grad)
        torch.testing.assert_close(bn.bias.grad, b.grad)
    # The running statistics are updated as batch norm's, from the batch statistics.
    torch.testing.assert_close(bn.running_mean, 0.9 * mu + 0.1 * mean.detach())
    torch.testing.assert_close(bn.running_var, 0.9 * sigma2 + 0.1 * var.detach() * count / (count - 1))
    # Eval is batch-norm eval with the running statistics.
    bn.eval()
    z = torch.randn(4, channels, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        bn(z), F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=EPS)
    )


@pytest.mark.parametrize(("rmax", "dmax"), [(0.5, 1.0), (2.0, -1.0), ("3", 1.0)])
def test_renorm_refuses_bad_limits_at_construction_and_in_forward_without_changing_anything(
    rmax: object, dmax: object
) -> None:
    with pytest.raises(ValueError, match=r"BatchRenorm: expected (rmax|dmax) to be a number"):
        BatchRenorm(3, rmax=rmax, dmax=dmax)  # type: ignore[arg-type]
    bn = BatchRenorm(3)
    bn.rmax, bn.dmax = rmax, dmax  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"BatchRenorm\(3\): expected (rmax|dmax)"):
        bn(torch.randn(4, 3))
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_mean, torch.zeros(3))


def test_renorm_schedule_holds_then_ramps_linearly_to_the_limits() -> None:
    kwargs = {"hold_steps": 10, "rmax_ramp_steps": 20, "dmax_ramp_steps": 40}
    assert renorm_schedule(0, **kwargs) == (1.0, 0.0)
    assert renorm_schedule(10, **kwargs) == (1.0, 0.0)
    assert renorm_schedule(20, **kwargs) == (2.0, 1.25)
    assert renorm_schedule(30, **kwargs) == (3.0, 2.5)
    assert renorm_schedule(1000, **kwargs) == (3.0, 5.0)
    assert renorm_schedule(5000) == (1.0, 0.0) and renorm_schedule(40000) == (3.0, 5.0)
    assert renorm_schedule(30000) == pytest.approx((1 + 2 * 25000 / 35000, 5.0))
    with pytest.raises(ValueError, match="renorm_schedule: expected step to be a non-negative int, got -1"):
        renorm_schedule(-1)
    with pytest.raises(ValueError, match="renorm_schedule: expected hold_steps"):
        renorm_schedule(1, hold_steps=1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# FrozenBatchNorm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["torch", "ours", "torch_not_affine"])
def test_frozen_loads_a_batchnorm_state_dict_and_equals_its_eval(source: str) -> None:
    gen = torch.Generator().manual_seed(3)
    if source == "ours":
        bn: torch.nn.Module = BatchNorm(4)
    else:
        bn = torch.nn.BatchNorm2d(4, affine=source == "torch")
    if source != "torch_not_affine":
        with torch.no_grad():
            bn.weight.copy_(torch.rand(4, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(4, generator=gen))
    bn(torch.randn(8, 4, 3, 3, generator=gen) * 2 + 1)  # running statistics away from (0, 1)
    bn.eval()
    frozen = FrozenBatchNorm(4)
    assert str(frozen.load_state_dict(bn.state_dict())) == "<All keys matched successfully>"
    assert list(frozen.parameters()) == []
    x = (torch.randn(5, 4, 3, 3, generator=gen) * 2).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    frozen.train()  # the mode changes nothing
    y, y_ref = frozen(x), bn(x_ref)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_frozen_validates_its_arguments_and_input() -> None:
    with pytest.raises(ValueError, match="FrozenBatchNorm: expected num_features to be a positive int, got 0"):
        FrozenBatchNorm(0)
    with pytest.raises(ValueError, match="FrozenBatchNorm: expected eps >= 0"):
        FrozenBatchNorm(3, eps=-1.0)
    with pytest.raises(ValueError, match=r"FrozenBatchNorm\(3\): expected input with 3 channels .* got 2 channels"):
        FrozenBatchNorm(3)(torch.randn(4, 2))
    with pytest.raises(TypeError, match=r"FrozenBatchNorm\(3\): expected a floating-point input"):
        FrozenBatchNorm(3)(torch.ones(4, 3, dtype=torch.long))


@pytest.mark.parametrize("cls", [batchnorm.GhostBatchNorm, batchnorm.BatchRenorm])
def test_variants_take_bias_false_as_torch(cls: type[nn.Module]) -> None:
    kwargs = {"virtual_batch_size": 4} if cls is batchnorm.GhostBatchNorm else {"rmax": 1.0, "dmax": 0.0}
    ours = cls(3, bias=False, **kwargs)
    theirs = nn.BatchNorm1d(3, bias=False)
    assert ours.bias is None and ours.weight is not None
    assert set(ours.state_dict()) == set(theirs.state_dict())
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(4, 3, dtype=torch.float32) * 2 + 1
    torch.testing.assert_close(ours(x), theirs(x))


def test_renorm_with_weight_and_no_bias_follows_the_formula() -> None:
    """y = gamma * (x_hat * r + d) with beta = 0: the gamma * d term must stay."""
    bn = batchnorm.BatchRenorm(2, bias=False, rmax=2.0, dmax=1.0, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -3.0], dtype=torch.float64))
        bn.running_mean.copy_(torch.tensor([0.5, -0.5], dtype=torch.float64))
        bn.running_var.copy_(torch.tensor([4.0, 0.25], dtype=torch.float64))
    x = torch.randn(16, 2, dtype=torch.float64) * 3
    mu_b, var_b = x.mean(0), x.var(0, unbiased=False)
    sigma_b, sigma = torch.sqrt(var_b + bn.eps), torch.sqrt(bn.running_var + bn.eps)
    r = (sigma_b / sigma).clamp(0.5, 2.0)
    d = ((mu_b - bn.running_mean) / sigma).clamp(-1.0, 1.0)
    expected = bn.weight.detach() * ((x - mu_b) / sigma_b * r + d)
    torch.testing.assert_close(bn(x), expected)


def test_frozen_loads_a_bias_false_state_dict() -> None:
    bn = nn.BatchNorm2d(3, bias=False).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.running_mean.uniform_(-1, 1)
    frozen = batchnorm.FrozenBatchNorm(3)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(frozen(x), bn(x))
