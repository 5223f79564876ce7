"""The benchmark harness: its figures are consistent, its JSON complete, its CLI strict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from batchnorm import bench, cli


def test_bench_shape_reports_consistent_figures() -> None:
    row = bench.bench_shape(bench.Shape("tiny", (8, 4, 5, 5)), "eager", torch.device("cpu"), torch.float32, 3, 1)
    for value in (row.train_forward_ms, row.torch_train_forward_ms, row.copy_ms, row.first_call_ms):
        assert value > 0
    assert row.train_forward_ratio == pytest.approx(row.train_forward_ms / row.torch_train_forward_ms)
    # Both save the input for backward: 8*4*5*5 float32 values at least.
    assert row.saved_mb >= 8 * 4 * 5 * 5 * 4 / 2**20
    assert row.torch_saved_mb >= 8 * 4 * 5 * 5 * 4 / 2**20
    assert "**" in bench.format_table([row])
    assert row.peak_mb is None and "n/a (CPU)" in bench.format_table([row])  # torch counts peaks on CUDA only


def test_bench_masked_row_runs_ours_masked() -> None:
    """The masked row times ours with a mask against torch without one, on the same shape."""
    assert any(spec.masked for spec in bench.SHAPES)
    row = bench.bench_shape(
        bench.Shape("masked", (4, 3, 16), masked=True), "eager", torch.device("cpu"), torch.float32, 2, 1
    )
    assert row.train_backward_ms > 0 and row.torch_train_backward_ms > 0


def test_interleaved_medians_takes_the_median() -> None:
    calls: list[str] = []
    medians = bench.interleaved_medians(
        [lambda: calls.append("a"), lambda: calls.append("b")], 5, 1, torch.device("cpu")
    )
    assert calls == ["a", "b"] * 6  # warm-up then repeats, alternating
    assert len(medians) == 2 and all(m >= 0 for m in medians)


def test_saved_bytes_counts_distinct_storages() -> None:
    x = torch.randn(100, requires_grad=True)
    # x * x saves x twice, one storage: 400 bytes.
    assert bench.saved_bytes(lambda: x * x) == 400


def test_cli_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "SHAPES", (bench.Shape("tiny", (6, 3, 4)),))
    monkeypatch.setattr(bench, "END_TO_END", ("LeNet-BN", bench.lenet, (4, 1, 28, 28), 10))
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--backend", "eager", "--json", str(out)]) == 0
    assert "| tiny (6, 3, 4) | eager |" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["rows"][0]["name"] == "tiny"
    assert payload["end_to_end"][0]["name"] == "LeNet-BN" and payload["end_to_end"][0]["ratio"] > 0
    assert {"train_forward_ratio", "train_forward_backward_ratio", "eval_forward_ratio"} <= payload["rows"][0].keys()


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["bench", "--shapes", "huge"], "unknown shape(s) huge"),
        (["bench", "--device", "cuda"], "CUDA is not available"),
        (["bench", "--json", "/nonexistent-dir/x.json", "--shapes", "mlp"], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    argv: list[str], phrase: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(bench, "SHAPES", (bench.Shape("mlp", (6, 3)),))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and phrase in err and "Traceback" not in err


def test_training_step_bench_starts_both_models_from_the_same_weights() -> None:
    built: list[torch.nn.Module] = []

    def build(bn1d: type[torch.nn.Module], bn2d: type[torch.nn.Module]) -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), bn1d(3))
        built.append(model)
        return model

    result = bench.bench_training_step("tiny", build, (8, 4), 3, "eager", torch.device("cpu"), 2, 1)
    assert type(built[0][1]).__module__ == "batchnorm.modules" and type(built[1][1]) is torch.nn.BatchNorm1d
    assert result.ours_ms > 0 and result.torch_ms > 0
    # Same steps on the same data from the same weights: the two models stay equal.
    torch.testing.assert_close(built[0][0].weight, built[1][0].weight)
    assert "ours/torch" in result.format()


def test_cli_memory_writes_table_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchnorm import bench_memory

    calls: list[dict[str, object]] = []
    real = bench_memory.run_memory

    def tiny(quick: bool = False, repeats: int | None = None, **kwargs: object) -> list[bench_memory.MemoryRow]:
        calls.append({"quick": quick, **kwargs})
        return real(quick=True, repeats=1, channels=4, size=8, batch=2, blocks=2)

    monkeypatch.setattr(bench_memory, "run_memory", tiny)
    out = tmp_path / "memory.json"
    assert cli.main(["bench", "--memory", "--quick", "--json", str(out)]) == 0
    assert calls == [{"quick": True, "device": "cpu"}]
    table = capsys.readouterr().out
    assert "InPlaceABN" in table and "ConvBatchNorm2d" in table
    variants = [row["variant"] for row in json.loads(out.read_text())["rows"]]
    assert variants == list(bench_memory.VARIANTS)
