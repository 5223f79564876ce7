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
from batchnorm.experiments import (
    inversion_demo,
    landscape,
    lenet,
    lr_sweep,
    masked_demo,
    paper,
    running_stats,
    tools_demo,
)
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
        seeds=(0, 1),
    )


def assert_written(section: Section, names: list[str], tmp_path: Path) -> None:
    assert [figure.name for figure in section.figures] == names
    for figure in section.figures:
        assert figure.caption and figure.title
    write_report(tmp_path, [section], {section.key: section.summary}, {})
    for name in names:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_accuracy(value: float, seeds: int = 1) -> None:
    # An accuracy is a count over the 32 test images (a mean over seeds: over seeds x 32).
    count = value * TEST_SIZE * seeds
    assert 0.0 <= value <= 1.0 and round(count) == pytest.approx(count, abs=1e-9)


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
    assert small["steps"] == steps == max(1, STEPS // 12)
    assert [small[key]["batch_size"] for key in tools_demo.VARIANTS] == [4, 4, 64, 64]
    for key in tools_demo.VARIANTS:
        # Means over the 2 seeds: counts over twice the test set.
        assert_accuracy(small[key]["final_test_accuracy"], seeds=2)
        assert_accuracy(small[key]["recalibrated_test_accuracy"], seeds=2)
    runs = tools_demo.small_batch_runs(ctx)
    # The batch norms counted what they normalized: one batch a step, 64 / 4 virtual batches for ghost.
    counts = {key: int(run.model[1].num_batches_tracked) for key, run in runs.items()}
    assert counts == {"batchnorm": steps, "batchrenorm": steps, "ghost": steps * 16, "batchnorm64": steps}
    assert all(len(seed_runs) == 2 for seed_runs in tools_demo.small_batch_runs_per_seed(ctx).values())
    assert list(fold["timing"]) == ["batch_1", "batch_4"] and fold["max_abs_difference"] < 1e-4
    assert all(t["speedup"] > 0 for t in fold["timing"].values())


def test_inversion_section(ctx: Context, tmp_path: Path) -> None:
    section = inversion_demo.section(ctx)
    assert_written(section, ["inversion", "flow"], tmp_path)
    summary = section.summary
    # The exact inverse first: float32 rounding, in both modes.
    assert summary["round_trip"]["train_relative_error"] < 1e-5 and summary["round_trip"]["eval_relative_error"] < 1e-5
    assert section.claim.index("bn.inverse(bn(x))") < section.claim.index("batchnorm.invert")
    errors = summary["reconstruction"]["relative_errors"]
    assert len(errors) == len(set(ctx.data.test_labels.tolist()))  # one original per class present
    assert all(math.isfinite(e) and e >= 0 for e in errors)
    assert summary["reconstruction"]["mean_relative_error"] == pytest.approx(sum(errors) / len(errors))
    synthesis = summary["synthesis"]
    for key in ("confidence_without_prior", "confidence_with_prior"):
        assert len(synthesis[key]) == 10 and all(0.0 <= p <= 1.0 for p in synthesis[key])
    assert synthesis["bn_distance_without_prior"] >= 0 and synthesis["bn_distance_with_prior"] >= 0
    flow = summary["flow"]
    assert flow["steps"] == inversion_demo.flow_steps(ctx) == 1 and flow["seeds"] == [0, 1]
    assert math.isfinite(flow["nll_with_batchnorm"]) and math.isfinite(flow["nll_without_batchnorm"])


def test_paper_lr_sweep_landscape_and_lenet_sections_over_seeds(ctx: Context, tmp_path: Path) -> None:
    sections = [paper.section(ctx), lr_sweep.section(ctx), landscape.section(ctx), lenet.section(ctx)]
    write_report(tmp_path, sections, {s.key: s.summary for s in sections}, {})
    figures = [f.name for s in sections for f in s.figures]
    assert figures == ["paper_mlp", "paper_mlp_percentiles", "lr_sweep", "landscape", "lenet_curves"]
    mlp, sweep, land, net = (s.summary for s in sections)
    for summary in (mlp, net):
        for name in ("bn", "plain"):
            per_seed = summary[name]["final_test_accuracy_per_seed"]
            assert len(per_seed) == 2
            assert summary[name]["final_test_accuracy"] == pytest.approx(sum(per_seed) / 2)
            low, high = summary[name]["final_test_accuracy_ci"]
            assert 0.0 <= low <= summary[name]["final_test_accuracy"] <= high <= 1.0
    assert sweep["learning_rates"] == list(lr_sweep.LEARNING_RATES)
    assert len(sweep["bn"]["final_test_accuracy"]) == len(sweep["plain"]["final_test_accuracy"]) == 6
    # One landscape measurement every `every` steps of each paper-MLP run, from step 0.
    assert land["steps"] == list(range(0, STEPS, landscape.every(STEPS)))
    for sentence in (sections[0].findings[0], sections[1].findings[0], sections[2].findings[0]):
        assert "higher" in sentence or "lower" in sentence or "no measurable difference" in sentence.lower(), sentence
    # Every claim, setup and caveat is there: one part of the page per claim.
    assert all(s.claim and s.setup and s.caveat and s.findings for s in sections)


def test_landscape_measure_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 10)
    x, y = torch.randn(16, 5), torch.randint(0, 10, (16,))
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    measured = landscape.measure(model, x, y, lr=0.1, multipliers=(1.0, 2.0))

    def loss_and_gradient(w: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor]:
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y)
        gw, gb = torch.autograd.grad(loss, (w, b))
        return float(loss.detach()), torch.cat([gw.flatten(), gb])

    loss0, g = loss_and_gradient(weight, bias)
    losses, changes, smoothness = [loss0], [], []
    for eta in (0.1, 0.2):
        loss, g_eta = loss_and_gradient(weight - eta * g[:50].view(10, 5), bias - eta * g[50:])
        losses.append(loss)
        changes.append(float((g_eta - g).norm()))
        smoothness.append(changes[-1] / (eta * float(g.norm())))
    assert measured["loss_variation"] == pytest.approx(max(losses) - min(losses), rel=1e-5)
    assert measured["gradient_change"] == pytest.approx(max(changes), rel=1e-5)
    assert measured["beta_smoothness"] == pytest.approx(max(smoothness), rel=1e-5)
    assert torch.equal(model.weight, weight) and torch.equal(model.bias, bias)  # measured on a copy


def test_masked_section(ctx: Context, tmp_path: Path) -> None:
    """Both variants at every padding level over the seeds; the masked net's batch norms ignore the
    padding, so a sample's training-mode output with full-length neighbours is where the drift is 0."""
    section = masked_demo.section(ctx)
    assert_written(section, ["masked"], tmp_path)
    summary = section.summary
    levels = len(masked_demo.LOWEST_LENGTHS)
    assert summary["padding"][0] == 0.0 and summary["padding"] == sorted(summary["padding"])
    for name in ("plain", "masked"):
        assert len(summary[name]["accuracy"]) == levels
        for value in summary[name]["accuracy"]:
            assert_accuracy(value, seeds=len(ctx.seeds))
        assert summary["neighbour_drift"][name][-1] == 0.0
    # Without padding the two networks are the same computation: same accuracy.
    assert summary["plain"]["accuracy"][0] == pytest.approx(summary["masked"]["accuracy"][0])


def test_masked_net_ignores_the_padding() -> None:
    """The masked network's output does not depend on what the padding holds (NaN there included)."""
    torch.manual_seed(0)
    net = masked_demo.MaskedConvNet(masked=True)
    x = torch.randn(6, 28, 28)
    mask = torch.arange(28) < torch.tensor([28, 5, 12, 20, 2, 9]).view(-1, 1)
    filled = torch.where(mask.unsqueeze(1), x, float("nan"))
    assert torch.equal(net(x, mask), net(filled, mask))
