"""Report section: batch-norm variants at small batches, and folding batch norm away for inference.

- :func:`small_batch_runs`: LeNet trained with batch 4 using :class:`batchnorm.BatchNorm`,
  :class:`batchnorm.BatchRenorm` (with :func:`batchnorm.renorm_schedule`'s warm-up) and
  :class:`batchnorm.GhostBatchNorm` (virtual batches of 4 out of batches of 64), and BatchNorm with
  batches of 64 (the matched baseline for ghost batch norm: the same images per step), over the
  seeds, each evaluated with its running averages and after :func:`batchnorm.recalibrate`.
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
from torch import Tensor, nn

from ..bench import interleaved_medians
from ..modules import BatchNorm
from ..tools import fold
from ..variants import BatchRenorm, GhostBatchNorm, renorm_schedule
from .lenet import LenetRun, lenet_runs, lenet_runs_per_seed, lenet_steps, train_lenet
from .models import Norm, lenet
from .report import Context, Figure, Section, Table, new_figure, percent_axis
from .running_stats import recalibrate_effect
from .stats import CI_TEXT, Interval, band, interval, separated
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
    "small_batch_runs_per_seed",
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
    "batchnorm64": (f"BatchNorm, batch {GHOST_BATCH}", BatchNorm, GHOST_BATCH),
}
COLORS = {"batchnorm": "tab:blue", "batchrenorm": "tab:orange", "ghost": "tab:green", "batchnorm64": "tab:purple"}
FOLD_BATCH_SIZES = (1, 16, 256)
# Evaluations per small-batch run: each costs a LeNet forward of the whole test set.
EVAL_POINTS = 10
# Recalibrate on this many training images (20 batches of 60): pooled statistics settle long before
# the whole training set, and 16 recalibrations of a ghost-batch-norm LeNet over all of it cost seconds each.
RECALIBRATE_IMAGES = 1200
FOLD_REPEATS = 30


def small_batch_steps(ctx: Context) -> int:
    """A twelfth of ``ctx.steps``: GhostBatchNorm's 16 virtual batches per step make its steps ~8x dearer."""
    return max(1, ctx.steps // 12)


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


def small_batch_runs_per_seed(ctx: Context) -> dict[str, list[LenetRun]]:
    """LeNet trained with each of :data:`VARIANTS`, one per seed (trained once per demo, then cached)."""

    def build() -> dict[str, list[LenetRun]]:
        steps = small_batch_steps(ctx)
        runs: dict[str, list[LenetRun]] = {key: [] for key in VARIANTS}
        desc = f"small batches: {len(VARIANTS)} normalizations x {len(ctx.seeds)} seeds"
        with ctx.bar(len(VARIANTS) * len(ctx.seeds) * steps, desc) as bar:
            for seed in ctx.seeds:
                for key, (_, norm, batch_size) in VARIANTS.items():
                    torch.manual_seed(seed)
                    model = lenet(norm2d=norm, norm1d=norm).to(ctx.device)
                    config = TrainConfig(
                        steps=steps, lr=SMALL_BATCH_LR, batch_size=batch_size, eval_points=EVAL_POINTS, seed=seed
                    )
                    history = train_lenet(ctx, model, config, before_step=_renorm_warmup(model, steps), bar=bar)
                    runs[key].append(LenetRun(model, history))
        return runs

    return ctx.cached("small_batch", build)


def small_batch_runs(ctx: Context) -> dict[str, LenetRun]:
    """The first seed's run of each of :data:`VARIANTS`."""
    return {key: seed_runs[0] for key, seed_runs in small_batch_runs_per_seed(ctx).items()}


def fold_speedup(model: nn.Module, inputs: Tensor, batch_sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Eval-mode forward time of ``model`` against ``fold(model)``, in this process, under no_grad.

    For each batch size b, the first b rows of ``inputs`` (cycled when it has fewer) go through
    both models in turn, ``repeats`` times after 3 warm-up calls; each time is the median.
    ``model`` does not change. Returns ``{"max_abs_difference": ... (largest |output difference|
    over all of ``inputs``), "timing": {"batch_<b>": {"unfolded_ms", "folded_ms", "speedup"}}}``
    with speed-up = unfolded / folded.
    """
    reference = copy.deepcopy(model).eval()
    folded = fold(reference, example_input=inputs[:2])
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
    ctx: Context, runs: dict[str, list[LenetRun]], numbers: dict[str, Any], reference: Interval
) -> tuple[Figure, Table, tuple[str, ...]]:
    steps = small_batch_steps(ctx)
    figure = new_figure(8.0, 3.6)
    curves_ax, dots_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for key, seed_runs in runs.items():
        h = seed_runs[0].history
        mean, low, high = band([[100 * a for a in r.history.test_accuracy] for r in seed_runs], bounds=(0, 100))
        curves_ax.plot(h.steps, mean, color=COLORS[key], label=VARIANTS[key][0])
        curves_ax.fill_between(h.steps, low, high, color=COLORS[key], alpha=0.15, lw=0)
    curves_ax.set(xlabel="training step", ylabel="test accuracy (running averages)", ylim=(0, 100))
    curves_ax.set_title(f"during training ({len(ctx.seeds)} seeds)", loc="left")
    percent_axis(curves_ax)
    keys = list(runs)
    positions = np.arange(len(keys))
    for offset, field, label, marker in (
        (-0.15, "final_test_accuracy", "running averages", "o"),
        (0.15, "recalibrated_test_accuracy", "recalibrated", "s"),
    ):
        for i, key in enumerate(keys):
            iv = numbers[key][f"{field}_interval"]
            dots_ax.errorbar(
                100 * iv.mean, positions[i] + offset, xerr=[[100 * (iv.mean - iv.low)], [100 * (iv.high - iv.mean)]],
                color=COLORS[key], marker=marker, mfc="white" if marker == "s" else COLORS[key], capsize=3,
                label=label if i == 0 else None,
            )  # fmt: skip
    dots_ax.axvline(100 * reference.mean, color="black", ls="--", lw=1)
    dots_ax.set_yticks(positions, [VARIANTS[key][0].replace(", ", "\n") for key in keys])
    dots_ax.invert_yaxis()
    dots_ax.set(xlabel="final test accuracy")
    dots_ax.set_title(f"after {steps} steps", loc="left")
    percent_axis(dots_ax, "x")
    legend_handles, legend_labels = curves_ax.get_legend_handles_labels()
    dot_handles, dot_labels = dots_ax.get_legend_handles_labels()
    figure.legend(
        legend_handles + dot_handles, legend_labels + dot_labels, loc="outside lower center", ncols=3, frameon=False
    )

    def iv_of(key: str) -> Interval:
        value: Interval = numbers[key]["final_test_accuracy_interval"]
        return value

    def versus(a: str, b: str) -> str:
        ia, ib = iv_of(a), iv_of(b)
        name_a, name_b = VARIANTS[a][0], VARIANTS[b][0]
        if not separated(ia, ib):
            return f"no measurable difference between {name_a} ({ia.percent()}) and {name_b} ({ib.percent()})"
        better, worse = (a, b) if ia.mean > ib.mean else (b, a)
        return (
            f"{VARIANTS[better][0]} ({iv_of(better).percent()}) beats {VARIANTS[worse][0]} ({iv_of(worse).percent()})"
        )

    same_images = f"At the same {SMALL_BATCH} images per step: {versus('batchrenorm', 'batchnorm')}."
    same_data = (
        f"At the same {GHOST_BATCH} images per step (matched baseline for ghost batch norm): "
        f"{versus('ghost', 'batchnorm64')}."
    )
    caption = (
        f"LeNet trained for {steps} steps of SGD (learning rate {SMALL_BATCH_LR}, momentum 0.9) with each "
        f"normalization, {len(ctx.seeds)} seeds. Left: test accuracy in eval mode (running averages) during training, "
        f"mean and t-based 95% band. Right: final test accuracy with the running averages (filled) and after "
        f"batchnorm.recalibrate on {RECALIBRATE_IMAGES:,} training images (open), mean and 95% interval; the dashed "
        f"line is the LeNet "
        f"of the section above (batch 60, {lenet_steps(ctx)} steps, {reference.percent()}). GhostBatchNorm normalizes "
        f"groups of {SMALL_BATCH} but steps on {GHOST_BATCH} images, so it is compared with BatchNorm at batch "
        f"{GHOST_BATCH}, not with the batch-{SMALL_BATCH} runs. {same_images} {same_data}"
    )
    table = Table(
        caption=(
            f"Small batches: test accuracy after {steps} steps (learning rate {SMALL_BATCH_LR}, momentum 0.9), "
            f"{CI_TEXT}."
        ),
        header=("normalization", "batch", "images seen", "test accuracy", "after recalibrate"),
        rows=tuple(
            (
                VARIANTS[key][0],
                str(numbers[key]["batch_size"]),
                f"{numbers[key]['batch_size'] * steps:,}",
                numbers[key]["final_test_accuracy_interval"].percent(),
                numbers[key]["recalibrated_test_accuracy_interval"].percent(),
            )
            for key in runs
        ),
    )
    return (
        Figure("small_batch", "Batch-norm variants at small batches", caption, figure),
        table,
        (same_images, same_data),
    )


def _fold_figure(numbers: dict[str, Any], test_size: int, repeats: int) -> tuple[Figure, Table]:
    timing = numbers["timing"]
    figure = new_figure(6.5, 3.4)
    ax = figure.subplots()
    positions = np.arange(len(timing))
    width = 0.38
    for offset, field, label in ((-width / 2, "unfolded_ms", "with batch norm"), (width / 2, "folded_ms", "folded")):
        bars = ax.bar(positions + offset, [t[field] for t in timing.values()], width, label=label)
        ax.bar_label(bars, fmt="%.3g")
    ax.set_xticks(
        positions, [f"batch {key.removeprefix('batch_')}\n{t['speedup']:.2f}x faster" for key, t in timing.items()]
    )
    ax.set(ylabel="ms per forward (median, log)", yscale="log")
    ax.set_title("fold removes the batch norms: LeNet inference time", loc="left")
    ax.margins(y=0.2)
    ax.grid(False)
    figure.legend(loc="outside right upper", frameon=False)
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
    """Variants at small batches over seeds (accuracy, with and without recalibration) and fold's speed-up."""
    train_x, test_x = ctx.images28()
    runs = small_batch_runs_per_seed(ctx)
    small: dict[str, Any] = {"steps": small_batch_steps(ctx), "lr": SMALL_BATCH_LR, "momentum": 0.9}
    intervals: dict[str, Any] = {}
    with ctx.bar(len(VARIANTS) * len(ctx.seeds), "small batches: recalibrate each trained LeNet") as bar:
        for key, seed_runs in runs.items():
            final = [run.history.final_test_accuracy for run in seed_runs]
            recalibrated = []
            for run in seed_runs:
                recalibrated.append(
                    recalibrate_effect(run.model, train_x[:RECALIBRATE_IMAGES], test_x, ctx.data.test_labels)["after"][
                        "accuracy"
                    ]
                )
                bar.update()
            final_iv, recalibrated_iv = interval(final, bounds=(0, 1)), interval(recalibrated, bounds=(0, 1))
            intervals[key] = {
                "final_test_accuracy_interval": final_iv,
                "recalibrated_test_accuracy_interval": recalibrated_iv,
            }
            small[key] = {
                "batch_size": VARIANTS[key][2],
                "images_seen": VARIANTS[key][2] * small_batch_steps(ctx),
                "final_test_accuracy": final_iv.mean,
                "final_test_accuracy_ci": final_iv.as_list(),
                "recalibrated_test_accuracy": recalibrated_iv.mean,
                "recalibrated_test_accuracy_ci": recalibrated_iv.as_list(),
            }
    reference = [run.history.final_test_accuracy for run in lenet_runs_per_seed(ctx)["bn"]]
    numbers = {key: {**small[key], **intervals[key]} for key in runs}
    small_figure, small_table, findings = _small_batch_figure(ctx, runs, numbers, interval(reference, bounds=(0, 1)))
    # Timings differ from run to run: they stay under "timing", which the reproducibility test skips.
    bn = lenet_runs(ctx)["bn"]
    with ctx.bar(1, "fold: time LeNet inference before and after folding") as bar:
        fold_numbers = fold_speedup(bn.model, test_x, FOLD_BATCH_SIZES, FOLD_REPEATS)
        bar.update()
    fold_figure, fold_table = _fold_figure(fold_numbers, len(test_x), FOLD_REPEATS)
    return Section(
        key="tools",
        title="Small batches: Batch Renormalization, ghost batch norm, recalibration; and folding",
        claim=(
            f"With batches of {SMALL_BATCH} a batch norm's statistics are noisy estimates, and the running averages "
            f"used at inference differ from what training normalized with. Batch Renormalization (Ioffe 2017) "
            f"corrects each batch's statistics towards the running ones; ghost batch norm (Hoffer et al. 2017) "
            f"normalizes small groups within a large batch; recalibrating the running statistics on the training "
            f"set is a third answer. For inference, batchnorm.fold merges every batch norm into the layer before it."
        ),
        setup=(
            f"LeNet with each normalization, {small_batch_steps(ctx)} steps of SGD at learning rate {SMALL_BATCH_LR} "
            f"(momentum 0.9), {len(ctx.seeds)} seeds; BatchRenorm with renorm_schedule's warm-up scaled to the run. "
            f"Numbers are the {CI_TEXT}. fold: the first seed's trained LeNet with batch norm, timed against its "
            f"folded copy."
        ),
        figures=(small_figure, fold_figure),
        tables=(small_table, fold_table),
        caveat=(
            f"{small_batch_steps(ctx)} steps is short: Batch Renormalization's corrections switch on only after its "
            f"warm-up, so a short run shows little of them. Timings depend on the machine and its load; the "
            f"speed-ups vary less than the times."
        ),
        findings=findings,
        summary={"small_batch": small, "fold": fold_numbers},
    )
