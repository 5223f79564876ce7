"""The hand-derived backward against finite differences (gradcheck) in float64, and its own
derivative (gradgradcheck), in training and eval mode."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import batchnorm
from batchnorm._autograd import BatchNormFunction
from batchnorm.functional import batch_norm

SHAPES = [(5, 3), (4, 3, 5), (3, 2, 3, 2)]


def inputs(shape: tuple[int, ...], affine: bool) -> tuple[torch.Tensor, ...]:
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    if not affine:
        return (x,)
    weight = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(shape[1], dtype=torch.float64).requires_grad_()
    return x, weight, bias


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "not_affine"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_gradcheck_and_gradgradcheck(shape: tuple[int, ...], affine: bool, training: bool) -> None:
    channels = shape[1]
    running_mean = torch.randn(channels, dtype=torch.float64)
    running_var = torch.rand(channels, dtype=torch.float64) + 0.5

    def fn(*args: torch.Tensor) -> torch.Tensor:
        # Running statistics are copied so that gradcheck's repeated calls see the same state.
        return batch_norm(args[0], running_mean.clone(), running_var.clone(), *args[1:], training=training, eps=1e-3)

    args = inputs(shape, affine)
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_backward_is_the_hand_derived_one(training: bool) -> None:
    """The graph's node is one of ours, whose inputs are the leaves themselves: not autograd
    through the forward's ops. A common call (module or functional) records the native node
    (csrc/autograd.cpp); every other route, here the eager backend, our autograd.Function."""
    x = torch.randn(4, 3, requires_grad=True)
    bn = batchnorm.BatchNorm1d(3).train(training)

    def functional() -> torch.Tensor:
        return batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training)

    with batchnorm.using_backend("eager"):
        eager = [bn(x).grad_fn, functional().grad_fn]
    native_nodes = [bn(x).grad_fn, functional().grad_fn]
    native = "BatchNormTrainFunction" if training else "BatchNormEvalFunction"
    for node in native_nodes:
        assert node is not None and node.name() == f"torch::autograd::CppNode<batchnorm::{native}>"
    for node in eager:
        assert type(node).__name__ == f"{BatchNormFunction.__name__}Backward"
    for node in native_nodes + eager:
        assert node is not None
        leaves = {type(edge).__name__ for edge, _ in node.next_functions if edge is not None}
        assert leaves == {"AccumulateGrad"}


def test_double_backward_matches_torch() -> None:
    """Gradient penalty (||dL/dx||^2) differentiated again, against torch's batch norm."""
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    grads = []
    for bn in (batchnorm.BatchNorm1d(3, dtype=torch.float64), torch.nn.BatchNorm1d(3, dtype=torch.float64)):
        xi = x.clone().requires_grad_()
        loss = (bn(xi) ** 3).sum()
        (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
        (gx.pow(2).sum()).backward()
        grads.append((xi.grad, bn.weight.grad))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_only_requested_gradients_are_computed() -> None:
    x = torch.randn(4, 3)
    weight = torch.ones(3, requires_grad=True)
    y = batch_norm(x, None, None, weight, torch.zeros(3), training=True)
    y.sum().backward()
    assert weight.grad is not None and x.grad is None


def test_eval_with_frozen_parameters_matches_torch() -> None:
    """Fine-tuning with frozen BN: eval mode, parameters without gradients, input gradient only."""
    ours, theirs = batchnorm.BatchNorm2d(3).eval(), torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        theirs.running_mean.uniform_(-1, 1)
        theirs.weight.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    grads = []
    for module in (ours, theirs):
        module.requires_grad_(False)
        x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
        (module(x) * torch.arange(x.numel()).view(x.shape)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(*grads)
