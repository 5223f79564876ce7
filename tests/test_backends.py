"""Backend selection, the compile fallback, and the same numbers from every backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import backends

from .test_differential import CASES, run_case


def test_default_is_auto_and_set_backend_returns_previous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    assert batchnorm.get_backend() == "auto"
    assert batchnorm.set_backend("eager") == "auto"
    assert batchnorm.get_backend() == "eager"
    assert batchnorm.set_backend("compiled") == "eager"
    assert batchnorm.get_backend() == "compiled"


def test_using_backend_restores_even_on_error() -> None:
    batchnorm.set_backend("compiled")
    with pytest.raises(RuntimeError, match="inside"), batchnorm.using_backend("eager"):
        assert batchnorm.get_backend() == "eager"
        raise RuntimeError("inside")
    assert batchnorm.get_backend() == "compiled"


def test_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHNORM_BACKEND", "eager")
    assert batchnorm.get_backend() == "eager"
    with batchnorm.using_backend("compiled"):
        assert batchnorm.get_backend() == "compiled"  # an explicit choice wins over the variable
    monkeypatch.setenv("BATCHNORM_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"BATCHNORM_BACKEND='fast'.*auto, eager, compiled"):
        batchnorm.get_backend()


@pytest.mark.parametrize("name", ["Eager", "cuda", "", None, 3])
def test_unknown_backend_lists_valid_names(name: object) -> None:
    before = batchnorm.get_backend()
    with pytest.raises(ValueError, match=r"expected one of auto, eager, compiled"):
        batchnorm.set_backend(name)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected one of auto, eager, compiled"), batchnorm.using_backend(name):  # type: ignore[arg-type]
        pass
    assert batchnorm.get_backend() == before


def test_auto_picks_native_on_cpu_else_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = torch.empty(8, 4), torch.empty(64, 64, 16, 16)
    if backends._native.AVAILABLE:
        assert backends.kernels_for(small) is backends.NATIVE
        assert backends.kernels_for(large) is backends.NATIVE
    # Without the native library (warned about once, elsewhere): the faster Python backend.
    monkeypatch.setattr(backends._native, "AVAILABLE", False)
    monkeypatch.setattr(backends, "_native_warned", True)
    assert backends.kernels_for(small) is backends.EAGER
    assert backends.kernels_for(large) is backends.COMPILED
    with batchnorm.using_backend("eager"):
        assert backends.kernels_for(large) is backends.EAGER
    with batchnorm.using_backend("compiled"):
        assert backends.kernels_for(small) is backends.COMPILED
        # Double backward cannot run through a compiled kernel: the eager one serves it.
        assert backends.kernels_for(small, create_graph=True) is backends.EAGER


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(fn: object, **kwargs: object) -> object:
        def run(*args: object) -> object:
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(backends, "_COMPILED", backends._CompiledKernels())
    x = torch.randn(6, 3)
    with batchnorm.using_backend("compiled"), pytest.warns(RuntimeWarning, match="falling back to 'eager'") as record:
        ys = [batchnorm.functional.batch_norm(x, None, None, training=True) for _ in range(3)]
    assert len(record) == 1
    assert backends._COMPILED.failed
    for y in ys:
        torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, training=True))


def test_a_compiler_that_fails_while_building_falls_back_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def refusing_compile(fn: object, **kwargs: object) -> object:
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(torch, "compile", refusing_compile)
    monkeypatch.setattr(backends, "_COMPILED", backends._CompiledKernels())
    x = torch.randn(6, 3)
    with batchnorm.using_backend("compiled"), pytest.warns(RuntimeWarning, match="falling back to 'eager'") as record:
        ys = [batchnorm.functional.batch_norm(x, None, None, training=True) for _ in range(2)]
    assert len(record) == 1
    for y in ys:
        torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, training=True))


BACKEND_CASES = [case for case in CASES if case.name in ("2d-default", "1d_2D-momentum_none", "2d-channels_last")]


@pytest.mark.parametrize("backend", ["eager", "compiled", "native"])
@pytest.mark.parametrize("case", BACKEND_CASES, ids=lambda case: case.name)
def test_every_backend_matches_torch(backend: str, case: object) -> None:
    with batchnorm.using_backend(backend):
        run_case(case)  # type: ignore[arg-type]
    assert not backends._COMPILED.failed


def test_compiled_backend_does_not_recompile_for_a_new_batch_size() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with batchnorm.using_backend("compiled"):
        for batch in (4, 6, 9):
            x = torch.randn(batch, 3, 5, 5, requires_grad=True)
            y = batchnorm.functional.batch_norm(x, None, None, training=True)
            y.sum().backward()
            torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, training=True))
    # One graph for the forward kernel and one for the backward kernel, whatever the batch size.
    assert counters["stats"]["unique_graphs"] == 2


def test_no_autograd_node_when_no_gradient_can_be_asked_for() -> None:
    module = batchnorm.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        y = module(x)
    assert y.grad_fn is None
    module.weight.requires_grad_(False)
    module.bias.requires_grad_(False)
    assert module(x).grad_fn is None
    module.weight.requires_grad_(True)
    assert module(x).grad_fn is not None
    assert module.num_batches_tracked.item() == 3


def test_each_rank_and_layout_compiles_on_its_own_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model's layers differ in rank and layout; past torch's recompile limit torch.compile
    silently runs uncompiled code. Each (kernel, rank, layout, dtype) has its own cache."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(backends, "_COMPILED", backends._CompiledKernels())
    inputs = [torch.randn(4, 3), torch.randn(4, 3, 5), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2, 2)]
    inputs.append(inputs[2].contiguous(memory_format=torch.channels_last))
    # torch's own patch: pytest's monkeypatch deletes the attribute of a config module on undo.
    with torch._dynamo.config.patch(recompile_limit=2), batchnorm.using_backend("compiled"):
        for x in inputs:
            for requires_grad in (False, True):
                y = batchnorm.functional.batch_norm(x.clone().requires_grad_(requires_grad), None, None, training=True)
                torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, training=True))
    assert counters["stats"]["unique_graphs"] == len(inputs)
