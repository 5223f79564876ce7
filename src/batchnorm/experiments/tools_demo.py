"""Report section: batch-norm variants at small batches, and folding batch norm away for inference.

- :func:`small_batch_runs`: LeNet trained with batch 4 using :class:`batchnorm.BatchNorm`,
  :class:`batchnorm.BatchRenorm` (with :func:`batchnorm.renorm_schedule`'s warm-up) and
  :class:`batchnorm.GhostBatchNorm` (virtual batches of 4 out of batches of 64), each evaluated
  with its running averages and after :func:`batchnorm.recalibrate`.
- :func:`fold_speedup`: eval-mode inference time of the trained LeNet with batch norm against its
  :func:`batchnorm.fold`-ed copy, in this process, at a few batch sizes.
- :func:`section`: both, as the report's ``tools`` section.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure as MplFigure
from matplotlib.patches import Patch
from torch import Tensor, nn

from ..bench import interleaved_medians
from ..modules import BatchNorm
from ..tools import fold
from ..variants import BatchRenorm, GhostBatchNorm, renorm_schedule
from .lenet import LenetRun, lenet_runs, train_lenet
from .models import Norm, lenet
from .report import Context, Figure, Section, Table
from .running_stats import recalibrate_effect
from .training import TrainConfig

__all__ = [
    "FOLD_BATCH_SIZES",
    "GHOST_BATCH",
    "SMALL_BATCH",
    "SMALL_BATCH_LR",
    "VARIANTS",
    "fold_speedup",
    "section",
    "small_batch_runs",
    "small_batch_steps",
]

SMALL_BATCH = 4
GHOST_BATCH = 64
# SGD with momentum 0.9 as the other LeNets, at a fifth of their rate: with 0.1 the batch-4
# gradients are noisy enough to cost accuracy (docs/experiments.md).
SMALL_BATCH_LR = 0.02
# key -> (label, norm, training batch size)
VARIANTS: dict[str, tuple[str, Norm, int]] = {
    "batchnorm": (f"BatchNorm, batch {SMALL_BATCH}", BatchNorm, SMALL_BATCH),
    "batchrenorm": (f"BatchRenorm, batch {SMALL_BATCH}", BatchRenorm, SMALL_BATCH),
    "ghost": (
        f"GhostBatchNorm, {SMALL_BATCH} of {GHOST_BATCH}",
        functools.partial(GhostBatchNorm, virtual_batch_size=SMALL_BATCH),
        GHOST_BATCH,
    ),
}
FOLD_BATCH_SIZES = (1, 16, 256)
FOLD_REPEATS = 30


def small_batch_steps(ctx: Context) -> int:
    """A quarter of ``ctx.steps``: GhostBatchNorm's 16 virtual batches per step make its steps ~10x dearer."""
    return max(1, ctx.steps // 4)


def _renorm_warmup(model: nn.Module, steps: int) -> Callable[[int], None] | None:
    """Sets every BatchRenorm's rmax/dmax before a step: batch norm for the first 10% of the steps,
    then rmax reaches 3 at 60% and dmax 5 at 35% (Ioffe 2017's schedule, scaled to ``steps``)."""
    layers = [module for module in model.modules() if isinstance(module, BatchRenorm)]
    if not layers:
        return None

    def set_limits(step: int) -> None:
        rmax, dmax = renorm_schedule(
            step, hold_steps=steps // 10, rmax_ramp_steps=steps // 2, dmax_ramp_steps=steps // 4
        )
        for layer in layers:
            layer.rmax, layer.dmax = rmax, dmax

    return set_limits


def small_batch_runs(ctx: Context) -> dict[str, LenetRun]:
    """LeNet trained with each of :data:`VARIANTS` (trained once per demo, then cached)."""

    def build() -> dict[str, LenetRun]:
        steps = small_batch_steps(ctx)
        runs = {}
        for key, (label, norm, batch_size) in VARIANTS.items():
            torch.manual_seed(ctx.seed)
            model = lenet(norm2d=norm, norm1d=norm).to(ctx.device)
            config = TrainConfig(
                steps=steps, lr=SMALL_BATCH_LR, batch_size=batch_size, eval_points=ctx.eval_points, seed=ctx.seed
            )
            history = train_lenet(ctx, model, config, desc=f"LeNet, {label}", before_step=_renorm_warmup(model, steps))
            runs[key] = LenetRun(model, history)
        return runs

    return ctx.cached("small_batch", build)


def fold_speedup(model: nn.Module, inputs: Tensor, batch_sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Eval-mode forward time of ``model`` against ``fold(model)``, in this process, under no_grad.

    For each batch size b, the first b rows of ``inputs`` (cycled when it has fewer) go through
    both models in turn, ``repeats`` times after 3 warm-up calls; each time is the median.
    ``model`` does not change. Returns ``{"max_abs_difference": ... (largest |output difference|
    over all of ``inputs``), "timing": {"batch_<b>": {"unfolded_ms", "folded_ms", "speedup"}}}``
    with speed-up = unfolded / folded.
    """
    reference = copy.deepcopy(model).eval()
    folded = fold(reference)
    result: dict[str, Any] = {"timing": {}}
    with torch.no_grad():
        result["max_abs_difference"] = float((reference(inputs) - folded(inputs)).abs().max())
        for batch_size in batch_sizes:
            x = inputs[torch.arange(batch_size) % len(inputs)]  # (b, C, H, W)
            unfolded_ms, folded_ms = interleaved_medians(
                [functools.partial(reference, x), functools.partial(folded, x)], repeats, 3, x.device
            )
            result["timing"][f"batch_{batch_size}"] = {
                "unfolded_ms": unfolded_ms,
                "folded_ms": folded_ms,
                "speedup": unfolded_ms / folded_ms,
            }
    return result


def _small_batch_figure(
    ctx: Context, runs: dict[str, LenetRun], numbers: dict[str, Any], reference: float
) -> tuple[Figure, Table]:
    steps = small_batch_steps(ctx)
    figure = MplFigure(figsize=(12, 4), layout="constrained")
    curves_ax, bars_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    colors = {"batchnorm": "tab:blue", "batchrenorm": "tab:orange", "ghost": "tab:green"}
    for key, run in runs.items():
        curves_ax.plot(run.history.steps, run.history.test_accuracy, color=colors[key], label=VARIANTS[key][0])
    curves_ax.axhline(reference, color="black", ls="--", lw=1, label=f"BatchNorm, batch 60, {ctx.steps} steps")
    curves_ax.set(xlabel="training step", ylabel="test accuracy (running averages)", ylim=(0, 1.02))
    curves_ax.set_title("test accuracy during training")
    curves_ax.grid(alpha=0.3)
    curves_ax.legend(fontsize="small", loc="lower right")
    positions = np.arange(len(runs))
    width = 0.38
    legend: list[Patch] = []
    for offset, (field, label, hatch) in zip(
        (-width / 2, width / 2),
        (("final_test_accuracy", "running averages", ""), ("recalibrated_test_accuracy", "recalibrated", "//")),
        strict=True,
    ):
        values = [numbers[key][field] for key in runs]
        bars = bars_ax.bar(positions + offset, values, width, hatch=hatch, color=[colors[k] for k in runs], alpha=0.85)
        bars_ax.bar_label(bars, fmt="%.3f", fontsize="small")
        # Neutral legend patches: the bars' colours stand for the variants, the hatching for the statistics.
        legend.append(Patch(facecolor="white", edgecolor="black", hatch=hatch, label=label))
    bars_ax.set_xticks(positions, [VARIANTS[key][0].replace(", ", "\n") for key in runs])
    low = min(min(numbers[key]["final_test_accuracy"], numbers[key]["recalibrated_test_accuracy"]) for key in runs)
    bars_ax.set(ylabel="final test accuracy", ylim=(max(0.0, low - 0.1), 1.02), title=f"after {steps} steps")
    bars_ax.legend(handles=legend, fontsize="small", loc="lower right")

    def describe(key: str) -> str:
        n = numbers[key]
        return f"{VARIANTS[key][0]} {n['final_test_accuracy']:.1%} ({n['recalibrated_test_accuracy']:.1%} recalibrated)"

    caption = (
        f"LeNet trained for {steps} steps of SGD (learning rate {SMALL_BATCH_LR}, momentum 0.9) with each "
        f"normalization; left: test accuracy in eval mode (running averages) during training, the dashed line "
        f"the LeNet of the section above (batch 60, {ctx.steps} steps, {reference:.1%}); right: final test "
        f"accuracy with the running averages (plain) and after batchnorm.recalibrate on the training set "
        f"(hatched). Final: {'; '.join(describe(key) for key in runs)}. BatchRenorm corrects each batch's "
        f"statistics towards the running ones, so that training and inference normalize alike; GhostBatchNorm "
        f"normalizes groups of {SMALL_BATCH} like the batch-4 runs but takes steps on {GHOST_BATCH} images, "
        f"so it sees {GHOST_BATCH // SMALL_BATCH} times as many images in the same number of steps."
    )
    table = Table(
        caption=f"Small batches: test accuracy after {steps} steps (learning rate {SMALL_BATCH_LR}, momentum 0.9).",
        header=("normalization", "batch", "images seen", "test accuracy", "after recalibrate"),
        rows=tuple(
            (
                VARIANTS[key][0],
                str(numbers[key]["batch_size"]),
                str(numbers[key]["batch_size"] * steps),
                f"{numbers[key]['final_test_accuracy']:.2%}",
                f"{numbers[key]['recalibrated_test_accuracy']:.2%}",
            )
            for key in runs
        ),
    )
    return Figure("small_batch", "Batch-norm variants at batch 4", caption, figure), table


def _fold_figure(numbers: dict[str, Any], test_size: int, repeats: int) -> tuple[Figure, Table]:
    timing = numbers["timing"]
    figure = MplFigure(figsize=(8, 4), layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(timing))
    width = 0.38
    for offset, field, label in ((-width / 2, "unfolded_ms", "with batch norm"), (width / 2, "folded_ms", "folded")):
        bars = ax.bar(positions + offset, [t[field] for t in timing.values()], width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize="small")
    ax.set_xticks(
        positions, [f"batch {key.removeprefix('batch_')}\n{t['speedup']:.2f}x faster" for key, t in timing.items()]
    )
    ax.set(ylabel="ms per eval-mode forward (median, log scale)", yscale="log", title="fold: LeNet inference time")
    ax.margins(y=0.2)
    ax.legend(fontsize="small")
    speedups = ", ".join(f"{t['speedup']:.2f}x at batch {key.removeprefix('batch_')}" for key, t in timing.items())
    caption = (
        f"Eval-mode forward of the trained LeNet with batch norm, as trained and after batchnorm.fold merged each "
        f"batch norm into the convolution or dense layer before it (one process, one thread, the two models "
        f"taking turns, median of {repeats} calls after 3 warm-up calls). Folding removes the four batch-norm "
        f"layers and so saves time: {speedups}. The folded model computes the same function: over the "
        f"{test_size} test images its logits differ by at most {numbers['max_abs_difference']:.2g} (float32 "
        f"rounding). Times vary from run to run with the machine's load; the speed-ups vary less."
    )
    table = Table(
        caption="fold: eval-mode forward time of LeNet with batch norm (median ms).",
        header=("batch", "with batch norm", "folded", "speed-up"),
        rows=tuple(
            (key.removeprefix("batch_"), f"{t['unfolded_ms']:.3f}", f"{t['folded_ms']:.3f}", f"{t['speedup']:.2f}x")
            for key, t in timing.items()
        ),
    )
    return Figure("fold_speedup", "Inference speed-up of fold", caption, figure), table


def section(ctx: Context) -> Section:
    """Variants at batch 4 (accuracy, with and without recalibration) and fold's inference speed-up."""
    train_x, test_x = ctx.images28()
    runs = small_batch_runs(ctx)
    small: dict[str, Any] = {"steps": small_batch_steps(ctx), "lr": SMALL_BATCH_LR, "momentum": 0.9}
    for key, run in runs.items():
        effect = recalibrate_effect(run.model, train_x, test_x, ctx.data.test_labels)
        small[key] = {
            "batch_size": VARIANTS[key][2],
            "final_test_accuracy": run.history.final_test_accuracy,
            "recalibrated_test_accuracy": effect["after"]["accuracy"],
        }
    bn = lenet_runs(ctx)["bn"]
    small_figure, small_table = _small_batch_figure(ctx, runs, small, bn.history.final_test_accuracy)
    # Timings differ from run to run: they stay under "timing", which the reproducibility test skips.
    fold_numbers = fold_speedup(bn.model, test_x, FOLD_BATCH_SIZES, FOLD_REPEATS)
    fold_figure, fold_table = _fold_figure(fold_numbers, len(test_x), FOLD_REPEATS)
    return Section(
        key="tools",
        title="Batch-norm variants at small batches, and folding",
        intro=(
            f"With batches of {SMALL_BATCH} a batch norm's statistics are noisy estimates, and the running averages "
            f"used at inference differ from what training normalized with. Batch Renormalization (Ioffe 2017) and "
            f"ghost batch norm (Hoffer et al. 2017) are two answers; recalibrating the running statistics on the "
            f"training set is a third. For inference, batchnorm.fold merges every batch norm into the layer before it."
        ),
        figures=(small_figure, fold_figure),
        tables=(small_table, fold_table),
        summary={"small_batch": small, "fold": fold_numbers},
    )
