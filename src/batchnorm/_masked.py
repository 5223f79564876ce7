r"""Masked batch norm: statistics over the valid positions of a padded, variable-length batch.

A boolean ``mask`` of the input's shape without the channel dimension ((N, L) for (N, C, L),
(N, H, W) for (N, C, H, W)) is True where a value is real. With M the number of valid positions
(the same for every channel), and every sum over the valid positions of one channel:

    mu = Σ x / M,  var = Σ (x - mu)² / M,  r = 1 / sqrt(var + eps),  x̂ = (x - mu) · r
    y = gamma · x̂ + beta on valid positions, 0 on padded ones
    dx = gamma · r · (dy - s1/M - x̂ · s2_hat/M) on valid positions, 0 on padded ones,
         s1 = Σ dy,  s2_hat = Σ dy · x̂

that is, batch norm of the valid values gathered into one tensor (``docs/math.md``). Padded
values never enter an arithmetic operation: they are replaced with ``torch.where``, so NaN or Inf
in the padding is harmless. The tensor operations below are the readable reference, and every
transform (vmap, jvp, double backward) sees ordinary code. Where the backend resolves to the
native kernels (CPU, contiguous input, no transform: :func:`native_masked`), the forward and the
first-order backward run the same equations in C++ instead (``csrc/masked.cpp``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _native, backends
from ._autograd import affine, affine_tangent, needs_autograd_function, param_grads, parameter_dtype, without_jvp

__all__ = ["apply_masked_batch_norm", "resolve_mask", "valid_count"]


def resolve_mask(input: Tensor, mask: object, lengths: object, caller: str) -> Tensor | None:
    """The boolean mask (N, *) of ``mask`` or ``lengths`` for ``input`` (N, C, *), validated; None
    when neither is given. Raises ValueError/TypeError naming what was expected and given."""
    if mask is None and lengths is None:
        return None
    expected = (input.shape[0], *input.shape[2:])  # (N, C, *) -> (N, *)
    if mask is not None and lengths is not None:
        raise ValueError(f"{caller}: expected mask or lengths, not both, got both")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{caller}: expected mask to be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{caller}: expected a mask of dtype torch.bool, got dtype {mask.dtype}")
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"{caller}: expected a mask of shape {expected} (the input's {tuple(input.shape)} without "
                f"the channel dimension), got shape {tuple(mask.shape)}"
            )
        if mask.device != input.device:
            raise ValueError(f"{caller}: expected a mask on the input's device {input.device}, got {mask.device}")
        return mask
    if not isinstance(lengths, Tensor):
        raise TypeError(f"{caller}: expected lengths to be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(f"{caller}: expected lengths of an integer dtype, got dtype {lengths.dtype}")
    if input.dim() < 3:
        raise ValueError(
            f"{caller}: expected input (N, C, *, L) with a last dimension to cut for lengths, "
            f"got {input.dim()}D input of shape {tuple(input.shape)}"
        )
    if tuple(lengths.shape) != (input.shape[0],):
        raise ValueError(f"{caller}: expected lengths of shape ({input.shape[0]},), got shape {tuple(lengths.shape)}")
    if lengths.device != input.device:
        raise ValueError(f"{caller}: expected lengths on the input's device {input.device}, got {lengths.device}")
    size = input.shape[-1]
    if lengths.numel() > 0 and bool(((lengths < 0) | (lengths > size)).any()):
        raise ValueError(f"{caller}: expected lengths in [0, {size}], got {lengths.tolist()}")
    positions = torch.arange(size, device=input.device)  # (L,)
    valid = positions < lengths.view(-1, 1)  # (N, 1) vs (L,) -> (N, L)
    return valid.view(input.shape[0], *([1] * (input.dim() - 3)), size).expand(expected)  # (N, *, L)


def valid_count(mask: Tensor) -> int:
    """M, the number of valid positions per channel."""
    return int(mask.sum())


def check_valid_count(input: Tensor, mask: Tensor) -> None:
    """Training needs two or more valid values per channel."""
    count = valid_count(mask)
    if count < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()} "
            f"with {count} valid value{'s' if count != 1 else ''} per channel"
        )


def spread(mask: Tensor) -> Tensor:
    """The mask (N, *) broadcastable against the input: (N, *) -> (N, 1, *)."""
    return mask.unsqueeze(1)


def masked_stats(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mu, var, M) over the valid positions, in the compute dtype: (N, C, *) -> (C,), (C,), ().

    Two passes (mean, then squared deviations): no E[x²] - E[x]². An all-padded batch gives NaN.
    """
    cdt = backends.compute_dtype(x)
    valid = spread(mask)  # (N, 1, *)
    dims = backends.reduce_dims(x)
    count = mask.sum().to(cdt)  # M, ()
    x = x.to(cdt)
    mean = torch.where(valid, x, 0).sum(dims) / count  # (N, C, *) -> (C,)
    centered = torch.where(valid, x - mean.view(backends.channel_shape(x)), 0)  # (N, C, *)
    var = (centered * centered).sum(dims) / count  # (N, C, *) -> (C,)
    return mean, var, count


def masked_normalized(x: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """x̂ = (x - mu) · r on valid positions, 0 on padded ones, in the statistics' dtype: (N, C, *)."""
    shape = backends.channel_shape(x)
    return torch.where(spread(mask), (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape), 0)


def masked_affine(x_hat: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y = gamma · x̂ + beta on valid positions, 0 on padded ones: (N, C, *)."""
    return torch.where(spread(mask), affine(x_hat, weight, bias), 0)


def native_masked(x: Tensor, *tensors: Tensor, create_graph: bool = False) -> bool:
    """The native masked kernels run this call: the backend resolves to the native kernels for
    ``x`` (so no transform, compiler or double backward sees it), they take ``x`` and ``tensors``
    (CPU, a floating dtype, no vmap dimension), and ``x`` is contiguous with a dimension after the
    channels. Other layouts take the tensor operations here."""
    return (
        backends.kernels_for(x, create_graph=create_graph) is backends.NATIVE
        and backends.native_takes(x, *tensors)
        and x.dim() >= 3
        and x.is_contiguous()
    )


def masked_forward(
    x: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eval_mean: Tensor | None,
    eval_var: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mu, var): training (batch statistics over the valid positions) when ``eval_mean`` /
    ``eval_var`` are None, inference with them otherwise."""
    cdt = backends.compute_dtype(x)
    training = eval_mean is None or eval_var is None
    if eval_mean is not None and eval_var is not None:
        # Views, not the running statistics themselves: a Function may not return an input as-is.
        mean, var = eval_mean.to(cdt).view_as(eval_mean), eval_var.to(cdt).view_as(eval_var)
    if native_masked(x):
        if training:
            y, mean, var, _ = _native.masked_forward_train(x, mask, weight, bias, eps)
        else:
            y, _ = _native.masked_forward_eval(x, mask, mean, var, weight, bias, eps)
        return y, mean, var
    if training:
        mean, var, _ = masked_stats(x, mask)
    x_hat = masked_normalized(x, mask, mean, torch.rsqrt(var + eps))
    return masked_affine(x_hat, mask, weight, bias).to(x.dtype), mean, var


def masked_input_grad(
    dy: Tensor,
    x_hat: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    invstd: Tensor,
    sum_dy: Tensor | None,
    sum_dy_xhat: Tensor | None,
    count: Tensor | float,
) -> Tensor:
    """dx = gamma · r · (dy - s1/M - x̂ · s2_hat/M) on valid positions, 0 on padded ones; in eval
    (``sum_dy`` None) dx = gamma · r · dy. ``dy`` is already 0 on padded positions: (N, C, *)."""
    shape = backends.channel_shape(x_hat)
    scale = backends.channel_scale(invstd, weight)  # a = gamma · r, (C,)
    if sum_dy is None or sum_dy_xhat is None:
        return torch.where(spread(mask), dy * scale.view(shape), 0)
    centered = dy - (sum_dy / count).view(shape) - x_hat * (sum_dy_xhat / count).view(shape)
    return torch.where(spread(mask), centered * scale.view(shape), 0)


class MaskedBatchNormFunction(torch.autograd.Function):
    """Masked batch norm with a hand-derived backward and jvp (module docstring).

    ``forward(x, mask, weight, bias, eval_mean, eval_var, eps) -> (y, mu, var)``: training when
    ``eval_mean``/``eval_var`` are None; mu and var are non-differentiable outputs.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        mask: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eval_mean: Tensor | None,
        eval_var: Tensor | None,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return masked_forward(x, mask, weight, bias, eval_mean, eval_var, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, mask, weight, bias, eval_mean, eval_var, eps = inputs
        _, mean, var = output
        ctx.training = eval_mean is None or eval_var is None
        ctx.eps = eps
        ctx.param_dtype = parameter_dtype(x, weight, bias)
        ctx.save_for_backward(x, mask, weight, mean, var)
        ctx.save_for_forward(x, mask, weight, mean, var)
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, _grad_mean: Any, _grad_var: Any) -> tuple[Tensor | None, ...]:
        x, mask, weight, mean, var = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        if native_masked(x, grad_output, create_graph=torch.is_grad_enabled()):
            invstd = torch.rsqrt(var + ctx.eps)  # r, (C,)
            native: tuple[Tensor | None, Tensor | None, Tensor | None]
            if ctx.training:
                native = _native.masked_backward_train(grad_output, x, mask, weight, mean, invstd, need_input)
            else:
                native = _native.masked_backward_eval(
                    grad_output, x, mask, weight, mean, invstd, need_input, need_weight or need_bias
                )
            grads = param_grads(*native, ctx.param_dtype, need_weight, need_bias)
            return (grads[0], None, *grads[1:])
        count: Tensor | float = 1.0
        if ctx.training and torch.is_grad_enabled():
            # Double backward: recompute mu(x) and var(x) differentiably, as BatchNormFunction does.
            mean, var, count = masked_stats(x, mask)
        elif ctx.training:
            count = mask.sum().to(mean.dtype)  # M, ()
        invstd = torch.rsqrt(var + ctx.eps)  # r, (C,)
        x_hat = masked_normalized(x, mask, mean, invstd)  # (N, C, *), 0 on padded positions
        dy = torch.where(spread(mask), grad_output.to(mean.dtype), 0)  # padded gradients never enter
        dims = backends.reduce_dims(x)
        sum_dy = dy.sum(dims)  # s1: (N, C, *) -> (C,)
        sum_dy_xhat = (dy * x_hat).sum(dims)  # s2_hat: (N, C, *) -> (C,)
        grad_input = None
        if need_input:
            s1, s2 = (sum_dy, sum_dy_xhat) if ctx.training else (None, None)
            grad_input = masked_input_grad(dy, x_hat, mask, weight, invstd, s1, s2, count).to(x.dtype)
        grads = param_grads(grad_input, sum_dy_xhat, sum_dy, ctx.param_dtype, need_weight, need_bias)
        return (grads[0], None, *grads[1:])

    @staticmethod
    def jvp(
        ctx: Any,
        t_x: Tensor | None,
        _t_mask: Any,
        t_weight: Tensor | None,
        t_bias: Tensor | None,
        *_constants: Any,
    ) -> tuple[Tensor | None, None, None]:
        # training: t_x̂ = r (t_x - mean(t_x) - x̂ mean(x̂ t_x)), means over the valid positions;
        # eval: t_x̂ = r t_x; then t_y = gamma t_x̂ + t_gamma x̂ + t_beta, 0 on padded positions.
        x, mask, weight, mean, var = ctx.saved_tensors
        shape = backends.channel_shape(x)
        invstd = torch.rsqrt(var + ctx.eps)
        x_hat = masked_normalized(x, mask, mean, invstd)
        t_x_hat = None
        if t_x is not None:
            tangent = torch.where(spread(mask), t_x.to(x_hat.dtype), 0)
            if ctx.training:
                dims = backends.reduce_dims(x)
                count = mask.sum().to(x_hat.dtype)
                mean_tangent = (tangent.sum(dims) / count).view(shape)  # (N, C, *) -> (C,)
                projection = ((x_hat * tangent).sum(dims) / count).view(shape)  # (N, C, *) -> (C,)
                tangent = tangent - mean_tangent - x_hat * projection
            t_x_hat = tangent * invstd.view(shape)
        t_y = affine_tangent(x_hat, t_x_hat, weight, t_weight, t_bias)
        return torch.where(spread(mask), t_y, 0).to(x.dtype), None, None


MaskedBatchNormFunctionNoJvp = without_jvp(MaskedBatchNormFunction)


def apply_masked_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eval_mean: Tensor | None,
    eval_var: Tensor | None,
    eps: float,
    *,
    mask: Tensor,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The :data:`batchnorm.functional.Normalizer` of a masked call: (y, mu, var), y 0 on padded
    positions; ``activation`` (in place, as ``Activation.apply_``) applied after, padding kept 0."""
    if needs_autograd_function(x, weight, bias, eval_mean, eval_var):
        function = MaskedBatchNormFunctionNoJvp if torch.compiler.is_compiling() else MaskedBatchNormFunction
        y, mean, var = function.apply(x, mask, weight, bias, eval_mean, eval_var, eps)
    else:
        y, mean, var = masked_forward(x, mask, weight, bias, eval_mean, eval_var, eps)
    if activation is not None:
        y = torch.where(spread(mask), activation(y), 0)
    return y, mean, var
