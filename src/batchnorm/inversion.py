r"""Network inversion: find an input whose output matches a target, by gradient descent on the input.

The objective for a candidate input x (N, C, \*) is

    L(x) = loss(model(x), target)
           + bn_prior * sum_l (||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2)
           + tv * sum_d mean |x_{i+1} - x_i|  (along each dimension d after C)
           + l2 * mean(x^2)

where mu_l(x), var_l(x) are the per-channel mean and biased variance of the input of the l-th
batch-norm layer over the candidate batch. The batch-norm term is the DeepInversion prior
(Yin et al. 2020, "Dreaming to Distill"): a trained network's running statistics describe the
data it saw, so a candidate batch whose features have the same statistics looks like that data.
See ``docs/inversion.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from ._convert import statistics_layers

__all__ = ["InversionResult", "bn_statistics_distance", "invert"]

LOSSES = ("mse", "cross_entropy")


@dataclass
class InversionResult:
    """What :func:`invert` found.

    Attributes:
        input: the optimized input, detached, shape ``input_shape``.
        losses: the objective (data loss plus the weighted priors) at each step, before its update.
        output: ``model(input)`` in eval mode, detached.
    """

    input: Tensor
    losses: list[float]
    output: Tensor


class _StatisticsPrior:
    """Forward pre-hooks that add up the DeepInversion distance of every batch-norm layer's input."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.terms: list[Tensor] = []
        # Before the layer runs: an in-place layer (InPlaceABN) overwrites its input.
        self._handles = [layer.register_forward_pre_hook(self._hook) for layer in layers]

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        # A copy: what var_mean saves for backward must outlive an in-place layer's overwrite (InPlaceABN).
        input = inputs[0].clone()
        mean, var = backends.batch_stats(input)  # (N, C, *) -> (C,), (C,), differentiable
        running_mean, running_var = module.running_mean, module.running_var
        assert isinstance(running_mean, Tensor) and isinstance(running_var, Tensor)
        self.terms.append(
            torch.linalg.vector_norm(mean - running_mean.to(mean.dtype))
            + torch.linalg.vector_norm(var - running_var.to(var.dtype))
        )

    def take(self) -> Tensor | None:
        """The sum over layers of the latest forward, and a clean slate for the next one."""
        total = torch.stack(self.terms).sum() if self.terms else None
        self.terms = []
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def bn_statistics_distance(model: nn.Module, input: Tensor) -> float:
    r"""DeepInversion distance of ``input`` (N, C, \*) to ``model``'s batch-norm running statistics.

    sum over batch-norm layers l of ||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2,
    with mu_l, var_l the per-channel mean and biased variance of layer l's input over the batch.
    Runs ``model`` in eval mode and restores its modes.

    Example:
        >>> import torch, batchnorm
        >>> from batchnorm.inversion import bn_statistics_distance
        >>> model = torch.nn.Sequential(batchnorm.BatchNorm1d(2)).eval()
        >>> bn_statistics_distance(model, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        1.0
    """
    layers = statistics_layers(model, "invert", frozen=True)
    if not layers:
        raise ValueError("bn_statistics_distance: expected a model with batch-norm running statistics, got none")
    prior = _StatisticsPrior(layers)
    with _eval_mode(model):
        try:
            model(input)
        finally:
            prior.remove()
    total = prior.take()
    assert total is not None
    return float(total)


class _eval_mode:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Eval mode and frozen parameters inside, each module's mode and requires_grad restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = [(module, module.training) for module in model.modules()]
        self.requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]

    def __enter__(self) -> None:
        self.model.eval()
        for parameter, _ in self.requires_grad:
            parameter.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for module, training in self.modes:
            module.training = training
        for parameter, requires_grad in self.requires_grad:
            parameter.requires_grad_(requires_grad)


def _total_variation(x: Tensor) -> Tensor:
    """sum over dimensions d >= 2 of mean |x_{i+1} - x_i| along d: (N, C, *) -> ()."""
    return torch.stack([x.diff(dim=d).abs().mean() for d in range(2, x.dim())]).sum()


def _data_loss(output: Tensor, target: Tensor, loss: str) -> Tensor:
    if loss == "mse":
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


def _check_number(name: str, value: object, *, positive: bool = False) -> float:
    number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else float("nan")
    # NaN (also standing for "not a number") fails both comparisons.
    if not (number > 0 if positive else number >= 0):
        kind = "a positive number" if positive else "a non-negative number"
        raise ValueError(f"invert: expected {name} to be {kind}, got {value!r}")
    return number


def _check_target(output: Tensor, target: Tensor, loss: str) -> None:
    """Target against the model's output for the initial input: raises before any step."""
    if loss == "mse":
        if not target.is_floating_point() or target.shape != output.shape:
            raise ValueError(
                f"invert: loss='mse' expected a floating-point target of the output's shape "
                f"{tuple(output.shape)}, got {target.dtype} of shape {tuple(target.shape)}"
            )
    elif (
        target.is_floating_point()
        or target.is_complex()
        or output.dim() != 2
        or target.shape != (output.shape[0],)
        or bool(((target < 0) | (target >= output.shape[1])).any())
    ):
        raise ValueError(
            f"invert: loss='cross_entropy' expected class indices (integer dtype) of shape "
            f"({output.shape[0]},) in [0, {output.shape[1] if output.dim() == 2 else 'K'}) for output "
            f"(N, K) of shape {tuple(output.shape)}, got {target.dtype} of shape {tuple(target.shape)}"
        )


def _initial_input(
    model: nn.Module, input_shape: tuple[int, ...] | torch.Size | None, init: object, seed: object
) -> tuple[Tensor, tuple[int, ...]]:
    if init is not None:
        if not isinstance(init, Tensor) or not init.is_floating_point():
            raise TypeError(f"invert: expected init to be a floating-point torch.Tensor, got {init!r:.80}")
        if input_shape is not None and tuple(init.shape) != tuple(input_shape):
            raise ValueError(f"invert: expected init of shape {tuple(input_shape)}, got {tuple(init.shape)}")
        return init.detach().clone(), tuple(init.shape)
    if input_shape is None:
        raise ValueError("invert: expected input_shape or init to say what input to look for, got neither")
    try:
        shape = tuple(int(size) for size in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"invert: expected input_shape to be a sequence of ints, got {input_shape!r}") from None
    if len(shape) < 1 or any(size <= 0 for size in shape):
        raise ValueError(f"invert: expected input_shape of positive sizes, got {input_shape!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"invert: expected seed to be an int, got {seed!r}")
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype), shape


def _steps(steps: int, progress: bool) -> Iterator[int]:
    if not progress:
        yield from range(steps)
        return
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError("invert(progress=True) needs tqdm: pip install 'batchnorm[experiments]'") from None
    yield from tqdm(range(steps), desc="invert", unit="step")


def invert(
    model: nn.Module,
    target: Tensor,
    *,
    input_shape: tuple[int, ...] | torch.Size | None = None,
    init: Tensor | None = None,
    steps: int = 1000,
    lr: float = 0.05,
    loss: str = "mse",
    bn_prior: float = 0.0,
    tv: float = 0.0,
    l2: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> InversionResult:
    r"""Find an input whose output under ``model`` matches ``target``, by Adam on the input.

    Minimizes ``loss(model(x), target) + bn_prior * BN + tv * TV(x) + l2 * mean(x^2)`` (see the
    module docstring) over x, with ``model`` in eval mode; its parameters and buffers are not
    touched, and each submodule's mode and each parameter's ``requires_grad`` are restored.

    Args:
        model: the network, any ``nn.Module`` taking one tensor.
        target: the output to match: a tensor of the output's shape for ``loss="mse"``, class
            indices (N,) of an integer dtype for ``loss="cross_entropy"``.
        input_shape: shape of the input to find, started from a standard normal draw.
        init: starting input instead (not modified); one of ``input_shape``/``init`` is needed.
        steps: optimizer steps. Default: 1000.
        lr: Adam's learning rate. Default: 0.05.
        loss: ``"mse"`` (default) or ``"cross_entropy"``.
        bn_prior: weight of the batch-norm statistics prior over every BN layer (ours and
            torch's) with running statistics. Default: 0.
        tv: weight of the total-variation prior along the dimensions after C. Default: 0.
        l2: weight of mean(x^2). Default: 0.
        seed: seed of the random start. Default: 0.
        progress: show a tqdm progress bar. Default: False.

    Returns:
        :class:`InversionResult` with ``input``, ``losses`` (one per step) and ``output``.

    Example:
        >>> import torch, batchnorm
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), batchnorm.BatchNorm1d(3)).eval()
        >>> x = torch.randn(4, 3)
        >>> result = batchnorm.invert(model, model(x).detach(), input_shape=(4, 3), steps=500)
        >>> float((result.output - model(x)).abs().max().detach()) < 1e-3
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"invert: expected model to be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"invert: expected target to be a torch.Tensor, got {type(target).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"invert: expected loss to be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"invert: expected steps to be a non-negative int, got {steps!r}")
    lr = _check_number("lr", lr, positive=True)
    bn_prior, tv, l2 = (_check_number(name, value) for name, value in (("bn_prior", bn_prior), ("tv", tv), ("l2", l2)))
    x, shape = _initial_input(model, input_shape, init, seed)
    if tv > 0 and len(shape) < 3:
        raise ValueError(f"invert: tv > 0 needs input (N, C, *) with dimensions after C, got shape {shape}")
    layers = statistics_layers(model, "invert", frozen=True) if bn_prior > 0 else []
    if bn_prior > 0 and not layers:
        raise ValueError("invert: bn_prior > 0 expected a model with batch-norm running statistics, got none")

    losses: list[float] = []
    with _eval_mode(model):
        with torch.no_grad():
            _check_target(model(x), target, loss)
        x.requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=lr)
        prior = _StatisticsPrior(layers)
        try:
            for _ in _steps(steps, progress):
                optimizer.zero_grad(set_to_none=True)
                objective = _data_loss(model(x), target, loss)
                statistics = prior.take()
                if statistics is not None:
                    objective = objective + bn_prior * statistics
                if tv > 0:
                    objective = objective + tv * _total_variation(x)
                if l2 > 0:
                    objective = objective + l2 * x.pow(2).mean()
                objective.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                losses.append(float(objective.detach()))
        finally:
            prior.remove()
        with torch.no_grad():
            output = model(x)
    return InversionResult(x.detach(), losses, output.detach())
