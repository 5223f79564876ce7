"""Batch-norm modules: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d`` and the lazy ones.

Each class subclasses the matching torch class, so that ``isinstance(ours, torch.nn.BatchNorm2d)``
holds and code that finds batch norms by type keeps working. Torch's ``_NormBase`` owns the
parameters, buffers, ``reset_*`` and state-dict versioning; one base here
(:class:`_BatchNormBase`) owns the forward, and the dimension-specific classes override only the
expected input rank.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.modules.lazy import LazyModuleMixin

from . import backends
from . import functional as BF
from ._autograd import apply_batch_norm
from ._protocol import BatchNormProtocol, Equivalent, Kept

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


def check_hyperparameters(eps: object, momentum: object, caller: str) -> None:
    """At construction, the values every later forward would refuse: eps and momentum finite
    numbers (momentum also None). The sign of eps is checked by the forward, as torch does: a
    negative eps fails there, and 0 fails in training only."""
    BF.check_eps(eps, caller, sign=False)
    if momentum is not None:
        BF.check_momentum(momentum, caller)


def fx_leaf_call(module: nn.Module, input: object, **keywords: Any) -> Any:
    """Under ``torch.fx.symbolic_trace``, the node torch's own batch norm gives: one
    ``call_module`` of this module, which runs it as it is at run time (mode included). None
    when not tracing. ``keywords`` that are not None (``mask``, ``lengths``) go into the node."""
    if not torch.compiler.is_compiling() and isinstance(input, torch.fx.Proxy):
        tracer: Any = input.tracer
        given = {name: value for name, value in keywords.items() if value is not None}
        return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), given)
    return None


def batch_statistics_observable() -> bool:
    """Whether batch statistics may be kept on the module: not inside a torch.func transform,
    whose wrapped tensors must not escape it, nor under torch.export, which refuses tensor
    attributes assigned during a trace (they would not be part of the exported program)."""
    return not backends.functorch_active() and not torch.compiler.is_exporting()


def extends_constructor(
    base: type[nn.Module], *, after: str = "num_features"
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The ``__init__`` of a variant, declared once: ``base``'s whole constructor plus the variant's own
    arguments, which the decorated ``init(self, **own)`` receives once ``base.__init__`` has run.

    The variant's positional parameters go right after ``after`` (``GhostBatchNorm(4, 2)`` is
    ``virtual_batch_size=2``), its keyword-only ones after ``base``'s. The merged signature is the
    one ``inspect.signature`` and ``help()`` show, and the one calls are bound against, so a base
    argument added to ``base`` reaches every variant.
    """

    def decorate(init: Callable[..., None]) -> Callable[..., None]:
        base_parameters = list(inspect.signature(base.__init__).parameters.values())
        own_parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
        own_names = frozenset(parameter.name for parameter in own_parameters)
        own_positional = [p for p in own_parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        own_keyword = [p for p in own_parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        split = [parameter.name for parameter in base_parameters].index(after) + 1
        positional = [p for p in base_parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keyword = [p for p in base_parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        signature = inspect.Signature(
            [*positional[:split], *own_positional, *positional[split:], *keyword, *own_keyword]
        )

        @functools.wraps(init)
        def constructor(self: nn.Module, *args: Any, **kwargs: Any) -> None:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            del arguments["self"]
            own = {name: arguments.pop(name) for name in own_names}
            base.__init__(self, **arguments)
            init(self, **own)

        constructor.__signature__ = signature  # type: ignore[attr-defined]
        return constructor

    return decorate


class _BatchNormBase(BatchNormProtocol, _BatchNorm):
    """The forward shared by every batch-norm module (torch's ``_BatchNorm`` owns the state)."""

    # Expected input ranks, for the error message; subclasses narrow it.
    _input_dims: tuple[int, ...] | None = None
    _input_layout = "(N, C, *)"

    skip_nonfinite: bool
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
        name = type(self).__name__
        check_num_features(num_features, name)
        check_hyperparameters(eps, momentum, name)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self._init_extras(skip_nonfinite)

    def _init_extras(self, skip_nonfinite: bool) -> None:
        self.skip_nonfinite = skip_nonfinite
        # Statistics of the latest forward that normalized with batch statistics (every training
        # forward; eval without running statistics), detached, biased variance: for inverse().
        self.batch_mean = None
        self.batch_var = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to(device/dtype), .cuda(), .double() also move the kept batch statistics.
        result = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name in ("batch_mean", "batch_var"):
            value = getattr(self, name, None)
            if isinstance(value, Tensor):
                setattr(self, name, fn(value))
        return result

    def extra_repr(self) -> str:
        return str(super().extra_repr())  # type: ignore[no-untyped-call]

    # The tools' protocol (batchnorm._protocol): a plain batch norm synchronizes and freezes as
    # one; the variants override what differs. Imported here: those modules import this one.

    @classmethod
    def sync_equivalent(cls) -> Equivalent:
        from .sync import SyncBatchNorm

        return SyncBatchNorm

    @classmethod
    def frozen_equivalent(cls) -> Equivalent:
        from .variants import FrozenBatchNorm

        return FrozenBatchNorm

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

    def _check_input_dim(self, input: Tensor) -> None:
        self._check_rank(input, self._describe())

    def _check_input(self, input: object) -> None:
        """Type, rank, channels and device; raises before any state changes."""
        who = self._describe()
        self._check_rank(input, who)
        assert isinstance(input, Tensor)
        if input.shape[1] != self.num_features:
            raise BF.BatchNormArgumentError(
                f"{who}: expected input with {self.num_features} channels (dimension 1), got "
                f"{input.shape[1]} channels in input of shape {tuple(input.shape)}"
            )
        for tensor in (self.weight, self.running_mean):
            if tensor is not None and tensor.device != input.device:
                raise BF.BatchNormArgumentError(
                    f"{who}: expected input on the module's device {tensor.device}, got input on {input.device}"
                )

    def forward(self, input: Tensor, *, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        if mask is None and lengths is None:
            output = self._native_call(input)
            if output is not None:
                return output
        traced = fx_leaf_call(self, input, mask=mask, lengths=lengths)
        if traced is not None:
            return traced  # type: ignore[no-any-return]
        output, _, _ = self._batch_norm(input, apply_batch_norm, mask=mask, lengths=lengths)
        return output

    def _native_call(self, input: Tensor) -> Tensor | None:
        """The common call as one native op per direction (:func:`batchnorm.functional.native_call`)
        after this module's own O(1) checks (rank, channels); None where :meth:`_batch_norm` must
        run instead, which validates the input and names any problem."""
        if type(input) is not Tensor:
            return None
        shape = input.shape
        dims = len(shape)
        if not (dims >= 2 and (self._input_dims is None or dims in self._input_dims)) or shape[1] != self.num_features:
            return None
        # The arguments _batch_norm passes: running statistics when used or updated, the counter
        # when updated; batch statistics in training and in eval without running statistics.
        running_mean, running_var = self.running_mean, self.running_var
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        tracked = not self.training or self.track_running_stats
        result = BF.native_call(
            input,
            running_mean if tracked else None,
            running_var if tracked else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            self.skip_nonfinite,
            self.num_batches_tracked if self.training and self.track_running_stats else None,
        )
        if result is None:
            return None
        output, mean, var = result
        if use_batch_stats:
            # Plain attributes (not parameters or buffers): set without nn.Module's bookkeeping.
            self.__dict__["batch_mean"], self.__dict__["batch_var"] = mean, var
        return output

    def _batch_norm(
        self,
        input: Tensor,
        normalizer: BF.Normalizer,
        *,
        mask: Tensor | None = None,
        lengths: Tensor | None = None,
        masked_normalizer: Callable[[Tensor], BF.Normalizer] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The forward, with ``normalizer`` computing the output; returns (output, mu, var).

        With ``mask`` or ``lengths`` (:func:`batchnorm.functional.batch_norm`), statistics over
        the valid positions only, computed by ``masked_normalizer(mask)`` (default: masked
        batch norm).

        Fused variants (batch norm + activation, convolution + batch norm) pass their own
        normalizer and share the validation, the running statistics, the counter and
        ``batch_mean``/``batch_var`` from here. As torch: batch statistics in training and in
        eval without running statistics; running statistics updated only in training when tracked.
        """
        self._check_input(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        output, mean, var = BF.batch_norm_with_stats(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            skip_nonfinite=self.skip_nonfinite,
            caller=self._describe(),
            normalizer=normalizer,
            num_batches_tracked=self.num_batches_tracked if self.training and self.track_running_stats else None,
            mask=mask,
            lengths=lengths,
            masked_normalizer=masked_normalizer,
        )
        if use_batch_stats and batch_statistics_observable():
            self.batch_mean = mean.detach()
            self.batch_var = var.detach()
        return output, mean, var

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
            statistics for that step; with ``momentum=None`` such a batch is left out of the
            cumulative average whole, uncounted (keyword-only). Default: True; False is torch's
            behaviour.

    Forward (keyword-only, for padded variable-length batches):
        mask: a boolean tensor of the input's shape without dimension 1 ((N, L) for (N, C, L),
            (N, H, W) for (N, C, H, W)), True where a value is real. Training statistics are the
            mean and biased variance of the valid values only (M per channel; the running
            variance unbiased by M/(M-1)); eval normalizes the valid values with the running
            statistics. Padded positions come out as 0 and get 0 gradient, whatever they hold.
        lengths: instead of ``mask``, an integer tensor (N,): the first ``lengths[n]`` positions
            of the last dimension of sample n are real.

    Shape:
        input (N, C, \*), output the same shape, dtype and memory format.

    Example:
        >>> import torch, batchnorm
        >>> bn = batchnorm.BatchNorm(3)
        >>> y = bn(torch.randn(8, 3, 2, 2, 2, 2))
        >>> y.shape, bn.num_batches_tracked.item()
        (torch.Size([8, 3, 2, 2, 2, 2]), 1)
    """

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return Kept("torch has no batch norm for inputs of any rank")


class BatchNorm1d(_BatchNormBase, nn.BatchNorm1d):
    """:class:`BatchNorm` over 2D (N, C) or 3D (N, C, L) input, as ``torch.nn.BatchNorm1d``."""

    _input_dims = (2, 3)
    _input_layout = "(N, C) or (N, C, L)"

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return nn.BatchNorm1d


class BatchNorm2d(_BatchNormBase, nn.BatchNorm2d):
    """:class:`BatchNorm` over 4D (N, C, H, W) input, as ``torch.nn.BatchNorm2d``."""

    _input_dims = (4,)
    _input_layout = "(N, C, H, W)"

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return nn.BatchNorm2d


class BatchNorm3d(_BatchNormBase, nn.BatchNorm3d):
    """:class:`BatchNorm` over 5D (N, C, D, H, W) input, as ``torch.nn.BatchNorm3d``."""

    _input_dims = (5,)
    _input_layout = "(N, C, D, H, W)"

    @classmethod
    def torch_equivalent(cls) -> Equivalent:
        return nn.BatchNorm3d


class _LazyBatchNormBase:
    """``num_features`` taken from dimension 1 of the first input, as torch's lazy modules; placed
    first among the bases of a class that also derives from torch's ``LazyBatchNorm*d``."""

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
        check_hyperparameters(eps, momentum, type(self).__name__)
        _LazyNormBase.__init__(self, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)  # type: ignore[arg-type]
        _BatchNormBase._init_extras(self, skip_nonfinite)  # type: ignore[arg-type]

    def initialize_parameters(self, input: Tensor, **_masks: Any) -> None:
        module: Any = self
        # Validate before materializing, so that a bad first input leaves the module lazy.
        module._check_rank(input, type(self).__name__)
        if module.has_uninitialized_params():
            _LazyNormBase.initialize_parameters(module, input)
        else:
            # Neither affine nor tracking: nothing to materialize, but the channel count is still
            # learned, so that later inputs are checked against it.
            module.num_features = input.shape[1]


class LazyBatchNorm1d(_LazyBatchNormBase, BatchNorm1d, nn.LazyBatchNorm1d):
    """:class:`BatchNorm1d` whose ``num_features`` is inferred from the first input."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNormBase, BatchNorm2d, nn.LazyBatchNorm2d):
    """:class:`BatchNorm2d` whose ``num_features`` is inferred from the first input."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNormBase, BatchNorm3d, nn.LazyBatchNorm3d):
    """:class:`BatchNorm3d` whose ``num_features`` is inferred from the first input."""

    cls_to_become = BatchNorm3d
