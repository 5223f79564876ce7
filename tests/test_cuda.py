"""On a CUDA device: every module against torch's (cuDNN) in float32, float16 and bfloat16, the
backends (eager, compiled with Triton, auto), a single-process NCCL SyncBatchNorm and the
benchmark's CUDA paths. Skipped where no CUDA device is present; ``pytest -m cuda`` selects them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import batchnorm
from batchnorm import bench

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# float32 differs from cuDNN by summation order only; half precision by the rounding of the output.
TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 3e-2, "atol": 5e-2},
}


def randomized(module: nn.Module) -> nn.Module:
    """Batch-norm state away from its initial values, so that a lost parameter or buffer shows."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return module


# name: (torch's module, ours built from it, input shape); ours gets torch's state.
Case = tuple[Callable[[], nn.Module], Callable[[nn.Module], nn.Module], tuple[int, ...]]


def _copy_state(ours: nn.Module) -> Callable[[nn.Module], nn.Module]:
    def build(reference: nn.Module) -> nn.Module:
        ours.load_state_dict(reference.state_dict())
        return ours

    return build


def _conv_bn(reference: nn.Module) -> nn.Module:
    ours = batchnorm.ConvBatchNorm2d(3, 8, 3, padding=1)
    ours.conv.load_state_dict(reference[0].state_dict())
    ours.bn.load_state_dict(reference[1].state_dict())
    return ours


CASES: dict[str, Case] = {
    "BatchNorm1d-2d": (lambda: nn.BatchNorm1d(16), batchnorm.from_torch, (64, 16)),
    "BatchNorm1d-3d": (lambda: nn.BatchNorm1d(16), batchnorm.from_torch, (8, 16, 40)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(16), batchnorm.from_torch, (8, 16, 12, 12)),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(8), batchnorm.from_torch, (4, 8, 6, 6, 6)),
    "BatchNorm-generic": (lambda: nn.BatchNorm2d(16), _copy_state(batchnorm.BatchNorm(16)), (8, 16, 12, 12)),
    "BatchNormAct-relu": (
        lambda: nn.Sequential(nn.BatchNorm2d(16), nn.ReLU()),
        lambda reference: _copy_state(batchnorm.BatchNormAct2d(16, activation="relu"))(reference[0]),
        (8, 16, 12, 12),
    ),
    "InPlaceABN-leaky_relu": (
        lambda: nn.Sequential(nn.BatchNorm2d(16), nn.LeakyReLU(0.01)),
        lambda reference: _copy_state(batchnorm.InPlaceABN(16, activation="leaky_relu"))(reference[0]),
        (8, 16, 12, 12),
    ),
}


def run(module: nn.Module, x: Tensor, grad: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """(output, parameter gradients, input gradient) of one step. The input goes through one
    multiplication so that in-place modules may overwrite what they receive."""
    leaf = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(leaf * 1)
    out.backward(grad)
    grads = {name: p.grad.float() for name, p in module.named_parameters() if p.grad is not None}
    assert leaf.grad is not None
    return out.detach().float(), grads, leaf.grad.float()


def compare(
    ours: nn.Module,
    reference: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    train: bool,
    grad_atol: float = 1e-2,
    out_shape: tuple[int, ...] | None = None,
) -> None:
    ours.train(train)
    reference.train(train)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 2 + 0.5).to(DEVICE, dtype)
    grad = torch.randn(out_shape or shape, generator=generator).to(DEVICE, dtype)
    tolerance = TOLERANCES[dtype]
    for _ in range(2):  # the second step sees the running statistics the first one updated
        out, grads, grad_input = run(ours, x, grad)
        expected_out, expected_grads, expected_grad_input = run(reference, x, grad)
        torch.testing.assert_close(out, expected_out, **tolerance)
        torch.testing.assert_close(grad_input, expected_grad_input, **tolerance)
        # The same parameters in the same order on both sides (the names differ for the fused
        # modules: "weight" against "0.weight"). Parameter gradients are sums over the batch.
        assert len(grads) == len(expected_grads) > 0
        for value, expected in zip(grads.values(), expected_grads.values(), strict=True):
            torch.testing.assert_close(value, expected, rtol=tolerance["rtol"], atol=grad_atol)
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    for value, expected in zip(ours_state.values(), reference_state.values(), strict=True):
        torch.testing.assert_close(value.float(), expected.float(), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_module_matches_torch(name: str, dtype: torch.dtype, train: bool) -> None:
    make_reference, make_ours, shape = CASES[name]
    torch.manual_seed(0)
    reference = randomized(make_reference()).to(DEVICE)
    ours = make_ours(reference).to(DEVICE)
    # InPlaceABN's backward rebuilds the normalized input from its own rounded half-precision
    # output: its parameter gradients (sums over the batch) carry that rounding.
    inverted_half = name.startswith("InPlaceABN") and dtype != torch.float32
    compare(ours, reference, shape, dtype, train, grad_atol=0.5 if inverted_half else 1e-2)


def test_cuda_conv_batch_norm_matches_conv_then_batch_norm() -> None:
    torch.manual_seed(0)
    reference = randomized(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))).to(DEVICE)
    ours = _conv_bn(reference).to(DEVICE)
    compare(ours, reference, (4, 3, 10, 10), torch.float32, train=True, out_shape=(4, 8, 10, 10))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_lazy_batch_norm_matches_torch(dtype: torch.dtype) -> None:
    reference = nn.LazyBatchNorm2d().to(DEVICE)
    ours = batchnorm.LazyBatchNorm2d().to(DEVICE)
    x = torch.randn(4, 6, 5, 5, device=DEVICE, dtype=dtype)
    torch.testing.assert_close(ours(x).float(), reference(x).float(), **TOLERANCES[dtype])
    assert ours.weight.shape == (6,) and ours.weight.device.type == DEVICE


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["eager", "compiled", "auto"])
def test_cuda_backends_match_torch(backend: str, dtype: torch.dtype, memory_format: torch.memory_format) -> None:
    """The compiled backend runs Triton kernels here; auto picks per size (both sizes below)."""
    for shape in ((4, 8, 6, 6), (16, 32, 32, 32)):
        torch.manual_seed(0)
        reference = randomized(nn.BatchNorm2d(shape[1])).to(DEVICE)
        ours = batchnorm.from_torch(reference)
        x = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=memory_format)
        with batchnorm.using_backend(backend):
            out = ours(x)
            out.float().square().sum().backward()
        expected = reference(x)
        expected.float().square().sum().backward()
        assert out.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(out.float(), expected.float(), **TOLERANCES[dtype])
        assert ours.weight.grad is not None and reference.weight.grad is not None
        torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=TOLERANCES[dtype]["rtol"], atol=0.5)
        torch.testing.assert_close(ours.running_var, reference.running_var, **TOLERANCES[torch.float32])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_cuda_sync_batch_norm_on_a_single_process_nccl_group() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        reference = randomized(nn.SyncBatchNorm(16)).to(DEVICE)
        ours = batchnorm.from_torch(reference)
        assert isinstance(ours, batchnorm.SyncBatchNorm)
        compare(ours, reference, (8, 16, 6, 6), torch.float32, train=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_bench_paths(dtype: torch.dtype) -> None:
    """The benchmark's CUDA figures: peak memory is measured there, and the networks run."""
    device = torch.device(DEVICE)
    row = bench.bench_shape(bench.Shape("tiny", (8, 4, 5, 5)), "auto", device, dtype, 2, 1)
    assert row.peak_mb is not None and row.torch_peak_mb is not None and row.peak_mb > 0
    network = bench.Network("LeNet-BN", bench.lenet, (8, 1, 28, 28))
    train, evaluation = bench.bench_network(network, "auto", device, 2, 1)
    assert train.pair.ours.median > 0 and evaluation.pair.torch.median > 0
