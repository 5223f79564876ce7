"""The module's common call as one native op per direction (``BatchNorm._native_call``,
csrc/autograd.cpp) against the general path it stands for: the same outputs, gradients, running
statistics, counter and kept batch statistics; taken exactly where nothing must see its parts."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

import batchnorm
from batchnorm import _native, backends

pytestmark = pytest.mark.skipif(not _native.AVAILABLE, reason=f"native kernels not built: {_native.LOAD_ERROR}")


@pytest.fixture
def general_path(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Any]:
    """A context in which every module takes the general path (same native kernels)."""

    class Context:
        def __enter__(self) -> None:
            monkeypatch.setattr(backends, "native_call_allowed", lambda *tensors: False)

        def __exit__(self, *exc: object) -> None:
            monkeypatch.undo()

    return Context


def _native_node(output: Tensor) -> bool:
    return output.grad_fn is not None and "batchnorm::BatchNorm" in output.grad_fn.name()


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


# (name, module factory, input shape, layout, input dtype): the configurations of a module call.
CASES: list[tuple[str, Callable[[], torch.nn.Module], tuple[int, ...], Callable[[Tensor], Tensor], torch.dtype]] = [
    ("2d", lambda: batchnorm.BatchNorm1d(7), (9, 7), lambda x: x, torch.float32),
    ("3d", lambda: batchnorm.BatchNorm1d(5), (4, 5, 6), lambda x: x, torch.float32),
    ("4d", lambda: batchnorm.BatchNorm2d(6), (3, 6, 5, 4), lambda x: x, torch.float32),
    ("4d_channels_last", lambda: batchnorm.BatchNorm2d(6), (3, 6, 5, 4), _channels_last, torch.float32),
    ("5d_channels_last_3d", lambda: batchnorm.BatchNorm3d(4), (2, 4, 3, 2, 5), _channels_last, torch.float32),
    ("any_rank", lambda: batchnorm.BatchNorm(3), (2, 3, 2, 2, 2, 2), lambda x: x, torch.float32),
    ("float64", lambda: batchnorm.BatchNorm2d(6, dtype=torch.float64), (3, 6, 5, 4), lambda x: x, torch.float64),
    ("bfloat16_input", lambda: batchnorm.BatchNorm2d(6), (3, 6, 5, 4), lambda x: x, torch.bfloat16),
    ("float16_input", lambda: batchnorm.BatchNorm1d(5), (8, 5, 3), lambda x: x, torch.float16),
    ("momentum_none", lambda: batchnorm.BatchNorm1d(5, momentum=None), (4, 5, 6), lambda x: x, torch.float32),
    ("not_affine", lambda: batchnorm.BatchNorm1d(5, affine=False), (4, 5, 6), lambda x: x, torch.float32),
    ("no_bias", lambda: batchnorm.BatchNorm1d(5, bias=False), (4, 5, 6), lambda x: x, torch.float32),
    (
        "not_tracking",
        lambda: batchnorm.BatchNorm2d(6, track_running_stats=False),
        (3, 6, 5, 4),
        lambda x: x,
        torch.float32,
    ),
]


def _randomized(module: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in (*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return module


def _run(module: torch.nn.Module, x: Tensor, steps: int) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Training steps (forward, backward), then an eval forward with backward: every output and
    gradient, and the state at the end."""
    results = []
    for _ in range(steps):
        xi = x.detach().clone().requires_grad_()
        y = module(xi)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view(y.shape).to(y.dtype))
        results += [y, xi.grad]
    module.eval()
    xi = x.detach().clone().requires_grad_()
    y = module(xi)
    y.sum().backward()
    results += [y, xi.grad]
    results += [p.grad for p in module.parameters()]
    state = {name: t.clone() for name, t in module.state_dict().items()}
    for name in ("batch_mean", "batch_var"):
        kept = getattr(module, name)
        if kept is not None:
            state[name] = kept
    return results, state


@pytest.mark.parametrize(("name", "factory", "shape", "layout", "dtype"), CASES, ids=[case[0] for case in CASES])
def test_native_call_equals_the_general_path(
    general_path: Callable[[], Any],
    name: str,
    factory: Callable[[], torch.nn.Module],
    shape: tuple[int, ...],
    layout: Callable[[Tensor], Tensor],
    dtype: torch.dtype,
) -> None:
    x = layout(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype))
    fast = _randomized(factory())
    general = copy.deepcopy(fast)
    assert _native_node(copy.deepcopy(fast)(x.detach().clone().requires_grad_())), f"{name}: not taken"
    fast_results, fast_state = _run(fast, x, steps=3)
    with general_path():
        assert not _native_node(copy.deepcopy(general)(x.detach().clone().requires_grad_()))
        general_results, general_state = _run(general, x, steps=3)
    # The same kernels; the backward's r = 1 / sqrt(var + eps) is the forward's (float64-rounded)
    # on the native call and recomputed in float32 on the general path: rounding apart.
    for ours, reference in zip(fast_results, general_results, strict=True):
        assert ours.dtype == reference.dtype and ours.stride() == reference.stride()
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert fast_state.keys() == general_state.keys()
    for key, value in fast_state.items():
        torch.testing.assert_close(value, general_state[key], rtol=1e-6, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "momentum_none"])
def test_nonfinite_batches_native_and_general(general_path: Callable[[], Any], momentum: float | None) -> None:
    """A NaN channel keeps its running statistics; with the cumulative average the whole batch is
    left out and not counted, so that the average is exactly that of the finite batches."""
    batches = [torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    batches[1][0, 2, 0] = math.nan
    results = []
    for use_general in (False, True):
        bn = batchnorm.BatchNorm1d(3, momentum=momentum)
        with general_path() if use_general else torch.no_grad():
            for batch in batches:
                bn(batch)
        results.append(bn)
    fast, general = results
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fast, key), getattr(general, key), rtol=1e-6, atol=1e-7)
    finite = [b for i, b in enumerate(batches) if i != 1]
    if momentum is None:
        assert int(fast.num_batches_tracked) == 3
        # Cumulative average of the finite batches, in float64.
        expected_mean = torch.stack([b.double().mean((0, 2)) for b in finite]).mean(0)
        expected_var = torch.stack([b.double().var((0, 2), unbiased=True) for b in finite]).mean(0)
        torch.testing.assert_close(fast.running_mean, expected_mean.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.running_var, expected_var.float(), rtol=1e-5, atol=1e-6)
    else:
        assert int(fast.num_batches_tracked) == 4
        assert torch.isfinite(fast.running_mean).all() and torch.isfinite(fast.running_var).all()


def test_nonfinite_batch_counted_with_skip_off() -> None:
    """skip_nonfinite=False is torch's behaviour: the NaN enters both running statistics."""
    x = torch.tensor([[1.0, math.nan], [2.0, 3.0]])
    ours = batchnorm.BatchNorm1d(2, momentum=None, skip_nonfinite=False)
    theirs = torch.nn.BatchNorm1d(2, momentum=None)
    with torch.no_grad():
        ours(x)
        theirs(x)
    assert int(ours.num_batches_tracked) == 1
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, equal_nan=True)
    torch.testing.assert_close(ours.running_var, theirs.running_var, equal_nan=True)
    assert math.isnan(float(ours.running_var[1]))


def test_double_backward_and_batched_gradients_through_the_native_call() -> None:
    bn = _randomized(batchnorm.BatchNorm2d(3, dtype=torch.float64))
    for training in (True, False):
        bn.train(training)
        x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
        assert _native_node(bn(x))
        torch.autograd.gradcheck(bn, (x,), check_batched_grad=True)
        torch.autograd.gradgradcheck(bn, (x,), check_batched_grad=True)


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _forward_ad_level() -> Iterator[None]:
    with forward_ad.dual_level():
        yield


# (name, context): where something must see the call's parts, the general path runs.
GENERAL_ROUTES: list[tuple[str, Callable[[], Any]]] = [
    ("eager_backend", lambda: batchnorm.using_backend("eager")),
    ("compiled_backend", lambda: batchnorm.using_backend("compiled")),
    ("forward_ad_level", _forward_ad_level),
    ("torch_function_mode", _PassThrough),
]


@pytest.mark.parametrize(("name", "context"), GENERAL_ROUTES, ids=[route[0] for route in GENERAL_ROUTES])
def test_general_path_where_the_call_must_be_seen(name: str, context: Callable[[], Any]) -> None:
    bn = batchnorm.BatchNorm1d(3)
    x = torch.randn(4, 3, requires_grad=True)
    assert _native_node(bn(x))
    with context():
        y = bn(x)
    assert not _native_node(y), name


def test_general_path_for_inputs_it_must_check() -> None:
    """Anything the general path would refuse or copy takes it (and is refused there, unchanged)."""
    bn = batchnorm.BatchNorm2d(3)
    with pytest.raises(ValueError, match="expected input with 3 channels"):
        bn(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1))
    assert int(bn.num_batches_tracked) == 0
    strided = torch.randn(2, 3, 4, 8)[..., ::2].requires_grad_()
    assert not _native_node(bn(strided))
    under_vmap = torch.func.vmap(batchnorm.BatchNorm1d(3, track_running_stats=False))(torch.randn(2, 4, 3))
    assert under_vmap.shape == (2, 4, 3)


@pytest.mark.parametrize(
    ("training", "momentum", "tracked"),
    [(True, 0.1, True), (True, None, True), (True, 0.1, False), (False, 0.1, True)],
    ids=["training", "momentum_none", "not_tracking", "eval"],
)
def test_functional_native_call_equals_the_general_path(
    general_path: Callable[[], Any], training: bool, momentum: float | None, tracked: bool
) -> None:
    """batchnorm.functional.batch_norm takes the same native call; with its counter it does what
    the module does."""
    x = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(2))
    weight, bias = torch.rand(4).requires_grad_(), torch.randn(4).requires_grad_()
    results = []
    for use_general in (False, True):
        generator = torch.Generator().manual_seed(3)
        statistics = [torch.rand(4, generator=generator), torch.rand(4, generator=generator) + 0.5, torch.tensor(3)]
        state = statistics if tracked else [None, None, None]
        xi = x.clone().requires_grad_()
        with general_path() if use_general else contextlib.nullcontext():
            y = batchnorm.functional.batch_norm(
                xi, state[0], state[1], weight, bias, training, momentum, 1e-5, num_batches_tracked=state[2]
            )
            assert _native_node(y) != use_general
            (gx, gw, gb) = torch.autograd.grad(y, (xi, weight, bias), torch.cos(y))
        results.append([y, gx, gw, gb, *(t for t in state if t is not None)])
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_functional_with_mask_never_takes_the_unmasked_call() -> None:
    x = torch.randn(4, 3, 5)
    lengths = torch.tensor([5, 2, 3, 4])
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    y = batchnorm.functional.batch_norm(x, running_mean, running_var, training=True, lengths=lengths)
    assert (y[1, :, 2:] == 0).all()  # padded positions: 0, as only the masked path gives
    valid = torch.cat([x[n, :, : int(length)] for n, length in enumerate(lengths)], dim=1)  # (C, M)
    torch.testing.assert_close(running_mean, 0.1 * valid.mean(1))


def test_eval_of_a_single_sample_takes_the_native_call() -> None:
    bn = _randomized(batchnorm.BatchNorm1d(5)).eval()
    x = torch.randn(1, 5, requires_grad=True)
    y = bn(x)
    assert _native_node(y)
    expected = torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_functional_refuses_a_nan_momentum_in_either_mode(training: bool) -> None:
    """The native call leaves what the general path refuses to it, in eval too."""
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="finite momentum"):
        batchnorm.functional.batch_norm(
            torch.randn(4, 3), running_mean, running_var, training=training, momentum=math.nan
        )
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))
