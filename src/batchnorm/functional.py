"""Stateless batch norm: the math in one place, with torch's signatures.

The modules in :mod:`batchnorm.modules` own parameters and buffers and call these functions;
their docstrings hold the full description (see :class:`batchnorm.BatchNorm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from numbers import Real

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _native, backends
from ._autograd import apply_batch_norm
from ._masked import apply_masked_batch_norm, check_valid_count, resolve_mask, valid_count

__all__ = [
    "BatchNormArgumentError",
    "BatchNormDtypeError",
    "NonInvertibleError",
    "batch_norm",
    "batch_norm_inverse",
    "batch_norm_stats",
]

# (input, weight, bias, eval_mean, eval_var, eps) -> (output, mu, var): the normalization step of
# batch_norm_with_stats; training when eval_mean/eval_var are None. Fused variants (activation,
# convolution) pass their own.
Normalizer = Callable[
    [Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, float], tuple[Tensor, Tensor, Tensor]
]


class BatchNormArgumentError(ValueError, RuntimeError):
    """A tensor argument of the wrong shape or device, or one that is missing.

    A ``ValueError`` that is also the ``RuntimeError`` torch raises in the same situation, so that
    code written against torch's errors keeps catching it.
    """


class BatchNormDtypeError(TypeError, NotImplementedError):
    """An input or per-channel tensor of a dtype batch norm does not take.

    A ``TypeError`` that is also the ``NotImplementedError`` (a ``RuntimeError``) torch raises for
    such dtypes.
    """


class BatchNormRankError(ValueError, IndexError):
    """Input with fewer than two dimensions: a ``ValueError`` that is also the ``IndexError``
    torch raises when it looks for the channel dimension."""


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    skip_nonfinite: bool = False,
    num_batches_tracked: Tensor | None = None,
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
) -> Tensor:
    r"""Batch normalization of ``input`` (N, C, \*) per channel, as ``torch.nn.functional.batch_norm``.

    In training, normalizes with the batch mean and biased variance over every dimension but 1
    and, when ``running_mean``/``running_var`` are given, updates them in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased batch variance.
    Otherwise normalizes with ``running_mean``/``running_var``. See :class:`batchnorm.BatchNorm`.
    Tensor subclasses and proxies that override ``__torch_function__`` see the call, as with
    torch's function.

    Args:
        skip_nonfinite: keep the running statistics of a channel whose batch statistics are not
            finite (default False here, torch's behaviour; the modules default to True).
        num_batches_tracked: the module's batch counter (a 0-d integer tensor), for a stateless
            call that does all a module's forward does: when given and the running statistics
            are updated, it is incremented, and ``momentum=None`` averages cumulatively
            (factor 1 / count).
        mask: for padded, variable-length batches, a boolean tensor of the input's shape without
            the channel dimension ((N, L) for (N, C, L)), True where a value is real. Statistics
            are taken over the valid positions only (M of them per channel; the running variance
            is unbiased by M/(M-1)), padded positions come out as 0 with 0 gradient, whatever
            they hold. Default None: every value is real.
        lengths: instead of ``mask``, the valid length (N,) of each sample along the last
            dimension: position l of sample n is valid when l < lengths[n].

    Example:
        >>> import torch
        >>> from batchnorm.functional import batch_norm
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
        >>> batch_norm(x, None, None, training=True, eps=1e-12)
        tensor([[-1., -1.],
                [ 1.,  1.]])
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm,
            (input, running_mean, running_var, weight, bias),
            input,
            running_mean,
            running_var,
            weight=weight,
            bias=bias,
            training=training,
            momentum=momentum,
            eps=eps,
            skip_nonfinite=skip_nonfinite,
            num_batches_tracked=num_batches_tracked,
            mask=mask,
            lengths=lengths,
        )
    if mask is None and lengths is None:
        native = native_call(
            input, running_mean, running_var, weight, bias, training, momentum, eps, skip_nonfinite, num_batches_tracked
        )
        if native is not None:
            return native[0]
    if isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0:
        # torch returns an empty output for an empty 1-D input: there is no channel to normalize.
        check_input(input, "batch_norm", min_dim=1)
        return input.clone()
    output, _, _ = batch_norm_with_stats(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        skip_nonfinite=skip_nonfinite,
        caller="batch_norm",
        num_batches_tracked=num_batches_tracked,
        mask=mask,
        lengths=lengths,
    )
    return output


def native_call(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    skip_nonfinite: bool,
    num_batches_tracked: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`batch_norm_with_stats` as one native op per direction, after O(1) checks: (output,
    mu, var), or None where the general path must run.

    Plain CPU tensors of the native dtypes, the input in a layout the kernels walk, outside every
    transform and tracer (:func:`batchnorm.backends.native_call_allowed`), with arguments the
    general path would accept. Then the forward is ``batchnorm::forward_train`` (or
    ``forward_eval``), whose autograd and backward are native too (``csrc/autograd.cpp``), and
    the running statistics and counter are updated by ``batchnorm::update_running_stats_`` with
    :func:`update_running_stats`'s semantics. Anything else (a wrong shape, eps or dtype
    included) takes the general path, which validates it and names the problem.
    """
    if not (type(input) is Tensor and input.is_cpu):
        return None
    if not backends.native_call_allowed(input, weight, bias, running_mean, running_var):
        return None
    shape = input.shape
    dims = len(shape)
    compute = backends.NATIVE_COMPUTE_DTYPES.get(input.dtype)
    if dims < 2 or compute is None or not _native.dense_layout(input, dims):
        return None
    channels = (shape[1],)
    for tensor in (weight, bias, running_mean, running_var):
        if tensor is not None and (tensor.dtype != compute or not tensor.is_cpu or tensor.shape != channels):
            return None
    if (
        type(training) is not bool
        or type(eps) is not float
        or not (0.0 < eps < math.inf if training else 0.0 <= eps < math.inf)
        or not (momentum is None or (type(momentum) in (float, int) and -math.inf < momentum < math.inf))
    ):
        return None
    values_per_channel = input.numel() // shape[1]
    if values_per_channel < (2 if training else 1):  # training needs two values per channel
        return None
    if not training:
        if running_mean is None or running_var is None or running_mean.requires_grad or running_var.requires_grad:
            return None
        output, _ = _native.forward_eval_op(input, running_mean, running_var, weight, bias, eps)
        return output, running_mean, running_var
    update = running_mean is not None and running_var is not None
    if running_mean is None or running_var is None:
        if not (running_mean is None and running_var is None):
            return None
    elif (
        running_mean.requires_grad
        or running_var.requires_grad
        or (momentum is None and num_batches_tracked is None)
        or (num_batches_tracked is not None and num_batches_tracked.dtype != torch.int64)  # converted by hand
    ):
        return None
    output, mean, var, _ = _native.forward_train_op(input, weight, bias, eps)
    if update:
        _native.update_running_stats_op(
            running_mean, running_var, num_batches_tracked, mean, var, values_per_channel, momentum, skip_nonfinite
        )
    return output, mean, var


def batch_norm_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-channel mean and biased variance of ``input`` (N, C, \*) -> ((C,), (C,)).

    Statistics of float16/bfloat16 input are computed and returned in float32.

    Example:
        >>> import torch
        >>> from batchnorm.functional import batch_norm_stats
        >>> batch_norm_stats(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        (tensor([ 2., 20.]), tensor([  1., 100.]))
    """
    check_input(input, "batch_norm_stats")
    return backends.batch_stats(input)


def batch_norm_with_stats(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    *,
    skip_nonfinite: bool,
    caller: str,
    normalizer: Normalizer = apply_batch_norm,
    num_batches_tracked: Tensor | None = None,
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
    masked_normalizer: Callable[[Tensor], Normalizer] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`batch_norm` that also returns the statistics it normalized with, (mu, var).

    Every argument is validated before anything is computed or updated, so a call that raises
    changes nothing. ``normalizer`` computes the output (default: plain batch norm); the
    validation and the running-statistics update stay here for every variant. With ``mask`` or
    ``lengths`` (see :func:`batch_norm`), ``masked_normalizer(mask)`` computes the output instead
    (default: masked batch norm, :mod:`batchnorm._masked`).
    """
    check_input(input, caller)
    check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, caller)
    valid = resolve_mask(input, mask, lengths, caller)
    update = training and running_mean is not None and running_var is not None
    if momentum is None and update and num_batches_tracked is None:
        raise TypeError(
            f"{caller}: expected momentum to be a number, got None (a cumulative average needs num_batches_tracked)"
        )
    if valid is not None:
        if training:
            check_valid_count(input, valid)
        normalizer = (
            partial(apply_masked_batch_norm, mask=valid) if masked_normalizer is None else masked_normalizer(valid)
        )
    elif training:
        check_batch_size(input)
    output, mean, var = normalizer(
        input, weight, bias, None if training else running_mean, None if training else running_var, eps
    )
    if update:
        assert running_mean is not None and running_var is not None
        # M values per channel: the valid ones of a masked batch; none in an empty batch.
        count = 0 if input.numel() == 0 else input.numel() // input.shape[1] if valid is None else valid_count(valid)
        # Counted only once the call has succeeded (torch counts before it can fail).
        update_running_stats(running_mean, running_var, mean, var, count, momentum, skip_nonfinite, num_batches_tracked)
    return output, mean, var


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    skip_nonfinite: bool,
    num_batches_tracked: Tensor | None = None,
) -> None:
    """One training step of the running statistics, and of the batch counter when given.

    running <- (1 - m) * running + m * batch, the variance unbiased by M / (M - 1), where
    M = ``count`` is the number of values per channel the batch statistics came from; ``lerp_``
    is that update in place (start + m * (end - start)). m = ``momentum``, or 1 / n for the n-th
    batch counted (``momentum=None``: the cumulative average). ``count=0`` (an empty batch) leaves
    the statistics alone but counts the batch, as torch does.

    ``skip_nonfinite``: a channel whose batch statistics are NaN/Inf keeps its running statistics
    this step. With the cumulative average, a batch with any such channel is left out whole and
    not counted, so that every channel keeps averaging the same batches with the one counter.
    """
    if count > 0:
        batch_mean = mean.to(running_mean.dtype)
        batch_var = (var * (count / (count - 1))).to(running_var.dtype)
        finite = None
        if skip_nonfinite:
            finite = torch.isfinite(batch_mean).logical_and_(torch.isfinite(batch_var))
            if momentum is None and not bool(finite.all()):
                return
            # lerp towards the running value itself is the identity.
            batch_mean = torch.where(finite, batch_mean, running_mean)
            batch_var = torch.where(finite, batch_var, running_var)
        if momentum is None:
            if num_batches_tracked is None:
                raise TypeError(
                    "update_running_stats: expected num_batches_tracked for the cumulative average (momentum None), "
                    "got None"
                )
            factor = 1.0 / float(num_batches_tracked + 1)
        else:
            factor = float(momentum)
        if backends.functorch_active():
            # vmap has no batching rule for the fused forms (model ensembling batches the buffers).
            running_mean.mul_(1 - factor).add_(batch_mean, alpha=factor)
            running_var.mul_(1 - factor).add_(batch_var, alpha=factor)
        else:
            torch._foreach_lerp_([running_mean, running_var], [batch_mean, batch_var], factor)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)


# ---------------------------------------------------------------------------------------------
# Validation: each check names the caller, what it expected and what it was given. The argument
# domain is torch's; where torch would silently compute garbage (NaN or infinite eps and
# momentum) we refuse earlier (docs/compat.md).
# ---------------------------------------------------------------------------------------------


def check_input(input: object, caller: str, min_dim: int = 2) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{caller}: expected input to be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise BatchNormDtypeError(
            f"{caller}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got dtype {input.dtype}"
        )
    if input.dim() < min_dim:
        raise BatchNormRankError(
            f"{caller}: expected input of shape (N, C, *) with at least {min_dim} dimensions, "
            f"got {input.dim()}D input of shape {tuple(input.shape)}"
        )


def check_batch_size(input: Tensor) -> None:
    """Training needs two or more values per channel (the biased variance of one value is 0)."""
    size = input.size()
    values_per_channel = size[0]
    for extent in size[2:]:
        values_per_channel *= extent
    if values_per_channel == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _check_channel_vector(name: str, tensor: object, input: Tensor, caller: str) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{caller}: expected {name} to be a torch.Tensor or None, got {type(tensor).__name__}")
    channels = input.shape[1]
    if tensor.shape != (channels,):
        raise BatchNormArgumentError(
            f"{caller}: expected {name} of shape ({channels},) for input of shape "
            f"{tuple(input.shape)}, got shape {tuple(tensor.shape)}"
        )
    if tensor.device != input.device:
        raise BatchNormArgumentError(
            f"{caller}: expected {name} on the input's device {input.device}, got {tensor.device}"
        )
    if not tensor.is_floating_point():
        raise BatchNormDtypeError(f"{caller}: expected a floating-point {name}, got dtype {tensor.dtype}")


def check_arguments(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    caller: str,
) -> None:
    vectors = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    for name, tensor in vectors.items():
        _check_channel_vector(name, tensor, input, caller)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{caller}: expected running_mean and running_var both given or both None, got "
            f"running_mean={'None' if running_mean is None else 'a tensor'} and "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )
    if not isinstance(training, bool):
        raise TypeError(f"{caller}: expected training to be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise BatchNormArgumentError(
            f"{caller}: expected running_mean and running_var in evaluation mode (training=False), got None"
        )
    if momentum is not None:
        check_momentum(momentum, caller)
    check_eps(eps, caller, training=training)
    if input.numel() > 0:
        # As torch, which has nothing to compute for an empty batch and does not look at dtypes.
        _check_vector_dtypes(vectors, input, caller)
    if not training and _has_tangent(input) and (_has_tangent(running_mean) or _has_tangent(running_var)):
        raise BatchNormArgumentError(
            f"{caller}: expected no forward-mode tangent on running_mean or running_var when the input has one, "
            f"got one (batch_norm is not differentiable wrt running_mean and running_var)"
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (running_mean, running_var)):
        # torch refuses too: the running statistics are constants of the normalization.
        raise BatchNormArgumentError(
            f"{caller}: expected running_mean and running_var that do not require grad (batch norm is not "
            f"differentiable with respect to its running statistics), got a tensor that requires grad"
        )


def _has_tangent(tensor: Tensor | None) -> bool:
    """``tensor`` carries a forward-mode tangent (``torch.autograd.forward_ad``)."""
    if tensor is None or forward_ad._current_level < 0 or torch.compiler.is_compiling():
        return False
    return forward_ad.unpack_dual(tensor).tangent is not None  # type: ignore[no-untyped-call]


def _check_vector_dtypes(vectors: dict[str, Tensor | None], input: Tensor, caller: str) -> None:
    """Per-channel tensors share one dtype: the input's, or float32 for float16/bfloat16 input."""
    given = {name: t.dtype for name, t in vectors.items() if t is not None}
    allowed = {input.dtype, backends.compute_dtype(input)}
    if all(dtype in allowed for dtype in given.values()) and len(set(given.values())) <= 1:
        return
    described = ", ".join(f"{name} {dtype}" for name, dtype in given.items())
    raise BatchNormDtypeError(
        f"{caller}: expected weight, bias and running statistics all of dtype {input.dtype} "
        f"(or all float32 for float16/bfloat16 input) to match input of dtype {input.dtype}, got {described}"
    )


def check_momentum(momentum: object, caller: str) -> None:
    """Any finite number, as torch (values outside [0, 1] extrapolate; in eval it is unused)."""
    if not isinstance(momentum, Real):
        raise TypeError(f"{caller}: expected momentum to be a number, got {type(momentum).__name__}")
    if not math.isfinite(float(momentum)):
        raise ValueError(f"{caller}: expected a finite momentum, got {momentum!r}")


def check_eps(eps: object, caller: str, *, training: bool = False, sign: bool = True) -> None:
    """eps > 0 in training and eps >= 0 in eval, as torch (``sign=False``: not checked yet, as at
    a module's construction); finite (stricter than torch)."""
    if not isinstance(eps, Real):
        raise TypeError(f"{caller}: expected eps to be a number, got {type(eps).__name__}")
    if not math.isfinite(float(eps)):
        raise ValueError(f"{caller}: expected a finite eps, got {eps!r}")
    if not sign:
        return
    if training and eps <= 0:
        raise ValueError(
            f"{caller}: expected eps > 0 in training (batch_norm eps must be positive during training), got {eps}"
        )
    if eps < 0:
        raise ValueError(f"{caller}: expected eps >= 0 (batch_norm eps must be non-negative), got {eps}")


# ---------------------------------------------------------------------------------------------
# Inversion (docs/inversion.md): y = gamma * (x - mu) / sqrt(var + eps) + beta is, per channel,
# an affine map with slope gamma / sqrt(var + eps); it is a bijection exactly when gamma != 0.
# ---------------------------------------------------------------------------------------------

# |gamma| at or below this destroys its channel: the output no longer depends on the input.
ZERO_WEIGHT_TOL = 1e-12
ON_ZERO_WEIGHT = ("raise", "mean")


class NonInvertibleError(ValueError):
    """Batch norm cannot be inverted: some channels have a zero scale ``weight`` (|w| <= 1e-12).

    ``channels`` lists their indices.
    """

    def __init__(self, message: str, channels: list[int]) -> None:
        super().__init__(message)
        self.channels = channels


def batch_norm_inverse(
    output: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    on_zero_weight: str = "raise",
) -> Tensor:
    r"""The input x (N, C, \*) that batch norm with statistics ``mean``/``var`` maps to ``output``.

    .. math::
        x = \mu + \frac{\sqrt{\sigma^2 + \epsilon}}{\gamma} (y - \beta)

    per channel, the inverse of ``batch_norm(x, mean, var, weight, bias, eps=eps)``. The
    statistics are the ones the forward normalized with: the running ones in eval, the batch's
    (``module.batch_mean``/``batch_var``, biased variance) in training. See
    :meth:`batchnorm.BatchNorm.inverse` and ``docs/inversion.md``.

    Args:
        output: y, shape (N, C, \*).
        mean, var: mu and sigma^2 (C,), any floating dtype; var must be non-negative.
        weight, bias: gamma and beta (C,), or None (1 and 0).
        eps: added to the variance inside the square root. Default: 1e-5.
        on_zero_weight: a channel with |gamma| <= 1e-12 carries no information about its input.
            ``"raise"`` (default) raises :class:`NonInvertibleError` naming those channels;
            ``"mean"`` fills them with their mean mu, the best guess without information.

    Shape:
        output (N, C, \*) -> input of the same shape and dtype (float16/bfloat16 computed in float32).

    Example:
        >>> import torch
        >>> from batchnorm.functional import batch_norm, batch_norm_inverse
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
        >>> mean, var = torch.tensor([2.0, 20.0]), torch.tensor([1.0, 100.0])
        >>> y = batch_norm(x, mean, var, eps=0.0)
        >>> batch_norm_inverse(y, mean, var, eps=0.0)
        tensor([[ 1., 10.],
                [ 3., 30.]])
    """
    return batch_norm_inverse_named(output, mean, var, weight, bias, eps, on_zero_weight, "batch_norm_inverse")


def batch_norm_inverse_named(
    output: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    on_zero_weight: str,
    caller: str,
) -> Tensor:
    """:func:`batch_norm_inverse` whose errors name ``caller`` (a module's inverse names the module)."""
    check_input(output, caller)
    for name, statistic in (("mean", mean), ("var", var)):
        if statistic is None:
            raise TypeError(f"{caller}: expected {name} to be a torch.Tensor of shape (C,), got None")
    for name, vector in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        _check_channel_vector(name, vector, output, caller)
    _check_vector_dtypes({"weight": weight, "bias": bias}, output, caller)
    check_eps(eps, caller)
    if on_zero_weight not in ON_ZERO_WEIGHT:
        raise ValueError(
            f"{caller}: expected on_zero_weight to be one of {', '.join(map(repr, ON_ZERO_WEIGHT))}, "
            f"got {on_zero_weight!r}"
        )
    if bool((var < 0).any()):
        negative = torch.nonzero(var < 0).flatten().tolist()
        raise ValueError(f"{caller}: expected a non-negative var, got negative values in channels {negative}")
    cdt = backends.compute_dtype(output)
    zero = None
    if weight is not None:
        zero = weight.abs() <= ZERO_WEIGHT_TOL  # (C,)
        if on_zero_weight == "raise" and bool(zero.any()):
            channels = torch.nonzero(zero).flatten().tolist()
            raise NonInvertibleError(
                f"{caller}: batch norm is not invertible in channels {channels}: their weight is zero "
                f"(|w| <= {ZERO_WEIGHT_TOL:g}), so the output does not depend on the input there; "
                f"pass on_zero_weight='mean' to fill them with their mean",
                channels,
            )
    mu = mean.to(cdt)
    std = torch.sqrt(var.to(cdt) + eps)  # sqrt(sigma^2 + eps), (C,)
    # x = y * a' + b' with a' = sqrt(var + eps) / gamma, b' = mu - beta * a'; all (C,).
    if weight is None:
        slope = std
    else:
        gamma = weight.to(cdt)
        # A zero channel gets slope 0, so that it comes out as b' = mu (its mean).
        safe_gamma = gamma if zero is None else torch.where(zero, torch.ones_like(gamma), gamma)
        slope = std / safe_gamma
        if zero is not None:
            slope = torch.where(zero, torch.zeros_like(slope), slope)
    shift = mu if bias is None else mu - bias.to(cdt) * slope
    return backends.normalize(output, slope, shift)
