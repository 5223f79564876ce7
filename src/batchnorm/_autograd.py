r"""The autograd.Function that carries batch norm's hand-derived backward, and its forward-mode rule.

The forward and backward formulas are in :mod:`batchnorm.backends` and derived in
``docs/math.md``. This file decides what is saved and how every transform sees the Function:

- reverse mode: ``backward`` reuses the statistics saved by the forward; when the backward is
  itself being differentiated (``create_graph=True``) it recomputes mu and r from the saved input
  with differentiable operations, so that autograd sees how they depend on x;
- forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``): ``jvp`` pushes
  tangents through the same equations (below);
- ``torch.func.vmap``: the Function is written in the ``forward`` + ``setup_context`` form with
  ``generate_vmap_rule = True``: its forward, backward and jvp are plain tensor code, and the
  kernels take their out-of-place path whenever a transform is active.

Forward-mode rule, with x̂ = (x - mu) * r, for tangents t_x, t_gamma, t_beta:

    training:  t_x̂ = r * (t_x - mean(t_x) - x̂ * mean(x̂ * t_x))     (mu and r depend on x)
    eval:      t_x̂ = r * t_x                                         (mu and r are constants)
    t_y = gamma * t_x̂ + t_gamma * x̂ + t_beta

(d mu = mean(t_x); d var = 2 mean((x - mu) t_x); d r = -r^3 mean((x - mu) t_x); the means are
per channel over the M values of the batch.) Tangents on the running statistics do not enter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import backends


def batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eval_mean: Tensor | None,
    eval_var: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mu, var): training when ``eval_mean``/``eval_var`` are None, inference otherwise."""
    kernels = backends.kernels_for(x)
    cdt = backends.compute_dtype(x)
    if eval_mean is not None and eval_var is not None:
        # Views, not the running statistics themselves: a Function may not return an input as-is.
        # (Converted only when needed: an exported graph keeps every conversion as nodes.)
        mean = eval_mean if eval_mean.dtype == cdt else eval_mean.to(cdt)
        var = eval_var if eval_var.dtype == cdt else eval_var.to(cdt)
        mean, var = mean.view_as(eval_mean), var.view_as(eval_var)
        y, _ = kernels.forward_eval(x, mean, var, weight, bias, eps)
        return y, mean, var
    if x.numel() == 0:
        # Empty batch: torch returns an empty output and leaves the statistics alone.
        nan = x.new_full((x.shape[1],), float("nan"), dtype=cdt)
        return x.clone(), nan, nan
    y, mean, var, _ = kernels.forward_train(x, weight, bias, eps)
    return y, mean, var


def needs_autograd_function(*tensors: Tensor | None) -> bool:
    """Whether a call must go through an autograd.Function: a gradient can be asked for (reverse
    mode), a forward-mode level is open (a tangent may be attached), a torch.func transform is
    active, or torch.jit.trace is recording. Otherwise inference pays for no autograd node.
    Never under ONNX export, which records the forward alone (and mangles a Function's node)."""
    if backends.onnx_exporting():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    if torch.compiler.is_compiling():
        return False
    # torch.jit.trace records the Function as one node; it checks its trace with grad mode off.
    return forward_ad._current_level >= 0 or backends.functorch_active() or torch._C._get_tracing_state() is not None


def without_jvp(function: type[torch.autograd.Function]) -> Any:
    """``function`` without its custom ``jvp``, for ``torch.compile``, which cannot trace a custom
    jvp (and never asks for forward mode inside a compiled region). Call sites pick
    ``(twin if torch.compiler.is_compiling() else function)``, which the compiler folds."""
    attributes = {"jvp": staticmethod(torch.autograd.Function.jvp), "__doc__": function.__doc__}
    return type(f"{function.__name__}NoJvp", (function,), attributes)


def apply_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eval_mean: Tensor | None,
    eval_var: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mu, var) through :class:`BatchNormFunction` when a transform can see the call, else directly."""
    if needs_autograd_function(x, weight, bias, eval_mean, eval_var):
        y, mean, var = (BatchNormFunctionNoJvp if torch.compiler.is_compiling() else BatchNormFunction).apply(
            x, weight, bias, eval_mean, eval_var, eps
        )
        return y, mean, var
    return batch_norm_forward(x, weight, bias, eval_mean, eval_var, eps)


def parameter_dtype(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> torch.dtype:
    """The dtype parameter gradients are returned in (float32 parameters with half input)."""
    parameter = weight if weight is not None else bias
    return parameter.dtype if parameter is not None else x.dtype


def normalized_tangent(x_hat: Tensor, invstd: Tensor, tangent: Tensor, training: bool) -> Tensor:
    """t_x̂ of x̂ = (x - mu) * r for the input tangent t_x (module docstring): (N, C, *)."""
    shape = backends.channel_shape(x_hat)
    tangent = tangent.to(x_hat.dtype)
    if not training:
        return tangent * invstd.view(shape)
    dims = backends.reduce_dims(x_hat)
    mean_tangent = tangent.mean(dims, keepdim=True)  # mean(t_x): (N, C, *) -> (1, C, 1...)
    projection = (x_hat * tangent).mean(dims, keepdim=True)  # mean(x̂ * t_x): (N, C, *) -> (1, C, 1...)
    return (tangent - mean_tangent - x_hat * projection) * invstd.view(shape)


def affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y = gamma * x̂ + beta in x̂'s dtype: (N, C, *)."""
    shape = backends.channel_shape(x_hat)
    y = x_hat if weight is None else x_hat * weight.to(x_hat.dtype).view(shape)
    return y if bias is None else y + bias.to(x_hat.dtype).view(shape)


def affine_tangent(
    x_hat: Tensor,
    t_x_hat: Tensor | None,
    weight: Tensor | None,
    t_weight: Tensor | None,
    t_bias: Tensor | None,
) -> Tensor:
    """t_y = gamma * t_x̂ + t_gamma * x̂ + t_beta, in x̂'s dtype: (N, C, *)."""
    shape = backends.channel_shape(x_hat)
    t_y = torch.zeros_like(x_hat)
    if t_x_hat is not None:
        t_y = t_x_hat if weight is None else t_x_hat * weight.to(x_hat.dtype).view(shape)
    if t_weight is not None:
        t_y = t_y + x_hat * t_weight.to(x_hat.dtype).view(shape)
    if t_bias is not None:
        t_y = t_y + t_bias.to(x_hat.dtype).view(shape)
    return t_y


def batch_norm_tangent(
    x_hat: Tensor,
    invstd: Tensor,
    training: bool,
    weight: Tensor | None,
    t_x: Tensor | None,
    t_weight: Tensor | None,
    t_bias: Tensor | None,
) -> Tensor:
    """t_y of y = gamma * x̂ + beta, in x̂'s (the compute) dtype."""
    t_x_hat = None if t_x is None else normalized_tangent(x_hat, invstd, t_x, training)
    return affine_tangent(x_hat, t_x_hat, weight, t_weight, t_bias)


class BatchNormFunction(torch.autograd.Function):
    """y = gamma * (x - mu) / sqrt(var + eps) + beta with a hand-derived backward and jvp.

    Training when ``eval_mean``/``eval_var`` are None (mu, var are the batch statistics and
    depend on x); inference otherwise (mu, var are constants).

    Returns ``(y, mu, var)``; mu and var are non-differentiable outputs that the caller uses for
    the running-statistics update.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eval_mean: Tensor | None,
        eval_var: Tensor | None,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return batch_norm_forward(x, weight, bias, eval_mean, eval_var, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, weight, bias, eval_mean, eval_var, eps = inputs
        _, mean, var = output
        ctx.training = eval_mean is None or eval_var is None
        ctx.eps = eps
        ctx.param_dtype = parameter_dtype(x, weight, bias)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, _grad_mean: Any, _grad_var: Any) -> tuple[Tensor | None, ...]:
        x, weight, mean, var = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if x.numel() == 0:
            zeros = x.new_zeros(x.shape[1], dtype=mean.dtype)
            grad_input = torch.zeros_like(x) if need_input else None
            return param_grads(grad_input, zeros, zeros, ctx.param_dtype, need_weight, need_bias)
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
            invstd = torch.rsqrt(var + ctx.eps)
            grad_input, grad_weight, grad_bias = kernels.backward_eval(
                grad_output, x, weight, mean, invstd, need_input, need_weight or need_bias
            )
        return param_grads(grad_input, grad_weight, grad_bias, ctx.param_dtype, need_weight, need_bias)

    @staticmethod
    def jvp(
        ctx: Any,
        t_x: Tensor | None,
        t_weight: Tensor | None,
        t_bias: Tensor | None,
        _t_eval_mean: Any,
        _t_eval_var: Any,
        _t_eps: Any,
    ) -> tuple[Tensor | None, None, None]:
        # The running statistics are constants of the normalization: their tangents (refused up
        # front where torch refuses them, batchnorm.functional) do not enter.
        x, weight, mean, var = ctx.saved_tensors
        if x.numel() == 0:
            return torch.zeros_like(x), None, None
        invstd = torch.rsqrt(var + ctx.eps)
        x_hat = normalized(x, mean, invstd)
        t_y = batch_norm_tangent(x_hat, invstd, ctx.training, weight, t_x, t_weight, t_bias)
        return t_y.to(x.dtype), None, None


BatchNormFunctionNoJvp = without_jvp(BatchNormFunction)


def normalized(x: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """x̂ = (x - mu) * r in the statistics' dtype: (N, C, *)."""
    shape = backends.channel_shape(x)
    return (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)


def param_grads(
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
