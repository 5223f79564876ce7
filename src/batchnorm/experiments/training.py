"""A minimal, deterministic training loop: SGD on minibatches, evaluated at regular steps.

:func:`train` draws minibatches by a seeded permutation per epoch (so two models trained with
the same seed see the same batches in the same order), steps the optimizer, and at evenly
spaced steps (step 0 included) evaluates the model in eval mode on the test set and calls an
optional probe. It shows a tqdm progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["History", "Probe", "TrainConfig", "evaluate", "train"]

# A probe looks at the model (in eval mode, under no_grad) and returns named numbers.
Probe = Callable[[nn.Module], dict[str, float]]


@dataclass(frozen=True)
class TrainConfig:
    """SGD settings of one run (the values used and why: ``docs/experiments.md``)."""

    steps: int
    lr: float
    momentum: float = 0.9
    batch_size: int = 60
    eval_points: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig: expected {name} to be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: expected lr > 0, got {self.lr!r}")

    def eval_steps(self) -> list[int]:
        """Steps after which the model is evaluated: 0, about ``eval_points`` evenly spaced, and the last.

        Example:
            >>> TrainConfig(steps=10, lr=0.1, eval_points=4).eval_steps()
            [0, 3, 6, 9, 10]
        """
        every = max(1, math.ceil(self.steps / self.eval_points))
        return sorted({*range(0, self.steps, every), self.steps})


@dataclass
class History:
    """What :func:`train` measured.

    ``steps[i]`` is the number of optimizer steps taken when ``test_accuracy[i]``,
    ``test_loss[i]`` and ``probes[name][i]`` were measured. ``train_loss[i]`` is the mean
    training loss of the steps since the previous evaluation (``train_steps[i]`` ends it).
    """

    steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    probes: dict[str, list[float]] = field(default_factory=dict)

    @property
    def final_test_accuracy(self) -> float:
        return self.test_accuracy[-1]

    def first_step_reaching(self, accuracy: float) -> int | None:
        """The first evaluated step whose test accuracy is at least ``accuracy`` (None: never)."""
        return next((s for s, a in zip(self.steps, self.test_accuracy, strict=True) if a >= accuracy), None)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, labels: Tensor, chunk: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode; restores the model's mode.

    Example:
        >>> model = nn.Linear(2, 10)
        >>> accuracy, loss = evaluate(model, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
        >>> 0.0 <= accuracy <= 1.0 and loss > 0
        True
    """
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    # Chunks bound the memory of the activations on large test sets (MNIST: 10,000 images).
    for start in range(0, len(labels), chunk):
        logits = model(inputs[start : start + chunk])  # (n, 10)
        target = labels[start : start + chunk]
        total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return correct / len(labels), total_loss / len(labels)


def _batches(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches: a fresh permutation each epoch; the incomplete last batch is dropped
    so that every batch norm sees exactly ``batch_size`` examples."""
    if num_examples < batch_size:
        raise ValueError(f"train: expected at least batch_size={batch_size} training examples, got {num_examples}")
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train(
    model: nn.Module,
    train_inputs: Tensor,
    train_labels: Tensor,
    test_inputs: Tensor,
    test_labels: Tensor,
    config: TrainConfig,
    *,
    probe: Probe | None = None,
    before_step: Callable[[int], None] | None = None,
    inspect: Callable[[int, Tensor, Tensor], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    bar: tqdm[NoReturn] | None = None,
) -> History:
    """Train ``model`` in place with SGD (cross-entropy) and return its :class:`History`.

    Args:
        model: the network, on the device of the tensors.
        train_inputs, train_labels: training set, (N, ...) and (N,) class indices.
        test_inputs, test_labels: evaluated at ``config.eval_steps()``.
        config: steps, learning rate, momentum, batch size, evaluation points, seed.
        probe: called at every evaluation with the model in eval mode under no_grad.
        before_step: called with the step's index (0 for the first) before each optimizer step,
            e.g. to set :class:`batchnorm.BatchRenorm`'s limits from :func:`batchnorm.renorm_schedule`.
        inspect: called with the step's index, its minibatch inputs and labels before each
            optimizer step, e.g. to measure the loss landscape around the current weights.
        progress: show a tqdm bar on stderr.
        desc: the bar's label.
        bar: advance this bar by one per step instead of showing a new one (``progress`` and
            ``desc`` are then not read): one bar for several runs.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(120, 4), torch.randint(0, 10, (120,))
        >>> history = train(nn.Linear(4, 10), x, y, x, y, TrainConfig(steps=4, lr=0.1, eval_points=2), progress=False)
        >>> history.steps, history.train_steps
        ([0, 2, 4], [2, 4])
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    # On CPU the generator is independent of the device the data lives on; indices move over.
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(len(train_labels), config.batch_size, generator)
    eval_steps = set(config.eval_steps())
    history = History()

    def record(step: int) -> None:
        accuracy, loss = evaluate(model, test_inputs, test_labels)
        history.steps.append(step)
        history.test_accuracy.append(accuracy)
        history.test_loss.append(loss)
        if probe is not None:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                for name, value in probe(model).items():
                    history.probes.setdefault(name, []).append(value)
            model.train(was_training)

    model.train()
    record(0)
    loss_sum = torch.zeros((), device=train_inputs.device)
    losses_since = 0
    own_bar = bar is None
    if bar is None:
        bar = tqdm(total=config.steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in range(1, config.steps + 1):
        if before_step is not None:
            before_step(step - 1)
        index = next(batches).to(train_inputs.device)
        inputs, labels = train_inputs[index], train_labels[index]
        if inspect is not None:
            inspect(step - 1, inputs, labels)
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        # Summed on the device: reading each loss back would synchronize a GPU every step.
        loss_sum += loss.detach()
        losses_since += 1
        if step in eval_steps:
            history.train_steps.append(step)
            history.train_loss.append(float(loss_sum) / losses_since)
            loss_sum.zero_()
            losses_since = 0
            record(step)
        bar.update()
    if own_bar:
        bar.close()
    return history
