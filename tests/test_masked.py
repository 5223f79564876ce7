"""Masked batch norm against its oracle: torch's own batch norm on the valid values gathered into
one tensor (every valid position of every sample, one row per position, channels as columns).

Padded positions must come out as exactly 0 and receive exactly 0 gradient whatever they hold.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import batchnorm
from batchnorm import BatchNorm, SyncBatchNorm, _masked, _native
from batchnorm.functional import batch_norm

STEPS = 2


def gather(x: Tensor, mask: Tensor) -> Tensor:
    """The valid values of x (N, C, *) as rows: (N, C, *) -> (M, C)."""
    return x.movedim(1, -1)[mask]


def scatter(values: Tensor, mask: Tensor, like: Tensor) -> Tensor:
    """Rows (M, C) back to the positions of mask, 0 elsewhere: (M, C) -> (N, C, *) like ``like``."""
    out = torch.zeros(like.movedim(1, -1).shape, dtype=values.dtype)
    out[mask] = values
    return out.movedim(-1, 1)


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float64
    kind: str = "random"  # random, all_valid, padded_sample
    channels_last: bool = False


CASES = [
    Case("1d", (5, 3, 9)),
    Case("1d_float32", (6, 4, 11), torch.float32),
    Case("1d_all_valid", (4, 3, 6), kind="all_valid"),
    Case("1d_padded_sample", (4, 3, 7), kind="padded_sample"),
    Case("2d", (3, 2, 5, 4)),
    Case("2d_channels_last", (3, 4, 5, 3), channels_last=True),
    Case("2d_float32_padded_sample", (4, 3, 4, 4), torch.float32, kind="padded_sample"),
    Case("3d", (2, 3, 3, 4, 2)),
]


def case_data(case: Case) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    n, c, *tail = case.shape
    mask = torch.rand((n, *tail), generator=gen) < 0.6
    if case.kind == "all_valid":
        mask = torch.ones_like(mask)
    if case.kind == "padded_sample":
        mask[1] = False
    mask.view(-1)[:2] = True  # at least two valid values
    x = [torch.randn(case.shape, generator=gen, dtype=case.dtype) * 2 + 3 for _ in range(STEPS)]
    if case.channels_last:
        x = [t.contiguous(memory_format=torch.channels_last) for t in x]
    return {
        "mask": mask,
        "x": x,
        "dy": [torch.randn(case.shape, generator=gen, dtype=case.dtype) for _ in range(STEPS)],
        "weight": torch.rand(c, generator=gen, dtype=case.dtype) + 0.5,
        "bias": torch.randn(c, generator=gen, dtype=case.dtype),
    }


def module(cls: type[BatchNorm], channels: int, data: dict[str, Any], dtype: torch.dtype) -> BatchNorm:
    bn = cls(channels, dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(data["weight"])
        bn.bias.copy_(data["bias"])
    return bn


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_against_batch_norm_of_valid_values(case: Case) -> None:
    """Outputs, input/weight/bias gradients over two training steps, running statistics and the
    eval output, against torch's F.batch_norm on the gathered valid values."""
    data = case_data(case)
    mask = data["mask"]
    bn = module(BatchNorm, case.shape[1], data, case.dtype)
    weight = data["weight"].clone().requires_grad_(True)
    bias = data["bias"].clone().requires_grad_(True)
    running_mean = torch.zeros(case.shape[1], dtype=case.dtype)
    running_var = torch.ones(case.shape[1], dtype=case.dtype)
    tol = tolerance(case.dtype)
    for step in range(STEPS):
        x = data["x"][step].clone().requires_grad_(True)
        y = bn(x, mask=mask)
        (y * data["dy"][step]).sum().backward()
        rows = gather(x.detach(), mask).requires_grad_(True)
        expected = F.batch_norm(rows, running_mean, running_var, weight, bias, True, 0.1, bn.eps)
        (expected * gather(data["dy"][step], mask)).sum().backward()
        assert x.grad is not None and rows.grad is not None
        torch.testing.assert_close(y.detach(), scatter(expected.detach(), mask, x), **tol)
        torch.testing.assert_close(x.grad, scatter(rows.grad, mask, x), **tol)
        torch.testing.assert_close(bn.weight.grad, weight.grad, **tol)
        torch.testing.assert_close(bn.bias.grad, bias.grad, **tol)
        bn.weight.grad = bn.bias.grad = weight.grad = bias.grad = None
    torch.testing.assert_close(bn.running_mean, running_mean, **tol)
    torch.testing.assert_close(bn.running_var, running_var, **tol)
    assert int(bn.num_batches_tracked) == STEPS
    bn.eval()
    x = data["x"][0]
    expected = F.batch_norm(gather(x, mask), running_mean, running_var, data["weight"], data["bias"], False)
    torch.testing.assert_close(bn(x, mask=mask), scatter(expected, mask, x), **tol)


def test_all_valid_equals_unmasked() -> None:
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    bn, masked = BatchNorm(3, dtype=torch.float64), BatchNorm(3, dtype=torch.float64)
    torch.testing.assert_close(masked(x, mask=torch.ones(4, 6, dtype=torch.bool)), bn(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(masked(x, lengths=torch.full((4,), 6)), bn(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(masked.running_var, bn.running_var, rtol=0, atol=1e-12)


def test_lengths_is_the_prefix_mask() -> None:
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    lengths = torch.tensor([5, 0, 2])
    mask = (torch.arange(5) < lengths.view(-1, 1)).view(3, 1, 5).expand(3, 4, 5)
    a, b = batch_norm_2d_pair()
    assert torch.equal(a(x, lengths=lengths), b(x, mask=mask))
    assert torch.equal(a.running_var, b.running_var)


def batch_norm_2d_pair() -> tuple[BatchNorm, BatchNorm]:
    return batchnorm.BatchNorm2d(2, dtype=torch.float64), batchnorm.BatchNorm2d(2, dtype=torch.float64)


@pytest.mark.parametrize("filler", [float("nan"), float("inf"), 1e30])
def test_padding_is_never_read(filler: float) -> None:
    """Padding filled with NaN, Inf or huge values gives identical outputs, gradients and statistics."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 7, generator=gen) < 0.5
    mask[0, :2] = True
    x = torch.randn(4, 3, 7, generator=gen)
    dy = torch.randn(4, 3, 7, generator=gen)
    results = []
    for fill in (0.0, filler):
        bn = BatchNorm(3)
        xin = torch.where(mask.unsqueeze(1), x, fill).requires_grad_(True)
        y = bn(xin, mask=mask)
        y.backward(torch.where(mask.unsqueeze(1), dy, fill))
        results.append((y.detach(), xin.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    y, grad = results[1][:2]
    assert torch.equal(y.movedim(1, -1)[~mask], torch.zeros_like(y.movedim(1, -1)[~mask]))
    assert grad is not None and bool((grad.movedim(1, -1)[~mask] == 0).all())


# Forward-mode checks import torch's jvp decompositions, which torch.jit.script warns about.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(training: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.rand(2, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_(True)
    bias = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.rand(3, 5, generator=gen) < 0.6
    mask[0, :2] = True
    mean, var = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def f(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        stats = (None, None) if training else (mean, var)
        return batch_norm(x, *stats, weight, bias, training, mask=mask)

    # Forward mode checks the hand-written jvp; the batched checks run backward and jvp under vmap.
    checks = {"check_forward_ad": True, "check_batched_grad": True, "check_batched_forward_grad": True}
    assert torch.autograd.gradcheck(f, (x, weight, bias), **checks)
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


# torch.func.jvp's first call imports torch's jvp decompositions, which torch.jit.script warns about.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_vmap_and_jvp() -> None:
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(3, 4, 2, 6, dtype=torch.float64, generator=gen)
    mask = torch.rand(4, 6, generator=gen) < 0.6
    mask[0, :2] = True
    tangent = torch.randn(4, 2, 6, dtype=torch.float64, generator=gen)

    def f(x: Tensor) -> Tensor:
        return batch_norm(x, None, None, training=True, mask=mask)

    batched = torch.func.vmap(f)(xs)
    for x, y in zip(xs, batched, strict=True):
        torch.testing.assert_close(y, f(x), rtol=0, atol=1e-12)
    out, t_out = torch.func.jvp(f, (xs[0],), (tangent,))
    # The reverse-mode Jacobian applied to the tangent is the oracle of the hand-written jvp.
    jacobian = torch.autograd.functional.jacobian(f, xs[0])  # (4, 2, 6, 4, 2, 6)
    expected = (jacobian.reshape(48, 48) @ tangent.reshape(48)).view_as(tangent)
    torch.testing.assert_close(out, f(xs[0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(t_out, expected, rtol=1e-10, atol=1e-10)


def test_variants_take_a_mask() -> None:
    """Lazy, ghost, renorm and activated batch norm with a mask, each against what it reduces to."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 5, dtype=torch.float64, generator=gen)
    mask = torch.rand(8, 5, generator=gen) < 0.7
    mask[:, 0] = True
    reference = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    expected = reference(x, mask=mask)
    lazy = batchnorm.LazyBatchNorm1d(dtype=torch.float64)
    assert torch.equal(lazy(x, mask=mask), expected)
    renorm = batchnorm.BatchRenorm(3, rmax=1.0, dmax=0.0, dtype=torch.float64)
    torch.testing.assert_close(renorm(x, mask=mask), expected, rtol=0, atol=1e-12)
    act = batchnorm.BatchNormAct(3, activation="relu", dtype=torch.float64)
    assert torch.equal(act(x, mask=mask), torch.relu(expected))
    sync = SyncBatchNorm(3, dtype=torch.float64)  # no process group: the local masked batch norm
    assert torch.equal(sync(x, mask=mask), expected)
    ghost = batchnorm.GhostBatchNorm(3, virtual_batch_size=4, dtype=torch.float64)
    halves = [BatchNorm(3, dtype=torch.float64)(x[i : i + 4], mask=mask[i : i + 4]) for i in (0, 4)]
    assert torch.equal(ghost(x, mask=mask), torch.cat(halves))
    with pytest.raises(ValueError, match="no mask"):
        batchnorm.InPlaceABN(3)(x.float(), mask=mask)


def test_inverse_is_exact_on_valid_positions() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 6, dtype=torch.float64, generator=gen) * 5 - 2
    mask = torch.rand(4, 6, generator=gen) < 0.6
    mask[0, :2] = True
    bn = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    restored = bn.inverse(bn(x, mask=mask))
    torch.testing.assert_close(gather(restored, mask), gather(x, mask), rtol=0, atol=1e-12)


def test_recalibrate_pools_valid_positions_only() -> None:
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 3, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    masks = [torch.rand(4, 8, generator=gen) < 0.5 for _ in range(3)]
    for mask in masks:
        mask[0, :2] = True
    xs = [torch.where(m.unsqueeze(1), x, float("nan")) for x, m in zip(xs, masks, strict=True)]
    model = batchnorm.BatchNorm1d(3, dtype=torch.float64).eval()
    batchnorm.recalibrate(model, list(zip(xs, masks, strict=True)))
    rows = torch.cat([gather(x, m) for x, m in zip(xs, masks, strict=True)])  # (M, C)
    torch.testing.assert_close(model.running_mean, rows.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.running_var, rows.var(0), rtol=0, atol=1e-12)
    assert not model.training and int(model.num_batches_tracked) == 0


BAD = {
    "mask_shape": ({"mask": torch.ones(4, 5, dtype=torch.bool)}, ValueError, r"shape \(4, 6\).*got shape \(4, 5\)"),
    "mask_with_channels": ({"mask": torch.ones(4, 3, 6, dtype=torch.bool)}, ValueError, "without the channel"),
    "mask_dtype": ({"mask": torch.ones(4, 6)}, TypeError, "torch.bool, got dtype torch.float32"),
    "mask_not_tensor": ({"mask": [[True] * 6] * 4}, TypeError, "got list"),
    "mask_device": ({"mask": torch.ones(4, 6, dtype=torch.bool, device="meta")}, ValueError, "device cpu, got meta"),
    "lengths_too_long": ({"lengths": torch.tensor([1, 7, 2, 3])}, ValueError, r"in \[0, 6\], got \[1, 7, 2, 3\]"),
    "lengths_negative": ({"lengths": torch.tensor([1, -1, 2, 3])}, ValueError, r"in \[0, 6\]"),
    "lengths_shape": ({"lengths": torch.tensor([1, 2])}, ValueError, r"shape \(4,\), got shape \(2,\)"),
    "lengths_float": ({"lengths": torch.ones(4)}, TypeError, "integer dtype"),
    "both": (
        {"mask": torch.ones(4, 6, dtype=torch.bool), "lengths": torch.ones(4, dtype=torch.long)},
        ValueError,
        "not both",
    ),
    "one_valid": ({"lengths": torch.tensor([1, 0, 0, 0])}, ValueError, "Expected more than 1 value per channel"),
    "none_valid": ({"mask": torch.zeros(4, 6, dtype=torch.bool)}, ValueError, "Expected more than 1 value per channel"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_mask_raises_before_any_change(name: str) -> None:
    keywords, error, message = BAD[name]
    bn = batchnorm.BatchNorm1d(3)
    before = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    with pytest.raises(error, match=message):
        bn(torch.randn(4, 3, 6), **keywords)
    after = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(error, match=message):
        batch_norm(torch.randn(4, 3, 6), None, None, training=True, **keywords)


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm with masks on gloo ranks, against torch's F.batch_norm on the valid values of all
# ranks gathered. One spawn of four ranks runs every case: the four-rank cases on the default
# group, the two-rank case on a group of ranks 0 and 1.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncCase:
    name: str
    sizes: tuple[int, ...]  # each rank's batch size
    tail: tuple[int, ...] = (5,)  # dimensions after (N, C)
    padded: tuple[tuple[int, ...], ...] = ((), ())  # per step, the ranks without any valid value
    lengths: bool = False  # lengths= (prefix masks) instead of mask=
    dtype: torch.dtype = torch.float64


SYNC_CASES_2 = [SyncCase("two_ranks_uneven_one_padded", (3, 2), padded=((), (1,)))]
SYNC_CASES_4 = [
    SyncCase("uneven", (3, 1, 2, 4), (6,)),
    SyncCase("empty_rank", (2, 0, 3, 2)),
    SyncCase("padded_ranks", (2, 3, 1, 2), padded=((2,), (0, 2))),
    SyncCase("lengths_2d", (1, 2, 2, 3), (3, 7), padded=((), (3,)), lengths=True),
    SyncCase("float32", (4, 2, 3, 1), (33,), dtype=torch.float32),
]
SYNC_CHANNELS = 3


def sync_rows(case: SyncCase, rank: int) -> slice:
    start = sum(case.sizes[:rank])
    return slice(start, start + case.sizes[rank])


def sync_data(case: SyncCase) -> dict[str, Any]:
    """The global batch of a case, identical in every process: x (offset from 0, so that lost
    digits would show), dy, and per step the mask and, for ``lengths`` cases, the lengths."""
    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    shape = (sum(case.sizes), SYNC_CHANNELS, *case.tail)
    n, size = shape[0], shape[-1]
    data: dict[str, Any] = {"x": [], "dy": [], "mask": [], "lengths": []}
    for padded in case.padded:
        lengths = torch.randint(0, size + 1, (n,), generator=gen)  # (N,)
        mask = torch.rand((n, *case.tail), generator=gen) < 0.6
        live = next(rank for rank, count in enumerate(case.sizes) if count > 0 and rank not in padded)
        lengths[sync_rows(case, live).start] = size  # at least two valid values over the group
        mask[sync_rows(case, live).start] = True
        for rank in padded:
            lengths[sync_rows(case, rank)] = 0
            mask[sync_rows(case, rank)] = False
        if case.lengths:
            prefix = torch.arange(size) < lengths.view(-1, *([1] * len(case.tail)))  # (N, 1.., L)
            mask = prefix.expand(n, *case.tail)
        data["mask"].append(mask)
        data["lengths"].append(lengths)
        data["x"].append((torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 40).to(case.dtype))
        data["dy"].append(torch.randn(shape, generator=gen, dtype=torch.float64).to(case.dtype))
    data["weight"] = torch.rand(SYNC_CHANNELS, generator=gen, dtype=torch.float64).add(0.5).to(case.dtype)
    data["bias"] = torch.randn(SYNC_CHANNELS, generator=gen, dtype=torch.float64).to(case.dtype)
    return data


def sync_steps(case: SyncCase, rank: int, group: Any) -> dict[str, list[Tensor]]:
    """One rank's training steps of a case: what it saw."""
    data = sync_data(case)
    rows = sync_rows(case, rank)
    bn = SyncBatchNorm(SYNC_CHANNELS, process_group=group, dtype=case.dtype)
    with torch.no_grad():
        bn.weight.copy_(data["weight"])
        bn.bias.copy_(data["bias"])
    seen: dict[str, list[Tensor]] = {"y": [], "dx": [], "dweight": [], "dbias": []}
    for step in range(len(case.padded)):
        x = data["x"][step][rows].clone().requires_grad_(True)
        keyword = {"lengths": data["lengths"][step][rows]} if case.lengths else {"mask": data["mask"][step][rows]}
        y = bn(x, **keyword)
        (y * data["dy"][step][rows]).sum().backward()
        assert x.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None
        seen["y"].append(y.detach())
        seen["dx"].append(x.grad)
        seen["dweight"].append(bn.weight.grad.clone())
        seen["dbias"].append(bn.bias.grad.clone())
        bn.weight.grad = bn.bias.grad = None
    seen["running"] = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
    return seen


def sync_oracle(case: SyncCase) -> dict[str, list[Tensor]]:
    """What the ranks must see together: F.batch_norm in float64 on the gathered valid values."""
    data = sync_data(case)
    weight = data["weight"].double().requires_grad_(True)
    bias = data["bias"].double().requires_grad_(True)
    running_mean = torch.zeros(SYNC_CHANNELS, dtype=torch.float64)
    running_var = torch.ones(SYNC_CHANNELS, dtype=torch.float64)
    seen: dict[str, list[Tensor]] = {"y": [], "dx": [], "dweight": [], "dbias": []}
    for step in range(len(case.padded)):
        x, mask = data["x"][step].double(), data["mask"][step]
        rows = gather(x, mask).requires_grad_(True)  # (M, C) over all ranks
        y = F.batch_norm(rows, running_mean, running_var, weight, bias, True)
        (y * gather(data["dy"][step].double(), mask)).sum().backward()
        assert rows.grad is not None and weight.grad is not None and bias.grad is not None
        seen["y"].append(scatter(y.detach(), mask, x))
        seen["dx"].append(scatter(rows.grad, mask, x))
        seen["dweight"].append(weight.grad.clone())
        seen["dbias"].append(bias.grad.clone())
        weight.grad = bias.grad = None
    seen["running"] = [running_mean, running_var, torch.tensor(len(case.padded))]
    return seen


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pair = dist.new_group([0, 1])  # every rank creates every group
        seen = {case.name: sync_steps(case, rank, None) for case in SYNC_CASES_4}
        if rank < 2:
            seen.update({case.name: sync_steps(case, rank, pair) for case in SYNC_CASES_2})
        torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sync_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Four gloo ranks, spawned once for every case (process start-up dominates the run time)."""
    from tests.test_sync import spawn_worker

    return spawn_worker(_sync_worker, 4, tmp_path_factory.mktemp("gloo_masked"))


@pytest.mark.parametrize("case", SYNC_CASES_4 + SYNC_CASES_2, ids=lambda case: case.name)
def test_sync_batch_norm_with_masks(case: SyncCase, sync_ranks: list[dict[str, Any]]) -> None:
    """Per-rank valid counts (uneven, an empty rank, fully padded ranks) merge to the statistics of
    all ranks' valid values: outputs, gradients and running statistics."""
    ranks = [sync_ranks[rank][case.name] for rank in range(len(case.sizes))]
    expected = sync_oracle(case)
    tol = tolerance(case.dtype)
    for step in range(len(case.padded)):
        for key in ("y", "dx"):
            got = torch.cat([seen[key][step] for seen in ranks])
            assert got.dtype == case.dtype
            torch.testing.assert_close(got.double(), expected[key][step], **tol, msg=f"{key} step {step}")
        for key in ("dweight", "dbias"):
            summed = sum(seen[key][step].double() for seen in ranks)
            torch.testing.assert_close(summed, expected[key][step], **tol, msg=f"{key} step {step}")
    for rank, seen in enumerate(ranks):
        for name, a, b in zip(("mean", "var", "counter"), seen["running"], expected["running"], strict=True):
            torch.testing.assert_close(a.double(), b.double(), **tol, msg=f"rank {rank} running {name}")


# ---------------------------------------------------------------------------------------------
# The native kernels (csrc/masked.cpp) against the eager masked path and the gathered oracle.
# ---------------------------------------------------------------------------------------------

needs_native = pytest.mark.skipif(not _native.AVAILABLE, reason=f"native kernels not built: {_native.LOAD_ERROR}")


@dataclass(frozen=True)
class NativeCase:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float64
    kind: str = "random"  # random, lengths (prefix masks: the select-free loops), all_valid, padded_sample


# Few channels (tasks over channel and group of samples) and many (tasks over channels, with two
# threads); runs longer than a block of 4096 positions; extents that are not multiples of the
# vector width.
NATIVE_CASES = [
    NativeCase("1d", (5, 3, 9)),
    NativeCase("1d_float32", (6, 17, 11), torch.float32),
    NativeCase("1d_lengths", (7, 3, 21), kind="lengths"),
    NativeCase("1d_lengths_float32_many_channels", (9, 19, 37), torch.float32, kind="lengths"),
    NativeCase("1d_all_valid", (4, 3, 6), kind="all_valid"),
    NativeCase("1d_padded_sample", (4, 18, 7), torch.float32, kind="padded_sample"),
    NativeCase("1d_runs_longer_than_a_block", (3, 2, 9000), torch.float32, kind="lengths"),
    NativeCase("1d_random_long_runs", (2, 3, 5000), torch.float32),
    NativeCase("2d", (3, 2, 5, 4)),
    NativeCase("2d_float32_padded_sample", (4, 3, 4, 4), torch.float32, kind="padded_sample"),
    NativeCase("3d", (2, 3, 3, 4, 2)),
    NativeCase("3d_lengths", (3, 9, 2, 3, 10), torch.float32, kind="lengths"),
]


def native_case_data(case: NativeCase) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    n, c, *tail = case.shape
    mask = torch.rand((n, *tail), generator=gen) < 0.6
    if case.kind == "lengths":
        lengths = torch.randint(0, tail[-1] + 1, (n,), generator=gen)
        lengths[0] = tail[-1]
        mask = (torch.arange(tail[-1]) < lengths.view(-1, *([1] * len(tail)))).expand(n, *tail)
    if case.kind == "all_valid":
        mask = torch.ones_like(mask)
    if case.kind == "padded_sample":
        mask[1] = False
    if case.kind != "lengths":  # the first sample is whole there
        mask.view(-1)[:2] = True  # at least two valid values
    x = (torch.randn(case.shape, generator=gen, dtype=torch.float64) * 2 + 3).to(case.dtype)
    return {
        "mask": mask,
        "x": x,
        "dy": torch.randn(case.shape, generator=gen, dtype=torch.float64).to(case.dtype),
        "weight": torch.rand(c, generator=gen, dtype=torch.float64).add(0.5).to(case.dtype),
        "bias": torch.randn(c, generator=gen, dtype=torch.float64).to(case.dtype),
    }


def masked_step(data: dict[str, Any], backend: str, training: bool) -> dict[str, Tensor]:
    """One call of batch_norm with a mask under ``backend``: y, dx, dweight, dbias and the running
    statistics after it."""
    x = data["x"].clone().requires_grad_(True)
    weight = data["weight"].clone().requires_grad_(True)
    bias = data["bias"].clone().requires_grad_(True)
    channels = x.shape[1]
    running_mean = torch.linspace(-1, 1, channels, dtype=x.dtype)
    running_var = torch.linspace(0.5, 2, channels, dtype=x.dtype)
    with batchnorm.using_backend(backend):
        y = batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, mask=data["mask"])
        y.backward(data["dy"])
    assert x.grad is not None and weight.grad is not None and bias.grad is not None
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": weight.grad,
        "dbias": bias.grad,
        "mean": running_mean,
        "var": running_var,
    }


def masked_oracle(data: dict[str, Any], training: bool) -> dict[str, Tensor]:
    """torch's F.batch_norm on the valid values gathered in float64, scattered back."""
    x, mask = data["x"], data["mask"]
    channels = x.shape[1]
    rows = gather(x.double(), mask).requires_grad_(True)  # (M, C)
    weight = data["weight"].double().requires_grad_(True)
    bias = data["bias"].double().requires_grad_(True)
    running_mean = torch.linspace(-1, 1, channels, dtype=torch.float64)
    running_var = torch.linspace(0.5, 2, channels, dtype=torch.float64)
    y = F.batch_norm(rows, running_mean, running_var, weight, bias, training, 0.1)
    y.backward(gather(data["dy"].double(), mask))
    assert rows.grad is not None and weight.grad is not None and bias.grad is not None
    return {
        "y": scatter(y.detach(), mask, x.double()),
        "dx": scatter(rows.grad, mask, x.double()),
        "dweight": weight.grad,
        "dbias": bias.grad,
        "mean": running_mean,
        "var": running_var,
    }


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


@needs_native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=lambda case: case.name)
def test_native_kernels_match_eager_and_oracle(
    case: NativeCase, training: bool, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs, dx, dgamma, dbeta and running statistics of the native masked kernels against the
    eager masked path and against torch's batch norm of the gathered valid values."""
    data = native_case_data(case)
    calls: list[str] = []
    for name in ("masked_forward_train", "masked_forward_eval", "masked_backward_train", "masked_backward_eval"):
        kernel = getattr(_native, name)
        monkeypatch.setattr(_native, name, lambda *args, _k=kernel, _n=name: calls.append(_n) or _k(*args))
    native = masked_step(data, "native", training)
    mode = "train" if training else "eval"
    assert calls == [f"masked_forward_{mode}", f"masked_backward_{mode}"]  # the native kernels ran
    eager = masked_step(data, "eager", training)
    expected = masked_oracle(data, training)
    tol = tolerance(case.dtype)
    for key, value in native.items():
        assert value.dtype == data["x"].dtype
        torch.testing.assert_close(value, eager[key], **tol, msg=f"{key} against eager")
        torch.testing.assert_close(value.double(), expected[key], **tol, msg=f"{key} against the oracle")
    padded = ~data["mask"].unsqueeze(1).expand(case.shape)
    assert not native["y"][padded].any() and not native["dx"][padded].any()  # exactly 0


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["random", "lengths"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_native_padding_is_never_read(dtype: torch.dtype, kind: str, training: bool) -> None:
    """NaN, Inf or huge values in the padding of x and dy: bit-identical results."""
    data = native_case_data(NativeCase("padding", (6, 5, 43), dtype, kind))
    valid = data["mask"].unsqueeze(1)  # (N, 1, L)
    base = masked_step(data, "native", training)
    for filler in (float("nan"), float("inf"), -1e30):
        filled = {**data, "x": torch.where(valid, data["x"], filler), "dy": torch.where(valid, data["dy"], filler)}
        got = masked_step(filled, "native", training)
        for key in base:
            assert torch.equal(got[key], base[key]), f"{key} with {filler} padding"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_native_half_input_computes_in_float32(dtype: torch.dtype) -> None:
    data = native_case_data(NativeCase("half", (4, 6, 19), torch.float32, "lengths"))
    x, mask = data["x"].to(dtype), data["mask"]
    y, mean, var, invstd = _native.masked_forward_train(x, mask, data["weight"], data["bias"], 1e-5)
    assert (y.dtype, mean.dtype, var.dtype, invstd.dtype) == (dtype, torch.float32, torch.float32, torch.float32)
    rows = gather(x.double(), mask)  # (M, C)
    torch.testing.assert_close(mean.double(), rows.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), rows.var(0, correction=0), rtol=1e-5, atol=1e-6)
    with batchnorm.using_backend("eager"):
        expected = batch_norm(x, None, None, data["weight"], data["bias"], True, mask=mask)
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)


@needs_native
def test_native_float32_far_from_zero_matches_float64() -> None:
    """|mu| >> sigma over the valid values: the corrected two-pass statistics keep the digits."""
    data = native_case_data(NativeCase("far", (16, 8, 600), torch.float32, "lengths"))
    x = (1e4 + 0.1 * torch.randn(16, 8, 600, dtype=torch.float64)).float()
    _, mean, var, _ = _native.masked_forward_train(x, data["mask"], None, None, 1e-5)
    rows = gather(x.double(), data["mask"])  # (M, C)
    assert ((mean.double() - rows.mean(0)).abs() / rows.mean(0).abs()).max() < 1e-7
    assert ((var.double() - rows.var(0, correction=0)).abs() / rows.var(0, correction=0)).max() < 1e-4


@needs_native
def test_native_ops_without_valid_values_or_outputs() -> None:
    """No valid value: NaN statistics, zero output and zero sums; dx or parameter gradients not
    asked for are not computed."""
    x, dy = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    none = torch.zeros(3, 5, dtype=torch.bool)
    y, mean, var, invstd = _native.masked_forward_train(x, none, None, None, 1e-5)
    assert mean.isnan().all() and var.isnan().all() and not y.any()
    dx, dgamma, dbeta = _native.masked_backward_train(dy, x, none, None, torch.zeros(4), torch.ones(4), True)
    assert dx is not None and not dx.any() and not dgamma.any() and not dbeta.any()
    mask = torch.rand(3, 5) < 0.5
    assert _native.masked_backward_train(dy, x, mask, None, mean, invstd, False)[0] is None
    assert _native.masked_backward_eval(dy, x, mask, None, mean, invstd, False, False) == (None, None, None)


@needs_native
def test_native_layouts_it_does_not_take_run_eagerly() -> None:
    """channels_last and (N, C) input take the eager masked path; contiguous (N, C, *) the native one."""
    x = torch.randn(4, 3, 5, 6)
    assert _masked.native_masked(x)
    assert not _masked.native_masked(x.contiguous(memory_format=torch.channels_last))
    assert not _masked.native_masked(torch.randn(4, 3))
    with batchnorm.using_backend("eager"):
        assert not _masked.native_masked(x)


@needs_native
def test_native_masked_ops_pass_torch_library_checks() -> None:
    """Schema, fake kernels (shapes, dtypes, strides) and tracing by AOT autograd."""
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    data = native_case_data(NativeCase("opcheck", (4, 5, 6), torch.float32))
    mask, w, b = data["mask"], data["weight"], data["bias"]
    for x in (data["x"], data["x"].half()):
        _, mean, var, invstd = _native.masked_forward_train(x, mask, w, b, 1e-5)
        ops = torch.ops.batchnorm
        torch.library.opcheck(ops.masked_forward_train, (x, mask, w, b, 1e-5), test_utils=utils)
        torch.library.opcheck(ops.masked_forward_eval, (x, mask, mean, var, w, None, 1e-5), test_utils=utils)
        for need in (True, False):
            arguments = (x, x, mask, w, mean, invstd, need)
            torch.library.opcheck(ops.masked_backward_train, arguments, test_utils=utils)
            torch.library.opcheck(ops.masked_backward_eval, (*arguments, not need), test_utils=utils)
