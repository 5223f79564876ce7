"""Batch-norm modules: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d`` and the lazy ones.

One base (:class:`_BatchNormBase`) owns parameters, buffers, state-dict versioning and the
forward; the dimension-specific classes override only the input check.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from . import functional as BF
from ._autograd import apply_batch_norm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]


def check_num_features(num_features: object, caller: str) -> int:
    """Stricter than torch: a positive int (a bool or 3.0 is refused)."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"{caller}: expected num_features to be a positive int, got {num_features!r}")
    return num_features


class _BatchNormBase(nn.Module):
    """State and forward shared by every batch-norm module (torch's ``_NormBase`` + ``_BatchNorm``)."""

    _version = 2
    # Expected input ranks, for the error message; subclasses narrow it.
    _input_dims: tuple[int, ...] | None = None
    _input_layout = "(N, C, *)"

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    skip_nonfinite: bool
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    batch_mean: Tensor | None
    batch_var: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        skip_nonfinite: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(self, LazyModuleMixin):
            check_num_features(num_features, name)
        BF.check_eps(eps, name)
        BF.check_momentum(momentum, name, allow_none=True)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.skip_nonfinite = skip_nonfinite
        # Statistics of the latest forward that normalized with batch statistics (every training
        # forward; eval without running statistics), detached, biased variance: for inverse().
        self.batch_mean = None
        self.batch_var = None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """running_mean <- 0, running_var <- 1, num_batches_tracked <- 0 (when tracking)."""
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset; weight <- 1, bias <- 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

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
        version = local_metadata.get("version")
        if (version is None or version < 2) and self.track_running_stats:
            # Version 2 added num_batches_tracked; an older checkpoint keeps the module's counter.
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                counter = self.num_batches_tracked
                state_dict[key] = (
                    counter
                    if counter is not None and counter.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -----------------------------------------------------------------------------------------

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_rank(self, input: object, who: str) -> None:
        BF.check_input(input, who)
        assert isinstance(input, Tensor)
        if self._input_dims is not None and input.dim() not in self._input_dims:
            ranks = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(
                f"{who}: expected {ranks} input {self._input_layout}, got {input.dim()}D input "
                f"of shape {tuple(input.shape)}"
            )

    def _check_input(self, input: object) -> None:
        """Type, rank, channels, dtype and device; raises before any state changes."""
        who = self._describe()
        self._check_rank(input, who)
        assert isinstance(input, Tensor)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{who}: expected input with {self.num_features} channels (dimension 1), got "
                f"{input.shape[1]} channels in input of shape {tuple(input.shape)}"
            )
        for tensor in (self.weight, self.running_mean):
            if tensor is not None and tensor.device != input.device:
                raise ValueError(
                    f"{who}: expected input on the module's device {tensor.device}, got input on {input.device}"
                )

    def forward(self, input: Tensor) -> Tensor:
        return self._forward_with(input, apply_batch_norm)

    def _forward_with(self, input: Tensor, normalizer: BF.Normalizer) -> Tensor:
        """The forward, with ``normalizer`` computing the output: fused variants (batch norm +
        activation, convolution + batch norm) pass their own and share the validation, the
        running statistics, the counter and ``batch_mean``/``batch_var`` from here."""
        self._check_input(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update = self.training and self.track_running_stats
        factor: float = 0.0 if self.momentum is None else self.momentum
        counter = self.num_batches_tracked
        if update and counter is not None and self.momentum is None:
            # Cumulative moving average: the n-th batch gets weight 1/n.
            factor = 1.0 / float(counter + 1)
        output, mean, var = BF.batch_norm_with_stats(
            input,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            skip_nonfinite=self.skip_nonfinite,
            caller=self._describe(),
            normalizer=normalizer,
        )
        # Counted only once the call has succeeded (torch counts before it can fail).
        if update and counter is not None:
            counter.add_(1)
        if use_batch_stats:
            self.batch_mean = mean.detach()
            self.batch_var = var.detach()
        return output

    def inverse(
        self,
        output: Tensor,
        *,
        mean: Tensor | None = None,
        var: Tensor | None = None,
        on_zero_weight: str = "raise",
    ) -> Tensor:
        r"""The input that this module mapped to ``output``: x = mu + sqrt(var + eps) / gamma * (y - beta).

        Uses the statistics the forward normalized with: in eval the running statistics (the
        batch's, ``batch_mean``/``batch_var``, when the module does not track running ones); in
        training the batch statistics of the latest training forward. ``mean``/``var`` given
        explicitly override them. The round trip ``inverse(forward(x))`` is exact to rounding.
        See :func:`batchnorm.functional.batch_norm_inverse` and ``docs/inversion.md``.

        Args:
            output: y, shape (N, C, \*) as the forward accepts.
            mean, var: per-channel statistics (C,) to use instead (keyword-only).
            on_zero_weight: ``"raise"`` (default): :class:`batchnorm.NonInvertibleError` naming
                the channels whose weight is zero; ``"mean"``: fill them with their mean.

        Raises:
            ValueError: no statistics to invert with (training mode, or eval without running
                statistics, before any forward that normalized with batch statistics).

        Example:
            >>> import torch, batchnorm
            >>> bn = batchnorm.BatchNorm2d(3)
            >>> x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
            >>> bn = bn.double()
            >>> torch.allclose(bn.inverse(bn(x)), x, rtol=0, atol=1e-12)
            True
        """
        who = f"{self._describe()}.inverse"
        if isinstance(self, LazyModuleMixin) and self.has_uninitialized_params():
            raise ValueError(
                f"{who}: expected a module initialized by a first forward, got an uninitialized lazy module"
            )
        self._check_input(output)
        if mean is None or var is None:
            use_running = not self.training and self.running_mean is not None and self.running_var is not None
            default_mean, default_var = (
                (self.running_mean, self.running_var) if use_running else (self.batch_mean, self.batch_var)
            )
            if default_mean is None or default_var is None:
                mode = "training mode" if self.training else "eval mode without running statistics"
                raise ValueError(
                    f"{who}: expected batch statistics from an earlier forward in {mode}, got none yet "
                    f"(batch_mean is None); run a forward first or pass mean= and var="
                )
            mean = default_mean if mean is None else mean
            var = default_var if var is None else var
        return BF.batch_norm_inverse_named(output, mean, var, self.weight, self.bias, self.eps, on_zero_weight, who)


class BatchNorm(_BatchNormBase):
    r"""Batch normalization over any input (N, C, \*) with at least 2 dimensions.

    .. math::
        y = \gamma \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    In training, mu and sigma^2 are the batch mean and biased variance of each channel, over
    every dimension but 1, and (when tracking) the running statistics are updated with
    ``running = (1 - momentum) * running + momentum * batch`` (the variance unbiased by
    M/(M-1), M values per channel); ``momentum=None`` gives the cumulative average. In eval,
    the running statistics are used, or the batch's when the module does not track them.
    Gradients come from a hand-derived backward (``docs/math.md``).

    Args:
        num_features: C, the number of channels (a positive int).
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: weight of the batch in the running statistics, or None for the cumulative
            average. Default: 0.1.
        affine: learn gamma (``weight``, ones) and beta (``bias``, zeros). Default: True.
        bias: with ``affine``, also learn beta (keyword-only, as in torch). Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` buffers. Default: True.
        skip_nonfinite: a channel whose batch statistics are NaN or Inf keeps its running
            statistics for that step (keyword-only). Default: True; False is torch's behaviour.

    Shape:
        input (N, C, \*), output the same shape, dtype and memory format.

    Example:
        >>> import torch, batchnorm
        >>> bn = batchnorm.BatchNorm(3)
        >>> y = bn(torch.randn(8, 3, 2, 2, 2, 2))
        >>> y.shape, bn.num_batches_tracked.item()
        (torch.Size([8, 3, 2, 2, 2, 2]), 1)
    """


class BatchNorm1d(_BatchNormBase):
    """:class:`BatchNorm` over 2D (N, C) or 3D (N, C, L) input, as ``torch.nn.BatchNorm1d``."""

    _input_dims = (2, 3)
    _input_layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNormBase):
    """:class:`BatchNorm` over 4D (N, C, H, W) input, as ``torch.nn.BatchNorm2d``."""

    _input_dims = (4,)
    _input_layout = "(N, C, H, W)"


class BatchNorm3d(_BatchNormBase):
    """:class:`BatchNorm` over 5D (N, C, D, H, W) input, as ``torch.nn.BatchNorm3d``."""

    _input_dims = (5,)
    _input_layout = "(N, C, D, H, W)"


class _LazyBatchNormBase(LazyModuleMixin, _BatchNormBase):
    """``num_features`` taken from dimension 1 of the first input, as torch's lazy modules."""

    weight: UninitializedParameter  # type: ignore[assignment]
    bias: UninitializedParameter | None  # type: ignore[assignment]
    cls_to_become: type[_BatchNormBase]

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        skip_nonfinite: bool = True,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        # affine and tracking off: no tensors that materialization would replace at once.
        super().__init__(0, eps, momentum, False, False, skip_nonfinite=skip_nonfinite, **factory_kwargs)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory_kwargs)
            self.bias = UninitializedParameter(**factory_kwargs) if bias else None
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory_kwargs)
            self.running_var = UninitializedBuffer(**factory_kwargs)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: Tensor) -> None:
        if self.has_uninitialized_params():
            # Validate before materializing, so that a bad first input leaves the module lazy.
            self._check_rank(input, type(self).__name__)
            self.num_features = input.shape[1]
            if self.affine:
                self.weight.materialize((self.num_features,))
                if self.bias is not None:
                    self.bias.materialize((self.num_features,))
            if self.track_running_stats:
                self.running_mean.materialize((self.num_features,))  # type: ignore[union-attr]
                self.running_var.materialize((self.num_features,))  # type: ignore[union-attr]
            self.reset_parameters()


class LazyBatchNorm1d(_LazyBatchNormBase, BatchNorm1d):
    """:class:`BatchNorm1d` whose ``num_features`` is inferred from the first input."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNormBase, BatchNorm2d):
    """:class:`BatchNorm2d` whose ``num_features`` is inferred from the first input."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNormBase, BatchNorm3d):
    """:class:`BatchNorm3d` whose ``num_features`` is inferred from the first input."""

    cls_to_become = BatchNorm3d
