r"""Batch-norm variants built on the core module: ghost, renormalized and frozen batch norm.

Each variant delegates the normalization to :class:`batchnorm.BatchNorm` (or, frozen, to the
eval kernel of :mod:`batchnorm.backends`) and adds only what makes it different.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from . import backends
from . import functional as BF
from ._autograd import apply_batch_norm
from ._masked import check_valid_count, resolve_mask
from ._protocol import BatchNormProtocol, Equivalent, Kept, Refused
from .modules import BatchNorm, check_num_features, extends_constructor

__all__ = ["BatchRenorm", "FrozenBatchNorm", "GhostBatchNorm", "renorm_schedule"]


class GhostBatchNorm(BatchNorm):
    r"""Batch norm with statistics per virtual ("ghost") batch (Hoffer et al. 2017).

    In training, the batch is split along dimension 0 into ``N // virtual_batch_size`` virtual
    batches of as equal size as possible (sizes differ by at most one, none is smaller than
    ``virtual_batch_size``; a batch smaller than ``virtual_batch_size`` is one virtual batch),
    and each is normalized with its own mean and biased variance.

    Running statistics are updated once per virtual batch, in order, as in Hoffer et al.: each
    virtual batch is one step of the running average and ``num_batches_tracked`` counts virtual
    batches (so ``momentum=None`` averages all virtual batches seen). Eval is plain
    :class:`batchnorm.BatchNorm` eval. After a training call, ``batch_mean``/``batch_var`` hold
    the statistics of the last virtual batch.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias, skip_nonfinite: as
            :class:`batchnorm.BatchNorm`.
        virtual_batch_size: samples per virtual batch (a positive int).

    Shape:
        input (N, C, \*), output the same.

    Example:
        >>> import torch, batchnorm
        >>> bn = batchnorm.GhostBatchNorm(2, virtual_batch_size=4)
        >>> y = bn(torch.randn(8, 2) + 5)
        >>> torch.allclose(y[:4].mean(0), torch.zeros(2), atol=1e-5), bn.num_batches_tracked.item()
        (True, 2)
    """

    @extends_constructor(BatchNorm)
    def __init__(self, virtual_batch_size: int) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size <= 0:
            raise ValueError(
                f"GhostBatchNorm: expected virtual_batch_size to be a positive int, got {virtual_batch_size!r}"
            )
        self.virtual_batch_size = virtual_batch_size

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return Kept("torch has no ghost batch norm")

    @classmethod
    def sync_equivalent(cls) -> Equivalent:
        return Kept("each rank splits its own batch into virtual batches, whose statistics are local by design")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor, *, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        if not self.training:
            return super().forward(input, mask=mask, lengths=lengths)
        # Every virtual batch is validated before the first one updates any state.
        self._check_input(input)
        valid = resolve_mask(input, mask, lengths, self._describe())
        sections = max(1, input.shape[0] // self.virtual_batch_size)
        chunks = torch.tensor_split(input, sections)  # k x (n_i, C, *)
        if valid is None:
            for chunk in chunks:
                BF.check_batch_size(chunk)
            normalize = super().forward
            return torch.cat([normalize(chunk) for chunk in chunks])  # k x (n_i, C, *) -> (N, C, *)
        masks = torch.tensor_split(valid, sections)  # k x (n_i, *): each virtual batch its own valid count
        for chunk, chunk_mask in zip(chunks, masks, strict=True):
            check_valid_count(chunk, chunk_mask)
        outputs = [super(GhostBatchNorm, self).forward(c, mask=m) for c, m in zip(chunks, masks, strict=True)]
        return torch.cat(outputs)  # k x (n_i, C, *) -> (N, C, *)


class BatchRenorm(BatchNorm):
    r"""Batch Renormalization (Ioffe 2017): batch norm corrected towards the running statistics.

    In training,

    .. math::
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta, \quad
        r = \mathrm{clip}\!\left(\frac{\sigma_B}{\sigma}, \frac{1}{r_{max}}, r_{max}\right), \quad
        d = \mathrm{clip}\!\left(\frac{\mu_B - \mu}{\sigma}, -d_{max}, d_{max}\right)

    with :math:`\sigma_B = \sqrt{\mathrm{var}_B + \epsilon}` and :math:`\mu`,
    :math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}` the running statistics as they were
    before this step's update; r and d are constants in backward. It runs the core batch norm,
    whose output is :math:`y_0 = \gamma \hat x + \beta`, then applies
    :math:`y = r y_0 + (1 - r) \beta + \gamma d` per channel. With ``rmax=1`` and ``dmax=0`` it is
    exactly batch norm. Eval is plain batch-norm eval. Without running statistics
    (``track_running_stats=False``) there is nothing to correct towards and it is batch norm.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias, skip_nonfinite: as
            :class:`batchnorm.BatchNorm`.
        rmax: bound on r, at least 1. Default: 3.0.
        dmax: bound on |d|, at least 0. Default: 5.0.

    ``rmax`` and ``dmax`` are plain attributes that a training loop may change between steps;
    :func:`renorm_schedule` gives the paper's warm-up from 1 and 0.

    Shape:
        input (N, C, \*), output the same.

    Example:
        >>> import torch, batchnorm
        >>> bn = batchnorm.BatchRenorm(2, rmax=1.0, dmax=0.0)
        >>> x = torch.randn(16, 2) * 3 + 1
        >>> torch.equal(bn(x), batchnorm.BatchNorm(2)(x))
        True
    """

    @extends_constructor(BatchNorm)
    def __init__(self, *, rmax: float = 3.0, dmax: float = 5.0) -> None:
        _check_limits(rmax, dmax, "BatchRenorm")
        self.rmax = float(rmax)
        self.dmax = float(dmax)

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return Kept("torch has no batch renormalization")

    @classmethod
    def sync_equivalent(cls) -> Equivalent:
        return Refused("no synchronized batch renormalization: its r and d would need the global batch statistics")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}"

    def forward(self, input: Tensor, *, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        if not self.training or not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return super().forward(input, mask=mask, lengths=lengths)
        _check_limits(self.rmax, self.dmax, self._describe())
        # mu and sigma as they were before this step's update.
        running_mean = self.running_mean.detach().clone()
        running_sigma = torch.sqrt(self.running_var.detach() + self.eps)
        # y0 = gamma * x_hat + beta with the batch statistics mu_B, var_B
        output, batch_mean, batch_var = self._batch_norm(input, apply_batch_norm, mask=mask, lengths=lengths)
        batch_mean, batch_var = batch_mean.detach(), batch_var.detach()
        cdt = batch_mean.dtype
        sigma = running_sigma.to(cdt)
        batch_sigma = torch.sqrt(batch_var + self.eps)  # (C,)
        r = torch.clamp(batch_sigma / sigma, 1.0 / self.rmax, self.rmax)  # (C,), a constant: no graph
        d = torch.clamp((batch_mean - running_mean.to(cdt)) / sigma, -self.dmax, self.dmax)  # (C,)
        # gamma (x_hat r + d) + beta = r y0 + (1 - r) beta + gamma d, with gamma = 1 and beta = 0
        # where the module has no weight or no bias.
        shift = d if self.weight is None else self.weight.to(cdt) * d
        if self.bias is not None:
            shift = shift + (1 - r) * self.bias.to(cdt)
        if mask is None and lengths is None:
            return backends.normalize(output, r, shift)
        # Padded positions stay 0 (the mask was validated by the forward above).
        valid = resolve_mask(input, mask, lengths, self._describe())
        assert valid is not None
        return torch.where(valid.unsqueeze(1), backends.normalize(output, r, shift), 0)  # (N, 1, *) vs (N, C, *)


def _check_limits(rmax: object, dmax: object, caller: str) -> None:
    if isinstance(rmax, bool) or not isinstance(rmax, Real) or not float(rmax) >= 1.0:
        raise ValueError(f"{caller}: expected rmax to be a number >= 1, got {rmax!r}")
    if isinstance(dmax, bool) or not isinstance(dmax, Real) or not float(dmax) >= 0.0:
        raise ValueError(f"{caller}: expected dmax to be a number >= 0, got {dmax!r}")


def renorm_schedule(
    step: int,
    *,
    rmax: float = 3.0,
    dmax: float = 5.0,
    hold_steps: int = 5000,
    rmax_ramp_steps: int = 35000,
    dmax_ramp_steps: int = 20000,
) -> tuple[float, float]:
    """``(rmax, dmax)`` for training step ``step`` under Ioffe (2017)'s warm-up.

    Plain batch norm (1, 0) for the first ``hold_steps`` steps, then each limit grows linearly to
    its final value over its ramp (the paper: rmax 1 -> 3 over 40k steps in all and dmax 0 -> 5
    over 25k steps, both held for the first 5k). Set the result on every :class:`BatchRenorm`
    before the step.

    Example:
        >>> from batchnorm import renorm_schedule
        >>> renorm_schedule(0), renorm_schedule(12500, hold_steps=5000, rmax_ramp_steps=10000)
        ((1.0, 0.0), (2.5, 1.875))
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"renorm_schedule: expected step to be a non-negative int, got {step!r}")
    _check_limits(rmax, dmax, "renorm_schedule")
    for name, value in (
        ("hold_steps", hold_steps),
        ("rmax_ramp_steps", rmax_ramp_steps),
        ("dmax_ramp_steps", dmax_ramp_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"renorm_schedule: expected {name} to be a non-negative int, got {value!r}")

    def ramp(length: int) -> float:
        """Fraction of the way from the start value to the final one: 0 while held, 1 once done."""
        if step < hold_steps:
            return 0.0
        return 1.0 if length == 0 else min((step - hold_steps) / length, 1.0)

    return 1.0 + (float(rmax) - 1.0) * ramp(rmax_ramp_steps), float(dmax) * ramp(dmax_ramp_steps)


class FrozenBatchNorm(BatchNormProtocol, nn.Module):
    r"""Batch norm as a fixed affine map: ``y = weight * (x - running_mean) / sqrt(running_var + eps) + bias``.

    Everything is a buffer (``weight``, ``bias``, ``running_mean``, ``running_var``); there are no
    parameters, and training mode changes nothing. Gradients flow to the input. It loads a
    BatchNorm state dict (torch's or ours): ``num_batches_tracked`` is accepted and ignored, and
    a state dict without ``weight`` or ``bias`` (a batch norm built with ``affine=False`` or
    ``bias=False``) loads them as weight 1 and bias 0.

    Args:
        num_features: C, the number of channels (a positive int).
        eps: added to the variance inside the square root. Default: 1e-5.

    Shape:
        input (N, C, \*), output the same.

    Example:
        >>> import torch, batchnorm
        >>> bn = torch.nn.BatchNorm2d(3).eval()
        >>> frozen = batchnorm.FrozenBatchNorm(3)
        >>> frozen.load_state_dict(bn.state_dict())
        <All keys matched successfully>
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(frozen(x), bn(x))
        True
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    # Fixed statistics: nothing to recalibrate, synchronize or freeze.
    tracks_statistics = False

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        check_num_features(num_features, type(self).__name__)
        BF.check_eps(eps, type(self).__name__)
        self.num_features = num_features
        self.eps = eps
        factory_kwargs = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory_kwargs))
        self.register_buffer("bias", torch.zeros(num_features, **factory_kwargs))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
        self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return Kept("torch has no frozen batch norm")

    @classmethod
    def sync_equivalent(cls) -> Equivalent:
        return Kept("its statistics are fixed: nothing to synchronize")

    @classmethod
    def frozen_equivalent(cls) -> Equivalent:
        return Kept("already frozen")

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        if prefix + "running_mean" in state_dict:
            # A batch norm built with affine=False (no weight, no bias) or bias=False (no bias):
            # the missing parts of the affine map are the identity's.
            state_dict.setdefault(prefix + "weight", torch.ones_like(self.weight))
            state_dict.setdefault(prefix + "bias", torch.zeros_like(self.bias))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        who = f"{type(self).__name__}({self.num_features})"
        BF.check_input(input, who)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{who}: expected input with {self.num_features} channels (dimension 1), got "
                f"{input.shape[1]} channels in input of shape {tuple(input.shape)}"
            )
        if input.device != self.running_mean.device:
            raise ValueError(
                f"{who}: expected input on the module's device {self.running_mean.device}, got input on {input.device}"
            )
        output, _ = backends.forward_eval(input, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
        return output
