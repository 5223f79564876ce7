"""Report additions for the variants and tools: recalibration, small batches, and folding.

Plain functions that take a model or data and an output path, return their numbers and write one
figure each, so that the report can call them at full size and the tests at a tiny one:

- :func:`recalibrate_experiment`: eval accuracy of a trained model before and after
  :func:`batchnorm.recalibrate` (report section 3, running statistics).
- :func:`small_batch_experiment`: LeNet-BN trained with batch 4 using BatchNorm, BatchRenorm and
  GhostBatchNorm (virtual batch 4 out of 64): test accuracy of each.
- :func:`fold_speedup`: inference time of LeNet-BN against its :func:`batchnorm.fold`-ed copy.

Also the LeNet-BN model they share with ``examples/ddp_train.py`` and the data they run on.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import BatchNorm, BatchRenorm, GhostBatchNorm, fold, recalibrate, renorm_schedule

Norm = Callable[[int], nn.Module]
Data = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train (N, 1, 28, 28), y_train (N,), x_test, y_test


class LeNetBN(nn.Module):
    """LeNet-5 with a batch norm after every convolution and hidden dense layer, sigmoid units.

    conv 1->6 5x5 pad 2, BN, sigmoid, avgpool 2; conv 6->16 5x5, BN, sigmoid, avgpool 2;
    400->120, BN, sigmoid; 120->84, BN, sigmoid; 84->10. Input (N, 1, 28, 28), output (N, 10).

    Args:
        norm: builds the batch norm for a number of channels; the rank-agnostic
            :class:`batchnorm.BatchNorm` (default) and its variants serve 4D and 2D alike.
    """

    def __init__(self, norm: Norm = BatchNorm, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            norm(6),
            nn.Sigmoid(),
            nn.AvgPool2d(2),  # (N, 6, 28, 28) -> (N, 6, 14, 14)
            nn.Conv2d(6, 16, 5),
            norm(16),
            nn.Sigmoid(),
            nn.AvgPool2d(2),  # (N, 16, 10, 10) -> (N, 16, 5, 5)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (N, 16, 5, 5) -> (N, 400)
            nn.Linear(400, 120),
            norm(120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            norm(84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.classifier(self.features(x))
        return logits


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def digits_28(seed: int = 0, test_fraction: float = 0.25) -> Data:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [0, 1] and 28x28.

    The split is a seeded permutation: ``test_fraction`` of the images are the test set.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)  # (N, 1, 28, 28)
    labels = torch.tensor(digits.target, dtype=torch.long)
    return _split(images, labels, seed, test_fraction)


def synthetic_digits(n: int, seed: int = 0, test_fraction: float = 0.25) -> Data:
    """``n`` noisy copies of 10 random 28x28 class prototypes: learnable, instant, no files."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    images = prototypes[labels] + 0.3 * torch.randn(n, 1, 28, 28, generator=gen)  # (n, 1, 28, 28)
    return _split(images, labels, seed, test_fraction)


def _split(images: Tensor, labels: Tensor, seed: int, test_fraction: float) -> Data:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------


def batches(x: Tensor, y: Tensor, batch_size: int, steps: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` batches of ``batch_size`` samples drawn without replacement within each epoch."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(y), generator=gen), 0
        index = order[position : position + batch_size]
        position += batch_size
        yield x[index], y[index]


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float = 0.5,
    seed: int = 0,
    before_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Plain SGD on the cross-entropy; returns the loss of every step. ``before_step(step)`` runs first."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step, (xb, yb) in enumerate(batches(x, y, batch_size, steps, seed)):
        if before_step is not None:
            before_step(step)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Fraction of ``x`` classified as ``y`` in eval mode; the model's mode is restored."""
    mode = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(y), batch_size):
            predicted = model(x[start : start + batch_size]).argmax(1)
            correct += int((predicted == y[start : start + batch_size]).sum())
    finally:
        model.train(mode)
    return correct / max(len(y), 1)


# ---------------------------------------------------------------------------------------------
# The three experiments
# ---------------------------------------------------------------------------------------------


def recalibrate_experiment(
    model: nn.Module, x_train: Tensor, x_test: Tensor, y_test: Tensor, out: str | Path, *, batch_size: int = 256
) -> dict[str, float]:
    """Test accuracy of a trained ``model`` before and after :func:`batchnorm.recalibrate`.

    Recalibrates a copy (``model`` does not change) on the whole training set in batches of
    ``batch_size``; writes a bar chart to ``out``. Returns ``{"before": ..., "after": ...}``.
    """
    before = accuracy(model, x_test, y_test)
    recalibrated = recalibrate(
        copy.deepcopy(model), [x_train[start : start + batch_size] for start in range(0, len(x_train), batch_size)]
    )
    after = accuracy(recalibrated, x_test, y_test)
    _bar_chart(
        {"running averages": before, "recalibrated": after},
        "test accuracy",
        "Eval accuracy before and after recalibrate",
        out,
    )
    return {"before": before, "after": after}


def small_batch_experiment(
    data: Data,
    out: str | Path,
    *,
    steps: int = 1000,
    batch_size: int = 4,
    ghost_batch_size: int = 64,
    lr: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """LeNet-BN at batch ``batch_size`` with BatchNorm, BatchRenorm and GhostBatchNorm: test accuracies.

    BatchNorm and BatchRenorm train on batches of ``batch_size``; BatchRenorm's ``rmax``/``dmax``
    follow :func:`renorm_schedule` scaled to ``steps`` (held at batch norm for the first 10%,
    full at 60% for rmax and 35% for dmax). GhostBatchNorm trains on batches of
    ``ghost_batch_size`` normalized in virtual batches of ``batch_size``. Every model starts from
    the same seed and runs ``steps`` SGD steps. Writes a bar chart to ``out``.
    """
    x_train, y_train, x_test, y_test = data
    hold = steps // 10

    def renorm_layers(model: nn.Module) -> Callable[[int], None]:
        layers = [module for module in model.modules() if isinstance(module, BatchRenorm)]

        def set_limits(step: int) -> None:
            rmax, dmax = renorm_schedule(step, hold_steps=hold, rmax_ramp_steps=steps // 2, dmax_ramp_steps=steps // 4)
            for layer in layers:
                layer.rmax, layer.dmax = rmax, dmax

        return set_limits

    runs: dict[str, tuple[Norm, int]] = {
        f"BatchNorm (batch {batch_size})": (BatchNorm, batch_size),
        f"BatchRenorm (batch {batch_size})": (BatchRenorm, batch_size),
        f"GhostBatchNorm ({batch_size} of {ghost_batch_size})": (
            lambda c: GhostBatchNorm(c, virtual_batch_size=batch_size),
            ghost_batch_size,
        ),
    }
    results = {}
    for name, (norm, size) in runs.items():
        torch.manual_seed(seed)
        model = LeNetBN(norm)
        train(model, x_train, y_train, steps=steps, batch_size=size, lr=lr, seed=seed, before_step=renorm_layers(model))
        results[name] = accuracy(model, x_test, y_test)
    _bar_chart(results, "test accuracy", f"Small batches: LeNet-BN after {steps} steps", out)
    return results


def fold_speedup(model: nn.Module, x: Tensor, out: str | Path, *, repeats: int = 30) -> dict[str, float]:
    """Eval-mode inference time of ``model`` against ``fold(model)`` on ``x``, in this process.

    Median of ``repeats`` timed calls after one warm-up each, under ``no_grad``. Returns
    ``{"unfolded_ms", "folded_ms", "speedup" (unfolded / folded), "max_abs_diff"}`` and writes a
    bar chart to ``out``. ``model`` does not change.
    """
    reference = copy.deepcopy(model).eval()
    folded = fold(reference)
    with torch.no_grad():
        expected, got = reference(x), folded(x)
        unfolded_ms = _median_ms(reference, x, repeats)
        folded_ms = _median_ms(folded, x, repeats)
    result = {
        "unfolded_ms": unfolded_ms,
        "folded_ms": folded_ms,
        "speedup": unfolded_ms / folded_ms,
        "max_abs_diff": float((expected - got).abs().max()),
    }
    _bar_chart(
        {"with batch norm": unfolded_ms, "folded": folded_ms},
        f"ms per forward (batch {x.shape[0]})",
        f"fold: {result['speedup']:.2f}x faster inference",
        out,
    )
    return result


def _median_ms(model: nn.Module, x: Tensor, repeats: int) -> float:
    model(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _bar_chart(values: dict[str, float], ylabel: str, title: str, out: str | Path) -> None:
    """One bar per entry, the value written on it; saved under a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig: Any
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(list(values), list(values.values()), color=["#4c72b0", "#dd8452", "#55a868"][: len(values)])
    ax.bar_label(bars, fmt="%.3g")
    ax.margins(y=0.15)  # room for the labels above the tallest bar
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(handle)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
