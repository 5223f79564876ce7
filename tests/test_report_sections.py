"""The report sections that use the trained LeNet (recalibrate, variants and folding, inversion) at a tiny size.

One tiny context is shared by the module: 160 synthetic 28x28 images, 8 training steps, so the
sections run in seconds and every number can be checked against an independent computation.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import batchnorm
from batchnorm.experiments import inversion_demo, running_stats, tools_demo
from batchnorm.experiments.data import synthetic_digits
from batchnorm.experiments.lenet import lenet_runs
from batchnorm.experiments.report import Context, Section, write_report
from batchnorm.experiments.training import evaluate

STEPS = 8
TEST_SIZE = 32


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Context:
    data = synthetic_digits(160, seed=0)
    assert len(data.test_labels) == TEST_SIZE
    return Context(
        data=data,
        device=torch.device("cpu"),
        seed=0,
        steps=STEPS,
        eval_points=2,
        progress=False,
        out=tmp_path_factory.mktemp("report"),
    )


def assert_written(section: Section, names: list[str], tmp_path: Path) -> None:
    assert [figure.name for figure in section.figures] == names
    for figure in section.figures:
        assert figure.caption and figure.title
    write_report(tmp_path, [section], {section.key: section.summary}, {})
    for name in names:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_accuracy(value: float) -> None:
    # An accuracy is a count over the 32 test images.
    assert 0.0 <= value <= 1.0 and round(value * TEST_SIZE) == pytest.approx(value * TEST_SIZE, abs=1e-9)


def test_running_stats_section_recalibrates_a_copy_of_the_trained_lenet(ctx: Context) -> None:
    model = lenet_runs(ctx)["bn"].model
    saved = copy.deepcopy(model.state_dict())
    section = running_stats.section(ctx)
    numbers = section.summary["lenet_recalibrate"]
    train_x, test_x = ctx.images28()
    # Independently: recalibrate on the same batches of 60, evaluate before and after.
    expected_after = batchnorm.recalibrate(copy.deepcopy(model), list(train_x.split(60)))
    assert numbers["before"]["accuracy"] == evaluate(model, test_x, ctx.data.test_labels)[0]
    assert numbers["after"]["accuracy"] == evaluate(expected_after, test_x, ctx.data.test_labels)[0]
    assert_accuracy(numbers["before"]["accuracy"])
    assert_accuracy(numbers["after"]["accuracy"])
    # After 8 steps with momentum 0.1 the running averages are far from the population's: they move.
    assert numbers["max_rel_running_var_change"] > 0.01 and numbers["max_abs_logit_change"] > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key  # the report's LeNet is shared: left alone
    assert len(section.tables) == 2 and section.tables[1].rows[0][1] == f"{numbers['before']['accuracy']:.2%}"


def test_tools_section(ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools_demo, "FOLD_REPEATS", 2)
    monkeypatch.setattr(tools_demo, "FOLD_BATCH_SIZES", (1, 4))
    section = tools_demo.section(ctx)
    assert_written(section, ["small_batch", "fold_speedup"], tmp_path)
    small, fold = section.summary["small_batch"], section.summary["fold"]
    steps = tools_demo.small_batch_steps(ctx)
    assert small["steps"] == steps == STEPS // 4
    assert [small[key]["batch_size"] for key in tools_demo.VARIANTS] == [4, 4, 64]
    for key in tools_demo.VARIANTS:
        assert_accuracy(small[key]["final_test_accuracy"])
        assert_accuracy(small[key]["recalibrated_test_accuracy"])
    runs = tools_demo.small_batch_runs(ctx)
    # The batch norms counted what they normalized: one batch a step, 64 / 4 virtual batches for ghost.
    counts = {key: int(run.model[1].num_batches_tracked) for key, run in runs.items()}
    assert counts == {"batchnorm": steps, "batchrenorm": steps, "ghost": steps * 16}
    assert list(fold["timing"]) == ["batch_1", "batch_4"] and fold["max_abs_difference"] < 1e-4
    assert all(t["speedup"] > 0 for t in fold["timing"].values())


def test_inversion_section(ctx: Context, tmp_path: Path) -> None:
    section = inversion_demo.section(ctx)
    assert_written(section, ["inversion", "flow"], tmp_path)
    summary = section.summary
    errors = summary["reconstruction"]["relative_errors"]
    assert len(errors) == len(set(ctx.data.test_labels.tolist()))  # one original per class present
    assert all(math.isfinite(e) and e >= 0 for e in errors)
    assert summary["reconstruction"]["mean_relative_error"] == pytest.approx(sum(errors) / len(errors))
    synthesis = summary["synthesis"]
    for key in ("confidence_without_prior", "confidence_with_prior"):
        assert len(synthesis[key]) == 10 and all(0.0 <= p <= 1.0 for p in synthesis[key])
    assert synthesis["bn_distance_without_prior"] >= 0 and synthesis["bn_distance_with_prior"] >= 0
    flow = summary["flow"]
    assert flow["steps"] == inversion_demo.flow_steps(ctx) == 1
    assert math.isfinite(flow["nll_with_batchnorm"]) and math.isfinite(flow["nll_without_batchnorm"])
