"""Running statistics: what a batch norm remembers for inference, and when it changes.

The paper MLP with batch norm is trained twice from the same seed, with ``momentum=0.1`` and
with ``momentum=None`` (cumulative average). Training never reads the running statistics, so
the two runs have identical weights; only the running statistics of their batch norms differ.
The figure follows channel 0 of the first batch norm, whose input is the first linear layer's
output, so the true population statistics (over the whole training set, under the weights of
that moment) are exact and cheap to compute.

Then the trained LeNet with batch norm is evaluated before and after :func:`batchnorm.recalibrate`
(precise batch norm: running statistics replaced by the pooled statistics of the training set),
which shows how much its running averages cost it at inference.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..modules import BatchNorm1d, _BatchNormBase
from ..tools import recalibrate
from .lenet import lenet_runs
from .models import paper_mlp
from .paper import MLP_LR
from .report import Context, Figure, Section, Table, new_figure
from .training import Probe, TrainConfig, evaluate, train

__all__ = ["CHANNEL", "RECALIBRATE_BATCH", "recalibrate_effect", "section"]

CHANNEL = 0
MOMENTA: dict[str, float | None] = {"0.1": 0.1, "None": None}
# Recalibration batches: the training batch size, so each batch norm sees its inputs as in training.
RECALIBRATE_BATCH = 60


def _first_bn(model: nn.Sequential) -> tuple[nn.Module, BatchNorm1d]:
    """The first linear layer and the batch norm right after it."""
    linear, bn = model[0], model[1]
    assert isinstance(bn, BatchNorm1d)
    return linear, bn


@torch.no_grad()
def population_stats(model: nn.Sequential, train_x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of the first batch norm's input over the whole training set: (C,), (C,)."""
    linear, _ = _first_bn(model)
    z = linear(train_x)  # (N, C)
    var, mean = torch.var_mean(z, dim=0, correction=0)  # (N, C) -> (C,), (C,)
    return mean, var


def _probe(train_x: Tensor) -> Probe:
    def probe(model: nn.Module) -> dict[str, float]:
        assert isinstance(model, nn.Sequential)
        _, bn = _first_bn(model)
        assert bn.running_mean is not None and bn.running_var is not None
        mean, var = population_stats(model, train_x)
        return {
            "running_mean": float(bn.running_mean[CHANNEL]),
            "running_var": float(bn.running_var[CHANNEL]),
            "population_mean": float(mean[CHANNEL]),
            "population_var": float(var[CHANNEL]),
        }

    return probe


def _state(bn: BatchNorm1d) -> tuple[Tensor, Tensor, int]:
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def _eval_table(model: nn.Sequential, ctx: Context) -> tuple[Table, dict[str, Any]]:
    """Running statistics after training, after an eval pass, and after one training-mode forward."""
    model = copy.deepcopy(model)
    _, bn = _first_bn(model)
    _, test_x = ctx.flat()
    trained = _state(bn)
    model.eval()
    with torch.no_grad():
        model(test_x)
    after_eval = _state(bn)
    model.train()
    with torch.no_grad():
        model(test_x[:60])
    after_train = _state(bn)

    def change(state: tuple[Tensor, Tensor, int]) -> float:
        return max(float((state[0] - trained[0]).abs().max()), float((state[1] - trained[1]).abs().max()))

    rows = []
    numbers = {}
    for label, key, state in (
        ("after training", "trained", trained),
        (f"after model.eval() and a forward of the {len(test_x)} test images", "after_eval", after_eval),
        ("after model.train() and a forward of 60 test images", "after_train_forward", after_train),
    ):
        rows.append(
            (
                label,
                str(state[2]),
                f"{float(state[0][CHANNEL]):.6f}",
                f"{float(state[1][CHANNEL]):.6f}",
                f"{change(state):.3g}",
            )
        )
        numbers[key] = {
            "num_batches_tracked": state[2],
            "running_mean": float(state[0][CHANNEL]),
            "running_var": float(state[1][CHANNEL]),
            "max_abs_change": change(state),
        }
    table = Table(
        caption=(
            "Evaluation leaves the running statistics alone: the first batch norm of the momentum-0.1 model "
            f"(channel {CHANNEL}; last column over all channels, against the trained values)."
        ),
        header=("state", "num_batches_tracked", "running_mean", "running_var", "max |change|"),
        rows=tuple(rows),
    )
    return table, numbers


def recalibrate_effect(
    model: nn.Module, train_x: Tensor, test_x: Tensor, test_y: Tensor, batch_size: int = RECALIBRATE_BATCH
) -> dict[str, Any]:
    """Test accuracy and loss of ``model`` in eval mode before and after :func:`batchnorm.recalibrate`.

    Recalibrates a copy (``model`` does not change) on all of ``train_x``, in order, in batches of
    ``batch_size``. Returns ``{"before": {"accuracy", "loss"}, "after": {...}, "max_abs_logit_change",
    "max_rel_running_var_change"}``; the last two say how far the eval-mode outputs and the
    running variances moved.
    """
    recalibrated = recalibrate(
        copy.deepcopy(model), [train_x[start : start + batch_size] for start in range(0, len(train_x), batch_size)]
    )
    result: dict[str, Any] = {}
    for label, candidate in (("before", model), ("after", recalibrated)):
        accuracy, loss = evaluate(candidate, test_x, test_y)
        result[label] = {"accuracy": accuracy, "loss": loss}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result["max_abs_logit_change"] = float((model(test_x) - recalibrated.eval()(test_x)).abs().max())
    model.train(was_training)
    changes = [
        float(((new.running_var - old.running_var).abs() / old.running_var).max())
        for old, new in zip(model.modules(), recalibrated.modules(), strict=True)
        if isinstance(old, _BatchNormBase)
        and isinstance(new, _BatchNormBase)
        and old.running_var is not None
        and new.running_var is not None
    ]
    result["max_rel_running_var_change"] = max(changes, default=0.0)
    return result


def _recalibrate_table(ctx: Context) -> tuple[Table, dict[str, Any]]:
    """The trained LeNet with batch norm, before and after recalibrate."""
    train_x, test_x = ctx.images28()
    numbers = recalibrate_effect(lenet_runs(ctx)["bn"].model, train_x, test_x, ctx.data.test_labels)
    before, after = numbers["before"], numbers["after"]
    table = Table(
        caption=(
            f"Eval-mode LeNet with batch norm on the {len(test_x)} test images, with the running averages "
            f"training left (momentum 0.1) and after batchnorm.recalibrate replaced them by the pooled mean "
            f"and unbiased variance of each batch norm's input over all {len(train_x)} training images "
            f"(batches of {RECALIBRATE_BATCH}, run as in training). The running variances moved by up to "
            f"{numbers['max_rel_running_var_change']:.1%} and the logits by up to "
            f"{numbers['max_abs_logit_change']:.3g}; test accuracy went from {before['accuracy']:.2%} to "
            f"{after['accuracy']:.2%} and test loss from {before['loss']:.4f} to {after['loss']:.4f}. How "
            "much recalibration gains measures how far the running averages were from the statistics of "
            "the final weights."
        ),
        header=("running statistics", "test accuracy", "test loss"),
        rows=(
            ("running averages (after training)", f"{before['accuracy']:.2%}", f"{before['loss']:.4f}"),
            ("recalibrated", f"{after['accuracy']:.2%}", f"{after['loss']:.4f}"),
        ),
    )
    return table, numbers


def running_steps(ctx: Context) -> int:
    """A quarter of ``ctx.steps``: enough for the running statistics to settle; a demonstration, not a comparison."""
    return max(1, ctx.steps // 4)


def section(ctx: Context) -> Section:
    """Running mean/variance across training against the population statistics, for both momenta;
    the trained LeNet before and after recalibrate."""
    train_x, test_x = ctx.flat()
    seed = ctx.seeds[0]
    steps = running_steps(ctx)
    config = TrainConfig(steps=steps, lr=MLP_LR, eval_points=ctx.eval_points, seed=seed)
    models: dict[str, nn.Sequential] = {}
    histories = {}
    with ctx.bar(len(MOMENTA) * steps, "running statistics: MLP with momentum 0.1 and None") as bar:
        for label, momentum in MOMENTA.items():
            torch.manual_seed(seed)
            models[label] = paper_mlp(train_x.shape[1], bn=True, momentum=momentum).to(ctx.device)
            histories[label] = train(
                models[label],
                train_x,
                ctx.data.train_labels,
                test_x,
                ctx.data.test_labels,
                config,
                probe=_probe(train_x),
                bar=bar,
            )
    weight_gap = max(
        float((a - b).detach().abs().max())
        for a, b in zip(models["0.1"].parameters(), models["None"].parameters(), strict=True)
    )
    final_mean, final_var = population_stats(models["0.1"], train_x)
    summary: dict[str, Any] = {"channel": CHANNEL, "max_weight_difference_between_momenta": weight_gap}
    for label, model in models.items():
        _, bn = _first_bn(model)
        assert bn.running_mean is not None and bn.running_var is not None
        summary[f"momentum_{label}"] = {
            "final_running_mean": float(bn.running_mean[CHANNEL]),
            "final_running_var": float(bn.running_var[CHANNEL]),
            # Over all channels: how far the running statistics are from the population's.
            "mean_abs_error_mean": float((bn.running_mean - final_mean).abs().mean()),
            "mean_rel_error_var": float(((bn.running_var - final_var).abs() / final_var).mean()),
        }
    summary["population_mean"] = float(final_mean[CHANNEL])
    summary["population_var"] = float(final_var[CHANNEL])

    figure = new_figure(8.0, 3.6)
    axes = figure.subplots(1, 2)
    eval_steps = histories["0.1"].steps
    for ax, stat, final in zip(axes, ("mean", "var"), (final_mean, final_var), strict=True):
        ax.plot(
            eval_steps,
            histories["0.1"].probes[f"population_{stat}"],
            color="0.6",
            lw=3,
            label="population, current weights",
        )
        ax.axhline(float(final[CHANNEL]), color="black", ls="--", lw=1, label="population, final weights")
        ax.plot(eval_steps, histories["0.1"].probes[f"running_{stat}"], color="tab:red", label="running, momentum=0.1")
        ax.plot(
            eval_steps, histories["None"].probes[f"running_{stat}"], color="tab:green", label="running, momentum=None"
        )
        ax.set(xlabel="training step", ylabel=f"{'mean' if stat == 'mean' else 'variance'} of channel {CHANNEL}")
        ax.set_title(f"running {'mean' if stat == 'mean' else 'variance'}", loc="left")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    m01, mnone = summary["momentum_0.1"], summary["momentum_None"]
    caption = (
        f"Channel {CHANNEL} of the first batch norm of the paper MLP. The thick grey line is the true mean "
        f"and variance of that channel's input over all {len(ctx.data.train_labels)} training images under "
        f"the weights of that step; the dashed line the same under the final weights "
        f"(mean {summary['population_mean']:.4f}, variance {summary['population_var']:.4f}). With momentum 0.1 "
        f"the running statistics follow the moving target closely (final {m01['final_running_mean']:.4f}, "
        f"{m01['final_running_var']:.4f}; over all channels mean |error| of the mean {m01['mean_abs_error_mean']:.2g}, "
        f"mean relative error of the variance {m01['mean_rel_error_var']:.2g}). With momentum=None they "
        f"average over the whole run, weights long gone included, and lag behind (final "
        f"{mnone['final_running_mean']:.4f}, {mnone['final_running_var']:.4f}; errors "
        f"{mnone['mean_abs_error_mean']:.2g} and {mnone['mean_rel_error_var']:.2g}). The two runs have "
        f"identical weights (largest difference {weight_gap:g}): training never reads the running statistics."
    )
    table, table_numbers = _eval_table(models["0.1"], ctx)
    summary["eval_leaves_running_stats"] = table_numbers
    recalibrate_table, summary["lenet_recalibrate"] = _recalibrate_table(ctx)
    return Section(
        key="running_stats",
        title="Running statistics: what a batch norm uses at inference",
        claim=(
            "In training a batch norm normalizes with the statistics of the batch and keeps running averages "
            "of them; in evaluation it normalizes with those running averages. How well they match the "
            "statistics of the data decides how the trained network behaves at inference; "
            "batchnorm.recalibrate (precise batch norm) replaces them by the statistics of the whole training set."
        ),
        setup=(
            f"The paper MLP with batch norm, trained for {steps} steps (learning rate {MLP_LR:g}, seed {seed}) twice: "
            f"momentum 0.1 and momentum None (cumulative average). The first seed's LeNet with batch norm, before "
            f"and after batchnorm.recalibrate. A demonstration of the mechanism on one seed, not a comparison."
        ),
        caveat=(
            "One seed and one channel in the figure; the errors over all channels are in the caption. Whether "
            "recalibration helps depends on how far the weights moved while the running averages were collected."
        ),
        figures=(Figure("running_stats", "Running statistics against the population's", caption, figure),),
        tables=(table, recalibrate_table),
        summary=summary,
    )
