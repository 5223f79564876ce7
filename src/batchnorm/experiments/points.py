"""Batch norm on 20 two-dimensional points: the cloud before and after normalization."""

from __future__ import annotations

import torch

from ..modules import BatchNorm1d
from .report import Context, Figure, Section, new_figure

__all__ = ["MEAN", "NUM_POINTS", "STD", "section"]

NUM_POINTS = 20
MEAN, STD = 5.0, 2.0


def section(ctx: Context) -> Section:
    """20 points from N(5, 2^2) in 2D through a fresh BatchNorm1d(2) in training mode."""
    generator = torch.Generator().manual_seed(ctx.seed)
    before = MEAN + STD * torch.randn(NUM_POINTS, 2, generator=generator, dtype=torch.float64)  # (20, 2)
    bn = BatchNorm1d(2, dtype=torch.float64)
    with torch.no_grad():
        after = bn(before)  # (20, 2): (x - batch mean) / sqrt(biased batch var + eps), weight 1, bias 0

    def stats(points: torch.Tensor) -> dict[str, list[float]]:
        var, mean = torch.var_mean(points, dim=0, correction=0)  # (20, 2) -> (2,), (2,)
        return {"mean": mean.tolist(), "std": var.sqrt().tolist()}

    b, a = stats(before), stats(after)
    summary = {"num_points": NUM_POINTS, "before": b, "after": a}
    figure = new_figure(6.0, 5.6)
    ax = figure.subplots()
    for start, end in zip(before.tolist(), after.tolist(), strict=True):
        ax.plot([start[0], end[0]], [start[1], end[1]], color="0.85", lw=0.8, zorder=1)
    ax.scatter(before[:, 0], before[:, 1], color="tab:blue", label="before: x ~ N(5, 2^2)", zorder=2)
    ax.scatter(after[:, 0], after[:, 1], color="tab:red", label="after BatchNorm1d(2)", zorder=2)
    ax.axhline(0, color="0.5", lw=0.5)
    ax.axvline(0, color="0.5", lw=0.5)
    ax.set(xlabel="feature 0", ylabel="feature 1", aspect="equal")
    ax.set_title("each coordinate moved to mean 0, scaled to spread 1", loc="left")
    figure.legend(loc="outside lower center", ncols=2, frameon=False)
    caption = (
        f"{NUM_POINTS} points drawn from a normal distribution with mean 5 and standard deviation 2 in each "
        f"coordinate (blue), and the same points after a batch norm in training mode with its initial "
        f"scale 1 and shift 0 (red; grey lines join each point to its image). Batch norm shifts and "
        f"rescales each coordinate separately: the sample mean goes from ({b['mean'][0]:.2f}, "
        f"{b['mean'][1]:.2f}) to ({a['mean'][0]:.1g}, {a['mean'][1]:.1g}) and the standard deviation from "
        f"({b['std'][0]:.2f}, {b['std'][1]:.2f}) to ({a['std'][0]:.4f}, {a['std'][1]:.4f}) (just under 1: "
        f"eps=1e-5 sits inside the square root). The cloud is only moved and stretched along the axes; "
        f"the correlation between the coordinates stays what it was."
    )
    return Section(
        key="twenty_points",
        title="Batch norm on 20 points",
        claim="What one batch norm does to one batch, in two dimensions: a picture of the equations above.",
        setup=f"{NUM_POINTS} points from N(5, 2^2) per coordinate (seed {ctx.seed}); a new BatchNorm1d(2), train mode.",
        caveat="An illustration, not an experiment: there is nothing to compare.",
        figures=(Figure("twenty_points", "20 points before and after batch norm", caption, figure),),
        summary=summary,
    )
