"""The report's tools experiments at a tiny size: they run, write their figures, their numbers hold."""

from __future__ import annotations

from pathlib import Path

import torch

import batchnorm
from batchnorm.experiments import tools_demo


def test_lenet_bn_has_the_documented_layers_and_shapes() -> None:
    model = tools_demo.LeNetBN()
    assert [type(m).__name__ for m in model.modules()].count("BatchNorm") == 4
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_experiments_run_at_tiny_size_and_write_their_figures(tmp_path: Path) -> None:
    data = tools_demo.synthetic_digits(96, seed=0)
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(0)
    model = tools_demo.LeNetBN()
    tools_demo.train(model, x_train, y_train, steps=3, batch_size=16, seed=0)
    saved = {key: value.clone() for key, value in model.state_dict().items()}

    recal = tools_demo.recalibrate_experiment(model, x_train, x_test, y_test, tmp_path / "recal.png", batch_size=32)
    assert recal["before"] == tools_demo.accuracy(model, x_test, y_test)
    recalibrated = batchnorm.recalibrate(tools_demo.copy.deepcopy(model), [x_train[:32], x_train[32:64], x_train[64:]])
    assert recal["after"] == tools_demo.accuracy(recalibrated, x_test, y_test)

    small = tools_demo.small_batch_experiment(data, tmp_path / "small.png", steps=2, ghost_batch_size=8)
    assert list(small) == ["BatchNorm (batch 4)", "BatchRenorm (batch 4)", "GhostBatchNorm (4 of 8)"]
    assert all(0.0 <= value <= 1.0 for value in small.values())

    speed = tools_demo.fold_speedup(model, x_test, tmp_path / "fold.png", repeats=2)
    assert speed["speedup"] == speed["unfolded_ms"] / speed["folded_ms"] and speed["max_abs_diff"] < 1e-4
    for name in ("recal.png", "small.png", "fold.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold.png", "recal.png", "small.png"]  # no temporaries
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key  # the experiments work on copies
