r"""Report section: inversion (SPEC section 6, item 5, and issue 5).

Two functions, each returning its numbers and one matplotlib figure, and the section that
shows them (:func:`section`, the report's ``inversion`` key):

* :func:`flow_demo`: a small RealNVP-style flow in 2-D (affine coupling layers with
  :class:`batchnorm.BatchNormFlow` between them) fitted to a generated toy density, against the
  same flow without the batch-norm layers; final negative log-likelihood of both.
* :func:`inversion_demo`: given a trained classifier with batch norm and some inputs, inputs
  reconstructed from the classifier's outputs (mse) with their errors, and one input per class
  synthesized from the class alone, with and without the batch-norm prior, with the
  classifier's confidence.

Sizes are parameters so that tests run them in a second; the defaults take a few seconds on
2 CPU cores (torch's intra-op threads spin badly when other processes share the cores:
OMP_NUM_THREADS=1 is then several times faster). The report writer saves the figures.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure as MplFigure
from torch import Tensor, nn

from ..flows import BatchNormFlow
from ..inversion import bn_statistics_distance, invert
from .lenet import lenet_runs
from .report import Context, Figure, Section

__all__ = ["FlowDemoResult", "InversionDemoResult", "flow_demo", "inversion_demo", "section", "toy_density"]

DENSITIES = ("moons", "ring")


def toy_density(name: str, num_samples: int, generator: torch.Generator) -> Tensor:
    """Samples (num_samples, 2) of ``"moons"`` (two interleaved half circles) or ``"ring"``
    (8 Gaussians on a circle of radius 2), scaled to roughly unit spread."""
    if name == "moons":
        # Half of the points on the upper arc (cos t, sin t), half on the lower (1 - cos t, 1/2 - sin t).
        t = torch.rand(num_samples, generator=generator) * math.pi
        upper = torch.rand(num_samples, generator=generator) < 0.5
        x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        points = torch.stack([x - 0.5, y - 0.25], dim=1)  # (N, 2), centred
        return points * 1.5 + 0.08 * torch.randn(num_samples, 2, generator=generator)
    if name == "ring":
        angle = torch.randint(0, 8, (num_samples,), generator=generator) * (2 * math.pi / 8)
        centres = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)  # (N, 2)
        return centres + 0.15 * torch.randn(num_samples, 2, generator=generator)
    raise ValueError(f"toy_density: expected name to be one of {', '.join(map(repr, DENSITIES))}, got {name!r}")


class _AffineCoupling(nn.Module):
    """RealNVP coupling in 2-D: the coordinate ``keep`` conditions an affine map of the other.

    y_keep = x_keep,  y_other = x_other * exp(s) + t,  (s, t) = MLP(x_keep),  log|det| = s.
    s = 2 tanh(.) bounds the scale per layer, which keeps training stable.
    """

    def __init__(self, keep: int, hidden: int) -> None:
        super().__init__()
        self.keep = keep
        last = nn.Linear(hidden, 2)
        nn.init.zeros_(last.weight)  # s = t = 0: the coupling starts as the identity
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), last)

    def _scale_shift(self, condition: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(condition).unbind(dim=1)  # (N, 2) -> (N,), (N,)
        return 2 * torch.tanh(s / 2), t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        other = 1 - self.keep
        s, t = self._scale_shift(x[:, self.keep : self.keep + 1])
        y = x.clone()
        y[:, other] = x[:, other] * torch.exp(s) + t
        return y, s

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        other = 1 - self.keep
        s, t = self._scale_shift(y[:, self.keep : self.keep + 1])
        x = y.clone()
        x[:, other] = (y[:, other] - t) * torch.exp(-s)
        return x, -s


class _Flow(nn.Module):
    """Data -> latent through the layers in order; standard normal latent."""

    layers: list[_AffineCoupling | BatchNormFlow]

    def __init__(self, couplings: int, hidden: int, batch_norm: bool) -> None:
        super().__init__()
        layers: list[_AffineCoupling | BatchNormFlow] = []
        for i in range(couplings):
            layers.append(_AffineCoupling(keep=i % 2, hidden=hidden))
            if batch_norm and i < couplings - 1:
                layers.append(BatchNormFlow(2))
        self.layers = nn.ModuleList(layers)  # type: ignore[assignment]

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) = log N(z; 0, I) + sum of the layers' log|det|: (N, 2) -> (N,)."""
        total = torch.zeros(x.shape[0])
        for layer in self.layers:
            x, logabsdet = layer(x)
            total = total + logabsdet
        return -0.5 * (x.pow(2).sum(dim=1) + 2 * math.log(2 * math.pi)) + total

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> Tensor:
        x = torch.randn(num_samples, 2, generator=generator)
        for layer in reversed(self.layers):
            x, _ = layer.inverse(x)
        return x


@dataclass
class FlowDemoResult:
    """Final negative log-likelihood (nats per point) on held-out samples, eval mode, and the figure."""

    nll_bn: float
    nll_plain: float
    density: str
    figure: MplFigure


def flow_demo(
    *,
    density: str = "moons",
    steps: int = 600,
    batch_size: int = 256,
    couplings: int = 6,
    hidden: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> FlowDemoResult:
    """Fit a coupling flow with and without :class:`BatchNormFlow` layers to a toy 2-D density.

    Both flows have the same couplings, initial weights, data and steps; they differ only in the
    batch-norm layers between couplings. Returns both flows' final NLL on 2000 held-out points
    and a figure of the data and of each flow's density and samples.
    """
    if density not in DENSITIES:
        raise ValueError(f"flow_demo: expected density to be one of {', '.join(map(repr, DENSITIES))}, got {density!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("couplings", couplings), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "batch_size" else 1):
            raise ValueError(f"flow_demo: expected {name} to be a positive int (batch_size >= 2), got {value!r}")
    generator = torch.Generator().manual_seed(seed)
    held_out = toy_density(density, 2000, generator)
    flows: dict[str, _Flow] = {}
    nll: dict[str, float] = {}
    for name, batch_norm in (("bn", True), ("plain", False)):
        torch.manual_seed(seed)  # same coupling weights in both flows
        flow = _Flow(couplings, hidden, batch_norm)
        optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
        data = torch.Generator().manual_seed(seed + 1)  # same batches in both flows
        for _ in range(steps):
            loss = -flow.log_prob(toy_density(density, batch_size, data)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        flow.eval()
        with torch.no_grad():
            nll[name] = float(-flow.log_prob(held_out).mean())
        flows[name] = flow

    figure = MplFigure(figsize=(12, 4), layout="constrained")
    axes = figure.subplots(1, 3)
    limit = 3.0
    axes[0].scatter(held_out[:, 0].numpy(), held_out[:, 1].numpy(), s=2, alpha=0.5)
    axes[0].set_title(f"data: {density}")
    grid = torch.linspace(-limit, limit, 120)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")  # (120, 120) each
    points = torch.stack([gx.flatten(), gy.flatten()], dim=1)  # (14400, 2)
    titles = {"bn": "with BatchNormFlow", "plain": "without batch norm"}
    for axis, (name, title) in zip(axes[1:], titles.items(), strict=True):
        with torch.no_grad():
            density_map = flows[name].log_prob(points).exp().reshape(gx.shape)  # (14400,) -> (120, 120)
            samples = flows[name].sample(500, torch.Generator().manual_seed(seed + 2))
        axis.pcolormesh(gx.numpy(), gy.numpy(), density_map.numpy(), shading="auto", cmap="viridis")
        axis.scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=2, c="white", alpha=0.6)
        axis.set_title(f"{title}: NLL {nll[name]:.3f}")
    for axis in axes:
        axis.set_xlim(-limit, limit)
        axis.set_ylim(-limit, limit)
        axis.set_aspect("equal")
    return FlowDemoResult(nll["bn"], nll["plain"], density, figure)


@dataclass
class InversionDemoResult:
    """Numbers behind the inversion figure.

    Attributes:
        reconstruction_errors: ||x_hat - x|| / ||x|| per input (the input itself is not pinned
            down by a low-dimensional output; see ``docs/inversion.md``).
        output_errors: max |model(x_hat) - model(x)| per input.
        confidence_plain, confidence_prior: softmax probability of the requested class for the
            input synthesized without and with the batch-norm prior, one per class.
        bn_distance_plain, bn_distance_prior: DeepInversion distance of each synthesized batch.
        figure: originals, reconstructions and both syntheses, with errors and confidences.
    """

    reconstruction_errors: list[float]
    output_errors: list[float]
    confidence_plain: list[float]
    confidence_prior: list[float]
    bn_distance_plain: float
    bn_distance_prior: float
    figure: MplFigure


def inversion_demo(
    model: nn.Module,
    inputs: Tensor,
    *,
    num_classes: int = 10,
    steps: int = 500,
    bn_prior: float = 0.05,
    tv: float = 0.05,
    l2: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> InversionDemoResult:
    """Reconstruct ``inputs`` (N, C, H, W) from ``model``'s outputs and synthesize one input per class.

    Reconstruction starts from zeros (noise in the directions the output does not see would stay)
    and minimizes the mse to the outputs with the TV and batch-norm priors. Synthesis minimizes
    the cross-entropy to classes 0..num_classes-1 with the same TV and L2 priors, once without
    and once with the batch-norm prior (weight ``bn_prior``). Draws originals, reconstructions
    and both syntheses in the result's figure. ``model`` is left as it was. ``progress`` shows
    each inversion's progress bar.
    """
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise ValueError(
            f"inversion_demo: expected image inputs (N, C, H, W), got "
            f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}"
        )
    was_training = [(module, module.training) for module in model.modules()]
    model.eval()
    with torch.no_grad():
        target = model(inputs)
    for module, training in was_training:
        module.training = training
    reconstruction = invert(
        model, target, init=torch.zeros_like(inputs), steps=steps, tv=tv, bn_prior=bn_prior, progress=progress
    )
    flat = (reconstruction.input - inputs).flatten(1)  # (N, C*H*W)
    reconstruction_errors = (flat.norm(dim=1) / inputs.flatten(1).norm(dim=1)).tolist()
    output_errors = (reconstruction.output - target).abs().flatten(1).amax(dim=1).tolist()

    classes = torch.arange(num_classes, device=inputs.device)
    shape = (num_classes, *inputs.shape[1:])
    common = {
        "input_shape": shape,
        "steps": steps,
        "loss": "cross_entropy",
        "tv": tv,
        "l2": l2,
        "seed": seed,
        "progress": progress,
    }
    synthesized = {
        "plain": invert(model, classes, **common),  # type: ignore[arg-type]
        "prior": invert(model, classes, bn_prior=bn_prior, **common),  # type: ignore[arg-type]
    }
    confidence = {name: result.output.softmax(dim=1)[classes, classes].tolist() for name, result in synthesized.items()}
    distance = {name: bn_statistics_distance(model, result.input) for name, result in synthesized.items()}

    columns = max(inputs.shape[0], num_classes)
    figure = MplFigure(figsize=(1.3 * columns, 6.2), layout="constrained")
    axes = figure.subplots(4, columns, squeeze=False)
    rows = [
        ("original", inputs, [""] * inputs.shape[0]),
        ("reconstructed", reconstruction.input, [f"err {e:.2f}" for e in reconstruction_errors]),
        ("class, no prior", synthesized["plain"].input, [f"{c}: {p:.2f}" for c, p in enumerate(confidence["plain"])]),
        ("class, BN prior", synthesized["prior"].input, [f"{c}: {p:.2f}" for c, p in enumerate(confidence["prior"])]),
    ]
    # Originals and reconstructions on the originals' grey scale, so that errors show as they are.
    low, high = float(inputs.min()), float(inputs.max())
    for row, (label, images, titles) in enumerate(rows):
        limits = {"vmin": low, "vmax": high} if row < 2 else {}
        for column in range(columns):
            axis = axes[row][column]
            axis.set_axis_off()
            if column < images.shape[0]:
                axis.imshow(images[column].mean(dim=0).cpu().numpy(), cmap="gray", **limits)  # (C, H, W) -> (H, W)
                axis.set_title(titles[column], fontsize=8)
        axes[row][0].text(-0.1, 0.5, label, transform=axes[row][0].transAxes, ha="right", va="center", fontsize=9)
    return InversionDemoResult(
        reconstruction_errors,
        output_errors,
        confidence["plain"],
        confidence["prior"],
        distance["plain"],
        distance["prior"],
        figure,
    )


# Priors of the report's inversions, chosen by looking at the synthesized digits of the default
# run (docs/experiments.md): with a weaker TV and BN prior (0.05 each) the class inputs stay
# speckle whether or not the BN prior is on; with these the prior's inputs take digit shapes.
BN_PRIOR, TV, L2 = 0.3, 0.3, 1e-2
FLOW_DENSITY = "moons"
FLOW_SETTINGS = {"couplings": 6, "hidden": 32, "batch_size": 256, "lr": 1e-3}


def inversion_steps(ctx: Context) -> int:
    """An eighth of ``ctx.steps`` (500 in the default run): each of the three inversions takes that many."""
    return max(1, ctx.steps // 8)


def flow_steps(ctx: Context) -> int:
    """3/20 of ``ctx.steps`` (600 in the default run) Adam steps for each flow."""
    return max(1, ctx.steps * 3 // 20)


def _one_per_class(images: Tensor, labels: Tensor) -> Tensor:
    """The first image of each class present in ``labels``, in class order: (K, C, H, W)."""
    firsts = [int((labels == c).nonzero()[0, 0]) for c in sorted(set(labels.tolist()))]
    return images[firsts]


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def section(ctx: Context) -> Section:
    """Reconstruction and class synthesis from the trained LeNet, and batch norm in a normalizing flow."""
    _, test_x = ctx.images28()
    model = lenet_runs(ctx)["bn"].model
    originals = _one_per_class(test_x, ctx.data.test_labels)
    steps = inversion_steps(ctx)
    inversion = inversion_demo(
        model, originals, steps=steps, bn_prior=BN_PRIOR, tv=TV, l2=L2, seed=ctx.seed, progress=ctx.progress
    )
    num_flow_steps = flow_steps(ctx)
    flow = flow_demo(density=FLOW_DENSITY, steps=num_flow_steps, seed=ctx.seed, **FLOW_SETTINGS)  # type: ignore[arg-type]

    errors = inversion.reconstruction_errors
    summary: dict[str, Any] = {
        "priors": {"bn_prior": BN_PRIOR, "tv": TV, "l2": L2},
        "reconstruction": {
            "steps": steps,
            "relative_errors": errors,
            "mean_relative_error": _mean(errors),
            "max_output_error": max(inversion.output_errors),
        },
        "synthesis": {
            "steps": steps,
            "confidence_without_prior": inversion.confidence_plain,
            "confidence_with_prior": inversion.confidence_prior,
            "mean_confidence_without_prior": _mean(inversion.confidence_plain),
            "mean_confidence_with_prior": _mean(inversion.confidence_prior),
            "bn_distance_without_prior": inversion.bn_distance_plain,
            "bn_distance_with_prior": inversion.bn_distance_prior,
        },
        "flow": {
            "density": FLOW_DENSITY,
            "steps": num_flow_steps,
            **FLOW_SETTINGS,
            "nll_with_batchnorm": flow.nll_bn,
            "nll_without_batchnorm": flow.nll_plain,
        },
    }
    synthesis = summary["synthesis"]
    inversion_caption = (
        f"Top row: one test image per class; second row: the input batchnorm.invert found from the trained "
        f"LeNet's 10 logits for it alone ({steps} Adam steps from a black image, mse on the logits plus TV and "
        f"batch-norm priors), with its relative error ||x_hat - x|| / ||x||: mean {_mean(errors):.2f}, from "
        f"{min(errors):.2f} to {max(errors):.2f}, while the logits match to {max(inversion.output_errors):.2g}. "
        f"Ten numbers cannot pin down 784 pixels: the reconstructions keep the stroke layout the classifier "
        f"sees and lose the rest. Bottom rows: an input synthesized from the class alone (cross-entropy, "
        f"{steps} steps from noise, TV and L2 priors), without and with the batch-norm prior, titled with the "
        f"classifier's probability of that class (mean {synthesis['mean_confidence_without_prior']:.4f} "
        f"without, {synthesis['mean_confidence_with_prior']:.4f} with; the lowest "
        f"{min(inversion.confidence_plain + inversion.confidence_prior):.4f}): the classifier is sure either way. "
        f"What differs is the input: the prior brings the statistics of the synthesized batch at every batch norm "
        f"close to the running ones (DeepInversion distance {synthesis['bn_distance_without_prior']:.3g} without, "
        f"{synthesis['bn_distance_with_prior']:.3g} with). Look for strokes: without the prior the inputs are flat "
        f"patches with speckle; with it they take on stroke-like structure, some of it digit-shaped."
    )
    better = "with" if flow.nll_bn < flow.nll_plain else "without"
    flow_caption = (
        f"Left: 2000 held-out points of the two-moons density. Middle and right: the density (colour) and 500 "
        f"samples (white) of a RealNVP-style flow of {FLOW_SETTINGS['couplings']} affine coupling layers, with a "
        f"BatchNormFlow between consecutive couplings and without; both from the same initial weights, fitted by "
        f"{num_flow_steps} Adam steps (learning rate {FLOW_SETTINGS['lr']:g}) on the same batches of "
        f"{FLOW_SETTINGS['batch_size']}. Held-out negative log-likelihood in nats "
        f"per point: {flow.nll_bn:.3f} with batch norm, {flow.nll_plain:.3f} without (lower is better; the flow "
        f"{better} batch norm fits better here). The batch-norm layers are exact bijections with a known "
        f"log-determinant, so the flow's likelihood stays exact."
    )
    return Section(
        key="inversion",
        title="Inversion: reconstruction, synthesis and flows",
        intro=(
            "Given its statistics and a non-zero scale, batch norm is an exact affine bijection per channel. "
            "batchnorm.invert runs a trained network backwards by gradient descent on its input; the batch-norm "
            "prior (DeepInversion) asks the candidate inputs to reproduce each batch norm's running statistics. "
            "BatchNormFlow uses the exact inverse and log-determinant inside a normalizing flow."
        ),
        figures=(
            Figure("inversion", "Inputs reconstructed and synthesized from LeNet", inversion_caption, inversion.figure),
            Figure("flow", "Batch norm in a normalizing flow", flow_caption, flow.figure),
        ),
        summary=summary,
    )
