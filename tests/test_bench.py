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
    assert set(row.pairs) == {"train_forward", "train_forward_backward", "eval_forward"}
    for pair in row.pairs.values():
        for spread in (pair.ours, pair.torch):
            assert 0 < spread.min <= spread.median <= spread.max
    assert row.pairs["train_forward"].ours.median == row.train_forward_ms


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


def test_interleaved_spreads_are_fastest_median_slowest(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.001, 0.0, 0.005, 0.0, 0.003])  # runs of 1, 5 and 3 ms
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    (spread,) = bench.interleaved_spreads([lambda: None], 3, 0, torch.device("cpu"))
    assert (spread.min, spread.median, spread.max) == pytest.approx((1.0, 3.0, 5.0))
    assert spread.relative == pytest.approx(4 / 3)


@pytest.mark.parametrize(
    ("ours", "theirs", "noisy"),
    [
        ((10.0, 10.5, 11.0), (20.0, 20.0, 20.5), False),  # a few percent: a quiet machine
        ((10.0, 10.5, 16.0), (20.0, 20.0, 20.5), True),  # ours: (16 - 10) / 10.5 = 57%
        ((10.0, 10.5, 11.0), (10.0, 20.0, 21.0), True),  # torch's: (21 - 10) / 20 = 55%
        ((10.0, 10.0, 15.0), (20.0, 20.0, 20.0), False),  # exactly at the threshold: trusted
    ],
)
def test_noisy_ratio_is_flagged_and_warned(
    ours: tuple[float, float, float], theirs: tuple[float, float, float], noisy: bool
) -> None:
    assert bench.NOISY_SPREAD == 0.5
    pair = bench.Pair(bench.Spread(*ours), bench.Spread(*theirs))
    assert pair.noisy is noisy
    assert pair.ratio == pytest.approx(ours[1] / theirs[1])
    assert ("(noisy)" in pair.format()) is noisy
    result = bench.EndToEnd("Net", "train", 4, "eager", pair)
    warnings = bench.noise_warnings([], [result])
    assert len(warnings) == int(noisy)
    if noisy:
        assert warnings[0].startswith("warning: Net train: runs spread over") and "too noisy" in warnings[0]
    assert result.to_dict()["noisy"] is noisy


def test_saved_bytes_counts_distinct_storages() -> None:
    x = torch.randn(100, requires_grad=True)
    # x * x saves x twice, one storage: 400 bytes.
    assert bench.saved_bytes(lambda: x * x) == 400


def test_cli_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "SHAPES", (bench.Shape("tiny", (6, 3, 4)),))
    monkeypatch.setattr(bench, "QUICK_NETWORKS", (bench.Network("LeNet-BN", bench.lenet, (4, 1, 28, 28)),))
    monkeypatch.setattr(bench, "bench_first_step", fake_first_step)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--backend", "eager", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "| tiny (6, 3, 4) | eager |" in captured.out
    assert "| LeNet-BN | training step | 4 | eager |" in captured.out
    assert "| LeNet-BN | eval (no_grad) | 4 | eager |" in captured.out
    assert "first training step in a fresh process" in captured.out
    # Progress: one line per item on stderr, numbered.
    progress = captured.err.splitlines()
    assert [line.split("] ")[0] for line in progress] == [f"batchnorm bench [{i}/3" for i in (1, 2, 3)]
    payload = json.loads(out.read_text())
    assert payload["rows"][0]["name"] == "tiny"
    assert {"train_forward_ratio", "train_forward_backward_ratio", "eval_forward_ratio"} <= payload["rows"][0].keys()
    spread = payload["rows"][0]["pairs"]["train_forward"]["ours"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert [(e["name"], e["mode"]) for e in payload["end_to_end"]] == [("LeNet-BN", "train"), ("LeNet-BN", "eval")]
    for entry in payload["end_to_end"]:
        assert entry["ratio"] > 0 and {"ours", "torch", "noisy"} <= entry.keys()
        assert entry["ours"]["min"] <= entry["ours"]["median"] <= entry["ours"]["max"]
    assert payload["first_step"]["ratio"] == pytest.approx(2.0)
    assert payload["noisy_spread"] == bench.NOISY_SPREAD and isinstance(payload["warnings"], list)


def fake_first_step(name: str, backend: str, device: str, quick: bool, runs: int) -> bench.FirstStep:
    """Instead of two fresh processes (test_first_step_in_fresh_processes runs them)."""
    return bench.FirstStep(name, backend, runs, 2.0, 1.0, 900.0, 900.0)


def test_first_step_in_fresh_processes() -> None:
    result = bench.bench_first_step("ResNet-18", "auto", "cpu", quick=True, runs=1)
    assert result.ours_step_ms > 0 and result.torch_step_ms > 0
    assert result.ours_import_ms > 0 and result.torch_import_ms > 0
    assert "ours/torch" in result.format()


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


def test_cli_interrupted_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(**_: object) -> bench.Results:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", interrupted)
    assert cli.main(["bench", "--quick"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "batchnorm bench: interrupted; no results written"


def test_network_bench_starts_both_models_from_the_same_weights() -> None:
    built: list[torch.nn.Module] = []

    def build(bn1d: bench.Norm, bn2d: bench.Norm) -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), bn1d(3))
        built.append(model)
        return model

    network = bench.Network("tiny", build, (8, 4), 3)
    train, evaluation = bench.bench_network(network, "eager", torch.device("cpu"), 2, 1)
    assert type(built[0][1]).__module__ == "batchnorm.modules" and type(built[1][1]) is torch.nn.BatchNorm1d
    assert (train.mode, evaluation.mode) == ("train", "eval")
    assert train.pair.ours.median > 0 and evaluation.pair.torch.median > 0
    # Same steps on the same data from the same weights: the two models stay equal.
    torch.testing.assert_close(built[0][0].weight, built[1][0].weight)
    assert built[0].training  # the eval pass puts the model back in training mode
    assert "ours/torch" in bench.format_end_to_end([train, evaluation])


@pytest.mark.parametrize("networks", ["NETWORKS", "QUICK_NETWORKS"])
def test_end_to_end_networks_have_their_batch_norms(networks: str) -> None:
    """Each network builds with either side's batch norms, and all of them are the side's."""
    from torch.nn.modules.batchnorm import _BatchNorm

    import batchnorm

    counts = {"ResNet-18": 20, "MobileNetV2": 52, "LeNet-BN": 4}
    for network in getattr(bench, networks):
        ours = network.build(batchnorm.BatchNorm1d, batchnorm.BatchNorm2d)
        theirs = network.build(torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
        ours_norms = [m for m in ours.modules() if isinstance(m, _BatchNorm)]
        assert len(ours_norms) == counts[network.name]
        assert all(type(m).__module__ == "batchnorm.modules" for m in ours_norms)
        theirs_norms = [m for m in theirs.modules() if isinstance(m, _BatchNorm)]
        assert all(type(m).__module__ == "torch.nn.modules.batchnorm" for m in theirs_norms)
    assert bench.FIRST_STEP_NETWORK in [network.name for network in getattr(bench, networks)]


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
