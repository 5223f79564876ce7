"""The native kernels (csrc/batch_norm.cpp) against the eager reference, float64 math and torch."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

import batchnorm
from batchnorm import _native, backends

pytestmark = pytest.mark.skipif(not _native.AVAILABLE, reason=f"native kernels not built: {_native.LOAD_ERROR}")

EPS = 1e-5


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _strided(x: Tensor) -> Tensor:
    """Same values, strides no kernel walks directly: every other element of a wider tensor."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


# (name, shape, layout): extents that are not multiples of the vector width; few channels (groups
# of runs in parallel) and many (parallel over channels); runs longer than a block and runs so
# short that (N, C, L) is walked as an (N, C * L) matrix; N = 1 with spatial dims; large C with
# small N.
LAYOUT_CASES: list[tuple[str, tuple[int, ...], Callable[[Tensor], Tensor]]] = [
    ("2d", (37, 13), lambda x: x),
    ("2d_large_c_small_n", (2, 1030), lambda x: x),
    ("3d_few_channels", (5, 3, 19), lambda x: x),
    ("3d_few_channels_many_runs", (300, 3, 20), lambda x: x),
    ("3d_runs_longer_than_a_block", (2, 3, 5000), lambda x: x),
    ("4d_short_runs", (16, 40, 2, 2), lambda x: x),
    ("4d_many_channels", (3, 17, 5, 7), lambda x: x),
    ("4d_n1", (1, 6, 9, 11), lambda x: x),
    ("4d_large_c_small_n", (2, 1030, 2, 3), lambda x: x),
    ("4d_channels_last", (3, 11, 5, 7), _channels_last),
    ("4d_channels_last_many_rows", (16, 3, 17, 9), _channels_last),
    ("5d_channels_last_3d", (2, 9, 3, 4, 5), _channels_last),
    ("5d", (2, 9, 3, 4, 5), lambda x: x),
    ("2d_transposed", (13, 37), lambda x: x.t().contiguous().t()),
    ("4d_strided", (3, 5, 4, 7), _strided),
]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def _inputs(shape: tuple[int, ...], layout: Callable[[Tensor], Tensor], dtype: torch.dtype) -> tuple[Tensor, ...]:
    x = layout((torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype))
    dy = layout(torch.randn(x.shape, dtype=torch.float64).to(dtype))
    weight = torch.rand(x.shape[1], dtype=torch.float64).add(0.5).to(backends.compute_dtype(x))
    bias = torch.randn(x.shape[1], dtype=torch.float64).to(backends.compute_dtype(x))
    return x, dy, weight, bias


def _close(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: {"rtol": 1e-10, "atol": 1e-10},
        torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    }.get(dtype, {"rtol": 1e-2, "atol": 1e-2})


def _compare_all_kernels(x: Tensor, dy: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    tol = _close(x.dtype)
    stat_tol = _close(backends.compute_dtype(x))
    ours = backends.NATIVE.forward_train(x, weight, bias, EPS)
    ref = backends.EAGER.forward_train(x, weight, bias, EPS)
    assert ours[0].dtype == x.dtype and ours[0].shape == x.shape
    assert ours[1].dtype == backends.compute_dtype(x)
    torch.testing.assert_close(ours[0], ref[0], **tol)
    for a, b in zip(ours[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b, **stat_tol)
    _, mean, var, invstd = ref
    y_eval, r_eval = backends.NATIVE.forward_eval(x, mean, var, weight, bias, EPS)
    y_ref, r_ref = backends.EAGER.forward_eval(x, mean, var, weight, bias, EPS)
    torch.testing.assert_close(y_eval, y_ref, **tol)
    torch.testing.assert_close(r_eval, r_ref, **stat_tol)
    for need_input in (True, False):
        grads = backends.NATIVE.backward_train(dy, x, weight, mean, invstd, need_input)
        refs = backends.EAGER.backward_train(dy, x, weight, mean, invstd, need_input)
        assert (grads[0] is None) == (not need_input)
        if need_input:
            assert grads[0] is not None and refs[0] is not None
            assert grads[0].dtype == x.dtype
            torch.testing.assert_close(grads[0], refs[0], **tol)
        torch.testing.assert_close(grads[1], refs[1], **stat_tol)
        torch.testing.assert_close(grads[2], refs[2], **stat_tol)
        for need_params in (True, False):
            got = backends.NATIVE.backward_eval(dy, x, weight, mean, invstd, need_input, need_params)
            want = backends.EAGER.backward_eval(dy, x, weight, mean, invstd, need_input, need_params)
            for a, b in zip(got, want, strict=True):
                assert (a is None) == (b is None)
                if a is not None and b is not None:
                    torch.testing.assert_close(a, b, **(tol if a.shape == x.shape else stat_tol))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("name", "shape", "layout"), LAYOUT_CASES, ids=[case[0] for case in LAYOUT_CASES])
def test_kernels_match_eager(
    threads: int, dtype: torch.dtype, name: str, shape: tuple[int, ...], layout: Callable[[Tensor], Tensor]
) -> None:
    x, dy, weight, bias = _inputs(shape, layout, dtype)
    _compare_all_kernels(x, dy, weight, bias)


@pytest.mark.parametrize("affine", ["weight_and_bias", "weight_only", "not_affine"])
def test_without_parameters(affine: str) -> None:
    x, dy, weight, bias = _inputs((4, 6, 5, 3), lambda x: x, torch.float64)
    _compare_all_kernels(
        x, dy, weight if affine != "not_affine" else None, bias if affine == "weight_and_bias" else None
    )


def test_layout_is_kept() -> None:
    x = _channels_last(torch.randn(3, 11, 5, 7))
    y, *_ = backends.NATIVE.forward_train(x, None, None, EPS)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # dy in another layout than x (here an expanded scalar, as from y.sum().backward()).
    dy = torch.ones(()).expand(x.shape)
    _, mean, _, invstd = backends.EAGER.forward_train(x, None, None, EPS)
    got = backends.NATIVE.backward_train(dy, x, None, mean, invstd, True)
    want = backends.EAGER.backward_train(dy, x, None, mean, invstd, True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_half_input_computes_in_float32(dtype: torch.dtype, memory_format: torch.memory_format) -> None:
    x, dy, weight, bias = _inputs((4, 10, 5, 3), lambda t: t.contiguous(memory_format=memory_format), dtype)
    _compare_all_kernels(x, dy, weight, bias)
    y, mean, var, invstd = backends.NATIVE.forward_train(x, weight, bias, EPS)
    assert (y.dtype, mean.dtype, var.dtype, invstd.dtype) == (dtype, torch.float32, torch.float32, torch.float32)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_float32_far_from_zero_matches_float64(threads: int, memory_format: torch.memory_format) -> None:
    """|mu| >> sigma: mean 1e4, standard deviation 1e-1. E[x^2] - E[x]^2 in float32 would lose
    every digit of the variance; the corrected two-pass algorithm keeps them."""
    x = (1e4 + 0.1 * torch.randn(32, 8, 24, 24, dtype=torch.float64)).float().contiguous(memory_format=memory_format)
    y, mean, var, _ = backends.NATIVE.forward_train(x, None, None, EPS)
    x64 = x.double()
    var64, mean64 = torch.var_mean(x64, dim=(0, 2, 3), correction=0)
    assert ((mean.double() - mean64).abs() / mean64.abs()).max() < 1e-7
    assert ((var.double() - var64).abs() / var64).max() < 1e-4
    y64 = (x64 - mean64.view(1, -1, 1, 1)) / (var64.view(1, -1, 1, 1) + EPS).sqrt()
    assert (y.double() - y64).abs().max() < 5e-3


def test_empty_batch() -> None:
    x = torch.randn(0, 4, 3)
    y, mean, var, invstd = torch.ops.batchnorm.forward_train(x, None, None, EPS)
    assert y.shape == x.shape and mean.isnan().all() and var.isnan().all()
    dx, dgamma, dbeta = torch.ops.batchnorm.backward_train(x, x, None, mean, invstd, True)
    assert dx.shape == x.shape and (dgamma == 0).all() and (dbeta == 0).all()
    with batchnorm.using_backend("native"):
        ours, theirs = batchnorm.BatchNorm1d(4), nn.BatchNorm1d(4)
        inp = torch.randn(0, 4, 3, requires_grad=True)
        out = ours(inp)
        out.sum().backward()
        torch.testing.assert_close(out, theirs(inp))
        assert ours.num_batches_tracked.item() == 1
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_module_float64(training: bool) -> None:
    module = batchnorm.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        module.running_var.uniform_(0.5, 2.0)
    module.train(training)
    module.momentum = 0.0  # repeated calls leave the running statistics as they are
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    with batchnorm.using_backend("native"):
        assert backends.kernels_for(x) is backends.NATIVE
        assert torch.autograd.gradcheck(lambda inp: module(inp), (x,))
        assert torch.autograd.gradcheck(
            lambda inp, w, b: batchnorm.functional.batch_norm(
                inp, module.running_mean, module.running_var, w, b, training=training, momentum=0.0
            ),
            (x, module.weight, module.bias),
        )


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_module_matches_torch(memory_format: torch.memory_format) -> None:
    ours, theirs = batchnorm.BatchNorm2d(5), nn.BatchNorm2d(5)
    x = torch.randn(6, 5, 7, 3).contiguous(memory_format=memory_format)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(x.shape)
    with batchnorm.using_backend("native"):
        y1 = ours(x1)
        (y1 * dy).sum().backward()
    y2 = theirs(x2)
    (y2 * dy).sum().backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert ours.weight.grad is not None and theirs.weight.grad is not None
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    with batchnorm.using_backend("native"):
        torch.testing.assert_close(ours(x), theirs(x))


def test_auto_takes_native_on_cpu() -> None:
    x = torch.randn(8, 4)
    assert backends.kernels_for(x) is backends.NATIVE
    with batchnorm.using_backend("native"):
        assert backends.kernels_for(x) is backends.NATIVE
        assert backends.kernels_for(x, create_graph=True) is backends.EAGER
    # Inputs the native kernels do not take (here a vmap dimension) run the eager kernels.
    assert not backends.native_takes(torch.zeros(2, 3, dtype=torch.int64))


def test_ops_pass_torch_library_checks() -> None:
    """Schema, fake kernels (shapes, dtypes, strides) and tracing by AOT autograd."""
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    x = torch.randn(4, 5, 3, 2)
    x_cl = _channels_last(x)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    _, mean, var, invstd = backends.EAGER.forward_train(x, w, b, EPS)
    for inp in (x, x_cl, x.half()):
        torch.library.opcheck(torch.ops.batchnorm.forward_train, (inp, w, b, EPS), test_utils=utils)
        torch.library.opcheck(torch.ops.batchnorm.forward_eval, (inp, mean, var, w, None, EPS), test_utils=utils)
        for need in (True, False):
            torch.library.opcheck(
                torch.ops.batchnorm.backward_train, (inp, inp, w, mean, invstd, need), test_utils=utils
            )
            torch.library.opcheck(
                torch.ops.batchnorm.backward_eval, (inp, inp, w, mean, invstd, need, not need), test_utils=utils
            )


def test_ops_compile_as_opaque_calls() -> None:
    def step(x: Tensor) -> Tensor:
        y, *_ = torch.ops.batchnorm.forward_train(x, None, None, EPS)
        return y.relu()

    x = torch.randn(4, 6, 5)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), step(x))


def test_unavailable_library_warns_once_and_runs_python_kernels() -> None:
    script = """
import warnings
import torch
from torch import nn
import batchnorm
from batchnorm import _native, backends
assert not _native.AVAILABLE
x = torch.randn(8, 3, 4, 4, requires_grad=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    module = batchnorm.BatchNorm2d(3)
    for _ in range(3):
        y = module(x)
        y.sum().backward()
    with batchnorm.using_backend("native"):
        module(x)
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1, messages
assert "native kernels are unavailable" in messages[0], messages
torch.testing.assert_close(y, nn.BatchNorm2d(3)(x))
assert backends.kernels_for(x) is not backends.NATIVE
print("ok")
"""
    env = {**os.environ, "BATCHNORM_DISABLE_NATIVE": "1"}
    env.pop("BATCHNORM_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
