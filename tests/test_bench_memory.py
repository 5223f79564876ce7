"""The memory benchmark on a small stack: deterministic saved-byte counts and agreement with torch."""

from __future__ import annotations

import pytest
import torch

from batchnorm.bench_memory import VARIANTS, MemoryRow, build_stacks, format_memory_table, run_memory


@pytest.fixture(scope="module")
def rows() -> list[MemoryRow]:
    return run_memory(quick=True, repeats=1, channels=4, size=16, batch=4, blocks=3)


def test_rows_cover_every_variant_against_torch(rows: list[MemoryRow]) -> None:
    assert [row.variant for row in rows] == list(VARIANTS)
    reference = rows[0]
    assert reference.saved_ratio == 1.0 and reference.step_ratio == 1.0
    assert all(row.step_ms > 0 and row.peak_bytes is None for row in rows)  # no peak figure on CPU


def test_saved_bytes_targets(rows: list[MemoryRow]) -> None:
    ratio = {row.variant: row.saved_ratio for row in rows}
    assert ratio["InPlaceABN"] <= 0.55
    assert ratio["ConvBatchNorm2d"] <= 0.70
    assert ratio["BatchNormAct"] < 1.0
    # one (4, 4, 16, 16) float32 tensor per block plus the input, and the small vectors
    big = 4 * 4 * 16 * 16 * 4
    assert next(row for row in rows if row.variant == "InPlaceABN").saved_bytes // big == 1 + 3


def test_every_variant_agrees_with_torch(rows: list[MemoryRow]) -> None:
    for row in rows:
        assert row.output_rel_err <= 1e-4, row
        assert row.grad_rel_err <= 1e-3, row
        assert row.stats_rel_err <= 1e-3, row


def test_stacks_share_the_reference_weights() -> None:
    stacks = build_stacks(channels=3, blocks=2, device=torch.device("cpu"))
    reference = stacks["torch"].state_dict()
    converted = stacks["ConvBatchNorm2d"].state_dict()
    assert torch.equal(converted["1.0.conv.weight"], reference["1.0.weight"])
    assert torch.equal(converted["1.0.bn.bias"], reference["1.1.bias"])
    assert not torch.equal(reference["1.1.weight"], torch.ones(3))  # drawn away from the default


def test_table_names_every_variant_and_says_cpu(rows: list[MemoryRow]) -> None:
    table = format_memory_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(VARIANTS)
    for variant, line in zip(VARIANTS, lines[2:], strict=True):
        assert line.startswith(f"| {variant} |") and "n/a (CPU)" in line
