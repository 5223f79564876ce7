"""The benchmark behind ``batchnorm bench``.

Ours (``batchnorm.functional.batch_norm`` under the chosen backend) against torch's own
``torch.nn.functional.batch_norm``, float32 by default, in one process. Ours and torch are
interleaved run by run so that both see the same machine drift, and each figure is the median
of the timed runs after warm-up, shown with the fastest and the slowest run (the spread). The
first call of ours (which includes compilation for the compiled backend) is reported separately.

End to end: a training step and an eval pass of a ResNet-18, a MobileNetV2 and LeNet-BN built
with our batch norms and with torch's, same weights, interleaved; and the first training step of
the ResNet-18 in a fresh Python process.

A ratio is flagged as noisy when either side's spread, (slowest - fastest) / median, exceeds
:data:`NOISY_SPREAD`: the runs of one figure then differ by more than the effects being measured.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from . import backends
from .experiments import models
from .functional import batch_norm

# A figure whose slowest run is more than this fraction of its median above its fastest run, on
# either side, is too noisy to trust its ratio: on a quiet machine the spread of these figures is
# a few percent, and the differences the ratios show are 5 to 50 percent.
NOISY_SPREAD = 0.5


@dataclass(frozen=True)
class Spread:
    """Fastest, median and slowest of the timed runs of one function, in ms."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, times: Sequence[float]) -> Spread:
        return cls(min(times), statistics.median(times), max(times))

    @property
    def relative(self) -> float:
        """(max - min) / median: how far apart the runs were, as a fraction of the median."""
        return (self.max - self.min) / self.median

    def format(self) -> str:
        return f"{self.median:.2f} [{self.min:.2f}-{self.max:.2f}]"


@dataclass(frozen=True)
class Pair:
    """One figure measured for ours and for torch."""

    ours: Spread
    torch: Spread

    @property
    def ratio(self) -> float:
        return self.ours.median / self.torch.median

    @property
    def noisy(self) -> bool:
        return max(self.ours.relative, self.torch.relative) > NOISY_SPREAD

    def format(self) -> str:
        """``ours-median [min-max]/torch-median [min-max] ms = **ratio**``."""
        noisy = " (noisy)" if self.noisy else ""
        return f"{self.ours.format()} / {self.torch.format()} ms = **{self.ratio:.2f}**{noisy}"

    def to_dict(self) -> dict[str, object]:
        return {"ours": asdict(self.ours), "torch": asdict(self.torch), "ratio": self.ratio, "noisy": self.noisy}


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
    # The spread of each figure: "train_forward", "train_forward_backward", "eval_forward".
    pairs: dict[str, Pair] = field(default_factory=dict)

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
        data["pairs"] = {figure: pair.to_dict() for figure, pair in self.pairs.items()}
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
    return [spread.median for spread in interleaved_spreads(functions, repeats, warmup, device)]


def interleaved_spreads(
    functions: Sequence[Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> list[Spread]:
    """Wall times in ms of each function (fastest, median, slowest), the functions taking turns
    run by run so that all of them see the same machine drift."""
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
    return [Spread.of(t) for t in times]


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
            forward = interleaved_spreads(
                [lambda: ours(x), lambda: theirs(x), lambda: x.clone()], repeats, warmup, device
            )
            evaluation = interleaved_spreads(
                [lambda: ours(x, False), lambda: theirs(x, False)], repeats, warmup, device
            )
        backward = interleaved_spreads([train_step(ours), train_step(theirs)], repeats, warmup, device)
        ours_saved = saved_bytes(lambda: ours(x_grad))
        torch_saved = saved_bytes(lambda: theirs(x_grad))
        ours_peak, torch_peak = peak_bytes(train_step(ours), device), peak_bytes(train_step(theirs), device)
    return Row(
        name=spec.name,
        shape=spec.shape,
        backend=backend,
        train_forward_ms=forward[0].median,
        torch_train_forward_ms=forward[1].median,
        copy_ms=forward[2].median,
        train_backward_ms=backward[0].median,
        torch_train_backward_ms=backward[1].median,
        eval_forward_ms=evaluation[0].median,
        torch_eval_forward_ms=evaluation[1].median,
        first_call_ms=first_call_ms,
        saved_mb=ours_saved / 2**20,
        torch_saved_mb=torch_saved / 2**20,
        peak_mb=None if ours_peak is None else ours_peak / 2**20,
        torch_peak_mb=None if torch_peak is None else torch_peak / 2**20,
        pairs={
            "train_forward": Pair(forward[0], forward[1]),
            "train_forward_backward": Pair(backward[0], backward[1]),
            "eval_forward": Pair(evaluation[0], evaluation[1]),
        },
    )


# Builds a batch norm for a number of channels: ours (batchnorm.BatchNorm2d) or torch's.
Norm = Callable[[int], nn.Module]


@dataclass(frozen=True)
class Network:
    """A network of the end-to-end figures: ``build(bn1d, bn2d)`` with either side's batch norms,
    trained with SGD and cross-entropy on ``input_shape`` random input and ``classes`` classes."""

    name: str
    build: Callable[[Norm, Norm], nn.Module]
    input_shape: tuple[int, ...]
    classes: int = 10


def _resnet18(width: int) -> Callable[[Norm, Norm], nn.Module]:
    return lambda bn1d, bn2d: models.resnet18(width=width, norm=bn2d)


def _mobilenet_v2(width_mult: float) -> Callable[[Norm, Norm], nn.Module]:
    return lambda bn1d, bn2d: models.mobilenet_v2(width_mult=width_mult, norm=bn2d)


def lenet(bn1d: Norm, bn2d: Norm) -> nn.Module:
    """LeNet-5 with batch norm after every convolution and hidden dense layer.

    The report's LeNet (:func:`batchnorm.experiments.models.lenet`, which needs only torch) with
    ``bn1d``/``bn2d`` as its batch norms, so that ours and torch's run the same network.
    """
    return models.lenet(norm1d=bn1d, norm2d=bn2d)


# MobileNetV2 at width 0.5: torch's depthwise-convolution backward on CPU is slow enough that
# width 1.0 alone would take minutes of the run on two cores.
NETWORKS = (
    Network("ResNet-18", _resnet18(64), (16, 3, 64, 64)),
    Network("MobileNetV2", _mobilenet_v2(0.5), (16, 3, 96, 96)),
    Network("LeNet-BN", lenet, (256, 1, 28, 28)),
)
# --quick: the same architectures, narrower and on smaller input.
QUICK_NETWORKS = (
    Network("ResNet-18", _resnet18(16), (8, 3, 32, 32)),
    Network("MobileNetV2", _mobilenet_v2(0.25), (8, 3, 64, 64)),
    Network("LeNet-BN", lenet, (64, 1, 28, 28)),
)
# (timed runs, warm-up runs) of each network, default and --quick: a whole network's step takes
# 10 to 1000 times one batch norm's, and fewer runs measure its spread as well.
NETWORK_REPEATS = (10, 2)
QUICK_NETWORK_REPEATS = (5, 1)
# The network whose first training step is timed in a fresh process.
FIRST_STEP_NETWORK = "ResNet-18"


@dataclass
class EndToEnd:
    """One pass of a whole network (a training step or an eval pass), ours against torch's."""

    name: str
    mode: str  # "train" (an SGD step) or "eval" (a forward pass under no_grad in eval mode)
    batch: int
    backend: str
    pair: Pair

    @property
    def ratio(self) -> float:
        return self.pair.ratio

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "mode": self.mode,
            "batch": self.batch,
            "backend": self.backend,
            "ours_ms": self.pair.ours.median,
            "torch_ms": self.pair.torch.median,
            **self.pair.to_dict(),
        }


def _build_pair(network: Network, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(ours, torch's): the same network and the same weights, with each side's batch norms."""
    from .modules import BatchNorm1d, BatchNorm2d

    torch.manual_seed(0)
    ours_model = network.build(BatchNorm1d, BatchNorm2d).to(device)
    torch_model = network.build(nn.BatchNorm1d, nn.BatchNorm2d).to(device)
    torch_model.load_state_dict(ours_model.state_dict())
    return ours_model, torch_model


def _batch(network: Network, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(network.input_shape, generator=generator).to(device)
    target = torch.randint(0, network.classes, (network.input_shape[0],), generator=generator).to(device)
    return x, target


def _training_step(model: nn.Module, x: Tensor, target: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), target)
        torch.autograd.backward(loss)
        optimizer.step()

    return step


def _eval_pass(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()

    return forward


def bench_network(
    network: Network,
    backend: str,
    device: torch.device,
    repeats: int,
    warmup: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[EndToEnd, EndToEnd]:
    """(training step, eval pass) of ``network`` with ours against torch's, same weights; under
    autocast to ``dtype`` when it is not float32 (float32 weights, as mixed-precision training)."""
    ours_model, torch_model = _build_pair(network, device)
    x, target = _batch(network, device)
    batch = network.input_shape[0]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with backends.using_backend(backend), autocast:
        train = interleaved_spreads(
            [_training_step(ours_model, x, target), _training_step(torch_model, x, target)], repeats, warmup, device
        )
        evaluation = interleaved_spreads(
            [_eval_pass(ours_model, x), _eval_pass(torch_model, x)], repeats, warmup, device
        )
    return (
        EndToEnd(network.name, "train", batch, backend, Pair(*train)),
        EndToEnd(network.name, "eval", batch, backend, Pair(*evaluation)),
    )


@dataclass
class FirstStep:
    """The first training step in a fresh process, ours and torch's, each in its own process.

    ``*_step_ms``: from the model built and the batch on the device to the end of the first step;
    ``*_import_ms``: importing torch and this package before it (the same code on both sides).
    Medians over ``runs`` processes per side.
    """

    name: str
    backend: str
    runs: int
    ours_step_ms: float
    torch_step_ms: float
    ours_import_ms: float
    torch_import_ms: float

    @property
    def ratio(self) -> float:
        return self.ours_step_ms / self.torch_step_ms

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "ratio": self.ratio}

    def format(self) -> str:
        return (
            f"{self.name} first training step in a fresh process ({self.backend}, median of {self.runs}): "
            f"ours {self.ours_step_ms:.1f} ms, torch {self.torch_step_ms:.1f} ms, ours/torch = **{self.ratio:.2f}** "
            f"(before it: importing torch and batchnorm, {self.ours_import_ms / 1e3:.1f} s / "
            f"{self.torch_import_ms / 1e3:.1f} s)"
        )


def first_step_in_this_process(
    name: str, ours: bool, backend: str, device: str, quick: bool, started: float, imported: float
) -> dict[str, float]:
    """The child's side of :func:`bench_first_step`: build the network, run one training step.

    ``started`` and ``imported`` are ``time.perf_counter()`` readings the child took before and
    after its imports. Returns both durations in ms.
    """
    from .modules import BatchNorm1d, BatchNorm2d

    network = next(n for n in (QUICK_NETWORKS if quick else NETWORKS) if n.name == name)
    target_device = torch.device(device)
    torch.manual_seed(0)
    norms = (BatchNorm1d, BatchNorm2d) if ours else (nn.BatchNorm1d, nn.BatchNorm2d)
    model = network.build(*norms).to(target_device)
    x, target = _batch(network, target_device)
    with backends.using_backend(backend):
        step = _training_step(model, x, target)
        _synchronize(target_device)
        ready = time.perf_counter()
        step()
        _synchronize(target_device)
        done = time.perf_counter()
    return {"import_ms": (imported - started) * 1e3, "step_ms": (done - ready) * 1e3}


# The child process: time its own imports, then hand over to first_step_in_this_process.
_CHILD = """
import time
started = time.perf_counter()
import torch
import batchnorm.bench
imported = time.perf_counter()
import json, sys
print(json.dumps(batchnorm.bench.first_step_in_this_process(*json.loads(sys.argv[1]), started, imported)))
"""


def _first_step_child(name: str, ours: bool, backend: str, device: str, quick: bool) -> dict[str, float]:
    arguments = json.dumps([name, ours, backend, device, quick])
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, arguments], capture_output=True, text=True, check=False, timeout=600
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the first-step process failed ({completed.returncode}): {completed.stderr.strip()}")
    result: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def bench_first_step(name: str, backend: str, device: str, quick: bool, runs: int) -> FirstStep:
    """The first training step of network ``name`` in ``runs`` fresh processes per side,
    ours and torch's alternating."""
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    for _ in range(runs):
        ours.append(_first_step_child(name, True, backend, device, quick))
        theirs.append(_first_step_child(name, False, backend, device, quick))

    def median(results: list[dict[str, float]], key: str) -> float:
        return statistics.median(result[key] for result in results)

    return FirstStep(
        name,
        backend,
        runs,
        ours_step_ms=median(ours, "step_ms"),
        torch_step_ms=median(theirs, "step_ms"),
        ours_import_ms=median(ours, "import_ms"),
        torch_import_ms=median(theirs, "import_ms"),
    )


def format_table(rows: Sequence[Row]) -> str:
    """One line per shape: each figure as ``ours median [fastest-slowest] / torch's ... = ratio``."""
    header = (
        "| shape | backend | train fwd ours/torch | train fwd+bwd ours/torch | eval fwd ours/torch "
        "| train fwd / input copy | first call | saved for backward ours/torch | peak ours/torch |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        figures = " | ".join(
            row.pairs[figure].format() for figure in ("train_forward", "train_forward_backward", "eval_forward")
        )
        lines.append(
            f"| {row.name} {row.shape} | {row.backend} | {figures} "
            f"| {row.forward_copies:.2f} | {row.first_call_ms / 1e3:.1f} s "
            f"| {row.saved_mb:.1f}/{row.torch_saved_mb:.1f} MB | {_peak(row)} |"
        )
    return "\n".join(lines)


def format_end_to_end(results: Sequence[EndToEnd]) -> str:
    """One line per network and mode: ours and torch's median [fastest-slowest] ms, the ratio."""
    lines = ["| network | pass | batch | backend | ours/torch |", "|---|---|---|---|---|"]
    for result in results:
        mode = "training step" if result.mode == "train" else "eval (no_grad)"
        lines.append(f"| {result.name} | {mode} | {result.batch} | {result.backend} | {result.pair.format()} |")
    return "\n".join(lines)


def noise_warnings(rows: Sequence[Row], end_to_end: Sequence[EndToEnd]) -> list[str]:
    """One line per ratio whose spread (:data:`NOISY_SPREAD`) says the machine was too noisy."""
    labelled = [(f"{row.name} {figure}", pair) for row in rows for figure, pair in row.pairs.items()]
    labelled += [(f"{result.name} {result.mode}", result.pair) for result in end_to_end]
    return [
        f"warning: {label}: runs spread over {max(pair.ours.relative, pair.torch.relative):.0%} of the median "
        f"(above {NOISY_SPREAD:.0%}): the machine was too noisy to trust this ratio"
        for label, pair in labelled
        if pair.noisy
    ]


def _peak(row: Row) -> str:
    if row.peak_mb is None or row.torch_peak_mb is None:
        return "n/a (CPU)"
    return f"{row.peak_mb:.1f}/{row.torch_peak_mb:.1f} MB"


@dataclass
class Results:
    """Everything one ``batchnorm bench`` run measured; ``format()`` is what the command prints."""

    rows: list[Row]
    end_to_end: list[EndToEnd]
    first_step: FirstStep | None

    def format(self) -> str:
        parts = [format_table(self.rows), "", format_end_to_end(self.end_to_end)]
        if self.first_step is not None:
            parts += ["", self.first_step.format()]
        warnings = noise_warnings(self.rows, self.end_to_end)
        if warnings:
            parts += ["", *warnings]
        return "\n".join(parts)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(
    *,
    backend: str = "auto",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    quick: bool = False,
    shapes: Sequence[str] | None = None,
    json_path: str | None = None,
    first_step: bool = True,
    progress: Callable[[str], None] = _to_stderr,
) -> Results:
    """Measure every shape (or those named), the end-to-end networks and the first step; writes
    JSON when asked. ``progress`` gets one line before each item."""
    selected = [s for s in SHAPES if shapes is None or s.name in shapes]
    networks = QUICK_NETWORKS if quick else NETWORKS
    repeats, warmup = (10, 2) if quick else (25, 3)
    network_repeats, network_warmup = QUICK_NETWORK_REPEATS if quick else NETWORK_REPEATS
    target = torch.device(device)
    items = len(selected) + len(networks) + int(first_step)
    counter = iter(range(1, items + 1))

    def announce(what: str) -> None:
        progress(f"batchnorm bench [{next(counter)}/{items}] {what}")

    rows = []
    for spec in selected:
        announce(f"{spec.name} {spec.shape}")
        rows.append(bench_shape(spec, backend, target, dtype, repeats, warmup))
    end_to_end: list[EndToEnd] = []
    for network in networks:
        announce(f"{network.name} training step and eval pass, batch {network.input_shape[0]}")
        end_to_end += bench_network(network, backend, target, network_repeats, network_warmup, dtype)
    first: FirstStep | None = None
    if first_step:
        announce(f"{FIRST_STEP_NETWORK} first training step in fresh processes")
        first = bench_first_step(FIRST_STEP_NETWORK, backend, device, quick, runs=1 if quick else 3)
    results = Results(rows, end_to_end, first)
    if json_path is not None:
        payload = {
            "device": device_name(target),
            "dtype": str(dtype),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "network_repeats": network_repeats,
            "noisy_spread": NOISY_SPREAD,
            "rows": [row.to_dict() for row in rows],
            "end_to_end": [result.to_dict() for result in end_to_end],
            "first_step": None if first is None else first.to_dict(),
            "warnings": noise_warnings(rows, end_to_end),
        }
        write_json_atomically(json_path, payload)
    return results


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
