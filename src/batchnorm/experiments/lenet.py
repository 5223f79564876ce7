"""LeNet-5 with and without batch norm: test accuracy and loss curves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure as MplFigure
from torch import nn

from .models import lenet
from .report import Context, Figure, Section
from .training import History, TrainConfig, train

__all__ = ["LENET_LR", "LenetRun", "lenet_runs", "section", "train_lenet"]

# SGD with momentum 0.9 as for the MLP; with 0.1 and Xavier initialization the network without
# batch norm leaves its initial plateau within the default run (docs/experiments.md).
LENET_LR = 0.1


@dataclass(frozen=True)
class LenetRun:
    model: nn.Sequential
    history: History


def train_config(ctx: Context) -> TrainConfig:
    return TrainConfig(steps=ctx.steps, lr=LENET_LR, eval_points=ctx.eval_points, seed=ctx.seed)


def train_lenet(
    ctx: Context,
    model: nn.Module,
    config: TrainConfig,
    *,
    desc: str,
    before_step: Callable[[int], None] | None = None,
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
    )


def lenet_runs(ctx: Context) -> dict[str, LenetRun]:
    """The two trained LeNets, ``"plain"`` and ``"bn"`` (trained once per demo, then cached)."""

    def build() -> dict[str, LenetRun]:
        runs = {}
        for name, bn in (("plain", False), ("bn", True)):
            torch.manual_seed(ctx.seed)
            model = lenet(bn=bn).to(ctx.device)
            history = train_lenet(ctx, model, train_config(ctx), desc=f"LeNet {'with' if bn else 'without'} BN")
            runs[name] = LenetRun(model, history)
        return runs

    return ctx.cached("lenet", build)


def section(ctx: Context) -> Section:
    """Accuracy and loss curves of LeNet with and without batch norm."""
    runs = lenet_runs(ctx)
    labels = {"plain": "without batch norm", "bn": "with batch norm"}
    colors = {"plain": "tab:blue", "bn": "tab:red"}
    figure = MplFigure(figsize=(12, 4), layout="constrained")
    accuracy_ax, loss_ax = figure.subplots(1, 2)
    for name, run in runs.items():
        h = run.history
        accuracy_ax.plot(h.steps, h.test_accuracy, color=colors[name], label=labels[name])
        loss_ax.plot(h.train_steps, h.train_loss, color=colors[name], label=f"train, {labels[name]}")
        loss_ax.plot(h.steps, h.test_loss, "--", color=colors[name], label=f"test, {labels[name]}")
    accuracy_ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1.02), title="test accuracy")
    loss_ax.set(xlabel="training step", ylabel="cross-entropy", yscale="log", title="loss")
    for ax in (accuracy_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")

    summary: dict[str, Any] = {
        "hyperparameters": {
            "batch_size": train_config(ctx).batch_size,
            "optimizer": "SGD",
            "lr": LENET_LR,
            "momentum": train_config(ctx).momentum,
            "init": "xavier_uniform",
            "steps": ctx.steps,
        }
    }
    for name, run in runs.items():
        summary[name] = {
            "final_test_accuracy": run.history.final_test_accuracy,
            "final_test_loss": run.history.test_loss[-1],
            "final_train_loss": run.history.train_loss[-1],
            "first_step_reaching_90": run.history.first_step_reaching(0.9),
        }

    def describe(name: str) -> str:
        s = summary[name]
        reach = s["first_step_reaching_90"]
        reach_text = f"passes 90% at step {reach}" if reach is not None else f"never passes 90% in {ctx.steps} steps"
        return (
            f"{labels[name]} it {reach_text} and ends at {s['final_test_accuracy']:.1%} test accuracy "
            f"(test loss {s['final_test_loss']:.3g}, training loss {s['final_train_loss']:.3g})"
        )

    caption = (
        f"Left: test accuracy on {len(ctx.data.test_labels)} images; right: training loss (mean over the "
        f"steps since the previous point, solid) and test loss (dashed), log scale. With batch norm the "
        f"network learns from the first steps; without it the sigmoids first sit on a plateau near chance. "
        f"{describe('bn').capitalize()}; {describe('plain')}."
    )
    return Section(
        key="lenet",
        title="LeNet with and without batch norm",
        intro=(
            f"LeNet-5 (sigmoid units, average pooling) on 28x28 images"
            f"{' (the 8x8 digits resized bilinearly)' if ctx.data.name == 'digits' else ''}, trained for "
            f"{ctx.steps} steps of SGD (learning rate {LENET_LR}, momentum 0.9, minibatches of 60); with batch "
            f"norm, BatchNorm2d after each convolution and BatchNorm1d after the first two dense layers."
        ),
        figures=(Figure("lenet_curves", "LeNet: accuracy and loss", caption, figure),),
        summary=summary,
    )
