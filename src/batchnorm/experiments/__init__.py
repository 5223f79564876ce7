"""The experiments behind ``batchnorm demo``: data, models, training loop and the report.

Needs the ``experiments`` extra (``pip install 'batchnorm[experiments]'``: matplotlib,
scikit-learn, tqdm). Modules:

- :mod:`~batchnorm.experiments.data`: digits (default) and MNIST IDX loaders.
- :mod:`~batchnorm.experiments.models`: the paper's MLP and LeNet, with or without batch norm.
- :mod:`~batchnorm.experiments.training`: the SGD loop with periodic evaluation and probes.
- :mod:`~batchnorm.experiments.report`: sections, figures, tables and the report writer.
- :mod:`~batchnorm.experiments.demo`: the list of sections and :func:`run_demo`; its docstring
  says how to add a section.
- one module per section: ``paper``, ``lenet``, ``running_stats``, ``points``.
"""

from .data import DataError
from .demo import SECTIONS, DemoConfig, run_demo
from .report import Context, DemoError, Figure, Section, Table

__all__ = ["SECTIONS", "Context", "DataError", "DemoConfig", "DemoError", "Figure", "Section", "Table", "run_demo"]
