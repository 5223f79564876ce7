"""The benchmark behind ``batchnorm bench``.

Ours (``batchnorm.functional.batch_norm`` under the chosen backend) against torch's own
``torch.nn.functional.batch_norm``, float32 by default, in one process. Ours and torch are
interleaved run by run so that both see the same machine drift, and each figure is the median
of the timed runs after warm-up. The first call of ours (which includes compilation for the
compiled backend) is reported separately.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from . import backends
from .experiments import models
from .functional import batch_norm


@dataclass(frozen=True)
class Shape:
    name: str
    shape: tuple[int, ...]
    channels_last: bool = False
    # Ours masked (random lengths along the last dimension) against torch unmasked on the same
    # shape: what padding-aware statistics cost over plain batch norm.
    masked: bool = False

    @property
    def numel(self) -> int:
        count = 1
        for extent in self.shape:
            count *= extent
        return count


SHAPES = (
    Shape("cnn", (64, 64, 56, 56)),
    Shape("cnn-cl", (64, 64, 56, 56), channels_last=True),
    Shape("deep", (256, 256, 14, 14)),
    Shape("mlp", (1024, 512)),
    Shape("seq", (32, 128, 512)),
    Shape("vol", (8, 32, 16, 32, 32)),
    Shape("small", (16, 512, 2, 2)),
    Shape("masked", (32, 128, 512), masked=True),
)


@dataclass
class Row:
    """One shape's figures; times in milliseconds, ratios ours/torch."""

    name: str
    shape: tuple[int, ...]
    backend: str
    train_forward_ms: float
    torch_train_forward_ms: float
    train_backward_ms: float
    torch_train_backward_ms: float
    eval_forward_ms: float
    torch_eval_forward_ms: float
    copy_ms: float
    first_call_ms: float
    saved_mb: float
    torch_saved_mb: float
    # Peak memory of one training step above what was allocated before it (CUDA only: torch
    # keeps no peak counter for CPU memory).
    peak_mb: float | None = None
    torch_peak_mb: float | None = None

    @property
    def train_forward_ratio(self) -> float:
        return self.train_forward_ms / self.torch_train_forward_ms

    @property
    def train_backward_ratio(self) -> float:
        return self.train_backward_ms / self.torch_train_backward_ms

    @property
    def eval_forward_ratio(self) -> float:
        return self.eval_forward_ms / self.torch_eval_forward_ms

    @property
    def forward_copies(self) -> float:
        return self.train_forward_ms / self.copy_ms

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.update(
            train_forward_ratio=self.train_forward_ratio,
            train_forward_backward_ratio=self.train_backward_ratio,
            eval_forward_ratio=self.eval_forward_ratio,
            train_forward_input_copies=self.forward_copies,
        )
        return data


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    functions: Sequence[Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> list[float]:
    """Median wall time in ms of each function, the functions taking turns run by run."""
    for _ in range(warmup):
        for fn in functions:
            fn()
    _synchronize(device)
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for index, fn in enumerate(functions):
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times[index].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``fn()``."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Bytes allocated at the peak of ``step()`` above those allocated before it, on CUDA;
    None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench_shape(spec: Shape, backend: str, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int) -> Row:
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(spec.shape, generator=generator).to(device=device, dtype=dtype)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    channels = spec.shape[1]
    param_dtype = backends.compute_dtype(x)
    weight = torch.ones(channels, device=device, dtype=param_dtype, requires_grad=True)
    bias = torch.zeros(channels, device=device, dtype=param_dtype, requires_grad=True)
    mean_ours = torch.zeros(channels, device=device, dtype=param_dtype)
    var_ours = torch.ones(channels, device=device, dtype=param_dtype)
    mean_torch, var_torch = mean_ours.clone(), var_ours.clone()
    x_grad = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    grad_output = torch.randn(spec.shape, generator=generator).to(device=device, dtype=dtype)
    if spec.channels_last:
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    mask = None
    if spec.masked:
        length = spec.shape[-1]
        lengths = torch.randint(2, length + 1, (spec.shape[0],), generator=generator)  # (N,)
        mask = (torch.arange(length) < lengths.view(-1, 1)).to(device)  # (N, L)
        mask = mask.view(spec.shape[0], *([1] * (len(spec.shape) - 3)), length).expand(
            spec.shape[0], *spec.shape[2:]
        )  # (N, *, L)

    def ours(inp: Tensor, training: bool = True) -> Tensor:
        return batch_norm(inp, mean_ours, var_ours, weight, bias, training, mask=mask)

    def theirs(inp: Tensor, training: bool = True) -> Tensor:
        return nn.functional.batch_norm(inp, mean_torch, var_torch, weight, bias, training)

    def train_step(fn: Callable[[Tensor], Tensor]) -> Callable[[], None]:
        def step() -> None:
            torch.autograd.backward(fn(x_grad), grad_output)
            x_grad.grad = None
            weight.grad = bias.grad = None

        return step

    with backends.using_backend(backend):
        start = time.perf_counter()
        with torch.no_grad():
            ours(x)
        train_step(ours)()
        ours(x, False)
        _synchronize(device)
        first_call_ms = (time.perf_counter() - start) * 1e3

        with torch.no_grad():
            forward = interleaved_medians(
                [lambda: ours(x), lambda: theirs(x), lambda: x.clone()], repeats, warmup, device
            )
            evaluation = interleaved_medians(
                [lambda: ours(x, False), lambda: theirs(x, False)], repeats, warmup, device
            )
        backward = interleaved_medians([train_step(ours), train_step(theirs)], repeats, warmup, device)
        ours_saved = saved_bytes(lambda: ours(x_grad))
        torch_saved = saved_bytes(lambda: theirs(x_grad))
        ours_peak, torch_peak = peak_bytes(train_step(ours), device), peak_bytes(train_step(theirs), device)
    return Row(
        name=spec.name,
        shape=spec.shape,
        backend=backend,
        train_forward_ms=forward[0],
        torch_train_forward_ms=forward[1],
        copy_ms=forward[2],
        train_backward_ms=backward[0],
        torch_train_backward_ms=backward[1],
        eval_forward_ms=evaluation[0],
        torch_eval_forward_ms=evaluation[1],
        first_call_ms=first_call_ms,
        saved_mb=ours_saved / 2**20,
        torch_saved_mb=torch_saved / 2**20,
        peak_mb=None if ours_peak is None else ours_peak / 2**20,
        torch_peak_mb=None if torch_peak is None else torch_peak / 2**20,
    )


@dataclass
class EndToEnd:
    """Training steps per second of one model built with our modules and with torch's."""

    name: str
    batch: int
    backend: str
    ours_ms: float
    torch_ms: float

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.torch_ms

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "ratio": self.ratio}

    def format(self) -> str:
        return (
            f"{self.name} training step (batch {self.batch}, {self.backend}): ours {self.ours_ms:.1f} ms "
            f"({1e3 / self.ours_ms:.1f} steps/s), torch {self.torch_ms:.1f} ms ({1e3 / self.torch_ms:.1f} steps/s), "
            f"ours/torch = {self.ratio:.2f}"
        )


def bench_training_step(
    name: str,
    build: Callable[[type[nn.Module], type[nn.Module]], nn.Module],
    input_shape: tuple[int, ...],
    classes: int,
    backend: str,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> EndToEnd:
    """SGD steps of ``build(BatchNorm1d, BatchNorm2d)`` with ours against torch's, same weights."""
    from .modules import BatchNorm1d, BatchNorm2d

    torch.manual_seed(0)
    ours_model = build(BatchNorm1d, BatchNorm2d).to(device)
    torch_model = build(nn.BatchNorm1d, nn.BatchNorm2d).to(device)
    torch_model.load_state_dict(ours_model.state_dict())
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(input_shape, generator=generator).to(device)
    target = torch.randint(0, classes, (input_shape[0],), generator=generator).to(device)

    def step_of(model: nn.Module) -> Callable[[], None]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), target)
            torch.autograd.backward(loss)
            optimizer.step()

        return step

    with backends.using_backend(backend):
        ours_ms, torch_ms = interleaved_medians([step_of(ours_model), step_of(torch_model)], repeats, warmup, device)
    return EndToEnd(name, input_shape[0], backend, ours_ms, torch_ms)


def lenet(bn1d: type[nn.Module], bn2d: type[nn.Module]) -> nn.Module:
    """LeNet-5 with batch norm after every convolution and hidden dense layer.

    The report's LeNet (:func:`batchnorm.experiments.models.lenet`, which needs only torch) with
    ``bn1d``/``bn2d`` as its batch norms, so that ours and torch's run the same network.
    """
    return models.lenet(norm1d=bn1d, norm2d=bn2d)


# The end-to-end figure: LeNet-BN on 28x28 digits, batch 256, 10 classes.
END_TO_END = ("LeNet-BN", lenet, (256, 1, 28, 28), 10)


def format_table(rows: Sequence[Row]) -> str:
    header = (
        "| shape | backend | train fwd ours/torch | train fwd+bwd ours/torch | eval fwd ours/torch "
        "| train fwd / input copy | first call | saved for backward ours/torch | peak ours/torch |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        lines.append(
            f"| {row.name} {row.shape} | {row.backend} "
            f"| {row.train_forward_ms:.2f}/{row.torch_train_forward_ms:.2f} ms = **{row.train_forward_ratio:.2f}** "
            f"| {row.train_backward_ms:.2f}/{row.torch_train_backward_ms:.2f} ms = **{row.train_backward_ratio:.2f}** "
            f"| {row.eval_forward_ms:.2f}/{row.torch_eval_forward_ms:.2f} ms = **{row.eval_forward_ratio:.2f}** "
            f"| {row.forward_copies:.2f} | {row.first_call_ms / 1e3:.1f} s "
            f"| {row.saved_mb:.1f}/{row.torch_saved_mb:.1f} MB | {_peak(row)} |"
        )
    return "\n".join(lines)


def _peak(row: Row) -> str:
    if row.peak_mb is None or row.torch_peak_mb is None:
        return "n/a (CPU)"
    return f"{row.peak_mb:.1f}/{row.torch_peak_mb:.1f} MB"


def run(
    *,
    backend: str = "auto",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    quick: bool = False,
    shapes: Sequence[str] | None = None,
    json_path: str | None = None,
) -> tuple[list[Row], EndToEnd]:
    """Measure every shape (or those named) and return the rows; writes JSON when asked."""
    selected = [s for s in SHAPES if shapes is None or s.name in shapes]
    repeats, warmup = (10, 2) if quick else (25, 3)
    target = torch.device(device)
    rows = [bench_shape(spec, backend, target, dtype, repeats, warmup) for spec in selected]
    end_to_end = bench_training_step(*END_TO_END, backend, target, repeats, warmup)
    if json_path is not None:
        payload = {
            "device": device_name(target),
            "dtype": str(dtype),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "rows": [row.to_dict() for row in rows],
            "end_to_end": [end_to_end.to_dict()],
        }
        write_json_atomically(json_path, payload)
    return rows, end_to_end


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def write_json_atomically(path: str, payload: object) -> None:
    """Write to a temporary name beside the target, then rename: no half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".bench-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=2)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
