"""The ``batchnorm`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from . import __version__, backends


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch normalization from first principles: experiments and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser("bench", help="time our batch norm against torch's (SPEC section 7)")
    bench.add_argument("--quick", action="store_true", help="fewer repetitions (under 3 minutes on 2 cores)")
    bench.add_argument("--json", metavar="FILE", help="also write the table as JSON to FILE")
    bench.add_argument("--backend", choices=backends.BACKENDS, default="auto")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    bench.add_argument("--shapes", nargs="+", metavar="NAME", help="only these shapes (default: all)")
    return parser


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available on this machine")


def check_writable_file(path: str) -> None:
    """Fail before a long run, not after it, when the output cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"cannot write {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"cannot write {path}: directory {directory} is not writable")


def run_bench(args: argparse.Namespace) -> int:
    from . import bench

    check_device(args.device)
    known = [spec.name for spec in bench.SHAPES]
    unknown = [name for name in args.shapes or [] if name not in known]
    if unknown:
        raise UsageError(f"unknown shape(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
    if args.json is not None:
        check_writable_file(args.json)
    rows, end_to_end = bench.run(
        backend=args.backend,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        quick=args.quick,
        shapes=args.shapes,
        json_path=args.json,
    )
    print(bench.format_table(rows))
    print()
    print(end_to_end.format())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            return run_bench(args)
    except (UsageError, OSError) as error:
        print(f"batchnorm {args.command}: error: {error}", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
