"""Smoke tests of the report's inversion demonstrations at tiny sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import batchnorm
from batchnorm.experiments.inversion_demo import flow_demo, inversion_demo, toy_density
from batchnorm.experiments.report import Figure as ReportFigure
from batchnorm.experiments.report import Section, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_renders(figure: Figure, tmp_path: Path) -> None:
    """The figure goes through the report writer into a valid PNG."""
    write_report(tmp_path, [Section("s", "t", "i", figures=(ReportFigure("f", "F", "c", figure),))], {}, {})
    assert (tmp_path / "f.png").read_bytes().startswith(PNG_MAGIC)


def test_toy_densities() -> None:
    generator = torch.Generator().manual_seed(0)
    ring = toy_density("ring", 4000, generator)
    radius = ring.norm(dim=1)
    assert ring.shape == (4000, 2) and abs(float(radius.mean()) - 2.0) < 0.05
    # Angles cluster at multiples of 45 degrees: distance to the nearest centre is small.
    angles = torch.atan2(ring[:, 1], ring[:, 0]) / (2 * math.pi / 8)
    assert float((angles - angles.round()).abs().mean()) < 0.1
    moons = toy_density("moons", 4000, generator)
    assert moons.shape == (4000, 2) and float(moons.mean(dim=0).abs().max()) < 0.1
    with pytest.raises(ValueError, match="'moons', 'ring'"):
        toy_density("spiral", 10, generator)


@pytest.mark.parametrize("density", ["moons", "ring"])
def test_flow_demo_tiny(tmp_path: Path, density: str) -> None:
    result = flow_demo(density=density, steps=3, batch_size=16, couplings=2, hidden=4)
    assert math.isfinite(result.nll_bn) and math.isfinite(result.nll_plain)
    assert result.nll_bn != result.nll_plain  # the batch-norm layers change the flow
    assert_renders(result.figure, tmp_path)


def test_flow_demo_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="steps"):
        flow_demo(steps=0)


def test_inversion_demo_tiny(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), batchnorm.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)
    )
    model(torch.randn(8, 1, 4, 4))  # running statistics away from their initial values
    model.train()
    inputs = torch.rand(2, 1, 4, 4)
    result = inversion_demo(model, inputs, num_classes=3, steps=4)
    assert_renders(result.figure, tmp_path)
    assert len(result.reconstruction_errors) == 2 and len(result.output_errors) == 2
    assert len(result.confidence_plain) == 3 and len(result.confidence_prior) == 3
    for value in [*result.reconstruction_errors, *result.output_errors]:
        assert math.isfinite(value) and value >= 0
    for value in [*result.confidence_plain, *result.confidence_prior]:
        assert 0.0 <= value <= 1.0
    assert math.isfinite(result.bn_distance_plain) and math.isfinite(result.bn_distance_prior)
    assert all(module.training for module in model.modules())


def test_inversion_demo_needs_images() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        inversion_demo(nn.Linear(4, 2), torch.randn(3, 4))
