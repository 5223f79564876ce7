"""The README's usage example runs, and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 2
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    exec(compile(blocks[0], str(README), "exec"), namespace)
    bn, x, y = namespace["bn"], namespace["x"], namespace["y"]
    assert isinstance(bn, torch.nn.Module) and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    assert bn.num_batches_tracked.item() == 1  # type: ignore[union-attr]
    # inverse(forward(x)) reproduces the input the example drew: normalizing it again gives y.
    torch.testing.assert_close(torch.nn.functional.batch_norm(x, None, None, training=True), y.detach())


def test_readme_masked_example_runs() -> None:
    """The masked example: statistics of the real values only, padding out as 0."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    exec(compile(blocks[1], str(README), "exec"), namespace)
    x, y, lengths = namespace["x"], namespace["y"], namespace["lengths"]
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and isinstance(lengths, torch.Tensor)
    mask = torch.arange(x.shape[-1]) < lengths.view(-1, 1)  # (N, L)
    rows = x.movedim(1, -1)[mask]  # (M, C): the real values
    expected = torch.nn.functional.batch_norm(rows, None, None, training=True)
    torch.testing.assert_close(y.detach().movedim(1, -1)[mask], expected)
    assert bool((y.movedim(1, -1)[~mask] == 0).all())
