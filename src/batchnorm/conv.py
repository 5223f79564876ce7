r"""Convolution followed by batch norm, trained with less memory, and folded for inference.

An unfused ``conv -> BatchNorm`` keeps two tensors for backward: the convolution's input x
(for the weight gradient) and its output c = conv(x) (batch norm's input). ``ConvBatchNorm*d``
keeps only x and recomputes c in backward, as in the PyTorch tutorial "Fusing Convolution and
Batch Norm using Custom Function":

    c = conv(x; W, b_conv)                          forward; c is freed after batch norm
    y = (c - mu) * a + beta                         batch norm (docs/math.md notation)
    backward:  c = conv(x; W, b_conv) again,
               dc, dgamma, dbeta = batch norm's backward(dy, c)
               dx, dW, db_conv  = the convolution's backward(dc, x, W)

one extra convolution per training step for one activation-sized tensor less.

State dict: ``conv.weight`` (and ``conv.bias``) as ``torch.nn.ConvNd``, ``bn.*`` as
``torch.nn.BatchNormNd``: the keys of ``nn.Sequential(OrderedDict(conv=..., bn=...))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import backends
from . import functional as BF
from ._autograd import (
    batch_norm_forward,
    batch_norm_tangent,
    needs_autograd_function,
    normalized,
    param_grads,
    parameter_dtype,
    without_jvp,
)
from ._protocol import BatchNormProtocol, Equivalent, Kept
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase, fx_leaf_call
from .sync import SyncBatchNorm

__all__ = ["ConvBatchNorm1d", "ConvBatchNorm2d", "ConvBatchNorm3d"]

_CONV_FUNCTIONS = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding, dilation and groups of one convolution, one entry per spatial dimension."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """c = conv(x; W, b): (N, C_in, *) -> (N, C_out, *')."""
        return _CONV_FUNCTIONS[x.dim() - 2](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def conv_backward(
        self, grad_output: Tensor, x: Tensor, weight: Tensor, has_bias: bool, mask: Sequence[bool]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(dx, dW, db) of c = conv(x; W, b) given dc, each only where ``mask`` asks for it."""
        bias_sizes = [weight.shape[0]] if has_bias else None
        output_padding = [0] * len(self.stride)
        grads = torch.ops.aten.convolution_backward(
            grad_output,
            x,
            weight,
            bias_sizes,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,  # not transposed
            output_padding,
            self.groups,
            [mask[0], mask[1], mask[2] and has_bias],
        )
        return grads[0], grads[1], grads[2]


class ConvBatchNormFunction(torch.autograd.Function):
    """y = BN(conv(x)) keeping only x, W and per-channel vectors for backward.

    ``conv_output`` is conv(x) computed by the caller without a graph; it is used for the
    forward only, never saved, and gets no gradient. Returns ``(y, mu, var)`` like
    :class:`batchnorm._autograd.BatchNormFunction`. Forward mode: the convolution is bilinear,
    t_c = conv(t_x; W) + conv(x; t_W) + t_b, then batch norm's tangent with c recomputed.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        conv_weight: Tensor,
        conv_bias: Tensor | None,
        conv_output: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eval_mean: Tensor | None,
        eval_var: Tensor | None,
        eps: float,
        geometry: ConvGeometry,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return batch_norm_forward(conv_output, weight, bias, eval_mean, eval_var, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, conv_weight, conv_bias, conv_output, weight, bias, eval_mean, eval_var, eps, geometry = inputs
        _, mean, var = output
        ctx.training = eval_mean is None or eval_var is None
        ctx.geometry = geometry
        ctx.eps = eps
        ctx.conv_dtype = conv_output.dtype
        ctx.param_dtype = parameter_dtype(conv_output, weight, bias)
        ctx.save_for_backward(x, conv_weight, conv_bias, weight, mean, var)
        ctx.save_for_forward(x, conv_weight, conv_bias, weight, mean, var)
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor, _grad_mean: Any, _grad_var: Any) -> tuple[Tensor | None, ...]:
        x, conv_weight, conv_bias, weight, mean, var = ctx.saved_tensors
        geometry: ConvGeometry = ctx.geometry
        need_x, need_conv_weight, need_conv_bias, _, need_weight, need_bias = ctx.needs_input_grad[:6]
        # The convolution is recomputed in the dtype it ran in (autocast may have lowered it), and
        # its gradients come back in the dtypes of x, W and b.
        x_c, weight_c = x.to(ctx.conv_dtype), conv_weight.to(ctx.conv_dtype)
        bias_c = None if conv_bias is None else conv_bias.to(ctx.conv_dtype)
        conv_output = geometry.conv(x_c, weight_c, bias_c)  # recomputed: c = conv(x; W, b)
        need_c = need_x or need_conv_weight or need_conv_bias
        invstd = torch.rsqrt(var + ctx.eps)
        grad_c: Tensor | None
        grad_weight: Tensor | None
        grad_bias: Tensor | None
        if conv_output.numel() == 0:
            zeros = x.new_zeros(conv_output.shape[1], dtype=mean.dtype)
            grad_c, grad_weight, grad_bias = torch.zeros_like(conv_output), zeros, zeros
        else:
            kernels = backends.kernels_for(conv_output)
            if ctx.training:
                grad_c, grad_weight, grad_bias = kernels.backward_train(
                    grad_output, conv_output, weight, mean, invstd, need_c
                )
            else:
                grad_c, grad_weight, grad_bias = kernels.backward_eval(
                    grad_output, conv_output, weight, mean, invstd, need_c, need_weight or need_bias
                )
        del conv_output
        grad_x = grad_conv_weight = grad_conv_bias = None
        if grad_c is not None:
            grads = geometry.conv_backward(
                grad_c.to(ctx.conv_dtype), x_c, weight_c, bias_c is not None, (need_x, need_conv_weight, need_conv_bias)
            )
            grad_x, grad_conv_weight, grad_conv_bias = (
                None if grad is None else grad.to(original.dtype)
                for grad, original in zip(
                    grads, (x, conv_weight, conv_weight if conv_bias is None else conv_bias), strict=True
                )
            )
        _, grad_weight, grad_bias, *_ = param_grads(
            None, grad_weight, grad_bias, ctx.param_dtype, need_weight, need_bias
        )
        return grad_x, grad_conv_weight, grad_conv_bias, None, grad_weight, grad_bias, None, None, None, None

    @staticmethod
    def jvp(
        ctx: Any,
        t_x: Tensor | None,
        t_conv_weight: Tensor | None,
        t_conv_bias: Tensor | None,
        _t_conv_output: Any,
        t_weight: Tensor | None,
        t_bias: Tensor | None,
        *_constants: Any,
    ) -> tuple[Tensor, None, None]:
        x, conv_weight, conv_bias, weight, mean, var = ctx.saved_tensors
        geometry: ConvGeometry = ctx.geometry
        conv_output = geometry.conv(x, conv_weight, conv_bias)  # recomputed, as in backward
        if conv_output.numel() == 0:
            return torch.zeros_like(conv_output), None, None
        # t_c = conv(t_x; W) + conv(x; t_W) + t_b: the convolution is linear in each argument.
        t_c: Tensor | None = None
        if t_x is not None:
            t_c = geometry.conv(t_x, conv_weight, None)
        if t_conv_weight is not None or t_conv_bias is not None:
            kernel = torch.zeros_like(conv_weight) if t_conv_weight is None else t_conv_weight
            from_parameters = geometry.conv(x, kernel, t_conv_bias)
            t_c = from_parameters if t_c is None else t_c + from_parameters
        invstd = torch.rsqrt(var + ctx.eps)
        c_hat = normalized(conv_output, mean, invstd)
        t_y = batch_norm_tangent(c_hat, invstd, ctx.training, weight, t_c, t_weight, t_bias)
        return t_y.to(conv_output.dtype), None, None


ConvBatchNormFunctionNoJvp = without_jvp(ConvBatchNormFunction)


def _apply_conv_batch_norm(
    conv_output: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eval_mean: Tensor | None,
    eval_var: Tensor | None,
    eps: float,
    *,
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    geometry: ConvGeometry,
) -> tuple[Tensor, Tensor, Tensor]:
    """The :data:`batchnorm.functional.Normalizer` of ``ConvBatchNorm*d``: (y, mu, var)."""
    if needs_autograd_function(x, conv_weight, conv_bias, weight, bias):
        y, mean, var = (ConvBatchNormFunctionNoJvp if torch.compiler.is_compiling() else ConvBatchNormFunction).apply(
            x, conv_weight, conv_bias, conv_output, weight, bias, eval_mean, eval_var, eps, geometry
        )
        return y, mean, var
    return batch_norm_forward(conv_output, weight, bias, eval_mean, eval_var, eps)


_CONVERTS_ITS_BATCH_NORM = Kept("the tool converts its child bn, which the module then runs unfused")


def _int_tuple(value: object, dims: int, name: str, caller: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dims
    if (
        isinstance(value, (tuple, list))
        and len(value) == dims
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    raise ValueError(f"{caller}: expected {name} to be an int or a tuple of {dims} ints, got {value!r}")


class _ConvBatchNormNd(BatchNormProtocol, nn.Module):
    """Convolution then batch norm; the dimension-specific classes set the modules to use.

    To the tools (``batchnorm._protocol``) its batch-norm state is the child ``bn``: they convert
    that child (to torch's, synchronized or frozen), and the module then runs the pair unfused.
    """

    _dims: int
    _conv_class: type[nn.Module]
    _bn_class: type[_BatchNormBase]

    conv: Any  # nn.Conv1d/2d/3d
    bn: _BatchNormBase

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        skip_nonfinite: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        dims = self._dims
        self.geometry = ConvGeometry(
            _int_tuple(stride, dims, "stride", name),
            _int_tuple(padding, dims, "padding", name),
            _int_tuple(dilation, dims, "dilation", name),
            groups,
        )
        factory_kwargs = {"device": device, "dtype": dtype}
        self.conv = self._conv_class(
            in_channels,
            out_channels,
            kernel_size,
            self.geometry.stride,
            self.geometry.padding,
            self.geometry.dilation,
            groups,
            bias,
            **factory_kwargs,
        )
        self.bn = self._bn_class(
            out_channels, eps, momentum, affine, track_running_stats, skip_nonfinite=skip_nonfinite, **factory_kwargs
        )

    def batch_norm_state(self) -> Any:
        return self.bn

    def fused_convolution(self) -> nn.Module | None:
        convolution: nn.Module = self.conv
        return convolution

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return _CONVERTS_ITS_BATCH_NORM

    @classmethod
    def sync_equivalent(cls) -> Equivalent:
        return _CONVERTS_ITS_BATCH_NORM

    @classmethod
    def frozen_equivalent(cls) -> Equivalent:
        return _CONVERTS_ITS_BATCH_NORM

    def _check_input(self, input: object) -> None:
        who = f"{type(self).__name__}({self.conv.in_channels}, {self.conv.out_channels})"
        BF.check_input(input, who)
        assert isinstance(input, Tensor)
        expected_dim = self._dims + 2
        if input.dim() != expected_dim:
            raise ValueError(
                f"{who}: expected {expected_dim}D input (N, C, {self._dims} spatial), got {input.dim()}D input "
                f"of shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.conv.in_channels:
            raise ValueError(
                f"{who}: expected input with {self.conv.in_channels} channels (dimension 1), got "
                f"{input.shape[1]} channels in input of shape {tuple(input.shape)}"
            )
        if input.device != self.conv.weight.device:
            raise ValueError(
                f"{who}: expected input on the module's device {self.conv.weight.device}, got input on {input.device}"
            )
        if input.dtype != self.conv.weight.dtype:
            raise TypeError(f"{who}: expected input of dtype {self.conv.weight.dtype}, got {input.dtype}")

    def _fused(self) -> bool:
        """The batch norm is this module's own class, unhooked (and, synchronized, on one rank)."""
        bn: nn.Module = self.bn
        if bn._forward_pre_hooks or bn._forward_hooks:
            return False
        if isinstance(bn, SyncBatchNorm):
            return not (bn.training and bn._world_size() > 1)
        return type(bn) is self._bn_class

    def forward(self, input: Tensor) -> Tensor:
        traced = fx_leaf_call(self, input)
        if traced is not None:
            return traced  # type: ignore[no-any-return]
        self._check_input(input)
        conv = self.conv
        if not self._fused():
            # The batch norm was swapped by a tool (freeze, to_torch, convert_sync_batchnorm) or is
            # hooked (recalibrate, invert's prior): the unfused pair, so that it runs as what it is
            # and its hooks see its input. The convolution's output is then kept for backward.
            return self.bn(self.geometry.conv(input, conv.weight, conv.bias))  # type: ignore[no-any-return]
        with torch.no_grad():
            # c = conv(x) without a graph: batch norm consumes it, backward recomputes it.
            conv_output = self.geometry.conv(input, conv.weight, conv.bias)
        normalizer = partial(
            _apply_conv_batch_norm, x=input, conv_weight=conv.weight, conv_bias=conv.bias, geometry=self.geometry
        )
        output, _, _ = self.bn._batch_norm(conv_output, normalizer)
        return output

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A new ``nn.Conv{1,2,3}d`` equal to this module in eval mode: batch norm folded in.

        With a = gamma / sqrt(running_var + eps) per output channel:
        W' = W * a (over the output-channel dimension), b' = (b_conv - running_mean) * a + beta.
        Refuses a module in training mode (it would not be equal) or one without running
        statistics.
        """
        who = type(self).__name__
        if self.training:
            raise ValueError(f"{who}.fold(): expected a module in eval mode (call .eval() first), got training mode")
        bn = self.bn
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{who}.fold(): expected running statistics to fold, got track_running_stats=False")
        conv = self.conv
        weight = conv.weight
        invstd = torch.rsqrt(bn.running_var + bn.eps)
        scale = invstd if bn.weight is None else bn.weight * invstd  # a, (C_out,)
        conv_bias = torch.zeros_like(bn.running_mean) if conv.bias is None else conv.bias
        shift = (conv_bias - bn.running_mean) * scale  # (b_conv - mu) * a, (C_out,)
        if bn.bias is not None:
            shift = shift + bn.bias
        folded: Any = self._conv_class(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            self.geometry.stride,
            self.geometry.padding,
            self.geometry.dilation,
            self.geometry.groups,
            True,
            device=weight.device,
            dtype=weight.dtype,
        )
        # (C_out,) -> (C_out, 1, ..., 1) against W (C_out, C_in / groups, *kernel)
        folded.weight.copy_(weight * scale.view(-1, *([1] * (weight.dim() - 1))))
        folded.bias.copy_(shift)
        folded.train(False)
        return cast(nn.Module, folded)


class ConvBatchNorm1d(_ConvBatchNormNd):
    r"""``nn.Conv1d`` then :class:`batchnorm.BatchNorm1d`, saving only the convolution's input.

    See :class:`ConvBatchNorm2d`; input (N, C_in, L).
    """

    _dims = 1
    _conv_class = nn.Conv1d
    _bn_class = BatchNorm1d


class ConvBatchNorm2d(_ConvBatchNormNd):
    r"""``nn.Conv2d`` then :class:`batchnorm.BatchNorm2d`, saving only the convolution's input.

    Training keeps x (and the weights and per-channel vectors) for backward, and recomputes the
    convolution's output there (module ``batchnorm.conv``): an unfused pair also keeps that
    output. Results (outputs, gradients, running statistics, eval mode) equal
    ``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...))``. Differentiable once.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as
            ``nn.Conv2d`` (padding as ints; zero padding only).
        bias: give the convolution a bias. Default: False (batch norm subtracts it again).
        eps, momentum, affine, track_running_stats, skip_nonfinite: as :class:`batchnorm.BatchNorm2d`.

    Attributes:
        conv: the ``nn.Conv2d`` holding the convolution's parameters (state-dict keys ``conv.*``).
        bn: the :class:`batchnorm.BatchNorm2d` holding batch norm's (``bn.*``).

    Shape:
        input (N, C_in, H, W), output (N, C_out, H', W') as ``nn.Conv2d``.

    Example:
        >>> import torch, batchnorm
        >>> block = batchnorm.ConvBatchNorm2d(3, 8, 3, padding=1)
        >>> y = block(torch.randn(4, 3, 6, 6))
        >>> folded = block.eval().fold()
        >>> x = torch.randn(2, 3, 6, 6)
        >>> torch.allclose(folded(x), block(x), atol=1e-5), sorted(block.state_dict())[:2]
        (True, ['bn.bias', 'bn.num_batches_tracked'])
    """

    _dims = 2
    _conv_class = nn.Conv2d
    _bn_class = BatchNorm2d


class ConvBatchNorm3d(_ConvBatchNormNd):
    r"""``nn.Conv3d`` then :class:`batchnorm.BatchNorm3d`, saving only the convolution's input.

    See :class:`ConvBatchNorm2d`; input (N, C_in, D, H, W).
    """

    _dims = 3
    _conv_class = nn.Conv3d
    _bn_class = BatchNorm3d
