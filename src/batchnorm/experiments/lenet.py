"""LeNet-5 with and without batch norm, over seeds: test accuracy and loss curves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn
from tqdm import tqdm

from .models import lenet
from .paper import COLORS, LABELS, draw_accuracy, reach_sentence
from .report import Context, Figure, Section, new_figure
from .stats import CI_TEXT, band, compare, interval
from .training import History, TrainConfig, train

__all__ = ["LENET_LR", "LenetRun", "lenet_runs", "lenet_runs_per_seed", "lenet_steps", "section", "train_lenet"]

# SGD with momentum 0.9 as for the MLP; with 0.1 and Xavier initialization the network without
# batch norm leaves its initial plateau within the default run (docs/experiments.md).
LENET_LR = 0.1


@dataclass(frozen=True)
class LenetRun:
    model: nn.Sequential
    history: History


def lenet_steps(ctx: Context) -> int:
    """A third of ``ctx.steps``: a LeNet step costs about four MLP steps."""
    return max(1, ctx.steps // 3)


def train_config(ctx: Context, seed: int | None = None) -> TrainConfig:
    # Half the MLPs' evaluation points: each costs a LeNet forward of the whole test set.
    return TrainConfig(
        steps=lenet_steps(ctx),
        lr=LENET_LR,
        eval_points=max(1, ctx.eval_points // 2),
        seed=ctx.seeds[0] if seed is None else seed,
    )


def train_lenet(
    ctx: Context,
    model: nn.Module,
    config: TrainConfig,
    *,
    desc: str = "LeNet",
    before_step: Callable[[int], None] | None = None,
    bar: tqdm[NoReturn] | None = None,
) -> History:
    """Train ``model`` in place on the context's 28x28 training images, evaluated on its test images."""
    train_x, test_x = ctx.images28()
    return train(
        model,
        train_x,
        ctx.data.train_labels,
        test_x,
        ctx.data.test_labels,
        config,
        before_step=before_step,
        progress=ctx.progress,
        desc=desc,
        bar=bar,
    )


def lenet_runs_per_seed(ctx: Context) -> dict[str, list[LenetRun]]:
    """The trained LeNets, ``"plain"`` and ``"bn"``, one per seed (trained once per demo, then cached)."""

    def build() -> dict[str, list[LenetRun]]:
        runs: dict[str, list[LenetRun]] = {"plain": [], "bn": []}
        desc = f"LeNet: 2 networks x {len(ctx.seeds)} seeds"
        with ctx.bar(2 * len(ctx.seeds) * lenet_steps(ctx), desc) as bar:
            for seed in ctx.seeds:
                for name in runs:
                    torch.manual_seed(seed)
                    model = lenet(bn=name == "bn").to(ctx.device)
                    history = train_lenet(ctx, model, train_config(ctx, seed), bar=bar)
                    runs[name].append(LenetRun(model, history))
        return runs

    return ctx.cached("lenet", build)


def lenet_runs(ctx: Context) -> dict[str, LenetRun]:
    """The first seed's trained LeNets, ``"plain"`` and ``"bn"``: the ones later sections reuse."""
    return {name: seed_runs[0] for name, seed_runs in lenet_runs_per_seed(ctx).items()}


def section(ctx: Context) -> Section:
    """Accuracy and loss curves of LeNet with and without batch norm, over seeds."""
    runs = lenet_runs_per_seed(ctx)
    steps = lenet_steps(ctx)
    histories = {name: [run.history for run in seed_runs] for name, seed_runs in runs.items()}
    figure = new_figure(8.0, 3.3)
    accuracy_ax, loss_ax = figure.subplots(1, 2)
    draw_accuracy(accuracy_ax, histories)
    for name, seed_histories in histories.items():
        h = seed_histories[0]
        mean_train = band([x.train_loss for x in seed_histories])[0]
        mean_test = band([x.test_loss for x in seed_histories])[0]
        loss_ax.plot(h.train_steps, mean_train, color=COLORS[name], label=f"train, {LABELS[name]}")
        loss_ax.plot(h.steps, mean_test, "--", color=COLORS[name], label=f"test, {LABELS[name]}")
    accuracy_ax.set_title("test accuracy", loc="left")
    loss_ax.set(xlabel="training step", ylabel="cross-entropy (log)", yscale="log")
    loss_ax.set_title("loss: train (solid), test (dashed)", loc="left")
    handles, labels = accuracy_ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)

    summary: dict[str, Any] = {
        "hyperparameters": {
            "batch_size": train_config(ctx).batch_size,
            "optimizer": "SGD",
            "lr": LENET_LR,
            "momentum": train_config(ctx).momentum,
            "init": "xavier_uniform",
            "steps": steps,
        },
        "seeds": list(ctx.seeds),
    }
    accuracy = {}
    for name, seed_histories in histories.items():
        accuracy[name] = interval([h.final_test_accuracy for h in seed_histories], bounds=(0, 1))
        summary[name] = {
            "final_test_accuracy": accuracy[name].mean,
            "final_test_accuracy_ci": accuracy[name].as_list(),
            "final_test_accuracy_per_seed": [h.final_test_accuracy for h in seed_histories],
            "final_test_loss": interval([h.test_loss[-1] for h in seed_histories]).mean,
            "final_train_loss": interval([h.train_loss[-1] for h in seed_histories]).mean,
            "first_step_reaching_90": [h.first_step_reaching(0.9) for h in seed_histories],
        }
    final_sentence = compare(
        "with batch norm", accuracy["bn"], "without", accuracy["plain"], what="final test accuracy"
    )
    reach = {
        "bn": reach_sentence("With batch norm", summary["bn"]["first_step_reaching_90"], steps),
        "plain": reach_sentence("without", summary["plain"]["first_step_reaching_90"], steps),
    }
    caption = (
        f"Left: test accuracy on the {len(ctx.data.test_labels)} test images, mean over {len(ctx.seeds)} seeds with "
        f"the t-based 95% band; right: training loss (mean over the steps since the previous point, solid) and test "
        f"loss (dashed), log scale, mean over seeds. {reach['bn']}; {reach['plain']}. {final_sentence}"
    )
    return Section(
        key="lenet",
        title="Batch norm in a convolutional network (LeNet-5)",
        claim=(
            "The paper's claims are about convolutional networks (Inception) as much as MLPs: with batch norm after "
            "each convolution a network trains in fewer steps. A small convolutional network tests it here."
        ),
        setup=(
            f"LeNet-5 (sigmoid units, average pooling, Xavier-uniform weights) on 28x28 images"
            f"{' (the 8x8 digits resized bilinearly)' if ctx.data.name == 'digits' else ''}, {steps} steps of SGD "
            f"(learning rate {LENET_LR}, momentum 0.9, minibatches of 60); with batch norm, BatchNorm2d after each "
            f"convolution and BatchNorm1d after the first two dense layers. {len(ctx.seeds)} seeds; numbers are the "
            f"{CI_TEXT}."
        ),
        figures=(Figure("lenet_curves", "LeNet: accuracy and loss over training", caption, figure),),
        caveat=(
            f"{steps} steps; the network without batch norm first sits on a plateau whose length depends on the "
            f"initialization (with torch's default initialization instead of Xavier it stays there for thousands of "
            f"steps), so the gap at the end of a short run depends on that choice."
        ),
        findings=(f"LeNet ({steps} steps): {final_sentence} {reach['bn']}; {reach['plain']}.",),
        summary=summary,
    )
