"""Santurkar et al. (2018), "How does batch normalization help optimization?": the loss landscape
along the gradient, measured during training of the paper's MLPs (with and without batch norm).

At every ``every``-th step of a run, :class:`LandscapeProbe` takes the step's minibatch and the
current weights w, computes the loss L(w) and its gradient g, and for each step size eta in
``lr * ETA_MULTIPLIERS`` the loss L(w - eta g) and gradient g_eta there (a copy of the model in
training mode, so the batch norms use the batch's statistics, as in training). It records

- loss variation: max - min of L over the step sizes (including 0): how much the loss changes
  along the direction the optimizer follows;
- gradient predictiveness: max over eta of ||g_eta - g||: how far the gradient at the point the
  step lands on is from the gradient that chose it (smaller: the gradient predicts better);
- effective beta-smoothness: max over eta of ||g_eta - g|| / ||eta g||: the same change per unit
  of distance moved, which does not depend on the scale of g.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import paper
from .report import Context, Figure, Section, new_figure
from .stats import CI_TEXT, Interval, band, compare, interval, separated
from .training import History

__all__ = ["ETA_MULTIPLIERS", "MEASURES", "LandscapeProbe", "measure", "section"]

# Step sizes along -g, as multiples of the run's learning rate (Santurkar et al. use a range around it).
ETA_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
# The summary's names and the figure's labels of the three measurements.
MEASURES = {
    "loss_variation": "loss variation along the gradient",
    "gradient_change": "gradient change ||g_eta - g|| (predictiveness)",
    "beta_smoothness": "effective beta-smoothness",
}


def _loss_and_gradient(model: nn.Module, params: list[nn.Parameter], x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.flatten() for g in grads])  # (P,): all parameters


def measure(
    model: nn.Module, x: Tensor, y: Tensor, lr: float, multipliers: Sequence[float] = ETA_MULTIPLIERS
) -> dict[str, float]:
    """The three measurements around ``model``'s weights on the batch (x, y); ``model`` is left as it was.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> m = measure(nn.Linear(4, 10), torch.randn(8, 4), torch.randint(0, 10, (8,)), lr=0.1)
        >>> sorted(m), all(v >= 0 for v in m.values())
        (['beta_smoothness', 'gradient_change', 'gradient_norm', 'loss_variation'], True)
    """
    probe = copy.deepcopy(model)  # its batch norms may update their running statistics: a copy
    probe.train()
    params = [p for p in probe.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    loss0, g = _loss_and_gradient(probe, params, x, y)
    g_norm = float(g.norm())
    losses, changes, smoothness = [loss0], [], []
    for multiplier in multipliers:
        eta = multiplier * lr
        offset = 0
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0 - eta * g[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        loss, g_eta = _loss_and_gradient(probe, params, x, y)
        change = float((g_eta - g).norm())
        losses.append(loss)
        changes.append(change)
        smoothness.append(change / (eta * g_norm) if g_norm > 0 else 0.0)
    finite = [v for v in losses if math.isfinite(v)]
    return {
        "loss_variation": max(finite) - min(finite) if finite else float("nan"),
        "gradient_change": max(changes),
        "beta_smoothness": max(smoothness),
        "gradient_norm": g_norm,
    }


@dataclass
class LandscapeProbe:
    """Pass as ``inspect=`` to :func:`~batchnorm.experiments.training.train`: measures every ``every`` steps."""

    model: nn.Module
    lr: float
    every: int
    steps: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def __call__(self, step: int, x: Tensor, y: Tensor) -> None:
        if step % self.every:
            return
        self.steps.append(step)
        for key, value in measure(self.model, x, y, self.lr).items():
            self.values.setdefault(key, []).append(value)


def every(steps: int) -> int:
    """About 25 measurements per run."""
    return max(1, steps // 25)


_LABELS = {"plain": "without batch norm", "bn": "with batch norm"}
_COLORS = {"plain": "tab:blue", "bn": "tab:red"}


def _per_seed_means(probes: list[LandscapeProbe], key: str) -> list[float]:
    return [float(np.nanmean(probe.values[key])) for probe in probes]


def _after_plateau(histories: list[History], probes: list[LandscapeProbe]) -> list[float]:
    """Per run that leaves its plateau: mean beta-smoothness of the measurements from then on."""
    means = []
    for history, probe in zip(histories, probes, strict=True):
        escape = history.first_step_reaching(paper.ESCAPE_MARK)
        values = [
            v
            for s, v in zip(probe.steps, probe.values["beta_smoothness"], strict=True)
            if escape is not None and s >= escape
        ]
        if values:
            means.append(float(np.nanmean(values)))
    return means


def section(ctx: Context) -> Section:
    """The three measurements over training, with and without batch norm, from the paper MLP's runs."""
    runs = paper.paper_runs(ctx)
    probes = {name: [run.landscape for run in seed_runs] for name, seed_runs in runs.items()}
    summary: dict[str, Any] = {
        "eta_multipliers": list(ETA_MULTIPLIERS),
        "lr": paper.MLP_LR,
        "every": probes["bn"][0].every,
        "steps": probes["bn"][0].steps,
    }
    intervals: dict[str, dict[str, Interval]] = {}
    late: dict[str, Interval | None] = {}
    for name, seed_probes in probes.items():
        summary[name] = {}
        intervals[name] = {}
        for key in (*MEASURES, "gradient_norm"):
            iv = interval(_per_seed_means(seed_probes, key))
            intervals[name][key] = iv
            summary[name][key] = iv.mean
            summary[name][f"{key}_ci"] = iv.as_list()
            summary[name][f"{key}_curve"] = band([p.values[key] for p in seed_probes])[0]
        # Beta-smoothness once the run has left its initial plateau (test accuracy above 20%).
        after = _after_plateau([run.history for run in runs[name]], seed_probes)
        late_iv = interval(after) if after else None
        late[name] = late_iv
        summary[name]["beta_smoothness_after_plateau"] = None if late_iv is None else late_iv.mean
        summary[name]["beta_smoothness_after_plateau_ci"] = None if late_iv is None else late_iv.as_list()
        summary[name]["seeds_leaving_plateau"] = len(after)

    figure = new_figure(8.0, 3.3)
    axes = figure.subplots(1, 3)
    steps = probes["bn"][0].steps
    for ax, key in zip(axes, MEASURES, strict=True):
        for name, seed_probes in probes.items():
            curves = np.array([p.values[key] for p in seed_probes])  # (seeds, measurements)
            ax.plot(steps, curves.mean(axis=0), color=_COLORS[name], label=_LABELS[name])
            # Min to max over seeds: a t-interval of 3 values reaches below zero on a log axis.
            ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=_COLORS[name], alpha=0.2, lw=0)
        ax.set(yscale="log", xlabel="training step")
        ax.set_title({"loss_variation": "loss variation", "gradient_change": "gradient change",
                      "beta_smoothness": "beta-smoothness"}[key])  # fmt: skip
    axes[0].set_ylabel("max over step sizes (log)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)

    sentences = {
        key: compare(
            "with batch norm",
            intervals["bn"][key],
            "without",
            intervals["plain"][key],
            what=f"the mean {MEASURES[key]} over the run",
            percent=False,
        )
        for key in MEASURES
    }
    late_bn, late_plain = late["bn"], late["plain"]
    if late_bn is not None and late_plain is not None:
        window = (
            f"Once each network has left its initial plateau (test accuracy above {paper.ESCAPE_MARK:.0%}; "
            f"{len(_after_plateau([r.history for r in runs['plain']], probes['plain']))} of {len(ctx.seeds)} seeds "
            f"without batch norm get there)"
        )
        bn_beta, plain_beta = late_bn, late_plain
    else:
        window = "Over the whole run (the network without batch norm never leaves its plateau)"
        bn_beta, plain_beta = intervals["bn"]["beta_smoothness"], intervals["plain"]["beta_smoothness"]
    numbers = f"{bn_beta.plain()} with batch norm, {plain_beta.plain()} without"
    if not separated(bn_beta, plain_beta):
        verdict = f"{window}, the effective beta-smoothness shows no measurable difference ({numbers})."
    elif bn_beta.mean < plain_beta.mean:
        verdict = (
            f"{window}, the effective beta-smoothness is lower with batch norm ({numbers}): the landscape along the "
            f"optimizer's path is smoother, as Santurkar et al. found."
        )
    else:
        verdict = (
            f"{window}, the effective beta-smoothness is higher with batch norm ({numbers}): here the landscape along "
            f"the optimizer's path is rougher with batch norm, unlike Santurkar et al.'s networks."
        )
    supports = separated(bn_beta, plain_beta) and bn_beta.mean < plain_beta.mean
    verdict_short = (
        "no measurable difference in beta-smoothness"
        if not separated(bn_beta, plain_beta)
        else "lower beta-smoothness with batch norm"
        if supports
        else "higher beta-smoothness with batch norm"
    )
    caption = (
        f"Measured every {summary['every']} steps on the step's minibatch, at step sizes "
        f"{', '.join(f'{m:g}' for m in ETA_MULTIPLIERS)} times the learning rate {paper.MLP_LR:g} along the negative "
        f"gradient; lines are the mean over {len(ctx.seeds)} seeds, bands "
        f"the range from the lowest to the highest seed. Left: the range of "
        f"the loss; middle: the largest change of the gradient; right: that change per unit of distance moved. "
        f"{' '.join(sentences.values())} {verdict}"
    )
    return Section(
        key="landscape",
        title="Beyond the paper: what batch norm does to the loss landscape",
        claim=(
            "Ioffe & Szegedy explained batch norm's effect by internal covariate shift. Santurkar et al. (2018) "
            "showed that batch norm still helps when noise is injected to create shift, and that it barely changes "
            "the shift as they measured it; instead it makes the loss and its gradient change more slowly along the "
            "direction of descent (a smoother landscape), which makes the gradient a more reliable guide and allows "
            "larger steps. This section repeats their landscape measurements on the paper's MLPs."
        ),
        setup=(
            f"The same runs as the paper-MLP section (learning rate {paper.MLP_LR:g}, momentum 0.9, batches of 60, "
            f"{len(ctx.seeds)} seeds). At every {summary['every']}th step, a copy of the network in training mode "
            f"evaluates the loss and gradient at the current weights w and at w - eta g for each step size eta; "
            f"numbers are each run's mean over its measurements, then the {CI_TEXT}."
        ),
        figures=(Figure("landscape", "Loss landscape along the gradient during training", caption, figure),),
        caveat=(
            f"What this says about internal covariate shift: the paper-MLP section shows a sigmoid's input "
            f"distribution moving most while the network without batch norm leaves its plateau, but a moving "
            f"distribution is not by itself evidence that it slows training. Santurkar et al. proposed smoothness "
            f"instead; on these networks the measurement {'supports' if supports else 'does not support'} that "
            f"explanation ({verdict_short}). "
            "The loss variation and the gradient change scale with the size of the gradient: while the network "
            "without batch norm sits on its initial plateau its gradient is tiny, which makes it look smooth by those "
            "two measures. The beta-smoothness divides by the distance moved and is the fairer comparison. These are "
            "small sigmoid MLPs, not the VGG and deep linear networks of Santurkar et al.; and smoothness along the "
            "gradient is one direction of a landscape with about 100,000."
        ),
        findings=(f"Loss landscape (paper MLP): {verdict}",),
        summary=summary,
    )
