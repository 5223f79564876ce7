"""The memory benchmark behind ``batchnorm bench --memory``.

A stack of Conv-BN-activation blocks (default: 6 blocks, 32 channels, 32x32, batch 16, float32,
LeakyReLU(0.01), 3x3 convolutions without bias) built five ways with the same weights:

    torch             nn.Conv2d -> nn.BatchNorm2d -> nn.LeakyReLU          (the reference)
    torch-inplace     nn.Conv2d -> nn.BatchNorm2d -> nn.LeakyReLU(inplace=True)
    BatchNormAct      nn.Conv2d -> batchnorm.BatchNormAct
    InPlaceABN        nn.Conv2d -> batchnorm.InPlaceABN
    ConvBatchNorm2d   batchnorm.ConvBatchNorm2d -> nn.LeakyReLU

For each: the bytes of the distinct storages autograd saves for backward during one training
forward (:func:`batchnorm.bench.saved_bytes`, deterministic), the peak memory of a training step
on CUDA (``torch.cuda.max_memory_allocated`` above what was allocated before; not measured on
CPU, where the saved bytes stand for it), the time of a training step (forward + backward),
interleaved with the others, median, and the largest relative differences from the reference
in the output, the gradients (input and parameters) and the running statistics after one step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .activation import BatchNormAct, InPlaceABN
from .bench import interleaved_medians, saved_bytes
from .conv import ConvBatchNorm2d

VARIANTS = ("torch", "torch-inplace", "BatchNormAct", "InPlaceABN", "ConvBatchNorm2d")
SLOPE = 0.01  # LeakyReLU's negative slope, the activation of every block


@dataclass
class MemoryRow:
    """One variant's figures; ratios against the ``torch`` row."""

    variant: str
    saved_bytes: int
    saved_ratio: float
    peak_bytes: int | None
    step_ms: float
    step_ratio: float
    output_rel_err: float
    grad_rel_err: float
    stats_rel_err: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _block(variant: str, channels: int) -> nn.Sequential:
    if variant == "BatchNormAct":
        return nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            BatchNormAct(channels, activation="leaky_relu", activation_param=SLOPE),
        )
    if variant == "InPlaceABN":
        return nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            InPlaceABN(channels, activation="leaky_relu", activation_param=SLOPE),
        )
    if variant == "ConvBatchNorm2d":
        return nn.Sequential(ConvBatchNorm2d(channels, channels, 3, padding=1), nn.LeakyReLU(SLOPE))
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.LeakyReLU(SLOPE, inplace=variant == "torch-inplace"),
    )


def _torch_key(variant: str, key: str) -> str:
    """The reference's state-dict key for ``key`` of ``variant``: block k is ``k.0`` (conv),
    ``k.1`` (batch norm) in both, except ConvBatchNorm2d's ``k.0.conv``/``k.0.bn``."""
    if variant != "ConvBatchNorm2d" or key == "input":
        return key
    block, _, name, rest = key.split(".", 3)
    return f"{block}.{'0' if name == 'conv' else '1'}.{rest}"


def build_stacks(channels: int, blocks: int, device: torch.device, seed: int = 0) -> dict[str, nn.Sequential]:
    """Every variant's stack, in training mode, all with the reference's weights; the
    batch-norm weights and biases are drawn away from 1 and 0 so that they matter."""
    torch.manual_seed(seed)
    stacks = {variant: nn.Sequential(*(_block(variant, channels) for _ in range(blocks))) for variant in VARIANTS}
    reference = stacks["torch"]
    with torch.no_grad():
        for layer in reference.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
    state = reference.state_dict()
    for variant, stack in stacks.items():
        stack.load_state_dict({key: state[_torch_key(variant, key)] for key in stack.state_dict()})
        stack.to(device)
    return stacks


def _rel_err(ours: Tensor, reference: Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return float(((ours - reference).abs().max() / scale).item())


def _train_step(model: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    """Forward and backward with a fixed output gradient; gradients cleared first."""

    def step() -> None:
        for parameter in model.parameters():
            parameter.grad = None
        x.grad = None
        model(x).backward(grad)

    return step


@dataclass
class _StepResult:
    """What one training step from the shared weights produced."""

    output: Tensor
    grads: dict[str, Tensor]  # "input" and every parameter, by name
    stats: dict[str, Tensor]  # every running_mean and running_var, by name


def _one_step(model: nn.Module, x: Tensor, grad: Tensor) -> _StepResult:
    inp = x.detach().clone().requires_grad_()
    output = model(inp)
    output.backward(grad)
    assert inp.grad is not None
    grads = {"input": inp.grad}
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None
        grads[name] = parameter.grad
    stats = {name: b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))}
    return _StepResult(output.detach(), grads, stats)


def _agreement(variant: str, ours: _StepResult, reference: _StepResult) -> tuple[float, float, float]:
    """(output, gradient, running-statistics) largest relative errors against the reference."""
    grad_errs = [_rel_err(g, reference.grads[_torch_key(variant, name)]) for name, g in ours.grads.items()]
    stats_errs = [_rel_err(s, reference.stats[_torch_key(variant, name)]) for name, s in ours.stats.items()]
    return _rel_err(ours.output, reference.output), max(grad_errs), max(stats_errs)


def _peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def run_memory(
    quick: bool = False,
    repeats: int | None = None,
    *,
    device: str = "cpu",
    channels: int = 32,
    size: int = 32,
    batch: int = 16,
    blocks: int = 6,
) -> list[MemoryRow]:
    """Measure every variant on a stack of ``blocks`` blocks over (batch, channels, size, size).

    ``repeats`` timed steps per variant (default 10 quick, 25 otherwise) after 1 (quick) or 3
    warm-up steps.
    """
    if repeats is None:
        repeats = 10 if quick else 25
    warmup = 1 if quick else 3
    target = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, channels, size, size)
    x = torch.randn(shape, generator=generator).to(target)
    grad = torch.randn(shape, generator=generator).to(target)

    stacks = build_stacks(channels, blocks, target)
    results = {variant: _one_step(stacks[variant], x, grad) for variant in VARIANTS}
    agreement = {variant: _agreement(variant, results[variant], results["torch"]) for variant in VARIANTS}

    stacks = build_stacks(channels, blocks, target)
    saved = {variant: saved_bytes(lambda stack=stacks[variant]: stack(x)) for variant in VARIANTS}  # type: ignore[misc]
    steps = [_train_step(stacks[variant], x, grad) for variant in VARIANTS]
    peaks = [_peak_bytes(step, target) for step in steps]
    times = interleaved_medians(steps, repeats, warmup, target)

    reference = VARIANTS.index("torch")
    return [
        MemoryRow(
            variant=variant,
            saved_bytes=saved[variant],
            saved_ratio=saved[variant] / saved["torch"],
            peak_bytes=peaks[index],
            step_ms=times[index],
            step_ratio=times[index] / times[reference],
            output_rel_err=agreement[variant][0],
            grad_rel_err=agreement[variant][1],
            stats_rel_err=agreement[variant][2],
        )
        for index, variant in enumerate(VARIANTS)
    ]


def format_memory_table(rows: Sequence[MemoryRow]) -> str:
    """The rows as a Markdown table; peak memory reads "n/a (CPU)" where it was not measured."""
    header = (
        "| variant | saved for backward | saved / torch | peak step memory | step time | time / torch "
        "| rel. err. output / grads / running stats |"
    )
    lines = [header, "|" + "---|" * 7]
    for row in rows:
        peak = "n/a (CPU)" if row.peak_bytes is None else f"{row.peak_bytes / 2**20:.1f} MB"
        lines.append(
            f"| {row.variant} | {row.saved_bytes / 2**20:.2f} MB | **{row.saved_ratio:.2f}** | {peak} "
            f"| {row.step_ms:.1f} ms | **{row.step_ratio:.2f}** "
            f"| {row.output_rel_err:.1e} / {row.grad_rel_err:.1e} / {row.stats_rel_err:.1e} |"
        )
    return "\n".join(lines)
