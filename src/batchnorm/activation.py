r"""Batch norm fused with an activation, and in-place activated batch norm (Rota Bulo et al. 2018).

Notation of ``docs/math.md``, extended by the activation f:

    x : input (N, C, *)                 mu, var : batch (or running) statistics (C,)
    r = 1 / sqrt(var + eps)             gamma, beta : weight and bias (C,),  a = gamma * r
    y = (x - mu) * a + beta             (batch norm)
    z = f(y)                            (activation: the block's output)
    dz = dL/dz,  dy = dz * f'(y)        (the activation's backward)

:class:`BatchNormAct` runs batch norm and f as one autograd node with one backward: it keeps x
(and z when f' can be read off z) and needs no y between forward and backward.

:class:`InPlaceABN` keeps less: it writes z over its input x and saves only z and per-channel
vectors. Backward rebuilds y = f^-1(z) by inverting the activation and uses the paper's
formulas, written with yc = y - beta = gamma * x̂ (x̂ = (x - mu) * r):

    s1 = sum(dy)                        = dbeta
    s2 = sum(dy * yc)                   = gamma * dgamma
    dgamma = s2 / gamma
    dx = a * dy - (r / M) * dgamma * yc - (a / M) * s1            (training, M values per channel)
    dx = a * dy                                                   (eval: mu, var are constants)

which is the core backward (``backends.input_grad_train``) with x - mu = yc / a substituted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import backends
from . import functional as BF
from ._autograd import (
    affine,
    batch_norm_forward,
    batch_norm_tangent,
    needs_autograd_function,
    normalized,
    param_grads,
    parameter_dtype,
    without_jvp,
)
from ._masked import apply_masked_batch_norm
from ._protocol import Equivalent, Kept
from .modules import _BatchNormBase, extends_constructor, fx_leaf_call
from .sync import SyncBatchNorm
from .variants import FrozenBatchNorm

__all__ = [
    "ACTIVATIONS",
    "INVERTIBLE_ACTIVATIONS",
    "BatchNormAct",
    "BatchNormAct2d",
    "FrozenBatchNormAct",
    "InPlaceABN",
    "SyncBatchNormAct",
    "batch_norm_act",
    "inplace_abn",
]

ACTIVATIONS = ("relu", "leaky_relu", "elu", "silu", "identity")
INVERTIBLE_ACTIVATIONS = ("leaky_relu", "elu", "identity")
# The activations that take ``activation_param``, and its default: leaky_relu's negative slope,
# elu's alpha (torch's defaults).
_PARAM_DEFAULTS = {"leaky_relu": 0.01, "elu": 1.0}


@dataclass(frozen=True)
class Activation:
    """The activation f of a fused block, with its derivative and (where it exists) inverse."""

    name: str
    param: float = 0.0

    @classmethod
    def make(cls, name: object, param: object, caller: str, *, invertible: bool = False) -> Activation:
        """Validated activation; ``invertible`` demands one that :class:`InPlaceABN` can undo."""
        valid = INVERTIBLE_ACTIVATIONS if invertible else ACTIVATIONS
        if name not in valid:
            why = ""
            if invertible and name in ACTIVATIONS:
                why = f" ({name} is not invertible: it maps many inputs to one output, so y cannot be rebuilt from z)"
            raise ValueError(
                f"{caller}: expected activation to be one of {', '.join(map(repr, valid))}, got {name!r}{why}"
            )
        assert isinstance(name, str)
        if name not in _PARAM_DEFAULTS:
            if param is not None:
                raise ValueError(
                    f"{caller}: activation {name!r} takes no activation_param (only "
                    f"{', '.join(map(repr, _PARAM_DEFAULTS))} do), got activation_param={param!r}"
                )
            return cls(name)
        if param is None:
            param = _PARAM_DEFAULTS[name]
        if isinstance(param, bool) or not isinstance(param, Real) or not math.isfinite(float(param)):
            raise ValueError(f"{caller}: expected activation_param to be a finite number, got {param!r}")
        if invertible and float(param) <= 0.0:
            label = "negative slope" if name == "leaky_relu" else "alpha"
            raise ValueError(
                f"{caller}: {name} is invertible only with a positive {label}, got activation_param={param!r}"
            )
        return cls(name, float(param))

    def __str__(self) -> str:
        return self.name if self.name not in _PARAM_DEFAULTS else f"{self.name}({self.param:g})"

    def apply_(self, y: Tensor) -> Tensor:
        """z = f(y), written over y."""
        if self.name == "relu":
            return torch.relu_(y)
        if self.name == "leaky_relu":
            return torch.nn.functional.leaky_relu_(y, self.param)
        if self.name == "elu":
            return torch.nn.functional.elu_(y, self.param)
        if self.name == "silu":
            return torch.nn.functional.silu(y, inplace=True)
        return y

    def module(self) -> nn.Module:
        """f as a torch module: what remains of a fused block once its batch norm is folded away."""
        if self.name == "relu":
            return nn.ReLU()
        if self.name == "leaky_relu":
            return nn.LeakyReLU(self.param)
        if self.name == "elu":
            return nn.ELU(self.param)
        if self.name == "silu":
            return nn.SiLU()
        return nn.Identity()

    @property
    def output_determines_grad(self) -> bool:
        """f'(y) is a function of z = f(y): f keeps the sign of y (relu, leaky_relu and elu with a
        non-negative parameter, identity); silu does not."""
        return self.name in ("relu", "identity") or (self.name in _PARAM_DEFAULTS and self.param >= 0.0)

    def grad_from_input(self, dz: Tensor, y: Tensor) -> Tensor:
        """dy = dz * f'(y), by torch's own activation backward kernels (one pass each):

        relu: f' = [y > 0];  leaky_relu: 1 for y > 0, the slope below;  elu: 1 for y > 0,
        alpha * exp(y) below;  silu: f = y * s with s = sigmoid(y), f' = s * (1 + y * (1 - s)).
        """
        aten = torch.ops.aten
        if self.name == "relu":
            return aten.threshold_backward(dz, y, 0)  # type: ignore[no-any-return]
        if self.name == "leaky_relu":
            return aten.leaky_relu_backward(dz, y, self.param, False)  # type: ignore[no-any-return]
        if self.name == "elu":
            return aten.elu_backward(dz, self.param, 1, 1, False, y)  # type: ignore[no-any-return]
        if self.name == "silu":
            return aten.silu_backward(dz, y)  # type: ignore[no-any-return]
        return dz

    def grad_from_output(self, dz: Tensor, z: Tensor) -> Tensor:
        """dy = dz * f'(f^-1(z)); requires :attr:`output_determines_grad`.

        z > 0 exactly where y > 0. Below, leaky_relu's f' is its slope and elu's
        f' = alpha * exp(y) = z + alpha (torch's kernels with ``is_result=True``).
        """
        aten = torch.ops.aten
        if self.name == "relu":
            return aten.threshold_backward(dz, z, 0)  # type: ignore[no-any-return]
        if self.name == "leaky_relu":
            return aten.leaky_relu_backward(dz, z, self.param, True)  # type: ignore[no-any-return]
        if self.name == "elu":
            return aten.elu_backward(dz, self.param, 1, 1, True, z)  # type: ignore[no-any-return]
        return dz

    def inverse(self, z: Tensor) -> Tensor:
        """y = f^-1(z) for the invertible activations, as a new tensor.

        leaky_relu: y = z / slope below 0, itself a leaky_relu with slope 1 / slope. elu:
        y = log(1 + z / alpha) below 0; where exp(y) underflowed to below the dtype's epsilon in
        the forward (y < log(eps): about -15.9 in float32, -36 in float64) z = -alpha carries no
        more information, and y comes back as log(eps). Such entries have
        dy = dz * (z + alpha) = 0 and add nothing to s1 and s2.
        """
        if self.name == "leaky_relu":
            return torch.nn.functional.leaky_relu(z, 1.0 / self.param)
        if self.name == "elu":
            tiny = torch.finfo(z.dtype).eps
            return torch.where(z > 0, z, torch.log1p((z / self.param).clamp_min(tiny - 1)))
        return z.clone()


# ---------------------------------------------------------------------------------------------
# BatchNormAct: batch norm + activation, one autograd node
# ---------------------------------------------------------------------------------------------


class BatchNormActFunction(torch.autograd.Function):
    """z = f(gamma * (x - mu) * r + beta) with one hand-derived backward and jvp.

    Returns ``(z, mu, var)`` like :class:`batchnorm._autograd.BatchNormFunction`. Saves x, the
    per-channel vectors and, when f' can be read off z, z (which the next layer saves anyway);
    otherwise (silu) backward recomputes y from x. Forward mode: t_z = f'(y) * t_y, with t_y
    batch norm's tangent.
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
        activation: Activation,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var = batch_norm_forward(x, weight, bias, eval_mean, eval_var, eps)
        return activation.apply_(y), mean, var  # y is a fresh tensor: f is applied in place

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, weight, bias, eval_mean, eval_var, eps, activation = inputs
        z, mean, var = output
        ctx.training = eval_mean is None or eval_var is None
        ctx.activation = activation
        ctx.eps = eps
        ctx.param_dtype = parameter_dtype(x, weight, bias)
        saved_output = z if activation.output_determines_grad else None
        ctx.save_for_backward(x, weight, bias, mean, var, saved_output)
        ctx.save_for_forward(x, weight, bias, mean, var)
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor, _grad_mean: Any, _grad_var: Any) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, var, z = ctx.saved_tensors
        activation: Activation = ctx.activation
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if x.numel() == 0:
            zeros = x.new_zeros(x.shape[1], dtype=mean.dtype)
            grad_input = torch.zeros_like(x) if need_input else None
            return (*param_grads(grad_input, zeros, zeros, ctx.param_dtype, need_weight, need_bias), None)
        invstd, scale, shift = backends.scale_shift(mean, var, weight, bias, ctx.eps)
        if z is not None:
            grad_y = activation.grad_from_output(grad_output, z)
        else:
            # y = x * a + b recomputed from the saved x, a = gamma * r, b = beta - mu * a.
            grad_y = activation.grad_from_input(grad_output, backends.normalize(x, scale, shift))
        kernels = backends.kernels_for(x)
        grad_weight: Tensor | None
        grad_bias: Tensor | None
        if ctx.training:
            grad_input, grad_weight, grad_bias = kernels.backward_train(grad_y, x, weight, mean, invstd, need_input)
        else:
            grad_input, grad_weight, grad_bias = kernels.backward_eval(
                grad_y, x, weight, mean, invstd, need_input, need_weight or need_bias
            )
        return (*param_grads(grad_input, grad_weight, grad_bias, ctx.param_dtype, need_weight, need_bias), None)

    @staticmethod
    def jvp(
        ctx: Any, t_x: Tensor | None, t_weight: Tensor | None, t_bias: Tensor | None, *_constants: Any
    ) -> tuple[Tensor, None, None]:
        x, weight, bias, mean, var = ctx.saved_tensors
        if x.numel() == 0:
            return torch.zeros_like(x), None, None
        invstd = torch.rsqrt(var + ctx.eps)
        x_hat = normalized(x, mean, invstd)
        t_y = batch_norm_tangent(x_hat, invstd, ctx.training, weight, t_x, t_weight, t_bias)
        y = affine(x_hat, weight, bias)
        activation: Activation = ctx.activation
        return activation.grad_from_input(t_y, y).to(x.dtype), None, None


BatchNormActFunctionNoJvp = without_jvp(BatchNormActFunction)


def _apply_batch_norm_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eval_mean: Tensor | None,
    eval_var: Tensor | None,
    eps: float,
    *,
    activation: Activation,
) -> tuple[Tensor, Tensor, Tensor]:
    """The :data:`batchnorm.functional.Normalizer` of :class:`BatchNormAct`: (z, mu, var)."""
    if needs_autograd_function(x, weight, bias):
        z, mean, var = (BatchNormActFunctionNoJvp if torch.compiler.is_compiling() else BatchNormActFunction).apply(
            x, weight, bias, eval_mean, eval_var, eps, activation
        )
        return z, mean, var
    y, mean, var = batch_norm_forward(x, weight, bias, eval_mean, eval_var, eps)
    return activation.apply_(y), mean, var


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "relu",
    activation_param: float | None = None,
    skip_nonfinite: bool = False,
) -> Tensor:
    r"""f(batch_norm(input, ...)) as one autograd node: :func:`batchnorm.functional.batch_norm`'s
    arguments and semantics, then the activation. See :class:`BatchNormAct`.

    Example:
        >>> import torch
        >>> from batchnorm.activation import batch_norm_act
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
        >>> batch_norm_act(x, None, None, training=True, eps=1e-12, activation="relu")
        tensor([[0., 0.],
                [1., 1.]])
    """
    act = Activation.make(activation, activation_param, "batch_norm_act")
    output, _, _ = BF.batch_norm_with_stats(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        skip_nonfinite=skip_nonfinite,
        caller="batch_norm_act",
        normalizer=partial(_apply_batch_norm_act, activation=act),
    )
    return output


# ---------------------------------------------------------------------------------------------
# InPlaceABN: the output overwrites the input; backward rebuilds y from z
# ---------------------------------------------------------------------------------------------


def floored_weight(weight: Tensor | None, min_abs_weight: float) -> Tensor | None:
    """gamma with |gamma| raised to at least ``min_abs_weight``, sign kept (+ for 0).

    gamma = 0 erases its channel (y = beta whatever x), so x̂ = (y - beta) / gamma cannot be
    rebuilt; the paper uses |gamma| + eps instead. We keep torch's parameterization (a BatchNorm
    checkpoint means the same here) and only lift the channels with |gamma| < min_abs_weight.
    """
    if weight is None:
        return None
    floor = torch.full_like(weight, min_abs_weight).copysign(weight)
    return torch.where(weight.abs() < min_abs_weight, floor, weight)


def _inplace_forward(
    x: Tensor,
    gamma: Tensor | None,
    bias: Tensor | None,
    eval_mean: Tensor | None,
    eval_var: Tensor | None,
    eps: float,
    activation: Activation,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x <- f((x - mu) * a + beta) in place; returns (x, mu, var, r)."""
    cdt = backends.compute_dtype(x)
    if eval_mean is not None and eval_var is not None:
        # Views, not the running statistics themselves: a Function may not return an input as-is.
        mean, var = eval_mean.to(cdt).view_as(eval_mean), eval_var.to(cdt).view_as(eval_var)
    elif x.numel() == 0:
        # Empty batch: nothing to normalize; statistics NaN as in the core.
        nan = torch.full((x.shape[1],), float("nan"), dtype=cdt, device=x.device)
        return x, nan, nan, nan
    else:
        mean, var = backends.batch_stats(x)
    invstd, scale = backends.invstd_scale(var, gamma, eps)
    shape = backends.channel_shape(x)
    if cdt == x.dtype:
        # (x - mu) * a + beta in two passes over x, both writing into x
        x.sub_(mean.view(shape))
        if bias is None:
            x.mul_(scale.view(shape))
        elif backends.functorch_active() or backends.is_batched(x) or torch.compiler.is_compiling():
            # vmap has no rule for out=, and export's tracing refuses out= where a parameter requires grad
            x.mul_(scale.view(shape)).add_(bias.view(shape))
        else:
            torch.addcmul(bias.view(shape), x, scale.view(shape), out=x)
    else:
        # float16/bfloat16: normalize in float32, store the result in the input's dtype.
        y = (x.to(cdt) - mean.view(shape)) * scale.view(shape)
        x.copy_(y if bias is None else y + bias.to(cdt).view(shape))
    activation.apply_(x)
    return x, mean, var, invstd


class InPlaceABNFunction(torch.autograd.Function):
    """In-place activated batch norm: z = f(gamma * (x - mu) * r + beta) written over x.

    Saves z (the same storage as x), gamma, beta and the statistics only; backward as in the
    module docstring. ``weight`` is the parameter; the map uses :func:`floored_weight` of it, and
    the gradient of the floored weight is passed to ``weight`` unchanged. Forward mode rebuilds
    x̂ = (f^-1(z) - beta) / gamma and writes t_z over the input's tangent, as an in-place
    operation must. Under ``vmap`` the vmapped dimension joins the channels: B independent batch
    norms of C channels are one of B * C channels, computed on a copy and written back into the
    input.
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eval_mean: Tensor | None,
        eval_var: Tensor | None,
        eps: float,
        activation: Activation,
        min_abs_weight: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        gamma = floored_weight(weight, min_abs_weight)
        z, mean, var, _ = _inplace_forward(x, gamma, bias, eval_mean, eval_var, eps, activation)
        return z, mean, var

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, weight, bias, eval_mean, eval_var, eps, activation, min_abs_weight = inputs
        z, mean, var = output
        ctx.mark_dirty(z)
        ctx.training = eval_mean is None or eval_var is None
        ctx.activation = activation
        ctx.eps = eps
        ctx.min_abs_weight = min_abs_weight
        ctx.param_dtype = parameter_dtype(x, weight, bias)
        ctx.save_for_backward(z, weight, bias, var)
        ctx.save_for_forward(z, weight, bias, var)
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eval_mean: Tensor | None,
        eval_var: Tensor | None,
        eps: float,
        activation: Activation,
        min_abs_weight: float,
    ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int, int]]:
        x_dim = in_dims[0]
        if x_dim is None:
            raise RuntimeError(
                "inplace_abn: expected the input to be batched under vmap, got an unbatched input with batched "
                "parameters or statistics (an in-place result cannot hold one output per batch)"
            )
        size = info.batch_size
        batched = x.movedim(x_dim, 1)  # (N, B, C, *), a view of x
        n, channels, tail = batched.shape[0], batched.shape[2], tuple(batched.shape[3:])
        # (N, B, C, *) -> (N, B * C, *), a copy: the Function overwrites it, and it is written back below.
        folded = batched.reshape(n, size * channels, *tail).clone()

        def vector(tensor: Tensor | None, dim: int | None) -> Tensor | None:
            """(C,), or (B, C) batched at ``dim`` -> (B * C,)"""
            if tensor is None:
                return None
            per_batch = tensor.expand(size, channels) if dim is None else tensor.movedim(dim, 0)
            return per_batch.reshape(size * channels)

        vectors = [vector(t, d) for t, d in zip((weight, bias, eval_mean, eval_var), in_dims[1:5], strict=True)]
        z, mean, var = InPlaceABNFunction.apply(folded, *vectors, eps, activation, min_abs_weight)  # type: ignore[no-untyped-call]
        batched.copy_(z.view(n, size, channels, *tail))  # written back into x
        return (x, mean.view(size, channels), var.view(size, channels)), (x_dim, 0, 0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor, _grad_mean: Any, _grad_var: Any) -> tuple[Tensor | None, ...]:
        z, weight, bias, var = ctx.saved_tensors
        gamma = floored_weight(weight, ctx.min_abs_weight)
        activation: Activation = ctx.activation
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        invstd = torch.rsqrt(var + ctx.eps)
        cdt = invstd.dtype
        channels = z.shape[1]
        if z.numel() == 0:
            zeros = z.new_zeros(channels, dtype=cdt)
            grad_input = torch.zeros_like(z) if need_input else None
            return (*param_grads(grad_input, zeros, zeros, ctx.param_dtype, need_weight, need_bias), None, None)
        shape = backends.channel_shape(z)
        dims = backends.reduce_dims(z)
        zc = z.to(cdt)
        grad_y = activation.grad_from_output(grad_output.to(cdt), zc)  # dy = dz * f'(f^-1(z))
        # y = f^-1(z): the batch-norm output, rebuilt; y - beta = gamma * x̂ is never stored: the
        # sums and dx below carry beta per channel instead, saving two passes over the data.
        y = activation.inverse(zc)
        beta = torch.zeros_like(invstd) if bias is None else bias.to(cdt)
        gamma_c = torch.ones_like(invstd) if gamma is None else gamma.to(cdt)
        scale = gamma_c * invstd  # a = gamma * r, (C,)
        sum_dy = grad_y.sum(dims)  # s1 = dbeta: (N, C, *) -> (C,)
        # s2 = sum(dy * (y - beta)) = sum(dy * y) - beta * s1: (N, C, *) -> (C,)
        sum_dy_yc = (grad_y * y).sum(dims) - beta * sum_dy
        grad_weight = sum_dy_yc / gamma_c  # dgamma = s2 / gamma
        grad_input = None
        if need_input:
            if ctx.training:
                count = z.numel() // channels
                p = -invstd * grad_weight / count  # coefficient of y - beta: -(r / M) * dgamma
                q = -scale * sum_dy / count  # -(a / M) * s1
                # dx = a * dy + p * (y - beta) + q = a * dy + p * y + (q - p * beta)
                grad_input = torch.addcmul((q - p * beta).view(shape), y, p.view(shape))
                if backends.is_batched(grad_y):
                    grad_input = grad_input + grad_y * scale.view(shape)  # vmap's rule is out of place
                else:
                    grad_input.addcmul_(grad_y, scale.view(shape))
            else:
                grad_input = grad_y * scale.view(shape)
            grad_input = grad_input.to(z.dtype)
        return (*param_grads(grad_input, grad_weight, sum_dy, ctx.param_dtype, need_weight, need_bias), None, None)

    @staticmethod
    def jvp(
        ctx: Any, t_x: Tensor | None, t_weight: Tensor | None, t_bias: Tensor | None, *_constants: Any
    ) -> tuple[Tensor | None, None, None]:
        z, weight, bias, var = ctx.saved_tensors
        if t_x is None or z.numel() == 0:
            # The output is the input tensor: without an input tangent there is none to update.
            return t_x, None, None
        gamma = floored_weight(weight, ctx.min_abs_weight)
        invstd = torch.rsqrt(var + ctx.eps)
        cdt = invstd.dtype
        shape = backends.channel_shape(z)
        y = ctx.activation.inverse(z.to(cdt))  # y = f^-1(z)
        y_centered = y if bias is None else y - bias.to(cdt).view(shape)
        x_hat = y_centered if gamma is None else y_centered / gamma.to(cdt).view(shape)
        t_y = batch_norm_tangent(x_hat, invstd, ctx.training, gamma, t_x, t_weight, t_bias)
        t_x.copy_(ctx.activation.grad_from_input(t_y, y))
        return t_x, None, None


InPlaceABNFunctionNoJvp = without_jvp(InPlaceABNFunction)


def _check_overwritable(input: Tensor, caller: str) -> None:
    """autograd refuses to overwrite a leaf that requires grad (or a view of one); say so before
    anything is written rather than after."""
    base = input._base if input._base is not None else input
    if torch.is_grad_enabled() and base.requires_grad and base.is_leaf:
        raise ValueError(
            f"{caller}: expected an input that may be overwritten in place (e.g. a convolution's output), "
            f"got a leaf tensor that requires grad{' (through a view)' if base is not input else ''}; "
            f"pass input.clone() or use BatchNormAct"
        )


def _is_view(x: Tensor) -> bool:
    """A view autograd tracks, outside the transforms (whose wrapped tensors have their own rules)."""
    return not torch.compiler.is_compiling() and not backends.functorch_active() and x._base is not None


def _apply_inplace_abn(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eval_mean: Tensor | None,
    eval_var: Tensor | None,
    eps: float,
    *,
    activation: Activation,
    min_abs_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The :data:`batchnorm.functional.Normalizer` of :class:`InPlaceABN`: (x overwritten by z, mu, var)."""
    if _is_view(x) and needs_autograd_function(x, weight, bias):
        # autograd lets an in-place Function with several outputs (z, mu, var) modify no view.
        # As torch's in-place ops on a view do, z is written back into the view by copy_, which
        # rebases the view's history; copy_ refuses (before writing, and before the running
        # statistics are updated) the views autograd cannot rebase, as relu_ does.
        z, mean, var = _apply_inplace_abn(
            x.clone(), weight, bias, eval_mean, eval_var, eps, activation=activation, min_abs_weight=min_abs_weight
        )
        return x.copy_(z), mean, var
    if needs_autograd_function(x, weight, bias):
        z, mean, var = (InPlaceABNFunctionNoJvp if torch.compiler.is_compiling() else InPlaceABNFunction).apply(
            x, weight, bias, eval_mean, eval_var, eps, activation, min_abs_weight
        )
        return z, mean, var
    gamma = floored_weight(weight, min_abs_weight)
    z, mean, var, _ = _inplace_forward(x, gamma, bias, eval_mean, eval_var, eps, activation)
    return z, mean, var


def _check_min_abs_weight(min_abs_weight: object, caller: str) -> float:
    if isinstance(min_abs_weight, bool) or not isinstance(min_abs_weight, Real) or not float(min_abs_weight) > 0:
        raise ValueError(f"{caller}: expected min_abs_weight to be a positive number, got {min_abs_weight!r}")
    return float(min_abs_weight)


def inplace_abn(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "leaky_relu",
    activation_param: float | None = None,
    min_abs_weight: float = 1e-5,
    skip_nonfinite: bool = False,
) -> Tensor:
    r"""In-place activated batch norm: writes f(batch_norm(input, ...)) over ``input`` and returns
    it. :func:`batchnorm.functional.batch_norm`'s arguments; see :class:`InPlaceABN`.

    Example:
        >>> import torch
        >>> from batchnorm.activation import inplace_abn
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
        >>> out = inplace_abn(x, None, None, training=True, eps=1e-12, activation_param=0.5)
        >>> out.data_ptr() == x.data_ptr(), x
        (True, tensor([[-0.5000, -0.5000],
                [ 1.0000,  1.0000]]))
    """
    caller = "inplace_abn"
    act = Activation.make(activation, activation_param, caller, invertible=True)
    floor = _check_min_abs_weight(min_abs_weight, caller)
    BF.check_input(input, caller)
    _check_overwritable(input, caller)
    output, _, _ = BF.batch_norm_with_stats(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        skip_nonfinite=skip_nonfinite,
        caller=caller,
        normalizer=partial(_apply_inplace_abn, activation=act, min_abs_weight=floor),
    )
    return output


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _activated_forward(
    module: _BatchNormBase, activation: Activation, input: Tensor, mask: Tensor | None, lengths: Tensor | None
) -> Tensor:
    """f(BN(x)) as one autograd node, through the module's batch-norm forward."""
    output, _, _ = module._batch_norm(
        input,
        partial(_apply_batch_norm_act, activation=activation),
        mask=mask,
        lengths=lengths,
        # Masked: masked batch norm, then the activation (padded positions stay 0: f(0) = 0).
        masked_normalizer=lambda valid: partial(apply_masked_batch_norm, mask=valid, activation=activation.apply_),
    )
    return output


class _WithActivation:
    """A module followed by an activation: the activation's public name, parameter and module."""

    _activation: Activation

    def activation_module(self) -> nn.Module:
        """The activation as a torch module (``nn.ReLU()``, ``nn.LeakyReLU(0.01)``, ...)."""
        return self._activation.module()

    def fused_activation(self) -> nn.Module | None:
        return self.activation_module()

    @property
    def activation(self) -> str:
        return self._activation.name

    @property
    def activation_param(self) -> float | None:
        return self._activation.param if self._activation.name in _PARAM_DEFAULTS else None


class _ActivatedBatchNorm(_WithActivation, _BatchNormBase):
    """A batch norm followed by an activation: synchronized and frozen, it keeps the activation."""

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return Kept("torch has no fused batch norm + activation")

    @classmethod
    def sync_equivalent(cls) -> Equivalent:
        return SyncBatchNormAct

    @classmethod
    def frozen_equivalent(cls) -> Equivalent:
        return FrozenBatchNormAct


class BatchNormAct(_ActivatedBatchNorm):
    r"""Batch norm followed by an activation, as one autograd node: z = f(BN(x)).

    Everything about the batch norm is :class:`batchnorm.BatchNorm`'s (parameters, buffers,
    running statistics, eval mode, ``skip_nonfinite``, input (N, C, \*) of any rank >= 2), and so
    is the state dict: a BatchNorm (ours or torch's) checkpoint loads into it and back.

    .. math::
        z = f\Big(\gamma \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta\Big)

    The backward is one hand-derived function (``dy = dz * f'(y)``, then batch norm's backward)
    that needs x and, except for silu, z: not the batch-norm output y, which an unfused
    ``nn.Sequential(bn, act)`` keeps as the activation's input (leaky_relu, elu, silu). It is
    differentiable once (no double backward).

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias, skip_nonfinite: as
            :class:`batchnorm.BatchNorm`.
        activation: one of ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"identity"``
            (keyword-only). Default: ``"relu"``.
        activation_param: leaky_relu's negative slope (default 0.01) or elu's alpha (default
            1.0); the other activations take none (keyword-only).

    Shape:
        input (N, C, \*), output the same shape and dtype.

    Example:
        >>> import torch, batchnorm
        >>> block = batchnorm.BatchNormAct(4, activation="leaky_relu", activation_param=0.1)
        >>> _ = block.load_state_dict(batchnorm.BatchNorm2d(4).state_dict())
        >>> x = torch.randn(8, 4, 5, 5)
        >>> F = torch.nn.functional
        >>> expected = F.leaky_relu(F.batch_norm(x, None, None, training=True), 0.1)
        >>> torch.allclose(block(x), expected, atol=1e-6), block.num_batches_tracked.item()
        (True, 1)
    """

    @extends_constructor(_ActivatedBatchNorm)
    def __init__(self, *, activation: str = "relu", activation_param: float | None = None) -> None:
        self._activation = Activation.make(activation, activation_param, type(self).__name__)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self._activation}"

    def forward(self, input: Tensor, *, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        traced = fx_leaf_call(self, input, mask=mask, lengths=lengths)
        if traced is not None:
            return traced  # type: ignore[no-any-return]
        return _activated_forward(self, self._activation, input, mask, lengths)


class BatchNormAct2d(BatchNormAct, nn.BatchNorm2d):
    """:class:`BatchNormAct` over 4D input (N, C, H, W), and an instance of ``torch.nn.BatchNorm2d``
    as timm's ``BatchNormAct2d`` is: what :func:`batchnorm.from_torch` converts timm's into, so that
    ``isinstance(m, nn.BatchNorm2d)`` loops find the same layers after conversion.

    Example:
        >>> import torch, batchnorm
        >>> block = batchnorm.BatchNormAct2d(4, activation="silu")
        >>> isinstance(block, torch.nn.BatchNorm2d), block(torch.randn(2, 4, 3, 3)).shape
        (True, torch.Size([2, 4, 3, 3]))
    """

    _input_dims = (4,)
    _input_layout = "(N, C, H, W)"


class InPlaceABN(_ActivatedBatchNorm):
    r"""In-place activated batch norm (Rota Bulo, Porzi and Kontschieder, CVPR 2018).

    Computes z = f(BN(x)) like :class:`BatchNormAct` but writes z over its input and returns
    the input tensor itself, and saves for backward only z (the same storage) and per-channel
    vectors. Backward rebuilds the batch-norm output y = f^-1(z) by inverting the activation,
    and x̂ = (y - beta) / gamma by inverting the affine map, and applies the paper's gradient
    (``batchnorm.activation`` module docstring, ``docs/math.md`` notation). In a stack
    conv -> InPlaceABN -> conv ..., one tensor per block stays alive for backward where
    conv -> BatchNorm2d -> LeakyReLU keeps three.

    Only invertible activations are accepted: ``"leaky_relu"`` (slope > 0), ``"elu"``
    (alpha > 0), ``"identity"``; relu and silu raise ``ValueError``. The input must be a tensor
    that may be overwritten: not a leaf that requires grad, and not a tensor that another
    operation saved for its backward (autograd then reports the in-place change at backward,
    as with any ``inplace=True`` layer). A view of a tensor that requires grad is overwritten
    as torch's in-place operations overwrite it (computed on a copy and written back, so it
    saves no memory); the views they refuse (made under ``no_grad``, one of several outputs of
    ``unbind`` or ``split``) are refused with torch's error before anything changes.

    Zero weight: gamma = 0 makes y independent of x, and x̂ cannot be rebuilt. The paper uses
    |gamma| + eps. We keep torch's parameterization, so that a BatchNorm checkpoint means the
    same here, and compute with gamma lifted to ±``min_abs_weight`` (sign kept, + for 0) in the
    channels where |gamma| < ``min_abs_weight``; the gradient for that lifted gamma is passed to
    ``weight`` unchanged, so a zero-initialized weight trains as in BatchNorm. Outside those
    channels the results equal BatchNorm followed by the activation. x̂ = (y - beta) / gamma
    loses about log10(|beta| / |gamma * x̂|) digits, so channels with a tiny |gamma| and a large
    |beta| get less accurate parameter gradients (the paper's scheme shares this).

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias, skip_nonfinite: as
            :class:`batchnorm.BatchNorm`.
        activation: ``"leaky_relu"``, ``"elu"`` or ``"identity"`` (keyword-only). Default:
            ``"leaky_relu"``.
        activation_param: leaky_relu's negative slope (default 0.01, must be > 0) or elu's
            alpha (default 1.0, must be > 0) (keyword-only).
        min_abs_weight: the least |gamma| the map uses (keyword-only). Default: 1e-5.

    Shape:
        input (N, C, \*), output: the input tensor, overwritten.

    Example:
        >>> import torch, batchnorm
        >>> abn = batchnorm.InPlaceABN(4)
        >>> x = torch.randn(8, 4, 5, 5)
        >>> F = torch.nn.functional
        >>> expected = F.leaky_relu(F.batch_norm(x, None, None, training=True), 0.01)
        >>> z = abn(x)
        >>> z is x, torch.allclose(z, expected, atol=1e-6)
        (True, True)
    """

    @extends_constructor(_ActivatedBatchNorm)
    def __init__(
        self, *, activation: str = "leaky_relu", activation_param: float | None = None, min_abs_weight: float = 1e-5
    ) -> None:
        name = type(self).__name__
        self._activation = Activation.make(activation, activation_param, name, invertible=True)
        self.min_abs_weight = _check_min_abs_weight(min_abs_weight, name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self._activation}, min_abs_weight={self.min_abs_weight:g}"

    def forward(self, input: Tensor, *, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        if mask is not None or lengths is not None:
            # In place, the padding would be overwritten with values the caller may still need.
            raise ValueError(
                f"{self._describe()}: expected no mask or lengths (in-place activated batch norm has no masked "
                f"form; use BatchNormAct), got {'mask' if mask is not None else 'lengths'}"
            )
        traced = fx_leaf_call(self, input)
        if traced is not None:
            return traced  # type: ignore[no-any-return]
        BF.check_input(input, self._describe())
        _check_overwritable(input, self._describe())
        normalizer = partial(_apply_inplace_abn, activation=self._activation, min_abs_weight=self.min_abs_weight)
        output, _, _ = self._batch_norm(input, normalizer)
        return output


class SyncBatchNormAct(SyncBatchNorm, _ActivatedBatchNorm):
    r""":class:`batchnorm.SyncBatchNorm` followed by an activation: what
    ``SyncBatchNorm.convert_sync_batchnorm`` turns :class:`BatchNormAct` and :class:`InPlaceABN`
    into. Without an initialized process group (or with one rank, or in eval) it is
    :class:`BatchNormAct`, one fused autograd node; across ranks the synchronized batch norm runs
    first and the activation after it.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, bias,
            skip_nonfinite: as :class:`batchnorm.SyncBatchNorm`.
        activation, activation_param: as :class:`BatchNormAct` (keyword-only).

    Example:
        >>> import torch, batchnorm
        >>> block = batchnorm.SyncBatchNormAct(4, activation="relu")  # no process group: local
        >>> x = torch.randn(8, 4, 3)
        >>> torch.equal(block(x), batchnorm.BatchNormAct(4, activation="relu")(x))
        True
    """

    @extends_constructor(SyncBatchNorm)
    def __init__(self, *, activation: str = "relu", activation_param: float | None = None) -> None:
        self._activation = Activation.make(activation, activation_param, type(self).__name__)

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return Kept("torch has no fused batch norm + activation")

    @classmethod
    def frozen_equivalent(cls) -> Equivalent:
        return FrozenBatchNormAct

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self._activation}"

    def forward(self, input: Tensor, *, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        traced = fx_leaf_call(self, input, mask=mask, lengths=lengths)
        if traced is not None:
            return traced  # type: ignore[no-any-return]
        if not self.training or self._world_size() == 1:
            return _activated_forward(self, self._activation, input, mask, lengths)
        # Padded positions stay 0 through the activation: f(0) = 0 for every activation here.
        return self._activation.apply_(super().forward(input, mask=mask, lengths=lengths))


class FrozenBatchNormAct(_WithActivation, FrozenBatchNorm):
    r""":class:`batchnorm.FrozenBatchNorm` followed by an activation: what :func:`batchnorm.freeze`
    turns :class:`BatchNormAct` and :class:`InPlaceABN` into (their eval-mode map, fixed).

    Args:
        num_features, eps: as :class:`batchnorm.FrozenBatchNorm`.
        activation, activation_param: as :class:`BatchNormAct` (keyword-only).

    Example:
        >>> import torch, batchnorm
        >>> block = batchnorm.BatchNormAct(3, activation="silu").eval()
        >>> frozen = batchnorm.freeze(torch.nn.Sequential(block))[0]
        >>> x = torch.randn(2, 3, 4)
        >>> type(frozen).__name__, torch.allclose(frozen(x), block(x))
        ('FrozenBatchNormAct', True)
    """

    @extends_constructor(FrozenBatchNorm)
    def __init__(self, *, activation: str = "relu", activation_param: float | None = None) -> None:
        self._activation = Activation.make(activation, activation_param, type(self).__name__)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self._activation}"

    def forward(self, input: Tensor) -> Tensor:
        return self._activation.apply_(super().forward(input))
