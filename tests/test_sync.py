"""SyncBatchNorm against BatchNorm on the concatenated batch, on real gloo process groups.

Four ranks are spawned once (process start-up dominates the run time): every rank runs the
four-rank cases on the default group, ranks 0 and 1 the two-rank cases on a group of their own,
and each saves what it saw; the tests then compare the ranks' results with the core BatchNorm
run on the concatenation of all ranks' batches in this process.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import batchnorm
from batchnorm import BatchNorm, SyncBatchNorm

ROOT = Path(__file__).resolve().parents[1]
JOIN_TIMEOUT_S = 90.0
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
STEPS = 3  # training steps per case: running statistics and the counter move more than once


@dataclass(frozen=True)
class Case:
    name: str
    sizes: tuple[int, ...]  # batch size of each rank
    tail: tuple[int, ...] = ()  # dimensions after (N, C)
    channels: int = 3
    affine: bool = True
    momentum: float | None = 0.1
    track: bool = True
    dtype: torch.dtype = torch.float64


CASES_2 = [
    Case("uneven_2d", (3, 5)),
    Case("uneven_3d", (2, 7), (4,)),
    Case("uneven_4d", (4, 1), (3, 2)),
    Case("empty_rank", (0, 6), (2,)),
    Case("momentum_none", (3, 4), momentum=None),
    Case("not_affine", (5, 2), (2,), affine=False),
    Case("not_tracking", (2, 3), (2,), track=False),
    Case("float32", (6, 10), (5, 5), channels=4, dtype=torch.float32),
]
CASES_4 = [
    Case("uneven_2d", (5, 3, 2, 1)),
    Case("empty_rank_4d", (3, 0, 2, 4), (2, 3)),
    Case("two_empty_ranks", (0, 4, 0, 3), (3,), momentum=None),
]


def case_data(case: Case) -> dict[str, torch.Tensor]:
    """The global batch, upstream gradient and parameters of a case, identical in every process."""
    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    shape = (sum(case.sizes), case.channels, *case.tail)
    return {
        # Offset and scaled so that a naive E[x^2] - E[x]^2 would show in float32.
        "x": [torch.randn(shape, generator=gen, dtype=case.dtype) * 3 + 40 for _ in range(STEPS)],
        "dy": [torch.randn(shape, generator=gen, dtype=case.dtype) for _ in range(STEPS)],
        "weight": torch.rand(case.channels, generator=gen, dtype=case.dtype) + 0.5,
        "bias": torch.randn(case.channels, generator=gen, dtype=case.dtype),
    }


def make(cls: type[BatchNorm], case: Case, data: dict[str, Any], **kwargs: Any) -> BatchNorm:
    bn = cls(
        case.channels,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track,
        dtype=case.dtype,
        **kwargs,
    )
    if case.affine:
        with torch.no_grad():
            bn.weight.copy_(data["weight"])
            bn.bias.copy_(data["bias"])
    return bn


def run_case(bn: nn.Module, case: Case, data: dict[str, Any], rows: slice) -> dict[str, Any]:
    """STEPS training steps on rows of the global batch, then one eval step."""
    seen: dict[str, Any] = {"y": [], "dx": [], "dweight": [], "dbias": []}
    for step in range(STEPS):
        x = data["x"][step][rows].clone().requires_grad_(True)
        y = bn(x)
        (y * data["dy"][step][rows]).sum().backward()
        seen["y"].append(y.detach())
        seen["dx"].append(x.grad)
        if case.affine:
            seen["dweight"].append(bn.weight.grad.clone())
            seen["dbias"].append(bn.bias.grad.clone())
            bn.weight.grad = bn.bias.grad = None
    bn.eval()
    seen["eval_y"] = bn(data["x"][0][rows]).detach()
    seen["running"] = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    return seen


def _rows(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        # Every rank creates every group, in the same order; halves[0] is the two-rank group.
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        results: dict[str, Any] = {"world4": {}, "world2": {}}
        for case in CASES_4:
            data = case_data(case)
            bn = make(SyncBatchNorm, case, data)
            results["world4"][case.name] = run_case(bn, case, data, _rows(case.sizes, rank))
        if rank < 2:
            for case in CASES_2:
                data = case_data(case)
                bn = make(SyncBatchNorm, case, data, process_group=halves[0])
                results["world2"][case.name] = run_case(bn, case, data, _rows(case.sizes, rank))
            # One value per channel over the whole group: every rank raises, nothing changes.
            bn = SyncBatchNorm(2, process_group=halves[0])
            try:
                bn(torch.randn(1 - rank, 2))
            except ValueError as error:
                results["error"] = (str(error), bn.running_mean.clone(), int(bn.num_batches_tracked))
        # Fused modules converted: the whole four-rank batch, as the unconverted model on one process.
        fused = SyncBatchNorm.convert_sync_batchnorm(fused_model())
        x, dy = fused_data()
        rows = _rows(FUSED_SIZES, rank)
        leaf = x[rows].clone().requires_grad_(True)
        y = fused(leaf)
        (y * dy[rows]).sum().backward()
        results["fused"] = (y.detach(), leaf.grad, [type(m).__name__ for m in fused])
        # Each half normalizes over its own two ranks only, on data that differs between halves.
        bn = SyncBatchNorm(2, process_group=halves[rank // 2])
        results["subgroup"] = bn(torch.arange(8.0).view(4, 2) * (rank + 1)).detach()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


FUSED_SIZES = (3, 2, 4, 3)


def fused_model() -> nn.Module:
    """Convolution + batch norm, batch norm + activation and in-place activated batch norm."""
    torch.manual_seed(0)
    return nn.Sequential(
        batchnorm.ConvBatchNorm2d(2, 3, 3, padding=1, dtype=torch.float64),
        batchnorm.BatchNormAct(3, activation="silu", dtype=torch.float64),
        nn.Conv2d(3, 3, 1, dtype=torch.float64),
        batchnorm.InPlaceABN(3, activation="leaky_relu", activation_param=0.1, dtype=torch.float64),
    )


def fused_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    shape = (sum(FUSED_SIZES), 2, 4, 4)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1, torch.randn(
        (sum(FUSED_SIZES), 3, 4, 4), generator=gen, dtype=torch.float64
    )


def spawn(world: int, tmp: Path) -> list[dict[str, Any]]:
    """Run _worker on ``world`` gloo ranks; every rank and the whole run have a deadline."""
    return spawn_worker(_worker, world, tmp)


def spawn_worker(worker: Any, world: int, tmp: Path) -> list[dict[str, Any]]:
    """Run ``worker(rank, world, init_file, out_dir)`` on ``world`` gloo ranks, each saving
    ``rank{rank}.pt`` in ``tmp``; every rank and the whole run have a deadline."""
    context = mp.start_processes(
        worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} gloo ranks did not finish within {JOIN_TIMEOUT_S} s")
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Four gloo ranks, spawned once for the module (process start-up dominates the run time)."""
    return spawn(4, tmp_path_factory.mktemp("gloo"))


def check_case(case: Case, ranks: list[dict[str, Any]], world: str) -> None:
    results = [ranks[rank][world] for rank in range(len(case.sizes))]
    data = case_data(case)
    expected = run_case(make(BatchNorm, case, data), case, data, slice(None))
    tol = {"rtol": 1e-10, "atol": 1e-10} if case.dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for step in range(STEPS):
        for key in ("y", "dx"):
            got = torch.cat([results[rank][case.name][key][step] for rank in range(len(case.sizes))])
            torch.testing.assert_close(got, expected[key][step], **tol, msg=f"{case.name} {key} step {step}")
        if case.affine:
            for key in ("dweight", "dbias"):
                summed = sum(results[rank][case.name][key][step] for rank in range(len(case.sizes)))
                torch.testing.assert_close(summed, expected[key][step], **tol, msg=f"{case.name} {key}")
    for rank in range(len(case.sizes)):
        got = results[rank][case.name]
        if case.track:
            for name, a, b in zip(
                ("running_mean", "running_var", "counter"), got["running"], expected["running"], strict=True
            ):
                torch.testing.assert_close(a, b, **tol, msg=f"{case.name} rank {rank} {name}")
        else:
            assert got["running"] == (None, None, None)
        # Eval never synchronizes, as torch's SyncBatchNorm: running statistics, or the rank's own
        # batch statistics when the module has none.
        rows = _rows(case.sizes, rank)
        if case.track:
            torch.testing.assert_close(got["eval_y"], expected["eval_y"][rows], **tol)
        elif case.sizes[rank] > 1:
            local = make(BatchNorm, case, data).eval()(data["x"][0][rows])
            torch.testing.assert_close(got["eval_y"], local, **tol)


@pytest.mark.parametrize("case", CASES_2, ids=lambda case: case.name)
def test_two_ranks_equal_batchnorm_on_concatenated_batch(case: Case, ranks: list[dict[str, Any]]) -> None:
    check_case(case, ranks, "world2")


@pytest.mark.parametrize("case", CASES_4, ids=lambda case: case.name)
def test_four_ranks_equal_batchnorm_on_concatenated_batch(case: Case, ranks: list[dict[str, Any]]) -> None:
    check_case(case, ranks, "world4")


def test_one_value_over_the_group_raises_on_every_rank_and_changes_nothing(ranks: list[dict[str, Any]]) -> None:
    for rank in range(2):
        message, running_mean, counter = ranks[rank]["error"]
        assert "Expected more than 1 value per channel when training" in message
        assert torch.equal(running_mean, torch.zeros(2))
        assert counter == 0


def test_process_group_limits_the_statistics_to_its_ranks(ranks: list[dict[str, Any]]) -> None:
    base = torch.arange(8.0).view(4, 2)
    for first in (0, 2):
        x = torch.cat([base * (first + 1), base * (first + 2)])
        expected = torch.nn.functional.batch_norm(x, None, None, training=True)
        got = torch.cat([ranks[first]["subgroup"], ranks[first + 1]["subgroup"]])
        torch.testing.assert_close(got, expected)


def test_without_process_group_is_the_local_batchnorm() -> None:
    assert not dist.is_initialized()
    torch.manual_seed(0)
    sync, local = SyncBatchNorm(3, momentum=None), BatchNorm(3, momentum=None)
    for _ in range(2):
        x = torch.randn(6, 3, 4)
        assert torch.equal(sync(x), local(x))
    assert torch.equal(sync.running_var, local.running_var)
    assert sync.num_batches_tracked.item() == local.num_batches_tracked.item() == 2


# ---------------------------------------------------------------------------------------------
# convert_sync_batchnorm
# ---------------------------------------------------------------------------------------------


def test_convert_sync_batchnorm_replaces_torch_and_our_batch_norms_keeping_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.Sequential(batchnorm.BatchNorm2d(4, eps=1e-3, skip_nonfinite=False), batchnorm.GhostBatchNorm(4, 2)),
        nn.Flatten(),
        nn.BatchNorm1d(4 * 6 * 6, affine=False),
    )
    model(torch.randn(8, 2, 8, 8))  # move the running statistics away from their defaults
    model[1].eval()
    old = {name: module for name, module in model.named_modules()}
    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group="group")
    assert converted is model
    for name in ("1", "2.0", "4"):
        new = dict(converted.named_modules())[name]
        assert type(new) is SyncBatchNorm and new.process_group == "group"
        for attr in ("num_features", "eps", "momentum", "affine", "training"):
            assert getattr(new, attr) == getattr(old[name], attr), (name, attr)
        for key, value in old[name].state_dict().items():
            assert new.state_dict()[key] is not None and torch.equal(new.state_dict()[key], value)
        if old[name].affine:
            assert new.weight is old[name].weight  # shared, so an existing optimizer keeps working
    assert not converted[2][0].skip_nonfinite
    assert type(converted[2][1]) is batchnorm.GhostBatchNorm
    assert SyncBatchNorm.convert_sync_batchnorm(batchnorm.BatchNorm1d(3)).__class__ is SyncBatchNorm


def test_convert_sync_batchnorm_keeps_bias_false() -> None:
    model = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4, bias=False)))
    assert type(model[0]) is SyncBatchNorm and model[0].bias is None and model[0].weight is not None
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(model[0](x), nn.BatchNorm2d(4, bias=False)(x))


@pytest.mark.parametrize("bad", [nn.LazyBatchNorm2d(), batchnorm.LazyBatchNorm2d()], ids=str)
def test_convert_sync_batchnorm_refuses_what_it_cannot_convert_and_changes_nothing(bad: nn.Module) -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), bad)
    first = model[0]
    with pytest.raises(ValueError, match=r"1 \("):
        SyncBatchNorm.convert_sync_batchnorm(model)
    assert model[0] is first and model[1] is bad


# ---------------------------------------------------------------------------------------------
# The data-parallel example
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ddp_example_equals_single_process_training_on_the_concatenated_batch(tmp_path: Path) -> None:
    # Odd global batch: the two ranks get 7 and 6 samples.
    args = ["--steps", "3", "--global-batch", "13", "--data", "synthetic", "--seed", "3"]
    example = str(ROOT / "examples" / "ddp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp_train = _import_example()
    assert ddp_train.main([*args, "--out", str(tmp_path / "single.pt")]) == 0
    distributed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            example,
            *args,
            "--out",
            str(tmp_path / "ddp.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert distributed.returncode == 0, distributed.stderr
    expected = torch.load(tmp_path / "single.pt", weights_only=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert got.keys() == expected.keys() and any("running_var" in key for key in got)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # Training moved the parameters: the comparison is not between two untouched initializations.
    initial = ddp_train.build_model(seed=3)[0].weight.detach()
    assert not torch.allclose(got["0.weight"], initial, atol=1e-3)


def _import_example() -> Any:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import ddp_train
    finally:
        sys.path.pop(0)
    return ddp_train


def test_converted_fused_modules_synchronize_over_the_group(ranks: list[dict[str, Any]]) -> None:
    """ConvBatchNorm2d, BatchNormAct and InPlaceABN after convert_sync_batchnorm, on four ranks with
    uneven batches, equal the unconverted model on the concatenated batch."""
    x, dy = fused_data()
    model = fused_model()
    leaf = x.clone().requires_grad_(True)
    expected = model(leaf)
    (expected * dy).sum().backward()
    assert ranks[0]["fused"][2] == ["ConvBatchNorm2d", "SyncBatchNormAct", "Conv2d", "SyncBatchNormAct"]
    got = torch.cat([ranks[rank]["fused"][0] for rank in range(4)])
    grad = torch.cat([ranks[rank]["fused"][1] for rank in range(4)])
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-10, atol=1e-10)
