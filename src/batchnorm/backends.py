"""Kernels for batch norm and the switch that picks which implementation runs them.

Every backend runs the same per-channel math (``docs/math.md``, notation below):

    x : input (N, C, *)           M  : values per channel, N * prod(*)
    mu, var : batch mean and biased variance per channel (C,)
    r = 1 / sqrt(var + eps)       gamma, beta : weight and bias (C,)
    y = (x - mu) * a + beta,  a = gamma * r                     (training: normalize + affine)
    y = x * a + b,  b = beta - mu * a                           (inference: one multiply-add)

and the backward in its compact per-channel form (training):

    s1 = sum(dy),  s2 = sum(dy * (x - mu))                     (the two reductions, one pass)
    dbeta = s1,  dgamma = s2 * r
    dx = dy * a + (x - mu) * p + q,  p = -a * r^2 * s2 / M,  q = -a * s1 / M

Backends:
    ``"eager"``    plain tensor operations, one pass per reduction and per elementwise map.
    ``"compiled"`` ``torch.compile`` of the same functions (fused C++ on CPU, Triton on GPU).
    ``"native"``   C++ kernels built at install (``csrc/batch_norm.cpp``, :mod:`batchnorm._native`):
                   CPU, float16/bfloat16/float32/float64; other inputs run eagerly.
    ``"auto"``     native on CPU where it is built, else the faster of eager and compiled for
                   the input at hand.

The active backend is process-wide: :func:`set_backend`, :func:`get_backend`,
:func:`using_backend` and the environment variable ``BATCHNORM_BACKEND``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import has_torch_function

from . import _native

BACKENDS = ("auto", "eager", "compiled", "native")
_ENV_VAR = "BATCHNORM_BACKEND"

# From this many elements up the compiled kernels win: below, torch.compile's fixed per-call
# cost (guards, argument handling) outweighs its fusion. Measured on 2 CPU cores: LeNet's
# (256, 16, 10, 10) layer is 0.85x torch compiled and 1.69x eager for forward+backward, and on
# (N, C) input the eager path's temporaries are page-faulted afresh on every call
# (docs/benchmarks.md).
_AUTO_COMPILED_MIN_NUMEL = 1 << 16


def channel_shape(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector (C,) against x (N, C, *): (1, C, 1, ..., 1)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def reduce_dims(x: Tensor) -> list[int]:
    """Every dimension of x (N, C, *) but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def compute_dtype(x: Tensor) -> torch.dtype:
    """float16/bfloat16 inputs are normalized with float32 statistics, as torch does."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# ---------------------------------------------------------------------------------------------
# Per-channel reductions, by memory layout
#
# torch's generic reductions over dims (0, 2, ...) of NCHW data, and over dim 0 of (R, C) data,
# run far below memory bandwidth (var_mean over (0, 2, 3) of the `cnn` input costs as much as
# torch's whole batch-norm forward). Viewed the right way each layout has a fast reduction:
#   "rows":    contiguous (N, C, *) is (N, C, L); reduce the contiguous L, then N.
#   "columns": (N, C) and channels_last (N, *, C) are (R, C) matrices; reduce the R rows.
# Anything else (strided views) takes the generic path.
# ---------------------------------------------------------------------------------------------


def functorch_active() -> bool:
    """A torch.func transform (vmap, grad, jvp, ...) is active. Under the compiler, which traces
    through transforms itself, False (the query would break the graph)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def is_batched(t: Tensor) -> bool:
    """``t`` carries a vmap dimension, as in ``gradcheck``'s batched-gradient check, which batches
    the backward without an active transform."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_batchedtensor(t) or torch._C._functorch.is_legacy_batchedtensor(t)


def _layout(x: Tensor) -> str:
    if functorch_active() or is_batched(x):
        # Strides are not observable under torch.func transforms (vmap refuses layout queries).
        return "generic"
    if x.dim() == 2:
        return "columns" if x.is_contiguous() else "generic"
    if x.is_contiguous():
        return "rows"
    if x.dim() in (4, 5) and x.is_contiguous(
        memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    ):
        return "columns"
    return "generic"


def _as_rows(x: Tensor) -> Tensor:
    length = math.prod(x.shape[2:])  # explicit: -1 is ambiguous for an empty batch
    return x.reshape(x.shape[0], x.shape[1], length)  # (N, C, *) -> (N, C, L), a view


def _as_columns(x: Tensor) -> Tensor:
    return x.movedim(1, -1).reshape(-1, x.shape[1])  # (N, C, *) channels-last -> (R, C), a view


def channel_sum(t: Tensor, layout: str) -> Tensor:
    """sum over every dimension but 1: (N, C, *) -> (C,)."""
    if layout == "columns":
        return _as_columns(t).sum(0)
    return t.sum(reduce_dims(t))


def channel_dot(a: Tensor, b: Tensor, layout: str) -> Tensor:
    """sum(a * b) over every dimension but 1: (N, C, *) x (N, C, *) -> (C,), without a temporary
    where the layout allows."""
    if layout == "rows":
        dots: Tensor = torch.linalg.vecdot(_as_rows(a), _as_rows(b), dim=-1)  # (N, C, L) -> (N, C)
        return dots.sum(0)  # (N, C) -> (C,)
    if layout == "columns":
        column_dots: Tensor = torch.linalg.vecdot(_as_columns(a), _as_columns(b), dim=0)  # (R, C) -> (C,)
        return column_dots
    return (a * b).sum(reduce_dims(a))


def channel_sumsq(t: Tensor, layout: str) -> Tensor:
    """sum(t^2) over every dimension but 1: (N, C, *) -> (C,)."""
    if layout == "rows":
        # Per-row Euclidean norms over the contiguous L are the fastest reduction torch has.
        norms: Tensor = torch.linalg.vector_norm(_as_rows(t), dim=-1)  # (N, C, L) -> (N, C)
        return norms.square().sum(0)  # (N, C) -> (C,)
    return channel_dot(t, t, layout)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x (N, C, *) -> ((C,), (C,)).

    ``var_mean`` in one call: differentiable twice, used for double backward and by the
    compiler, which fuses it into one pass.
    """
    var, mean = torch.var_mean(x.to(compute_dtype(x)), dim=reduce_dims(x), correction=0)
    return mean, var


# Below this many elements a tensor operation's fixed cost (a few microseconds) outweighs its
# memory traffic, and fewer, more general operations win.
_SMALL_NUMEL = 1 << 15


def centered_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(mu, var, c, delta) by the corrected two-pass algorithm (Chan, Golub & LeVeque 1983):

        m = sum(x)/M,  c = x - m,  delta = sum(c)/M,  mu = m + delta,
        var = sum(c^2)/M - delta^2,

    so that ``x - mu = c - delta`` (delta None: c is x - mu already). Not E[x^2] - E[x]^2,
    which loses every digit in float32 when |mu| >> sigma; delta recovers the rounding error of
    the first pass's float32 sum (torch's CPU kernel accumulates in float64 instead). Not for
    double backward (see :func:`batch_stats`).
    """
    xc = x.to(compute_dtype(x))
    layout = _layout(x)
    if x.numel() <= _SMALL_NUMEL and layout != "columns":
        # Per-call cost dominates small inputs: one var_mean instead of a dozen small operations
        # (but not over the rows of an (R, C) layout, where var_mean costs 200 us at (256, 120)).
        mean, var = batch_stats(x)
        return mean, var, xc - mean.view(channel_shape(x)), None
    count = x.numel() // x.shape[1]
    first_mean = channel_sum(xc, layout) / count
    centered = xc - first_mean.view(channel_shape(x))
    delta = channel_sum(centered, layout) / count
    var = channel_sumsq(centered, layout) / count - delta * delta
    return first_mean + delta, var.clamp_(min=0), centered, delta


def channel_scale(invstd: Tensor, weight: Tensor | None) -> Tensor:
    """a = gamma * r, (C,); r itself without affine."""
    return invstd if weight is None else weight.to(invstd.dtype) * invstd


def invstd_scale(var: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """r = 1/sqrt(var + eps), a = gamma * r; both (C,)."""
    invstd = torch.rsqrt(var + eps)
    return invstd, channel_scale(invstd, weight)


def scale_shift(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """r = 1/sqrt(var + eps), a = gamma * r, b = beta - mu * a; all (C,)."""
    invstd, scale = invstd_scale(var, weight, eps)
    return invstd, scale, _shift(mean, scale, bias)


def _shift(mean: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """beta - mu * a, one operation."""
    if bias is None:
        return -mean * scale
    return torch.addcmul(bias.to(scale.dtype), mean, scale, value=-1)


def normalize(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """y = x * a + b with (C,) vectors broadcast over x (N, C, *); keeps x's dtype and layout."""
    shape = channel_shape(x)
    xc = x.to(scale.dtype)
    y = torch.addcmul(shift.view(shape), xc, scale.view(shape))
    return y.to(x.dtype)


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward: returns (y, mu, var, r), statistics (C,) in the compute dtype.

    y = (x - mu) * a + beta: centering first keeps the digits that x * a + b cancels when
    |mu| >> sigma (the batch's own statistics make that case common, e.g. unnormalized pixels).
    """
    shape = channel_shape(x)
    if _transforms_active():
        # The compiler fuses var_mean and the elementwise map into two passes over x; torch.func
        # transforms need the out-of-place form.
        mean, var = batch_stats(x)
        invstd, scale = invstd_scale(var, weight, eps)
        centered = x.to(mean.dtype) - mean.view(shape)
        y = centered * scale.view(shape)
        if bias is not None:
            y = y + bias.to(mean.dtype).view(shape)
        return y.to(x.dtype), mean, var, invstd
    mean, var, centered, delta = centered_stats(x)
    invstd, scale = invstd_scale(var, weight, eps)
    # y = (c - delta) * a + beta = c * a + (beta - delta * a), written into the centered buffer,
    # which is ours, instead of a new tensor.
    if delta is not None:
        shift: Tensor | None = _shift(delta, scale, bias)
    else:
        shift = None if bias is None else bias.to(scale.dtype)
    if shift is None:
        y = centered.mul_(scale.view(shape))
    else:
        y = torch.addcmul(shift.view(shape), centered, scale.view(shape), out=centered)
    return y.to(x.dtype), mean, var, invstd


def forward_eval(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Inference forward with given statistics: returns (y, r)."""
    cdt = compute_dtype(x)
    invstd, scale, shift = scale_shift(mean.to(cdt), var.to(cdt), weight, bias, eps)
    return normalize(x, scale, shift), invstd


def _transforms_active() -> bool:
    """The compiler or a torch.func transform sees the computation: ``out=`` writes and in-place
    reuse of buffers, which they cannot follow, give way to the out-of-place formulation."""
    return torch.compiler.is_compiling() or functorch_active()


def _in_autograd_or_compiler(dy: Tensor) -> bool:
    """In-place tricks and layout views are for plain eager execution; under double backward
    (grad mode on inside backward), the compiler, a torch.func transform or a batched gradient
    ``dy``, the out-of-place formulation runs."""
    return torch.is_grad_enabled() or _transforms_active() or is_batched(dy)


def _sums_of_centered(dy: Tensor, centered: Tensor) -> tuple[Tensor, Tensor]:
    """s1 = sum(dy), s2 = sum(dy * c) with c = x - mu, both (N, C, *) -> (C,)."""
    if _in_autograd_or_compiler(dy):
        dims = reduce_dims(dy)
        return dy.sum(dims), (dy * centered).sum(dims)
    layout = _layout(dy) if _layout(dy) == _layout(centered) else "generic"
    return channel_sum(dy, layout), channel_dot(dy, centered, layout)


def grad_sums(dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """s1 = sum(dy), s2 = sum(dy * (x - mu)), both (N, C, *) -> (C,)."""
    cdt = mean.dtype
    return _sums_of_centered(dy.to(cdt), x.to(cdt) - mean.view(channel_shape(x)))


def input_grad_train(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    count: int,
    centered: Tensor | None = None,
) -> Tensor:
    """dx from the per-channel sums s1, s2 over ``count`` values (global counts for sync BN).

    dx = a * (dy - s1/M - (x - mu) * r^2 * s2/M) = dy * a + (x - mu) * p + q,
    p = -a * r^2 * s2 / M,  q = -a * s1 / M: one elementwise pass. Centering x before the
    product keeps the digits that x * p - mu * p would cancel when |mu| >> sigma.

    ``centered`` (x - mu, computed by the caller, who gives it up) is reused as dx's buffer.
    """
    cdt = mean.dtype
    shape = channel_shape(x)
    scale = channel_scale(invstd, weight)
    p = (-scale * invstd * invstd * sum_dy_xmu / count).view(shape)
    q = (-scale * sum_dy / count).view(shape)
    if centered is None:
        centered = x.to(cdt) - mean.view(shape)
    if _in_autograd_or_compiler(dy):
        grad_input = torch.addcmul(torch.addcmul(q, centered, p), dy.to(cdt), scale.view(shape))
    else:
        grad_input = torch.addcmul(q, centered, p, out=centered).addcmul_(dy.to(cdt), scale.view(shape))
    return grad_input.to(x.dtype)


def backward_train(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, need_input_grad: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Training backward: returns (dx, dgamma, dbeta); dgamma = s2 * r, dbeta = s1.

    x - mu is formed once, for s2 and then as dx's buffer.
    """
    cdt = mean.dtype
    centered = x.to(cdt) - mean.view(channel_shape(x))
    sum_dy, sum_dy_xmu = _sums_of_centered(dy.to(cdt), centered)
    grad_weight = sum_dy_xmu * invstd
    if not need_input_grad:
        return None, grad_weight, sum_dy
    count = x.numel() // x.shape[1]
    grad_input = input_grad_train(dy, x, weight, mean, invstd, sum_dy, sum_dy_xmu, count, centered)
    return grad_input, grad_weight, sum_dy


def backward_eval(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    need_input_grad: bool,
    need_param_grads: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Inference backward (statistics are constants): dx = dy * a, dgamma = s2 * r, dbeta = s1.

    Frozen parameters (fine-tuning with a BN in eval mode) skip the reduction pass entirely.
    """
    grad_weight = grad_bias = grad_input = None
    if need_param_grads:
        grad_bias, sum_dy_xmu = grad_sums(dy, x, mean)
        grad_weight = sum_dy_xmu * invstd
    if need_input_grad:
        scale = channel_scale(invstd, weight)
        grad_input = (dy.to(invstd.dtype) * scale.view(channel_shape(x))).to(x.dtype)
    return grad_input, grad_weight, grad_bias


@dataclass(frozen=True)
class Kernels:
    """One implementation of the four batch-norm kernels."""

    forward_train: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    forward_eval: Callable[..., tuple[Tensor, Tensor]]
    backward_train: Callable[..., tuple[Tensor | None, Tensor, Tensor]]
    backward_eval: Callable[..., tuple[Tensor | None, Tensor | None, Tensor | None]]


def _full_precision(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` with autocast off: statistics and normalization run in the compute dtype
    (float32 for float16/bfloat16 input) whatever autocast says, as torch's own batch norm does.
    (Autocast would run reductions such as ``vecdot`` in bfloat16 and lose about three digits.)"""

    @functools.wraps(kernel)
    def run(*args: Any) -> Any:
        device = next(arg.device.type for arg in args if isinstance(arg, Tensor))
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return kernel(*args)
        return kernel(*args)

    return run


_EAGER_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "forward_train": forward_train,
    "forward_eval": forward_eval,
    "backward_train": backward_train,
    "backward_eval": backward_eval,
}
EAGER = Kernels(**{name: _full_precision(kernel) for name, kernel in _EAGER_FUNCTIONS.items()})


def _code_copy(fn: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own: torch.compile keeps one cache (and one recompile
    budget) per code object, so each copy compiles and specializes independently."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{suffix}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class _CompiledKernels:
    """The eager kernels under ``torch.compile``, built on first use.

    One compiled copy per (kernel, rank, memory layout, dtype, device type): a model's layers
    differ in these, and sharing one cache would exhaust torch's recompile limit (after which
    torch runs the function uncompiled). The batch dimension is dynamic from the first call, so
    a new batch size reuses the compiled code; other extents are specialized (better loops)
    until they vary. Tensors are passed detached, so that whether the caller's input requires
    grad does not force a recompile. If compilation fails on this platform, every later call
    runs eagerly, after one warning.
    """

    def __init__(self) -> None:
        self._compiled: dict[tuple[object, ...], Callable[..., Any]] = {}
        self._failed = False

    def _kernel(self, kernel: str, x: Tensor) -> Callable[..., Any]:
        key = (kernel, x.dim(), _layout(x), x.dtype, x.device.type)
        compiled = self._compiled.get(key)
        if compiled is None:
            suffix = f"{x.dim()}d_{_layout(x)}_{str(x.dtype).removeprefix('torch.')}_{x.device.type}"
            compiled = self._compiled[key] = torch.compile(_code_copy(_EAGER_FUNCTIONS[kernel], suffix))
        return compiled

    def run(self, kernel: str, *args: Any) -> Any:
        eager = getattr(EAGER, kernel)
        if self._failed:
            return eager(*args)
        # The input is the first tensor of a forward kernel, the second (after dy) of a backward.
        x = args[0] if kernel.startswith("forward") else args[1]
        detached = [arg.detach() if isinstance(arg, Tensor) else arg for arg in args]
        try:
            # Building the compiled kernel fails on some platforms too (or warns, which
            # `python -W error` turns into an error): inside the guard, like running it.
            compiled = self._kernel(kernel, x)
            for arg in detached:
                if isinstance(arg, Tensor) and arg.dim() >= 2:
                    torch._dynamo.maybe_mark_dynamic(arg, 0)
            # Grad mode is part of a compiled graph's guards; the kernels never need autograd.
            with torch.no_grad():
                return compiled(*detached)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            self._failed = True
            warnings.warn(
                f"batchnorm: the 'compiled' backend failed on this platform "
                f"({type(error).__name__}: {error}); falling back to 'eager'.",
                RuntimeWarning,
                stacklevel=3,
            )
        return eager(*args)

    @property
    def failed(self) -> bool:
        return self._failed


_COMPILED = _CompiledKernels()


def _compiled_kernel(kernel: str) -> Callable[..., Any]:
    # Looks _COMPILED up at call time, so that tests can swap in a fresh instance.
    return _full_precision(lambda *args: _COMPILED.run(kernel, *args))


COMPILED = Kernels(
    _compiled_kernel("forward_train"),
    _compiled_kernel("forward_eval"),
    _compiled_kernel("backward_train"),
    _compiled_kernel("backward_eval"),
)

# Input dtype -> the dtype of its statistics and parameters on the native path (float16 and
# bfloat16 input is computed in float32 with float32 parameters).
NATIVE_COMPUTE_DTYPES = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}


def native_takes(*tensors: Tensor) -> bool:
    """The native kernels can run on these tensors: CPU, a floating dtype they implement, no vmap
    dimension (the ops have no batching rule). O(1) checks, no layout queries."""
    return all(t.device.type == "cpu" and t.dtype in NATIVE_COMPUTE_DTYPES and not is_batched(t) for t in tensors)


def _native_forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _native.forward_train(x, weight, bias, eps) if native_takes(x) else forward_train(x, weight, bias, eps)


def _native_forward_eval(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    kernel = _native.forward_eval if native_takes(x) else forward_eval
    return kernel(x, mean, var, weight, bias, eps)


def _native_backward_train(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, need_input_grad: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    # dy is checked too: gradcheck's batched-gradient check hands the backward a batched dy.
    kernel = _native.backward_train if native_takes(dy, x) else backward_train
    return kernel(dy, x, weight, mean, invstd, need_input_grad)


def _native_backward_eval(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    need_input_grad: bool,
    need_param_grads: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    kernel = _native.backward_eval if native_takes(dy, x) else backward_eval
    return kernel(dy, x, weight, mean, invstd, need_input_grad, need_param_grads)


def _aten_forward_eval(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Inference forward as torch's ``batch_norm`` (for exporters, which know that op): (y, r)."""
    y = torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    return y, torch.rsqrt(var + eps)


ONNX_EXPORT = Kernels(EAGER.forward_train, _aten_forward_eval, EAGER.backward_train, EAGER.backward_eval)
"""Under ONNX export: the eval forward as torch's batch norm, which the exporter emits as one
``BatchNormalization`` (that runtimes fold into the preceding convolution); the eager kernels
for the rest."""

NATIVE = Kernels(_native_forward_train, _native_forward_eval, _native_backward_train, _native_backward_eval)
"""The native kernels, for the inputs they take; the eager kernels for the rest."""


def native_call_allowed(*tensors: Tensor | None) -> bool:
    """A module may run its call as one native op (:meth:`batchnorm.BatchNorm._native_call`): the
    library is loaded and the backend is ``auto`` or ``native``, and nothing must see the call's
    parts: no compiler, torch.func transform, forward-mode level, ``jit.trace`` recording, or
    ``__torch_function__`` override (a mode, or a tensor subclass among ``tensors``)."""
    return (
        _native.AVAILABLE
        and (_selected or os.environ.get(_ENV_VAR) or "auto") in ("auto", "native")
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and forward_ad._current_level < 0
        and torch._C._get_tracing_state() is None
        and not has_torch_function(tuple(t for t in tensors if t is not None))
    )


_native_warned = False


def native_available() -> bool:
    """The native library is loaded. If not, warns once (RuntimeWarning) per process."""
    global _native_warned
    if _native.AVAILABLE:
        return True
    if not _native_warned:
        _native_warned = True
        warnings.warn(
            f"batchnorm: the native kernels are unavailable ({_native.LOAD_ERROR}); running the Python "
            "kernels instead. Reinstall with a C++ compiler (pip install --no-build-isolation -e .) to build them.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------

_selected: str | None = None


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown batchnorm backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """Name of the active backend: set by :func:`set_backend`, else ``$BATCHNORM_BACKEND``, else
    ``"auto"``."""
    if _selected is not None:
        return _selected
    env = os.environ.get(_ENV_VAR)
    if env is None or env == "":
        return "auto"
    try:
        return _check_name(env)
    except ValueError as error:
        raise ValueError(f"{_ENV_VAR}={env!r}: {error}") from None


def set_backend(name: str) -> str:
    """Select the backend for every later call; returns the previous name.

    Example:
        >>> import batchnorm
        >>> previous = batchnorm.set_backend("eager")
        >>> batchnorm.get_backend()
        'eager'
        >>> _ = batchnorm.set_backend(previous)
    """
    global _selected
    _check_name(name)
    previous = get_backend()
    _selected = name
    return previous


@contextlib.contextmanager
def using_backend(name: str) -> Iterator[None]:
    """Context manager: run the block with backend ``name``, then restore the previous one."""
    global _selected
    _check_name(name)
    saved = _selected
    _selected = name
    try:
        yield
    finally:
        _selected = saved


def onnx_exporting() -> bool:
    """Inside ``torch.onnx.export``. Both exporters trace, with torch.export or with torch.jit's
    tracer, so those cheap checks go first: torch.onnx's own query costs about 10 us a call."""
    if torch.compiler.is_exporting():
        return torch.onnx.is_in_onnx_export()
    if torch.compiler.is_compiling():
        return False
    return torch._C._get_tracing_state() is not None and torch.onnx.is_in_onnx_export()


def kernels_for(x: Tensor, *, create_graph: bool = False) -> Kernels:
    """The kernels that run batch norm on ``x`` under the active backend.

    Inside a ``torch.compile`` region, under torch.func transforms and for double backward the
    eager kernels run: the outer compiler fuses them itself, the native ops have no batching
    rule, and neither a compiled nor a native kernel can be differentiated twice. ``"auto"``
    takes the native kernels for CPU input where they are built. Under ``torch.export`` the
    native kernels run where they take the input (one graph node per call), and under ONNX
    export, whatever the backend, :data:`ONNX_EXPORT`.
    """
    if create_graph:
        return EAGER
    if onnx_exporting():
        # ONNX has a batch-norm operator, and exporters emit it for torch's batch norm only.
        return ONNX_EXPORT
    name = get_backend()
    if name == "eager":
        return EAGER
    if torch.compiler.is_exporting() and name != "compiled" and x.device.type == "cpu" and native_available():
        # torch.export keeps each native call as one opaque node (its fake kernel gives the
        # shapes), where the eager kernels would put a dozen tensor operations in the graph.
        return NATIVE
    if _transforms_active():
        return EAGER
    if name == "compiled":
        return COMPILED
    if x.device.type == "cpu" and native_available():
        return NATIVE
    return COMPILED if x.numel() >= _AUTO_COMPILED_MIN_NUMEL else EAGER
