r"""Batch norm as a normalizing-flow bijector (Dinh et al. 2017, "Density estimation using Real NVP").

Per channel c, over every position of a sample, the map data -> latent is

    z = gamma_c * (x - mu_c) / sqrt(var_c + eps) + beta_c,    gamma_c = softplus(u_c) + delta > 0

with mu, var the batch statistics in training and the running statistics in eval. For a
sample with P positions per channel (P = prod of the dimensions after C) the map is diagonal,
so

    log|det dz/dx| = P * sum_c [log gamma_c - 1/2 log(var_c + eps)].

The statistics, the running-statistics update and the affine map are the core's
(:mod:`batchnorm.functional`, :mod:`batchnorm.backends`); this module only adds the positive
scale and the log-determinant.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from . import functional as BF
from ._protocol import BatchNormProtocol, Equivalent, Kept, Refused
from .modules import check_hyperparameters, check_num_features

__all__ = ["BatchNormFlow"]

# Smallest scale gamma: keeps log(gamma) finite when u -> -inf (softplus(u) underflows to 0).
_MIN_SCALE = 1e-3


class BatchNormFlow(BatchNormProtocol, nn.Module):
    r"""Batch normalization as an invertible flow layer with a tractable log-determinant.

    ``forward(x)`` normalizes (data to latent) and returns ``(z, logabsdet)``;
    ``inverse(z)`` returns ``(x, logabsdet)`` of the inverse map. The scale
    ``gamma = softplus(unconstrained_weight) + 1e-3`` is strictly positive by construction, so
    the map is always a bijection. In training, the batch statistics normalize (and gradients
    flow through them, also into the log-determinant) and the running statistics are updated
    as in :class:`batchnorm.BatchNorm`; in eval the running statistics normalize and the map is
    a fixed per-sample affine bijection whose ``logabsdet`` is log|det J| exactly.

    .. math::
        z = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta, \qquad
        \log|\det J| = P \sum_c \left(\log\gamma_c - \tfrac12 \log(\sigma_c^2 + \epsilon)\right)

    Args:
        num_features: C, the number of channels (a positive int).
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: weight of the batch in the running statistics, or None for the cumulative
            average. Default: 0.1.
        device, dtype: of the parameters and buffers. Default: torch's defaults.

    Shape:
        x, z: (N, C, \*); logabsdet: (N,), counting all P = prod(\*) positions of a sample.

    Example:
        >>> import torch, batchnorm
        >>> flow = batchnorm.BatchNormFlow(3)
        >>> x = torch.randn(16, 3, 4, 4)
        >>> z, logabsdet = flow(x)
        >>> logabsdet.shape
        torch.Size([16])
        >>> x_back, inverse_logabsdet = flow.eval().inverse(flow(x)[0])
        >>> torch.allclose(x_back, x, atol=1e-5)
        True
    """

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    batch_mean: Tensor | None
    batch_var: Tensor | None

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_num_features(num_features, name)
        check_hyperparameters(eps, momentum, name)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        # softplus(u) + delta = 1 at u = log(exp(1 - delta) - 1): the flow starts as plain normalization.
        factory = {"device": device, "dtype": dtype}
        self.unconstrained_weight = nn.Parameter(
            torch.full((num_features,), math.log(math.expm1(1.0 - _MIN_SCALE)), **factory)
        )
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        # Statistics of the latest training forward (detached), for inverse() in training mode.
        self.batch_mean = None
        self.batch_var = None

    @property
    def weight(self) -> Tensor:
        """gamma = softplus(unconstrained_weight) + 1e-3 > 0, shape (C,)."""
        return F.softplus(self.unconstrained_weight) + _MIN_SCALE

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return Kept("torch has no normalizing-flow layer")

    @classmethod
    def sync_equivalent(cls) -> Equivalent:
        return Refused("no synchronized form: its log-determinant would need the global batch statistics")

    @classmethod
    def frozen_equivalent(cls) -> Equivalent:
        return Refused("a frozen batch norm would drop the log-determinant it returns; use .eval() for a fixed map")

    def _check(self, input: object, who: str) -> Tensor:
        BF.check_input(input, who)
        assert isinstance(input, Tensor)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{who}: expected input with {self.num_features} channels (dimension 1), got "
                f"{input.shape[1]} channels in input of shape {tuple(input.shape)}"
            )
        if input.device != self.bias.device:
            raise ValueError(f"{who}: expected input on the module's device {self.bias.device}, got {input.device}")
        return input

    def _log_abs_det(self, input: Tensor, invstd: Tensor) -> Tensor:
        """P * sum_c (log gamma_c + log r_c), r = 1/sqrt(var + eps), repeated for each sample: (N,)."""
        positions = math.prod(input.shape[2:])
        per_sample = positions * (torch.log(self.weight).to(invstd.dtype) + torch.log(invstd)).sum()  # (C,) -> ()
        return per_sample.expand(input.shape[0]).clone()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data -> latent: returns ``(z, logabsdet)``, z (N, C, \\*) and logabsdet (N,)."""
        who = type(self).__name__
        self._check(x, who)
        if self.training:
            BF.check_batch_size(x)
            # Differentiable statistics: the log-determinant depends on x through var, and the
            # layers before this one must see that gradient (or they inflate their own scale freely).
            mean, var = BF.batch_norm_stats(x)  # (N, C, *) -> (C,), (C,)
            BF.update_running_stats(
                self.running_mean,
                self.running_var,
                mean.detach(),
                var.detach(),
                x.numel() // x.shape[1],
                self.momentum,
                skip_nonfinite=True,
                num_batches_tracked=self.num_batches_tracked,
            )
            self.batch_mean, self.batch_var = mean.detach(), var.detach()
        else:
            cdt = backends.compute_dtype(x)
            mean, var = self.running_mean.to(cdt), self.running_var.to(cdt)
        invstd, scale, shift = backends.scale_shift(mean, var, self.weight, self.bias, self.eps)
        return backends.normalize(x, scale, shift), self._log_abs_det(x, invstd)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent -> data: returns ``(x, logabsdet)`` of the inverse map, logabsdet (N,).

        Eval uses the running statistics; training the batch statistics of the latest training
        forward (``ValueError`` before the first one).
        """
        who = f"{type(self).__name__}.inverse"
        self._check(z, who)
        if self.training:
            if self.batch_mean is None or self.batch_var is None:
                raise ValueError(
                    f"{who}: expected batch statistics from an earlier training forward, got none yet; "
                    f"run a forward first or switch to eval mode"
                )
            mean, var = self.batch_mean, self.batch_var
        else:
            mean, var = self.running_mean, self.running_var
        cdt = backends.compute_dtype(z)
        mean, var = mean.to(cdt), var.to(cdt)
        invstd, _ = backends.invstd_scale(var, None, self.eps)
        x = BF.batch_norm_inverse(z, mean, var, self.weight, self.bias, self.eps)
        return x, -self._log_abs_det(z, invstd)
