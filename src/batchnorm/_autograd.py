"""The autograd.Function that carries batch norm's hand-derived backward.

The forward and backward formulas are in :mod:`batchnorm.backends` and derived in
``docs/math.md``. This file decides what is saved and how double backward stays correct:
the fast path reuses the statistics saved by the forward, and when the backward itself is
being differentiated (``create_graph=True``) it recomputes mu and r from the saved input with
differentiable operations, so that autograd sees how they depend on x.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import backends


def batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eval_mean: Tensor | None,
    eval_var: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mu, var, r): training when ``eval_mean``/``eval_var`` are None, inference otherwise."""
    kernels = backends.kernels_for(x)
    cdt = backends.compute_dtype(x)
    if eval_mean is not None and eval_var is not None:
        mean, var = eval_mean.to(cdt), eval_var.to(cdt)
        y, invstd = kernels.forward_eval(x, mean, var, weight, bias, eps)
        return y, mean, var, invstd
    if x.numel() == 0:
        # Empty batch: torch returns an empty output and leaves the statistics alone.
        nan = torch.full((x.shape[1],), float("nan"), dtype=cdt, device=x.device)
        return x.clone(), nan, nan, nan
    return kernels.forward_train(x, weight, bias, eps)


def apply_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eval_mean: Tensor | None,
    eval_var: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mu, var) through :class:`BatchNormFunction` when a gradient can be asked for, else
    directly: inference under ``no_grad`` pays for no autograd node."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        y, mean, var = BatchNormFunction.apply(x, weight, bias, eval_mean, eval_var, eps)  # type: ignore[no-untyped-call]
        return y, mean, var
    y, mean, var, _ = batch_norm_forward(x, weight, bias, eval_mean, eval_var, eps)
    return y, mean, var


class BatchNormFunction(torch.autograd.Function):
    """y = gamma * (x - mu) / sqrt(var + eps) + beta with a hand-derived backward.

    Training when ``eval_mean``/``eval_var`` are None (mu, var are the batch statistics and
    depend on x); inference otherwise (mu, var are constants).

    Returns ``(y, mu, var)``; mu and var are non-differentiable outputs that the caller uses for
    the running-statistics update.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eval_mean: Tensor | None,
        eval_var: Tensor | None,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, invstd = batch_norm_forward(x, weight, bias, eval_mean, eval_var, eps)
        ctx.training = eval_mean is None or eval_var is None
        ctx.eps = eps
        parameter = weight if weight is not None else bias
        ctx.param_dtype = parameter.dtype if parameter is not None else x.dtype
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, _grad_mean: Any, _grad_var: Any) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if x.numel() == 0:
            zeros = torch.zeros(x.shape[1], dtype=mean.dtype, device=x.device)
            grad_input = torch.zeros_like(x) if need_input else None
            return _param_grads(grad_input, zeros, zeros, ctx.param_dtype, need_weight, need_bias)
        create_graph = torch.is_grad_enabled()
        kernels = backends.kernels_for(x, create_graph=create_graph)
        grad_weight: Tensor | None
        grad_bias: Tensor | None
        if ctx.training:
            if create_graph:
                # Differentiable recomputation: second derivatives flow through mu(x) and r(x).
                mean, var = backends.batch_stats(x)
                invstd = torch.rsqrt(var + ctx.eps)
            grad_input, grad_weight, grad_bias = kernels.backward_train(
                grad_output, x, weight, mean, invstd, need_input
            )
        else:
            grad_input, grad_weight, grad_bias = kernels.backward_eval(
                grad_output, x, weight, mean, invstd, need_input, need_weight or need_bias
            )
        return _param_grads(grad_input, grad_weight, grad_bias, ctx.param_dtype, need_weight, need_bias)


def _param_grads(
    grad_input: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
    dtype: torch.dtype,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, ...]:
    """Gradients in forward's argument order, parameters' in the parameters' dtype."""
    return (
        grad_input,
        grad_weight.to(dtype) if need_weight and grad_weight is not None else None,
        grad_bias.to(dtype) if need_bias and grad_bias is not None else None,
        None,
        None,
        None,
    )
