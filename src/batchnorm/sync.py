r"""Synchronized batch norm: the statistics of the global batch across a ``torch.distributed`` group.

The math is the local batch norm's (:mod:`batchnorm.backends`); only the per-channel sums cross
the group, one collective in forward and one in backward (``docs/math.md``, notation there):

forward, rank k with n_k values per channel, local mean mu_k and M2_k = sum (x - mu_k)^2:
    gather (n_k, mu_k, M2_k) from every rank                        one all_gather of (2C + 1,)
    n = sum n_k,  mu = sum n_k mu_k / n                              (Chan et al.'s parallel merge:
    var = (sum M2_k + sum n_k (mu_k - mu)^2) / n                      no E[x^2] - E[x]^2 anywhere)
    y = gamma (x - mu) / sqrt(var + eps) + beta
backward:
    s1 = sum dy,  s2 = sum dy (x - mu) over the rank, then summed over the group  one all_reduce of (2C,)
    dx = gamma r (dy - s1/n - (x - mu) r^2 s2/n)                     with the GLOBAL count n
    dgamma = local s2 * r,  dbeta = local s1                         (DDP sums them over ranks)

Per-rank batch sizes may differ and a rank with an empty batch takes part (n_k = 0). With a mask
(``forward(x, mask=...)``, :mod:`batchnorm._masked`) n_k is the rank's valid count, 0 for a fully
padded rank, and the sums run over valid positions (s2 becomes s2_hat = sum dy x̂). Every rank
of the group must call forward and backward the same number of times, as with torch's
SyncBatchNorm. Gloo (CPU) and NCCL (GPU) both run it; without an initialized process group, or
with a group of one, the module is the local :class:`batchnorm.BatchNorm`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import backends
from . import functional as BF
from ._autograd import affine_tangent, normalized, parameter_dtype, without_jvp
from ._convert import convert_batch_norms
from ._masked import (
    masked_forward,
    masked_input_grad,
    masked_normalized,
    masked_stats,
    resolve_mask,
    spread,
    valid_count,
)
from ._protocol import Equivalent, Kept
from .modules import BatchNorm, batch_statistics_observable, extends_constructor, fx_leaf_call

__all__ = ["SyncBatchNorm"]


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training batch norm over the group's global batch; returns (y, mu, var, n), n a 0-d tensor.

    Forward mode: batch norm's tangent (:mod:`batchnorm._autograd`) with the two per-channel
    means taken over the global batch, one all_reduce of (2C,).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        group: Any,
        world_size: int,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cdt = backends.compute_dtype(x)
        channels = x.shape[1]
        # n_k: the rank's values per channel, its valid ones when masked (0 for a fully padded rank).
        local_count = x.numel() // channels if mask is None else valid_count(mask)
        if local_count > 0 and mask is not None:
            mean, var, _ = masked_stats(x, mask)  # (N, C, *) -> (C,), (C,) over the valid positions
        elif local_count > 0:
            mean, var = backends.batch_stats(x)  # (N, C, *) -> (C,), (C,)
        else:
            # An empty rank contributes n_k = 0; zeros keep NaN out of the weighted sums.
            mean = var = torch.zeros(channels, dtype=cdt, device=x.device)
        # Packed in float64: counts stay exact beyond 2**24 and the merge adds no rounding of its own.
        local = torch.cat(
            [
                torch.tensor([float(local_count)], dtype=torch.float64, device=x.device),
                mean.to(torch.float64),
                var.to(torch.float64) * local_count,  # M2_k = n_k * biased var_k
            ]
        )  # (2C + 1,)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)  # world_size x (2C + 1,)
        stats = torch.stack(gathered)  # (W, 2C + 1)
        counts, means, m2s = stats[:, :1], stats[:, 1 : channels + 1], stats[:, channels + 1 :]  # (W, 1), (W, C)
        total = counts.sum()  # () : n, the global values per channel
        n = int(total.item())
        if n == 1 or (mask is not None and n < 2):
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()} on this rank "
                f"and 1 value per channel over the process group"
            )
        if n == 0:
            # Every rank is empty: as the local batch norm, an empty output and NaN statistics.
            global_mean = global_var = torch.full((channels,), float("nan"), dtype=cdt, device=x.device)
            y = x.clone()
        else:
            merged_mean = (counts * means).sum(0) / total  # (W, C) -> (C,)
            merged_m2 = m2s.sum(0) + (counts * (means - merged_mean) ** 2).sum(0)  # (W, C) -> (C,)
            global_mean = merged_mean.to(cdt)
            global_var = (merged_m2 / total).to(cdt)
            if mask is None:
                y, _ = backends.forward_eval(x, global_mean, global_var, weight, bias, eps)
            else:
                y, _, _ = masked_forward(x, mask, weight, bias, global_mean, global_var, eps)
        return y, global_mean, global_var, total.to(cdt)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, weight, bias, eps, group, _, mask = inputs
        _, mean, var, count = output
        ctx.count = int(count.item())
        ctx.group = group
        ctx.eps = eps
        ctx.param_dtype = parameter_dtype(x, weight, bias)
        ctx.save_for_backward(x, weight, mean, var, mask)
        ctx.save_for_forward(x, weight, mean, var, mask)
        ctx.mark_non_differentiable(mean, var, count)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor, *_grad_stats: Any) -> tuple[Tensor | None, ...]:
        x, weight, mean, var, mask = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        grad_input: Tensor | None = None
        if mask is not None:
            # Masked: the same two sums over the valid positions, s2_hat = Σ dy · x̂ (_masked).
            invstd = torch.rsqrt(var + ctx.eps)
            x_hat = masked_normalized(x, mask, mean, invstd)  # (N, C, *), 0 on padded positions
            dy = torch.where(spread(mask), grad_output.to(mean.dtype), 0)
            dims = backends.reduce_dims(x)
            sum_dy, grad_weight = dy.sum(dims), (dy * x_hat).sum(dims)  # (N, C, *) -> (C,), (C,)
            if need_input:
                packed = torch.cat([sum_dy, grad_weight])  # (2C,)
                dist.all_reduce(packed, group=ctx.group)  # (2C,) summed over the group
                grad_input = masked_input_grad(
                    dy, x_hat, mask, weight, invstd, packed[:channels], packed[channels:], ctx.count
                ).to(x.dtype)
        elif ctx.count == 0:
            zeros = torch.zeros(channels, dtype=mean.dtype, device=x.device)
            sum_dy, grad_weight = zeros, zeros
            if need_input:
                grad_input = torch.zeros_like(x)
        else:
            invstd = torch.rsqrt(var + ctx.eps)
            sum_dy, sum_dy_xmu = backends.grad_sums(grad_output, x, mean)  # (N, C, *) -> (C,), (C,)
            grad_weight = sum_dy_xmu * invstd
            if need_input:
                packed = torch.cat([sum_dy, sum_dy_xmu])  # (2C,)
                dist.all_reduce(packed, group=ctx.group)  # (2C,) summed over the group
                grad_input = backends.input_grad_train(
                    grad_output, x, weight, mean, invstd, packed[:channels], packed[channels:], ctx.count
                )
        return (
            grad_input,
            grad_weight.to(ctx.param_dtype) if need_weight else None,
            sum_dy.to(ctx.param_dtype) if need_bias else None,
            None,
            None,
            None,
            None,
        )

    @staticmethod
    def jvp(
        ctx: Any, t_x: Tensor | None, t_weight: Tensor | None, t_bias: Tensor | None, *_constants: Any
    ) -> tuple[Tensor, None, None, None]:
        x, weight, mean, var, mask = ctx.saved_tensors
        if ctx.count == 0:
            return torch.zeros_like(x), None, None, None
        invstd = torch.rsqrt(var + ctx.eps)
        x_hat = normalized(x, mean, invstd) if mask is None else masked_normalized(x, mask, mean, invstd)  # (N, C, *)
        t_x_hat = None
        if t_x is not None and mask is not None:
            t_x = torch.where(spread(mask), t_x, 0)  # padded tangents never enter
        if t_x is not None:
            # t_x̂ = r * (t_x - mean(t_x) - x̂ * mean(x̂ * t_x)), the means over the global batch.
            shape = backends.channel_shape(x)
            dims = backends.reduce_dims(x)
            tangent = t_x.to(x_hat.dtype)
            packed = torch.cat([tangent.sum(dims), (x_hat * tangent).sum(dims)])  # (2C,)
            dist.all_reduce(packed, group=ctx.group)  # (2C,) summed over the group
            mean_tangent, projection = (packed / ctx.count).view(2, -1)  # (C,), (C,)
            t_x_hat = (tangent - mean_tangent.view(shape) - x_hat * projection.view(shape)) * invstd.view(shape)
        t_y = affine_tangent(x_hat, t_x_hat, weight, t_weight, t_bias)
        if mask is not None:
            t_y = torch.where(spread(mask), t_y, 0)
        return t_y.to(x.dtype), None, None, None


_SyncBatchNormFunctionNoJvp = without_jvp(_SyncBatchNormFunction)


class SyncBatchNorm(BatchNorm):
    r"""Batch norm whose statistics span every rank of a ``torch.distributed`` process group.

    Equal to :class:`batchnorm.BatchNorm` applied to the concatenation of all ranks' batches:
    outputs, input gradients, the parameter gradients summed over ranks (what DDP all-reduces),
    running statistics (global mean, global unbiased variance) and ``num_batches_tracked``. The
    per-channel count, mean and sum of squared deviations are merged with the parallel-variance
    formula in one all_gather per forward; backward all-reduces the two per-channel gradient sums
    once. Runs on gloo (CPU tensors) and NCCL (CUDA tensors). Double backward is not supported.

    When no process group is initialized, or the group has one rank, or the module normalizes
    with running statistics (eval), it computes exactly as :class:`batchnorm.BatchNorm`.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias, skip_nonfinite: as
            :class:`batchnorm.BatchNorm`.
        process_group: the group to synchronize over; None (default) is the default group.

    Shape:
        input (N, C, \*) with N possibly different on every rank (0 included), output the same.

    Example:
        >>> import torch, batchnorm
        >>> bn = batchnorm.SyncBatchNorm(4)  # no process group here: local batch norm
        >>> x = torch.randn(8, 4, 3)
        >>> torch.equal(bn(x), batchnorm.BatchNorm(4)(x))
        True
    """

    @extends_constructor(BatchNorm, after="track_running_stats")
    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return nn.SyncBatchNorm

    @classmethod
    def sync_equivalent(cls) -> Equivalent:
        return Kept("already synchronized (over the process group it was given)")

    def _world_size(self) -> int:
        if not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor, *, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        # As torch: only training synchronizes; eval normalizes locally (with the batch's own
        # statistics when there are no running ones).
        world_size = self._world_size() if self.training else 1
        traced = fx_leaf_call(self, input, mask=mask, lengths=lengths)
        if world_size == 1 or traced is not None:
            local: Tensor = super().forward(input, mask=mask, lengths=lengths)
            return local
        self._check_input(input)
        valid = resolve_mask(input, mask, lengths, self._describe())
        update = self.track_running_stats
        running_mean = self.running_mean if update else None
        running_var = self.running_var if update else None
        BF.check_arguments(
            input, running_mean, running_var, self.weight, self.bias, True, self.momentum, self.eps, self._describe()
        )
        output, mean, var, count = (
            _SyncBatchNormFunctionNoJvp if torch.compiler.is_compiling() else _SyncBatchNormFunction
        ).apply(input, self.weight, self.bias, self.eps, self.process_group, world_size, valid)
        if running_mean is not None and running_var is not None:
            BF.update_running_stats(
                running_mean,
                running_var,
                mean,
                var,
                int(count.item()),
                self.momentum,
                self.skip_nonfinite,
                self.num_batches_tracked,
            )
        if batch_statistics_observable():
            self.batch_mean = mean.detach()
            self.batch_var = var.detach()
        result: Tensor = output
        return result

    def extra_repr(self) -> str:
        group = "" if self.process_group is None else f", process_group={self.process_group}"
        return super().extra_repr() + group

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every batch norm in ``module`` (torch's and ours) by its synchronized form.

        As torch's ``convert_sync_batchnorm``: children are replaced in place and the (possibly
        new) root is returned; the new layers share the old ones' parameters and buffers and keep
        their mode, device and dtype. Each class declares its synchronized form
        (``sync_equivalent()``): torch's batch norms and ours become :class:`SyncBatchNorm`;
        :class:`batchnorm.BatchNormAct` and :class:`batchnorm.InPlaceABN` become
        :class:`batchnorm.SyncBatchNormAct` (the same activation; not in place); the batch norm
        inside ``ConvBatchNorm*d`` becomes a :class:`SyncBatchNorm`, which that module then runs
        over the group. Kept as they are: synchronized and frozen layers, and
        :class:`batchnorm.GhostBatchNorm` (each rank splits its own batch). Refused:
        :class:`batchnorm.BatchRenorm` and :class:`batchnorm.BatchNormFlow` (no synchronized
        form), and batch-norm-like classes it does not know (another library's subclass of torch's
        batch norm). Nothing changes when it raises: ``ValueError`` naming the module and why.

        Example:
            >>> import torch, batchnorm
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
            >>> model = batchnorm.SyncBatchNorm.convert_sync_batchnorm(model)
            >>> type(model[1]).__name__
            'SyncBatchNorm'
        """
        return convert_batch_norms(module, "sync", "convert_sync_batchnorm", process_group=process_group)
