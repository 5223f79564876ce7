"""The native CPU kernels (``csrc/*.cpp``, built at install as
``batchnorm._C``).

The library registers four ``torch.library`` ops, ``torch.ops.batchnorm.forward_train``,
``forward_eval``, ``backward_train`` and ``backward_eval``, with CPU kernels and autograd for the
two forwards (their backward calls the backward ops; ``csrc/autograd.cpp``); their masked
counterparts ``masked_forward_train``, ``masked_forward_eval``, ``masked_backward_train`` and
``masked_backward_eval`` (contiguous input, :mod:`batchnorm._masked`); and
``update_running_stats_``. This module adds their fake (meta) kernels, so that ``torch.compile``
and ``torch.export`` trace them as opaque ops, and wraps them in the signatures of
:class:`batchnorm.backends.Kernels` (the masked ones with the mask after the input).

If the library cannot be loaded (no compiler at install time, an import error) :data:`AVAILABLE`
is False, :data:`LOAD_ERROR` says why, and :mod:`batchnorm.backends` warns once and runs the
Python kernels. ``BATCHNORM_DISABLE_NATIVE=1`` makes the library unavailable on purpose.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

LOAD_ERROR: str | None = None


def _load() -> bool:
    global LOAD_ERROR
    if os.environ.get("BATCHNORM_DISABLE_NATIVE") == "1":
        LOAD_ERROR = "disabled by BATCHNORM_DISABLE_NATIVE=1"
        return False
    try:
        from . import _C  # type: ignore[attr-defined]  # noqa: F401 - registers the ops on import
    except ImportError as error:
        LOAD_ERROR = f"{type(error).__name__}: {error}"
        return False
    return True


AVAILABLE = _load()


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _channel_vector(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=_compute_dtype(x))


if AVAILABLE:
    # Fake kernels: output shapes, dtypes and layouts without computing. y and dx keep x's
    # layout (the wrappers below only pass layouts the kernels keep), statistics are (C,) in the
    # compute dtype.

    @torch.library.register_fake("batchnorm::forward_train")  # type: ignore[untyped-decorator]
    def _forward_train_fake(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.empty_like(x), _channel_vector(x), _channel_vector(x), _channel_vector(x)

    @torch.library.register_fake("batchnorm::forward_eval")  # type: ignore[untyped-decorator]
    def _forward_eval_fake(
        x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor]:
        return torch.empty_like(x), _channel_vector(x)

    @torch.library.register_fake("batchnorm::backward_train")  # type: ignore[untyped-decorator]
    def _backward_train_fake(
        dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, need_input_grad: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx = torch.empty_like(x) if need_input_grad else x.new_empty((0,))
        return dx, _channel_vector(x), _channel_vector(x)

    @torch.library.register_fake("batchnorm::backward_eval")  # type: ignore[untyped-decorator]
    def _backward_eval_fake(
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        need_input_grad: bool,
        need_param_grads: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx = torch.empty_like(x) if need_input_grad else x.new_empty((0,))
        count = x.shape[1] if need_param_grads else 0
        grads = x.new_empty((count,), dtype=_compute_dtype(x))
        return dx, grads, torch.empty_like(grads)

    # The masked ops return y and dx contiguous, whatever x's layout (the wrappers below pass
    # contiguous input).

    @torch.library.register_fake("batchnorm::masked_forward_train")  # type: ignore[untyped-decorator]
    def _masked_forward_train_fake(
        x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return x.new_empty(x.shape), _channel_vector(x), _channel_vector(x), _channel_vector(x)

    @torch.library.register_fake("batchnorm::masked_forward_eval")  # type: ignore[untyped-decorator]
    def _masked_forward_eval_fake(
        x: Tensor, mask: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor]:
        return x.new_empty(x.shape), _channel_vector(x)

    @torch.library.register_fake("batchnorm::masked_backward_train")  # type: ignore[untyped-decorator]
    def _masked_backward_train_fake(
        dy: Tensor,
        x: Tensor,
        mask: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        need_input_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx = x.new_empty(x.shape if need_input_grad else (0,))
        return dx, _channel_vector(x), _channel_vector(x)

    @torch.library.register_fake("batchnorm::masked_backward_eval")  # type: ignore[untyped-decorator]
    def _masked_backward_eval_fake(
        dy: Tensor,
        x: Tensor,
        mask: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        need_input_grad: bool,
        need_param_grads: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx = x.new_empty(x.shape if need_input_grad else (0,))
        grads = x.new_empty((x.shape[1] if need_param_grads else 0,), dtype=_compute_dtype(x))
        return dx, grads, torch.empty_like(grads)

    @torch.library.register_fake("batchnorm::update_running_stats_")  # type: ignore[untyped-decorator]
    def _update_running_stats_fake(
        running_mean: Tensor,
        running_var: Tensor,
        num_batches_tracked: Tensor | None,
        mean: Tensor,
        var: Tensor,
        count: int,
        momentum: float | None,
        skip_nonfinite: bool,
    ) -> None:
        return None


def dense_layout(x: Tensor, dims: int) -> bool:
    """``x`` (``dims`` dimensions) is in a layout the kernels walk directly: contiguous, or
    channels_last for 4-D and 5-D input."""
    return (
        x.is_contiguous()
        or (dims == 4 and x.is_contiguous(memory_format=torch.channels_last))
        or (dims == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
    )


def _dense(x: Tensor) -> Tensor:
    """x itself in a layout the kernels walk directly, else a contiguous copy; so that the
    output's layout is the fake kernels' too."""
    return x if dense_layout(x, x.dim()) else x.contiguous()


if AVAILABLE:
    # The overloads themselves, for the module's native call (one lookup saved per call).
    forward_train_op = torch.ops.batchnorm.forward_train.default
    forward_eval_op = torch.ops.batchnorm.forward_eval.default
    update_running_stats_op = torch.ops.batchnorm.update_running_stats_.default


# The Kernels signatures (batchnorm.backends), one native call each.


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward: (y, mu, var, r); statistics (C,) in the compute dtype."""
    y, mean, var, invstd = torch.ops.batchnorm.forward_train(_dense(x), weight, bias, eps)
    return y, mean, var, invstd


def forward_eval(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Inference forward with given statistics: (y, r)."""
    y, invstd = torch.ops.batchnorm.forward_eval(_dense(x), mean, var, weight, bias, eps)
    return y, invstd


def backward_train(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, need_input_grad: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Training backward: (dx, dgamma, dbeta); dx None unless asked for."""
    dx, grad_weight, grad_bias = torch.ops.batchnorm.backward_train(
        dy, _dense(x), weight, mean, invstd, need_input_grad
    )
    return (dx if need_input_grad else None), grad_weight, grad_bias


def backward_eval(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    need_input_grad: bool,
    need_param_grads: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Inference backward: (dx, dgamma, dbeta), each None unless asked for."""
    dx, grad_weight, grad_bias = torch.ops.batchnorm.backward_eval(
        dy, _dense(x), weight, mean, invstd, need_input_grad, need_param_grads
    )
    if not need_param_grads:
        grad_weight = grad_bias = None
    return (dx if need_input_grad else None), grad_weight, grad_bias


# The masked kernels (csrc/masked.cpp): x contiguous (N, C, *), mask bool (N, *); y and dx 0 on
# padded positions. Callers pass contiguous input (batchnorm._masked.native_masked).


def masked_forward_train(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward over the valid positions: (y, mu, var, r); statistics (C,) in the compute dtype."""
    y, mean, var, invstd = torch.ops.batchnorm.masked_forward_train(x, mask, weight, bias, eps)
    return y, mean, var, invstd


def masked_forward_eval(
    x: Tensor, mask: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Inference forward with given statistics: (y, r)."""
    y, invstd = torch.ops.batchnorm.masked_forward_eval(x, mask, mean, var, weight, bias, eps)
    return y, invstd


def masked_backward_train(
    dy: Tensor, x: Tensor, mask: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, need_input_grad: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Training backward: (dx, dgamma, dbeta); dx None unless asked for."""
    dx, grad_weight, grad_bias = torch.ops.batchnorm.masked_backward_train(
        dy, x, mask, weight, mean, invstd, need_input_grad
    )
    return (dx if need_input_grad else None), grad_weight, grad_bias


def masked_backward_eval(
    dy: Tensor,
    x: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    need_input_grad: bool,
    need_param_grads: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Inference backward: (dx, dgamma, dbeta), each None unless asked for."""
    dx, grad_weight, grad_bias = torch.ops.batchnorm.masked_backward_eval(
        dy, x, mask, weight, mean, invstd, need_input_grad, need_param_grads
    )
    if not need_param_grads:
        grad_weight = grad_bias = None
    return (dx if need_input_grad else None), grad_weight, grad_bias
