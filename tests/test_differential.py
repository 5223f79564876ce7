"""Our modules against torch.nn.BatchNorm* over a table of named configurations.

Each configuration runs a sequence of train and eval steps through both modules on the same
input and compares outputs, input/weight/bias gradients, running statistics,
``num_batches_tracked`` and the output's memory format after every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm.functional import batch_norm

from .conftest import PAIRS, TorchBatchNormAnyRank, assert_state_equal, tolerances


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    shape: tuple[int, ...]
    affine: bool = True
    track_running_stats: bool = True
    momentum: float | None = 0.1
    eps: float = 1e-5
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # contiguous | channels_last | noncontiguous
    steps: str = "ttetet"  # t: training step, e: eval step
    kwargs: dict[str, object] = field(default_factory=dict)


SHAPES = {
    "1d_2D": ("1d", (16, 5)),
    "1d_3D": ("1d", (6, 5, 7)),
    "2d": ("2d", (4, 5, 6, 3)),
    "3d": ("3d", (2, 5, 3, 4, 2)),
    "any_3D": ("any", (4, 5, 6)),
    "any_4D": ("any", (3, 5, 2, 4)),
    "any_5D": ("any", (2, 5, 2, 3, 2)),
    "any_6D": ("any", (2, 5, 2, 2, 3, 2)),
}

OPTIONS: dict[str, dict[str, object]] = {
    "default": {},
    "not_affine": {"affine": False},
    "not_tracking": {"track_running_stats": False},
    "not_affine_not_tracking": {"affine": False, "track_running_stats": False},
    "momentum_0.5": {"momentum": 0.5},
    "momentum_0": {"momentum": 0.0},
    "momentum_1": {"momentum": 1.0},
    "momentum_none": {"momentum": None},
    "eps_1e-1": {"eps": 1e-1},
    "float64": {"dtype": torch.float64},
    "noncontiguous": {"layout": "noncontiguous"},
}

CASES = [
    Case(f"{shape_name}-{option_name}", kind, shape, **option)  # type: ignore[arg-type]
    for shape_name, (kind, shape) in SHAPES.items()
    for option_name, option in OPTIONS.items()
] + [
    Case("2d-channels_last", "2d", (4, 5, 6, 3), layout="channels_last"),
    Case("3d-channels_last", "3d", (2, 5, 3, 4, 2), layout="channels_last"),
    Case("2d-channels_last-float64-momentum_none", "2d", (4, 5, 3, 3), layout="channels_last", momentum=None),
    Case("2d-eval_first", "2d", (4, 5, 6, 3), steps="ette"),
]


def make_input(case: Case, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    shape = case.shape
    if case.layout == "noncontiguous":
        # Every other element of the last dimension: a strided view, not a contiguous tensor.
        shape = (*shape[:-1], shape[-1] * 2)
    # Per-channel offsets and scales, so that normalization has work to do.
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    x = x * torch.linspace(0.5, 2.0, shape[1], dtype=torch.float64).view(channel)
    x = x + torch.arange(shape[1], dtype=torch.float64).view(channel)
    x = x.to(case.dtype)
    if case.layout == "noncontiguous":
        x = x[..., ::2]
        assert not x.is_contiguous()
    elif case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def build_pair(case: Case) -> tuple[nn.Module, nn.Module]:
    ours_cls, theirs_cls = PAIRS[case.kind]
    args = {
        "num_features": case.shape[1],
        "eps": case.eps,
        "momentum": case.momentum,
        "affine": case.affine,
        "track_running_stats": case.track_running_stats,
        "dtype": case.dtype,
    }
    ours, theirs = ours_cls(**args), theirs_cls(**args)
    if case.affine:
        # Non-trivial parameters, the same in both.
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-1.0, 1.0)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def run_case(case: Case) -> None:
    ours, theirs = build_pair(case)
    tol = tolerances(case.dtype)
    for step, mode in enumerate(case.steps):
        ours.train(mode == "t")
        theirs.train(mode == "t")
        x = make_input(case, step)
        x_ours, x_theirs = make_input(case, step).requires_grad_(), make_input(case, step).requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        torch.testing.assert_close(y_ours, y_theirs, **tol)
        assert y_ours.dtype == y_theirs.dtype
        if case.layout == "channels_last":
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert y_ours.is_contiguous(memory_format=fmt)
        grad = torch.randn(y_theirs.shape, generator=torch.Generator().manual_seed(step), dtype=case.dtype)
        y_ours.backward(grad)
        y_theirs.backward(grad)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, **tol)
        if case.affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **tol)
            ours.zero_grad()
            theirs.zero_grad()
        assert_state_equal(ours, theirs, **tol)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_module_matches_torch(case: Case) -> None:
    run_case(case)


def test_each_option_changes_something() -> None:
    """Every option in the table changes the outcome: the table cannot pass by ignoring one."""
    base = Case("base", "2d", (4, 5, 6, 3))

    def outcome(case: Case) -> list[torch.Tensor]:
        ours, _ = build_pair(case)
        outs = []
        for step, mode in enumerate(case.steps):
            ours.train(mode == "t")
            x = make_input(case, step).requires_grad_()
            y = ours(x)
            y.backward(torch.ones_like(y) + torch.arange(y.numel(), dtype=y.dtype).view(y.shape) / y.numel())
            outs += [y.detach().double(), x.grad.double()]
            outs += [t.detach().double() for t in ours.state_dict().values()]
        return outs

    reference = outcome(base)
    for name, option in OPTIONS.items():
        if name in ("default", "float64", "noncontiguous"):
            continue  # same numbers by design: these change representation, not semantics
        changed = outcome(replace(base, **option))  # type: ignore[arg-type]
        assert len(changed) != len(reference) or any(
            not torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(changed, reference, strict=True)
        ), name


@pytest.mark.parametrize("offset", [3e2, 1e4, 1e5])
@pytest.mark.parametrize("shape", [(64, 4), (8, 4, 6, 6)], ids=str)
def test_float32_accuracy_far_from_zero(offset: float, shape: tuple[int, ...]) -> None:
    """Means far from zero: a one-pass E[x^2] - E[x]^2 would lose every digit here. Against a
    float64 oracle, our float32 output and gradient are as accurate as torch's own kernel."""
    channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    x64 = torch.randn(shape, dtype=torch.float64) + offset * torch.arange(1, shape[1] + 1).view(channel)
    x32 = x64.float()
    grad = torch.randn(shape)
    reference = x32.double().requires_grad_()
    y_ref = nn.functional.batch_norm(reference, None, None, training=True)
    y_ref.backward(grad.double())
    errors = {}
    for name, fn in (("ours", batch_norm), ("torch", nn.functional.batch_norm)):
        x = x32.clone().requires_grad_()
        y = fn(x, None, None, training=True)
        y.backward(grad)
        assert x.grad is not None and reference.grad is not None
        errors[name] = (
            (y.double() - y_ref).abs().max().item(),
            (x.grad.double() - reference.grad).abs().max().item(),
        )
    for ours_error, torch_error in zip(errors["ours"], errors["torch"], strict=True):
        assert ours_error <= 2 * torch_error + 1e-6, errors


FUNCTIONAL_CASES = [
    ("training_with_running", True, True, True),
    ("training_no_running", True, False, True),
    ("eval_running", False, True, True),
    ("training_not_affine", True, True, False),
    ("eval_not_affine", False, True, False),
]


@pytest.mark.parametrize(
    ("training", "with_running", "affine"),
    [case[1:] for case in FUNCTIONAL_CASES],
    ids=[case[0] for case in FUNCTIONAL_CASES],
)
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 5)], ids=str)
def test_functional_matches_torch(training: bool, with_running: bool, affine: bool, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    channels = shape[1]
    running = (torch.randn(channels, dtype=torch.float64), torch.rand(channels, dtype=torch.float64) + 0.5)
    weight = torch.randn(channels, dtype=torch.float64) if affine else None
    bias = torch.randn(channels, dtype=torch.float64) if affine else None
    ours_running = [t.clone() for t in running] if with_running else [None, None]
    theirs_running = [t.clone() for t in running] if with_running else [None, None]
    y_ours = batch_norm(x, *ours_running, weight, bias, training, 0.3, 1e-3)
    y_theirs = nn.functional.batch_norm(x, *theirs_running, weight, bias, training, 0.3, 1e-3)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-12, atol=1e-12)
    if with_running:
        for a, b in zip(ours_running, theirs_running, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=5).filter(
        lambda s: s[0] * int(torch.tensor(s[2:]).prod()) > 1
    ),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-1e3, 1e3),
    momentum=st.one_of(st.none(), st.floats(0.0, 1.0)),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch(
    shape: list[int], scale: float, offset: float, momentum: float | None, affine: bool, seed: int
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + offset
    ours = batchnorm.BatchNorm(shape[1], momentum=momentum, affine=affine, dtype=torch.float64)
    theirs = TorchBatchNormAnyRank(shape[1], momentum=momentum, affine=affine, dtype=torch.float64)
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-7, atol=1e-7)
        (ya * ya.detach().sin()).sum().backward()
        (yb * yb.detach().sin()).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6 / scale)
    assert_state_equal(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2)], ids=str)
def test_empty_batch_gradient_sums_in_every_layout(shape: tuple[int, ...]) -> None:
    """Statistics of an empty batch are sums over nothing: zeros, in every layout's kernel."""
    from batchnorm import backends

    x = torch.randn(shape)
    mean = torch.zeros(3)
    sums = backends.grad_sums(torch.randn(shape), x, mean)
    for total in sums:
        torch.testing.assert_close(total, torch.zeros(3))
