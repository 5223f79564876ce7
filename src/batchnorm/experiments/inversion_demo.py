r"""Report section: inversion, from the exact round trip of one batch norm to a whole network.

:func:`round_trip` measures ``bn.inverse(bn(x))`` on the first batch norm of a trained network;
two functions each return their numbers and one matplotlib figure; :func:`section` (the
report's ``inversion`` key) opens with the round trip and then shows both:

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

import copy
import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure as MplFigure
from torch import Tensor, nn

from ..flows import BatchNormFlow
from ..inversion import bn_statistics_distance, invert
from ..modules import _BatchNormBase
from .lenet import lenet_runs
from .report import Context, Figure, Section, new_figure
from .stats import CI_TEXT, compare, interval

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

    figure = new_figure(8.0, 3.2)
    axes = figure.subplots(1, 3, sharey=True)
    limit = 3.0
    axes[0].scatter(held_out[:, 0].numpy(), held_out[:, 1].numpy(), s=2, alpha=0.5)
    axes[0].set_title(f"held-out data\n({density})", loc="left")
    grid = torch.linspace(-limit, limit, 120)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")  # (120, 120) each
    points = torch.stack([gx.flatten(), gy.flatten()], dim=1)  # (14400, 2)
    titles = {"bn": "with BatchNormFlow", "plain": "without batch norm"}
    maps = {}
    for name in titles:
        with torch.no_grad():
            maps[name] = flows[name].log_prob(points).exp().reshape(gx.shape)  # (14400,) -> (120, 120)
    top = max(float(m.max()) for m in maps.values())
    mesh = None
    for axis, (name, title) in zip(axes[1:], titles.items(), strict=True):
        with torch.no_grad():
            samples = flows[name].sample(500, torch.Generator().manual_seed(seed + 2))
        mesh = axis.pcolormesh(
            gx.numpy(), gy.numpy(), maps[name].numpy(), shading="auto", cmap="viridis", vmin=0.0, vmax=top
        )
        axis.scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=2, c="white", alpha=0.6)
        axis.set_title(f"{title}\nheld-out NLL {nll[name]:.2f}", loc="left")
    for axis in axes:
        axis.set_xlim(-limit, limit)
        axis.set_ylim(-limit, limit)
        axis.set_aspect("equal")
        axis.set_xlabel("x1")
        axis.grid(False)
    axes[0].set_ylabel("x2")
    if mesh is not None:
        figure.colorbar(mesh, ax=axes[1:], label="density", shrink=0.8)
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
    figure = new_figure(8.0, 3.7)
    axes = figure.subplots(4, columns, squeeze=False)
    # Rows 1-2 on the originals' grey scale, so that errors show as they are; rows 3-4 on one
    # common scale of their own (the synthesized inputs leave [0, 1]), so they compare with each other.
    low, high = float(inputs.min()), float(inputs.max())
    both = torch.cat([synthesized["plain"].input, synthesized["prior"].input])
    synth_low, synth_high = float(both.min()), float(both.max())
    rows = [
        ("original", inputs, (low, high)),
        ("reconstructed\nfrom 10 logits", reconstruction.input, (low, high)),
        ("synthesized,\nno BN prior", synthesized["plain"].input, (synth_low, synth_high)),
        ("synthesized,\nBN prior", synthesized["prior"].input, (synth_low, synth_high)),
    ]
    for row, (label, images, (vmin, vmax)) in enumerate(rows):
        for column in range(columns):
            axis = axes[row][column]
            axis.set_axis_off()
            if column < images.shape[0]:
                # (C, H, W) -> (H, W)
                axis.imshow(images[column].mean(dim=0).cpu().numpy(), cmap="gray", vmin=vmin, vmax=vmax)
            if row == 0 and column < num_classes:
                axis.set_title(str(column))
        axes[row][0].text(-0.15, 0.5, label, transform=axes[row][0].transAxes, ha="right", va="center")
    figure.text(
        0.5, 0.0, f"rows 1-2: grey scale {low:.2f} (black) to {high:.2f} (white); rows 3-4: one scale, "
        f"{synth_low:.2f} to {synth_high:.2f}", ha="center", va="bottom",
    )  # fmt: skip
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
    """A fifth of ``ctx.steps`` (400 in the default run): each of the three inversions takes that many."""
    return max(1, ctx.steps // 5)


def flow_steps(ctx: Context) -> int:
    """A tenth of ``ctx.steps`` (200 in the default run) Adam steps for each flow, per seed."""
    return max(1, ctx.steps // 10)


def _one_per_class(images: Tensor, labels: Tensor) -> Tensor:
    """The first image of each class present in ``labels``, in class order: (K, C, H, W)."""
    firsts = [int((labels == c).nonzero()[0, 0]) for c in sorted(set(labels.tolist()))]
    return images[firsts]


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


@torch.no_grad()
def round_trip(model: nn.Sequential, images: Tensor) -> dict[str, float]:
    """``bn.inverse(bn(x))`` for the first batch norm of ``model`` (a copy), x = its input for ``images``.

    In training mode (batch statistics) and in eval mode (running statistics): the largest
    |x_back - x| relative to the largest |x|, and the largest absolute error.
    """
    first = next(i for i, module in enumerate(model) if isinstance(module, _BatchNormBase))
    x = model[:first](images)  # (N, C, H, W): what the batch norm receives
    bn = copy.deepcopy(model[first])
    assert isinstance(bn, _BatchNormBase)
    result = {}
    for mode, training in (("train", True), ("eval", False)):
        bn.train(training)
        back = bn.inverse(bn(x))
        error = float((back - x).abs().max())
        result[f"{mode}_max_abs_error"] = error
        result[f"{mode}_relative_error"] = error / float(x.abs().max())
    return result


def section(ctx: Context) -> Section:
    """Exact inversion of batch norm, reconstruction and synthesis from the trained LeNet, and flows."""
    _, test_x = ctx.images28()
    model = lenet_runs(ctx)["bn"].model
    originals = _one_per_class(test_x, ctx.data.test_labels)
    steps = inversion_steps(ctx)
    exact = round_trip(model, test_x[:60])
    with ctx.bar(1, "inversion: reconstruct 10 test images, synthesize 10 digits with and without the BN prior") as bar:
        inversion = inversion_demo(model, originals, steps=steps, bn_prior=BN_PRIOR, tv=TV, l2=L2, seed=ctx.seeds[0])
        bar.update()
    num_flow_steps = flow_steps(ctx)
    flows = []
    with ctx.bar(len(ctx.seeds), f"normalizing flow with and without BatchNormFlow: {len(ctx.seeds)} seeds") as bar:
        for seed in ctx.seeds:
            flows.append(flow_demo(density=FLOW_DENSITY, steps=num_flow_steps, seed=seed, **FLOW_SETTINGS))  # type: ignore[arg-type]
            bar.update()
    flow = flows[0]
    nll_bn = interval([f.nll_bn for f in flows])
    nll_plain = interval([f.nll_plain for f in flows])

    errors = inversion.reconstruction_errors
    summary: dict[str, Any] = {
        "round_trip": exact,
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
            "seeds": list(ctx.seeds),
            "nll_with_batchnorm": nll_bn.mean,
            "nll_with_batchnorm_ci": nll_bn.as_list(),
            "nll_without_batchnorm": nll_plain.mean,
            "nll_without_batchnorm_ci": nll_plain.as_list(),
        },
    }
    synthesis = summary["synthesis"]
    exact_text = (
        f"The exact round trip: for the first batch norm of the trained LeNet, on the inputs it receives for 60 test "
        f"images, bn.inverse(bn(x)) returns x to a largest error of {exact['train_max_abs_error']:.1e} "
        f"({exact['train_relative_error']:.1e} of the largest |x|) in training mode and "
        f"{exact['eval_max_abs_error']:.1e} ({exact['eval_relative_error']:.1e}) in eval mode: float32 rounding."
    )
    inversion_caption = (
        f"Top row: one test image per class; second row: the input batchnorm.invert found from the trained LeNet's "
        f"10 logits for it alone ({steps} Adam steps from a black image, mse on the logits plus TV and batch-norm "
        f"priors). Its relative error ||x_hat - x|| / ||x|| is {_mean(errors):.2f} on average (from {min(errors):.2f} "
        f"to {max(errors):.2f}) while the logits match to {max(inversion.output_errors):.2g}: ten numbers cannot pin "
        f"down 784 pixels, and most reconstructions are not recognisable as their originals. This is not the exact "
        f"inversion above, which needs every layer's output, not the network's. Bottom rows: an input synthesized "
        f"from the class alone (cross-entropy, {steps} steps from noise, TV and L2 priors), without and with the "
        f"batch-norm prior. The classifier gives the requested class a probability of "
        f"{synthesis['mean_confidence_without_prior']:.4f} on average without the prior and "
        f"{synthesis['mean_confidence_with_prior']:.4f} with it (lowest "
        f"{min(inversion.confidence_plain + inversion.confidence_prior):.4f}): it is sure either way. The prior "
        f"brings the statistics of the synthesized batch at every batch norm close to the running ones "
        f"(DeepInversion distance {synthesis['bn_distance_without_prior']:.3g} without, "
        f"{synthesis['bn_distance_with_prior']:.3g} with); whether that makes the inputs look like digits is for the "
        f"eye to judge."
    )
    flow_sentence = compare(
        "with BatchNormFlow", nll_bn, "without", nll_plain, what="held-out negative log-likelihood", percent=False
    )
    flow_caption = (
        f"Left: 2000 held-out points of the two-moons density. Middle and right: the density (colour, one scale) and "
        f"500 samples (white) of a RealNVP-style flow of {FLOW_SETTINGS['couplings']} affine coupling layers, with a "
        f"BatchNormFlow between consecutive couplings and without, first seed; both from the same initial weights, "
        f"fitted by {num_flow_steps} Adam steps (learning rate {FLOW_SETTINGS['lr']:g}) on the same batches of "
        f"{FLOW_SETTINGS['batch_size']}. Negative log-likelihood in nats per held-out point, lower is better, over "
        f"{len(ctx.seeds)} seeds. {flow_sentence} The batch-norm layers are exact bijections with a known "
        f"log-determinant, so the flow's likelihood stays exact."
    )
    return Section(
        key="inversion",
        title="Inversion: the exact round trip, reconstruction, synthesis and flows",
        claim=(
            f"Given its statistics and a non-zero scale, batch norm is an exact affine bijection per channel. "
            f"{exact_text} Running a whole trained network backwards is a different problem: batchnorm.invert "
            f"searches by gradient descent for an input with given outputs, and the batch-norm prior (DeepInversion) "
            f"asks the candidate inputs to reproduce each batch norm's running statistics. BatchNormFlow uses the "
            f"exact inverse and log-determinant inside a normalizing flow."
        ),
        setup=(
            f"The first seed's trained LeNet with batch norm; priors TV {TV:g}, batch-norm {BN_PRIOR:g}, L2 {L2:g}; "
            f"{steps} Adam steps per inversion. Flows over {len(ctx.seeds)} seeds, {CI_TEXT}."
        ),
        figures=(
            Figure(
                "inversion",
                "Ten logits do not determine an image; inputs synthesized from a class",
                inversion_caption,
                inversion.figure,
            ),
            Figure("flow", "Batch norm inside a normalizing flow", flow_caption, flow.figure),
        ),
        caveat=(
            "The reconstructions and syntheses come from one network and one seed, and their look depends on the "
            "priors' weights, which were chosen by eye; the classifier's confidence says nothing about whether an "
            "input looks like a digit."
        ),
        findings=(f"Inversion: {exact_text}", f"Flow on two moons: {flow_sentence}"),
        summary=summary,
    )
