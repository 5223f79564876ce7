"""The report's tools experiments: variants in the one LeNet, the renorm warm-up, fold timing."""

from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm.experiments import tools_demo
from batchnorm.experiments.models import lenet


@pytest.mark.parametrize("key", list(tools_demo.VARIANTS))
def test_variants_fill_every_norm_slot_of_lenet(key: str) -> None:
    _, norm, _ = tools_demo.VARIANTS[key]
    model = lenet(norm2d=norm, norm1d=norm)
    norms = [m for m in model if isinstance(m, batchnorm.BatchNorm)]
    assert [m.num_features for m in norms] == [6, 16, 120, 84]
    expected = {
        "batchnorm": batchnorm.BatchNorm,
        "batchnorm64": batchnorm.BatchNorm,
        "batchrenorm": batchnorm.BatchRenorm,
        "ghost": batchnorm.GhostBatchNorm,
    }[key]
    assert all(type(m) is expected for m in norms)
    if key == "ghost":
        assert all(m.virtual_batch_size == tools_demo.SMALL_BATCH for m in norms)
    assert model(torch.randn(8, 1, 28, 28)).shape == (8, 10)


def test_ghost_batch_norm_has_a_baseline_that_sees_the_same_images() -> None:
    batches = {key: batch for key, (_, _, batch) in tools_demo.VARIANTS.items()}
    assert batches["ghost"] == batches["batchnorm64"] == tools_demo.GHOST_BATCH
    assert batches["batchnorm"] == batches["batchrenorm"] == tools_demo.SMALL_BATCH


def test_renorm_warmup_holds_then_ramps_to_the_final_limits() -> None:
    model = lenet(norm2d=batchnorm.BatchRenorm, norm1d=batchnorm.BatchRenorm)
    set_limits = tools_demo._renorm_warmup(model, steps=100)
    assert set_limits is not None
    layers = [m for m in model if isinstance(m, batchnorm.BatchRenorm)]
    set_limits(9)  # inside the first 10%: plain batch norm
    assert all((m.rmax, m.dmax) == (1.0, 0.0) for m in layers)
    set_limits(100)  # past both ramps
    assert all((m.rmax, m.dmax) == (3.0, 5.0) for m in layers)
    assert tools_demo._renorm_warmup(lenet(bn=True), steps=100) is None  # nothing to warm up


def test_fold_speedup_times_both_models_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = lenet(bn=True)
    model(torch.randn(16, 1, 28, 28))  # running statistics away from (0, 1), so folding does something
    model.train()
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    inputs = torch.rand(5, 1, 28, 28)
    result = tools_demo.fold_speedup(model, inputs, (2, 7), repeats=3)
    assert list(result["timing"]) == ["batch_2", "batch_7"]  # 7 > 5 inputs: cycled
    for timing in result["timing"].values():
        assert timing["unfolded_ms"] > 0 and timing["folded_ms"] > 0
        assert timing["speedup"] == timing["unfolded_ms"] / timing["folded_ms"]
    assert 0 <= result["max_abs_difference"] < 1e-4
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
