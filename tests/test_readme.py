"""The README's usage example runs, and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    exec(compile(blocks[0], str(README), "exec"), namespace)
    bn, x, y = namespace["bn"], namespace["x"], namespace["y"]
    assert isinstance(bn, torch.nn.Module) and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    assert bn.num_batches_tracked.item() == 1  # type: ignore[union-attr]
    # inverse(forward(x)) reproduces the input the example drew: normalizing it again gives y.
    torch.testing.assert_close(torch.nn.functional.batch_norm(x, None, None, training=True), y.detach())
