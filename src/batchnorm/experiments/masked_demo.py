"""Padded sequences: batch norm that counts the padding against batch norm over the real values only.

Each image is read row by row as a sequence (one time step per row, its pixels as channels:
(N, 28, 28) -> (N, C=28, L=28)), cut to a random length and zero-padded back to 28. A small 1-D
convolutional network classifies it, once with plain batch norm (the padding enters the
statistics) and once with masked batch norm (``mask=``: statistics over the real rows only).
Everything else is the same: the padding is zeroed at the input and the classifier pools over
the real positions only, so the two differ only in what the batch norms see.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import BatchNorm1d
from . import stats
from .report import Context, Figure, Section, new_figure, percent_axis

__all__ = ["LOWEST_LENGTHS", "MaskedConvNet", "section"]

LENGTH = 28
# Lengths are drawn uniformly from [low, 28]: low = 28 is no padding, low = 2 about half.
LOWEST_LENGTHS = (28, 20, 12, 2)
BATCH = 64
LR = 0.05
HIDDEN = 32


class MaskedConvNet(nn.Module):
    """Conv1d-BN-ReLU twice, a mean over the real positions, a linear classifier.

    ``masked=True`` passes the mask to the batch norms; ``False`` lets them see the padding.
    """

    def __init__(self, masked: bool, channels: int = LENGTH, hidden: int = HIDDEN, classes: int = 10) -> None:
        super().__init__()
        self.masked = masked
        self.conv1 = nn.Conv1d(channels, hidden, 3, padding=1, bias=False)
        self.bn1 = BatchNorm1d(hidden)
        self.conv2 = nn.Conv1d(hidden, hidden, 3, padding=1, bias=False)
        self.bn2 = BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        valid = mask.unsqueeze(1)  # (N, L) -> (N, 1, L)
        h = torch.where(valid, x, 0)  # (N, C, L): the padding is 0 for both variants
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
            h = conv(h)
            h = bn(h, mask=mask) if self.masked else bn(h)
            h = torch.where(valid, torch.relu(h), 0)
        pooled = h.sum(2) / mask.sum(1, keepdim=True).clamp(min=1)  # (N, hidden, L) -> (N, hidden)
        logits: Tensor = self.head(pooled)  # (N, hidden) -> (N, classes)
        return logits


def sequences(images: Tensor) -> Tensor:
    """(N, 1, 28, 28) images as sequences of rows: (N, C=28 pixels, L=28 rows)."""
    return images[:, 0].transpose(1, 2).contiguous()


def random_mask(count: int, low: int, generator: torch.Generator) -> Tensor:
    """(count, 28) prefix masks with lengths uniform in [low, 28]."""
    lengths = torch.randint(low, LENGTH + 1, (count,), generator=generator)  # (N,)
    return torch.arange(LENGTH) < lengths.view(-1, 1)  # (N, L)


@dataclass
class Run:
    accuracy: float  # eval mode (running statistics)
    train_mode_accuracy: float  # training mode on test batches (batch statistics)
    model: MaskedConvNet


def accuracy(model: MaskedConvNet, x: Tensor, mask: Tensor, labels: Tensor, training: bool) -> float:
    """Accuracy in eval mode, or in training mode on batches of BATCH (a copy: no state changes)."""
    net = copy.deepcopy(model).train(training)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), BATCH):
            rows = slice(start, start + BATCH)
            if training and len(labels[rows]) < 2:
                continue
            correct += int((net(x[rows], mask[rows]).argmax(1) == labels[rows]).sum())
    return correct / len(labels)


def train_one(ctx: Context, masked: bool, low: int, seed: int, steps: int) -> Run:
    train_images, test_images = ctx.images28()
    x_train, x_test = sequences(train_images), sequences(test_images)
    y_train, y_test = ctx.data.train_labels, ctx.data.test_labels
    generator = torch.Generator().manual_seed(seed * 1000 + low)
    mask_train = random_mask(len(y_train), low, generator).to(x_train.device)
    mask_test = random_mask(len(y_test), low, torch.Generator().manual_seed(10_000 + low)).to(x_test.device)
    torch.manual_seed(seed)
    model = MaskedConvNet(masked).to(x_train.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for _ in range(steps):
        rows = torch.randint(0, len(y_train), (BATCH,), generator=generator).to(x_train.device)
        loss = F.cross_entropy(model(x_train[rows], mask_train[rows]), y_train[rows])
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
    return Run(
        accuracy(model, x_test, mask_test, y_test, training=False),
        accuracy(model, x_test, mask_test, y_test, training=True),
        model,
    )


def neighbour_drift(model: MaskedConvNet, x: Tensor, sample_length: int = 14) -> tuple[list[int], list[float]]:
    """One sample (length ``sample_length``) in a training-mode batch with 15 others, all of one
    length k: how far its logits move from those with full-length neighbours, for each k."""
    net = copy.deepcopy(model).train()
    batch = x[:16]
    lengths = list(range(2, LENGTH + 1, 2))
    outputs = []
    with torch.no_grad():
        for k in lengths:
            mask = torch.arange(LENGTH, device=x.device) < k  # (L,)
            mask = mask.expand(16, LENGTH).clone()  # (16, L)
            mask[0] = torch.arange(LENGTH, device=x.device) < sample_length
            outputs.append(net(batch, mask)[0])
    reference = outputs[-1]
    return lengths, [float((out - reference).norm() / reference.norm()) for out in outputs]


def section(ctx: Context) -> Section:
    """Plain against masked batch norm on row sequences cut to random lengths, over seeds."""
    # An eighth of --steps per run: 8 runs per seed, and the default report must stay a few minutes.
    steps = max(ctx.steps // 8, 4)
    results: dict[str, dict[int, list[Run]]] = {"plain": {}, "masked": {}}
    with ctx.bar(len(LOWEST_LENGTHS) * 2 * len(ctx.seeds), "masked batch norm") as bar:
        for low in LOWEST_LENGTHS:
            for name in results:
                results[name][low] = []
                for seed in ctx.seeds:
                    results[name][low].append(train_one(ctx, name == "masked", low, seed, steps))
                    bar.update(1)
    padding = [1 - (low + LENGTH) / 2 / LENGTH for low in LOWEST_LENGTHS]  # expected padded fraction
    summary: dict[str, object] = {"steps": steps, "lowest_lengths": list(LOWEST_LENGTHS), "padding": padding}
    accuracies: dict[str, list[stats.Interval]] = {}
    gaps: dict[str, list[stats.Interval]] = {}
    for name, by_low in results.items():
        accuracies[name] = [stats.interval([r.accuracy for r in by_low[low]], (0, 1)) for low in LOWEST_LENGTHS]
        gaps[name] = [
            stats.interval([r.train_mode_accuracy - r.accuracy for r in by_low[low]]) for low in LOWEST_LENGTHS
        ]
        summary[name] = {
            "accuracy": [i.mean for i in accuracies[name]],
            "accuracy_ci": [i.as_list() for i in accuracies[name]],
            "train_minus_eval": [i.mean for i in gaps[name]],
        }
    _, test_images = ctx.images28()
    x_test = sequences(test_images)
    drift = {name: neighbour_drift(results[name][LOWEST_LENGTHS[-1]][0].model, x_test) for name in results}
    summary["neighbour_drift"] = {name: values for name, (_, values) in drift.items()}

    figure = new_figure(8.0, 3.2)
    axes = figure.subplots(1, 3)
    colors = {"plain": "tab:blue", "masked": "tab:red"}
    for name in results:
        means = [100 * i.mean for i in accuracies[name]]
        axes[0].plot(padding, means, marker="o", color=colors[name], label=f"{name} batch norm")
        axes[0].fill_between(
            padding,
            [100 * i.low for i in accuracies[name]],
            [100 * i.high for i in accuracies[name]],
            color=colors[name],
            alpha=0.2,
        )
        axes[1].plot(padding, [i.mean for i in gaps[name]], marker="o", color=colors[name])
        lengths, values = drift[name]
        axes[2].plot(lengths, values, marker=".", color=colors[name])
    axes[0].set(xlabel="padded fraction", title="test accuracy (eval)")
    percent_axis(axes[0])
    axes[1].set(xlabel="padded fraction", title="train-mode minus eval accuracy")
    axes[1].axhline(0, color="0.5", lw=0.5)
    axes[2].set(xlabel="neighbours' length", title="one sample's output moves")
    figure.legend(loc="outside lower center", ncols=2, frameon=False)
    last = len(LOWEST_LENGTHS) - 1
    plain_drift, masked_drift = drift["plain"][1][0], drift["masked"][1][0]
    comparison = stats.compare(
        "masked", accuracies["masked"][last], "plain", accuracies["plain"][last], what="test accuracy"
    )
    caption = (
        f"Images read row by row (28 steps of 28 pixels), cut to lengths uniform in [low, 28] and zero-padded; "
        f"a two-layer 1-D convolutional network with plain or masked batch norm, {steps} SGD steps, "
        f"{len(ctx.seeds)} seeds ({stats.CI_TEXT}). Left: test accuracy in eval mode against the expected "
        f"padded fraction. At the most padding: {comparison} Middle: accuracy in training mode (batch "
        f"statistics of test batches of {BATCH}) minus eval accuracy: how far the running statistics are from "
        f"what the network trained with. Right: the relative change of one length-14 sample's logits in a "
        f"training-mode batch of 16 as its 15 neighbours go from length 2 to 28 (most-padded models, first seed): "
        f"{plain_drift:.2f} with plain and {masked_drift:.2f} with masked batch norm at length 2. Both move, since "
        f"shorter neighbours hold fewer real values; only plain batch norm's statistics also count their padding."
    )
    return Section(
        key="masked",
        title="Masked batch norm on padded sequences",
        claim=(
            "Padding that enters the batch statistics couples a sample's output to how much padding its "
            "batch holds; masked batch norm takes statistics over the real values only."
        ),
        setup=(
            f"Row sequences of the images, lengths uniform in [low, 28] for low in {list(LOWEST_LENGTHS)}; "
            f"Conv1d({LENGTH}, {HIDDEN}, 3)-BN-ReLU, Conv1d({HIDDEN}, {HIDDEN}, 3)-BN-ReLU, mean over real "
            f"positions, Linear; batch {BATCH}, SGD lr {LR} momentum 0.9, {steps} steps, seeds {list(ctx.seeds)}."
        ),
        figures=(Figure("masked", "Plain and masked batch norm on padded sequences", caption, figure),),
        caveat=(
            "Short runs on small images; the padding here is at the end of each sequence and zero-valued, "
            "and the classifier already ignores it, so only the batch norms differ."
        ),
        findings=(f"Padded row sequences, the most padding: {comparison}",),
        summary=summary,
    )
