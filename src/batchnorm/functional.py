"""Stateless batch norm: the math in one place, with torch's signatures.

The modules in :mod:`batchnorm.modules` own parameters and buffers and call these functions;
their docstrings hold the full description (see :class:`batchnorm.BatchNorm`).
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real

import torch
from torch import Tensor

from . import backends
from ._autograd import apply_batch_norm

__all__ = ["batch_norm", "batch_norm_stats"]

# (input, weight, bias, eval_mean, eval_var, eps) -> (output, mu, var): the normalization step of
# batch_norm_with_stats; training when eval_mean/eval_var are None. Fused variants (activation,
# convolution) pass their own.
Normalizer = Callable[
    [Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, float], tuple[Tensor, Tensor, Tensor]
]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    skip_nonfinite: bool = False,
) -> Tensor:
    r"""Batch normalization of ``input`` (N, C, \*) per channel, as ``torch.nn.functional.batch_norm``.

    In training, normalizes with the batch mean and biased variance over every dimension but 1
    and, when ``running_mean``/``running_var`` are given, updates them in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased batch variance.
    Otherwise normalizes with ``running_mean``/``running_var``. See :class:`batchnorm.BatchNorm`.

    Args:
        skip_nonfinite: keep the running statistics of a channel whose batch statistics are not
            finite (default False here, torch's behaviour; the modules default to True).

    Example:
        >>> import torch
        >>> from batchnorm.functional import batch_norm
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
        >>> batch_norm(x, None, None, training=True, eps=0.0)
        tensor([[-1., -1.],
                [ 1.,  1.]])
    """
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
    )
    return output


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
    momentum: float,
    eps: float,
    *,
    skip_nonfinite: bool,
    caller: str,
    normalizer: Normalizer = apply_batch_norm,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`batch_norm` that also returns the statistics it normalized with, (mu, var).

    Every argument is validated before anything is computed or updated, so a call that raises
    changes nothing. ``normalizer`` computes the output (default: plain batch norm); the
    validation and the running-statistics update stay here for every variant.
    """
    check_input(input, caller)
    check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, caller)
    if training:
        check_batch_size(input)
        output, mean, var = normalizer(input, weight, bias, None, None, eps)
        if running_mean is not None and running_var is not None and input.numel() > 0:
            update_running_stats(running_mean, running_var, mean, var, input, momentum, skip_nonfinite)
    else:
        output, mean, var = normalizer(input, weight, bias, running_mean, running_var, eps)
    return output, mean, var


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    input: Tensor,
    momentum: float,
    skip_nonfinite: bool,
) -> None:
    """running <- (1 - m) * running + m * batch, the variance unbiased by M / (M - 1).

    ``lerp_`` is that update in one in-place operation: start + m * (end - start).
    """
    count = input.numel() // input.shape[1]
    batch_mean = mean.to(running_mean.dtype)
    batch_var = (var * (count / (count - 1))).to(running_var.dtype)
    if skip_nonfinite:
        # A channel whose batch statistics are NaN/Inf keeps its running statistics this step:
        # lerp towards the running value itself is the identity.
        finite = torch.isfinite(batch_mean) & torch.isfinite(batch_var)
        batch_mean = torch.where(finite, batch_mean, running_mean)
        batch_var = torch.where(finite, batch_var, running_var)
    running_mean.lerp_(batch_mean, momentum)
    running_var.lerp_(batch_var, momentum)


# ---------------------------------------------------------------------------------------------
# Validation: each check names the caller, what it expected and what it was given.
# ---------------------------------------------------------------------------------------------


def check_input(input: object, caller: str, min_dim: int = 2) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{caller}: expected input to be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(
            f"{caller}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got dtype {input.dtype}"
        )
    if input.dim() < min_dim:
        raise ValueError(
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
        raise ValueError(
            f"{caller}: expected {name} of shape ({channels},) for input of shape "
            f"{tuple(input.shape)}, got shape {tuple(tensor.shape)}"
        )
    if tensor.device != input.device:
        raise ValueError(f"{caller}: expected {name} on the input's device {input.device}, got {tensor.device}")
    if not tensor.is_floating_point():
        raise TypeError(f"{caller}: expected a floating-point {name}, got dtype {tensor.dtype}")


def check_arguments(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    caller: str,
) -> None:
    for name, tensor in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_channel_vector(name, tensor, input, caller)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{caller}: expected running_mean and running_var both given or both None, got "
            f"running_mean={'None' if running_mean is None else 'a tensor'} and "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )
    if not training and running_mean is None:
        raise ValueError(
            f"{caller}: expected running_mean and running_var in evaluation mode (training=False), got None"
        )
    if not isinstance(training, bool):
        raise TypeError(f"{caller}: expected training to be a bool, got {type(training).__name__}")
    check_momentum(momentum, caller, allow_none=False)
    check_eps(eps, caller)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None:
            _check_parameter_dtype(name, tensor, input, caller)


def _check_parameter_dtype(name: str, tensor: Tensor, input: Tensor, caller: str) -> None:
    """Parameters share the input's dtype, except float32 parameters with float16/bfloat16 input."""
    if tensor.dtype == input.dtype or tensor.dtype == backends.compute_dtype(input):
        return
    raise TypeError(
        f"{caller}: expected {name} of dtype {input.dtype} (or float32 for float16/bfloat16 input) "
        f"to match input of dtype {input.dtype}, got {tensor.dtype}"
    )


def check_momentum(momentum: object, caller: str, allow_none: bool) -> None:
    if momentum is None and allow_none:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, Real) or not 0.0 <= float(momentum) <= 1.0:
        expected = "a number in [0, 1]" + (" or None (cumulative average)" if allow_none else "")
        raise ValueError(f"{caller}: expected momentum to be {expected}, got {momentum!r}")


def check_eps(eps: object, caller: str) -> None:
    if isinstance(eps, bool) or not isinstance(eps, Real) or not float(eps) >= 0.0:
        raise ValueError(f"{caller}: expected eps to be a non-negative number, got {eps!r}")
