"""Tests of the ``batchnorm`` command: options, and bad input as one line with exit status 2."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batchnorm
from batchnorm.cli import main


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "--version")
    assert (status, out) == (0, f"batchnorm {batchnorm.__version__}\n")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys)
    assert status == 0 and "demo" in out


def test_demo_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "demo", "--help")
    assert status == 0
    for option in ("--data", "--data-dir", "--steps", "--seeds", "--quick", "--out", "--seed", "--device"):
        assert option in out
    assert "mnist5k (default)" in out


def write_idx_files(directory: Path, *, truncate: bool = False) -> None:
    directory.mkdir()
    header = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28])
    images = header + bytes(2 * 28 * 28 - (5 if truncate else 0))
    labels = bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 4])
    for prefix in ("train", "t10k"):
        (directory / f"{prefix}-images-idx3-ubyte").write_bytes(images)
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)


BAD_INPUT = {
    "missing_data_dir": (["--data", "mnist", "--data-dir", "{tmp}/none"], "MNIST directory not found"),
    "missing_file": (["--data", "mnist", "--data-dir", "{tmp}"], "MNIST file not found"),
    "truncated_file": (["--data", "mnist", "--data-dir", "{tmp}/truncated"], "truncated"),
    "mnist_without_dir": (["--data", "mnist"], "--data mnist needs --data-dir"),
    "dir_without_mnist": (["--data-dir", "{tmp}"], "--data-dir is only read with --data mnist"),
    "out_is_a_file": (["--out", "{tmp}/file"], "cannot write the report to"),
    "out_under_a_file": (["--out", "{tmp}/file/report"], "cannot write the report to"),
    "unknown_data": (["--data", "cifar"], "invalid choice: 'cifar'"),
    "zero_steps": (["--steps", "0"], "expected a positive integer, got '0'"),
    "text_steps": (["--steps", "many"], "expected a positive integer, got 'many'"),
    "negative_seed": (["--seed", "-1"], "expected a non-negative integer, got '-1'"),
    "zero_seeds": (["--seeds", "0"], "expected a positive integer, got '0'"),
    "unknown_option": (["--fast"], "batchnorm: error: unrecognized arguments: --fast"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    write_idx_files(tmp_path / "truncated", truncate=True)
    (tmp_path / "file").write_text("not a folder")
    args, message = BAD_INPUT[case]
    status, out, err = run_main(capsys, "demo", "--out", str(tmp_path / "out"), *(a.format(tmp=tmp_path) for a in args))
    assert status == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    # The demo's own checks and its option parser speak as "batchnorm demo"; the top-level parser
    # (which reports unknown options) as "batchnorm".
    assert err.startswith(("batchnorm demo: error: ", "batchnorm: error: ")) and message in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_main(capsys, "demo", "--device", "cuda", "--out", str(tmp_path / "out"))
    assert status == 2 and err.count("\n") == 1
    assert "--device cuda requested, but CUDA is not available" in err
    assert not (tmp_path / "out").exists()


def test_installed_command_exits_2_without_traceback(tmp_path: Path) -> None:
    """The real process: no traceback reaches the terminal, nothing is written."""
    result = subprocess.run(
        [sys.executable, "-m", "batchnorm.cli", "demo", "--data", "mnist", "--data-dir", str(tmp_path / "none"),
         "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == f"batchnorm demo: error: MNIST directory not found: {tmp_path / 'none'}\n"
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_and_status_130(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from batchnorm.experiments import demo

    def interrupted(config: object) -> None:
        raise KeyboardInterrupt

    # The command imports run_demo from batchnorm.experiments, which looks it up in demo.
    monkeypatch.setattr(demo, "run_demo", interrupted)
    status, out, err = run_main(capsys, "demo", "--quick")
    assert status == 130 and out == ""
    assert err.strip() == "batchnorm demo: interrupted; no report written" and "Traceback" not in err


def test_sigint_during_the_demo_ends_with_one_line_and_status_130(tmp_path: Path) -> None:
    """The real process, interrupted once the first section has started: no traceback, no report."""
    process = subprocess.Popen(
        [sys.executable, "-m", "batchnorm.cli", "demo", "--quick", "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:  # the section counter ends its line; progress bars do not
        if line.startswith("[1/"):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert out == "" and "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == "batchnorm demo: interrupted; no report written"
    assert not (tmp_path / "out" / "index.html").exists()
