"""The module-by-operation matrix (tests/matrix.py): every cell against its oracle (float64 math
written out here, torch's modules, or the unconverted model), every refusal with its reason, and
the table in docs/compat.md up to date with the data."""

from __future__ import annotations

import copy
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import batchnorm
from batchnorm._convert import batch_norm_like, declares_protocol
from batchnorm.inversion import bn_statistics_distance

from .conftest import TorchBatchNormAnyRank
from .matrix import CHANNELS, COLUMNS, ROW, ROWS, Cell, Row, cells, expected, render_into
from .test_sync import COLLECTIVE_TIMEOUT, spawn_worker

ROOT = Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-5, "atol": 1e-5}
TOL64 = {"rtol": 1e-10, "atol": 1e-10}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def state_of(module: nn.Module) -> Any:
    return module.batch_norm_state() if declares_protocol(module) else module


def build(row: Row, seed: int = 0, **kwargs: Any) -> nn.Sequential:
    """The row's module in a one-module Sequential, its state moved away from the defaults."""
    torch.manual_seed(seed)
    module = row.make(CHANNELS, **kwargs)
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        module(torch.randn(row.shape))  # materialized by a first input
    state = state_of(module)
    with torch.no_grad():
        if isinstance(module, batchnorm.BatchNormFlow):
            module.unconstrained_weight.normal_(0.0, 0.3)
        elif state.weight is not None:
            state.weight.uniform_(0.5, 1.5)
        if state.bias is not None:
            state.bias.normal_(0.0, 0.5)
        state.running_mean.normal_(0.0, 0.5)
        state.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(module)


def data(row: Row, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(row.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 + 0.5


def output(model: nn.Module, x: Tensor) -> Tensor:
    """The model's output on a copy of x (InPlaceABN overwrites its input); a flow's z."""
    y = model(x.clone())
    return y[0] if isinstance(y, tuple) else y


def layer_input(row: Row, model: nn.Module, x: Tensor) -> Tensor:
    """What the batch norm of the row's module sees, in float64: x, or the convolution's output."""
    if not row.conv_dims:
        return x.double()
    conv = model[0].conv
    bias = None if conv.bias is None else conv.bias.detach().double()
    convolution = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[row.conv_dims]
    return convolution(x.double(), conv.weight.detach().double(), bias, padding=1)


def math(row: Row, model: nn.Module, x: Tensor, training: bool) -> Tensor | None:
    """The row's output in float64, written out; None where training normalizes in a way this
    formula does not cover (batch renormalization, tested in tests/test_variants.py)."""
    state = state_of(model[0])
    z = layer_input(row, model, x)
    dims = [0, *range(2, z.dim())]
    shape = (1, -1) + (1,) * (z.dim() - 2)

    def normalize(part: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        weight = state.weight.detach().double() if state.weight is not None else torch.ones_like(mean)
        bias = state.bias.detach().double() if state.bias is not None else torch.zeros_like(mean)
        return (part - mean.view(shape)) / torch.sqrt(var.view(shape) + state.eps) * weight.view(shape) + bias.view(
            shape
        )

    if not training or row.batch_statistics == "none":
        y = normalize(z, state.running_mean.double(), state.running_var.double())
    elif row.batch_statistics == "batch":
        y = normalize(z, z.mean(dims), z.var(dims, unbiased=False))
    elif row.batch_statistics == "virtual":
        y = torch.cat([normalize(c, c.mean(dims), c.var(dims, unbiased=False)) for c in z.split(2)])
    else:
        return None
    return y if row.activation is None else row.activation(y)


def check_close(actual: Tensor, reference: Tensor | None, **tol: float) -> None:
    if reference is not None:
        torch.testing.assert_close(actual.double(), reference, **(tol or TOL))


def same_outputs(first: nn.Module, second: nn.Module, x: Tensor, **tol: float) -> None:
    """Equal outputs in eval and in one training step (each model on its own copy)."""
    for training in (False, True):
        a, b = copy.deepcopy(first).train(training), copy.deepcopy(second).train(training)
        torch.testing.assert_close(output(a, x), output(b, x), **(tol or TOL))


def assert_refused(cell: Cell, call: Any, model: nn.Module) -> None:
    """The tool raises a ValueError with the cell's reason and changes nothing."""
    before = {key: value.clone() for key, value in model.state_dict().items()}
    types = [type(module) for module in model.modules()]
    with pytest.raises(ValueError, match=re.escape(cell.reason)):
        call(model)
    assert [type(module) for module in model.modules()] == types
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------------------------------
# One function per column
# ---------------------------------------------------------------------------------------------


def cell_to_torch(row: Row, cell: Cell) -> None:
    model, x = build(row).eval(), data(row)
    back = batchnorm.to_torch(model)
    if cell.status == "kept":
        assert type(back[0]) is type(model[0])
        if row.conv_dims:  # its inner batch norm is converted: torch's, run unfused
            assert type(back[0].bn) is getattr(nn, f"BatchNorm{row.conv_dims}d")
    else:
        assert type(back[0]).__module__.startswith("torch.nn")
        again = batchnorm.from_torch(back)
        assert type(again[0]) is type(model[0])
        same_outputs(again, model, x)
    same_outputs(back, model, x)


def cell_freeze(row: Row, cell: Cell) -> None:
    model, x = build(row).eval(), data(row)
    if cell.status == "refused":
        assert_refused(cell, batchnorm.freeze, model)
        return
    frozen = batchnorm.freeze(model)
    assert isinstance(state_of(frozen[0]), batchnorm.FrozenBatchNorm)
    reference = math(row, model, x, training=False)
    for training in (True, False):
        check_close(output(frozen.train(training), x), reference)


def cell_fold(row: Row, cell: Cell) -> None:
    x = data(row)
    model = build(row)
    if not row.conv_dims:
        torch.manual_seed(5)
        model = nn.Sequential(CONVS[len(row.shape) - 2](CHANNELS, CHANNELS, 1), model[0])
    model.eval()
    folded = batchnorm.fold(model, example_input=x)
    torch.testing.assert_close(output(folded, x), output(model, x), rtol=1e-4, atol=1e-4)
    left = [type(module).__name__ for module in folded.modules() if batch_norm_like(module)]
    assert left == ([] if cell.status == "supported" else [row.name])


def cell_recalibrate(row: Row, cell: Cell) -> None:
    model = build(row)
    batches = [data(row, seed) for seed in (2, 3, 4)]
    state = state_of(model[0])
    before = (state.running_mean.clone(), state.running_var.clone())
    batchnorm.recalibrate(model, [x.clone() for x in batches])  # copies: InPlaceABN overwrites its input
    if cell.status == "kept":
        assert torch.equal(state.running_mean, before[0]) and torch.equal(state.running_var, before[1])
        return
    seen = torch.cat([layer_input(row, model, x) for x in batches])  # every value the layer saw
    dims = [0, *range(2, seen.dim())]
    torch.testing.assert_close(state.running_mean.double(), seen.mean(dims), **TOL)
    torch.testing.assert_close(state.running_var.double(), seen.var(dims), **TOL)  # unbiased


def cell_invert_prior(row: Row, cell: Cell) -> None:
    model, x = build(row), data(row)
    state = state_of(model[0])
    z = layer_input(row, model, x)
    dims = [0, *range(2, z.dim())]
    written_out = torch.linalg.vector_norm(z.mean(dims) - state.running_mean.double()) + torch.linalg.vector_norm(
        z.var(dims, unbiased=False) - state.running_var.double()
    )
    assert bn_statistics_distance(model, x) == pytest.approx(float(written_out), rel=1e-5)


def _torch_counterpart(row: Row) -> nn.Module:
    if row.conv_dims:
        conv = CONVS[row.conv_dims](CHANNELS, CHANNELS, 3, padding=1, bias=False)
        return nn.Sequential(OrderedDict(conv=conv, bn=getattr(nn, f"BatchNorm{row.conv_dims}d")(CHANNELS)))
    return TorchBatchNormAnyRank(CHANNELS)


def cell_state_dict(row: Row, cell: Cell) -> None:
    model, x = build(row).eval(), data(row)
    theirs = _torch_counterpart(row)
    if cell.status == "refused":
        with pytest.raises(RuntimeError, match="Missing key"):
            theirs.load_state_dict(model[0].state_dict())
        return
    theirs.load_state_dict(model[0].state_dict())  # a frozen one has no counter: torch's starts at 0
    fresh = row.make(CHANNELS)
    fresh.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(output(nn.Sequential(fresh).eval(), x), output(model, x))
    if row.activation is None:
        torch.testing.assert_close(output(nn.Sequential(theirs).eval(), x), output(model, x))


def cell_copy(row: Row, cell: Cell) -> None:
    model, x = build(row), data(row)
    same_outputs(copy.deepcopy(model), model, x)
    same_outputs(pickle.loads(pickle.dumps(model)), model, x)


def cell_to_dtype(row: Row, cell: Cell) -> None:
    model, x = build(row).to(torch.float64), data(row, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())
    for training in (False, True):
        check_close(output(copy.deepcopy(model).train(training), x), math(row, model, x, training), **TOL64)


def cell_compile(row: Row, cell: Cell) -> None:
    model, x = build(row), data(row)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()  # each cell compiles the same code for another module: no recompile limit
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(output(compiled, x), output(eager, x))
    torch.testing.assert_close(state_of(model[0]).running_var, state_of(eager[0]).running_var)


def cell_export(row: Row, cell: Cell) -> None:
    model, x = build(row).eval(), data(row)
    exported = torch.export.export(model, (x.clone(),))
    torch.testing.assert_close(output(exported.module(), x), output(model, x))


def cell_autocast(row: Row, cell: Cell) -> None:
    model, x = build(row).eval(), data(row)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = output(model, x)
    torch.testing.assert_close(low.float(), output(model, x), rtol=0.05, atol=0.1)


def cell_channels_last(row: Row, cell: Cell) -> None:
    model, x = build(row), data(row)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for training in (False, True):
        y = output(copy.deepcopy(model).train(training), channels_last)
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, output(copy.deepcopy(model).train(training), x))


def cell_bias_false(row: Row, cell: Cell) -> None:
    model, x = build(row, bias=False), data(row)
    assert state_of(model[0]).bias is None and state_of(model[0]).weight is not None
    for training in (False, True):
        check_close(output(copy.deepcopy(model).train(training), x), math(row, model, x, training))


def cell_train_eval(row: Row, cell: Cell) -> None:
    model, x = build(row), data(row)
    state = state_of(model[0])
    check_close(output(model.train(), x), math(row, model, x, training=True))
    after_training = state.running_var.clone()
    check_close(output(model.eval(), x), math(row, model, x, training=False))
    assert torch.equal(state.running_var, after_training)  # eval moves nothing
    output(model.train(), x)
    moved = not torch.equal(state.running_var, after_training)
    assert moved == (row.batch_statistics != "none")  # a frozen batch norm's statistics never move


CELL_CHECKS = {
    "to_torch": cell_to_torch,
    "freeze": cell_freeze,
    "fold": cell_fold,
    "recalibrate": cell_recalibrate,
    "invert_prior": cell_invert_prior,
    "state_dict": cell_state_dict,
    "copy": cell_copy,
    "to_dtype": cell_to_dtype,
    "compile": cell_compile,
    "export": cell_export,
    "autocast": cell_autocast,
    "channels_last": cell_channels_last,
    "bias_false": cell_bias_false,
    "train_eval": cell_train_eval,
}
LOCAL_CELLS = [(row, column, cell) for row, column, cell in cells() if column != "sync" and cell.status != "n/a"]


@pytest.mark.parametrize(
    ("row", "column", "cell"), LOCAL_CELLS, ids=[f"{row.name}-{column}" for row, column, _ in LOCAL_CELLS]
)
def test_cell(row: Row, column: str, cell: Cell) -> None:
    CELL_CHECKS[column](row, cell)


# ---------------------------------------------------------------------------------------------
# convert_sync_batchnorm: every row on the same two gloo ranks, spawned once
# ---------------------------------------------------------------------------------------------


def _synchronizes(row: Row) -> bool:
    """After convert_sync_batchnorm, the row's model holds a synchronized batch norm."""
    if expected(row, "sync").status == "refused":
        return False
    converted = batchnorm.SyncBatchNorm.convert_sync_batchnorm(build(row))
    return any(isinstance(module, batchnorm.SyncBatchNorm) for module in converted.modules())


SYNCED = [row.name for row in ROWS if _synchronizes(row)]
SYNC_ROWS_PER_RANK = 3


def _sync_step(model: nn.Module, row: Row, rows: slice) -> dict[str, Tensor]:
    """One training step with an upstream gradient on ``rows`` of the row's global batch."""
    x, dy = data(row, dtype=torch.float64), data(row, seed=9, dtype=torch.float64)
    leaf = x[rows].clone().requires_grad_(True)
    y = model(leaf * 1.0)  # a non-leaf: InPlaceABN overwrites its input
    (y * dy[rows]).sum().backward()
    state = state_of(model[0])
    return {"y": y.detach(), "dx": leaf.grad, "running_var": state.running_var.clone()}


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        results = {}
        rows = slice(rank * SYNC_ROWS_PER_RANK, (rank + 1) * SYNC_ROWS_PER_RANK)
        for name in SYNCED:
            model = batchnorm.SyncBatchNorm.convert_sync_batchnorm(build(ROW[name]).double())
            results[name] = {"types": [type(m).__name__ for m in model.modules()], **_sync_step(model, ROW[name], rows)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sync_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_worker(_sync_worker, 2, tmp_path_factory.mktemp("matrix_sync"))


SYNC_CELLS = [(row, cell) for row, column, cell in cells() if column == "sync"]


@pytest.mark.parametrize(("row", "cell"), SYNC_CELLS, ids=[row.name for row, _ in SYNC_CELLS])
def test_sync_cell(row: Row, cell: Cell, sync_ranks: list[dict[str, Any]]) -> None:
    convert = batchnorm.SyncBatchNorm.convert_sync_batchnorm
    if cell.status == "refused":
        assert_refused(cell, convert, build(row))
        return
    if row.name not in SYNCED:  # kept, local by design or fixed: the module itself stays
        model = build(row)
        original = model[0]
        assert convert(model)[0] is original
        return
    reference = build(row).double()
    full = slice(0, None)
    expected_step = _sync_step(reference, row, full)
    types = sync_ranks[0][row.name]["types"]
    assert any(name.startswith("Sync") for name in types), types
    for key in ("y", "dx"):
        torch.testing.assert_close(torch.cat([rank[row.name][key] for rank in sync_ranks]), expected_step[key], **TOL64)
    for rank in sync_ranks:
        torch.testing.assert_close(rank[row.name]["running_var"], expected_step["running_var"], **TOL64)


# ---------------------------------------------------------------------------------------------
# The data and the documentation
# ---------------------------------------------------------------------------------------------


def test_docs_compat_table_is_generated_from_the_matrix() -> None:
    text = (ROOT / "docs" / "compat.md").read_text()
    assert render_into(text) == text, "docs/compat.md is out of date: run python -m tests.matrix docs/compat.md"


def test_every_column_has_a_check() -> None:
    assert set(CELL_CHECKS) | {"sync"} == set(COLUMNS)
