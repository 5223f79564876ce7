"""Every batch-norm-like module of the package against every tool and transform: the one place
that says which cells work and which are refused, and why.

The table in ``docs/compat.md`` is generated from this data (``python -m tests.matrix
docs/compat.md``), and ``tests/test_matrix.py`` runs every cell against its oracle and checks
that the table is up to date. The answers of ``to_torch``, ``convert_sync_batchnorm`` and
``freeze`` (and so ``fold``) come from the classes' own declarations (``batchnorm._protocol``);
:data:`EXCEPTIONS` holds the rest.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import batchnorm
from batchnorm._convert import equivalent
from batchnorm._protocol import Kept, Refused

CHANNELS = 3
BATCH = 6  # two ranks of 3 in the synchronized cells


@dataclass(frozen=True)
class Row:
    """One module of the matrix, built in a one-module ``nn.Sequential`` with randomized state."""

    name: str
    make: Callable[..., nn.Module]  # keyword arguments: the constructor's (bias=False)
    shape: tuple[int, ...]  # input (N, C, *)
    activation: Callable[[Tensor], Tensor] | None = None  # what the module applies after batch norm
    conv_dims: int = 0  # a ConvBatchNorm*d: its spatial dimensions
    batch_statistics: str = "batch"  # how training normalizes: "batch", "virtual" (2 per batch), "renorm", "none"


def _leaky(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.01)


ROWS: list[Row] = [
    Row("BatchNorm1d", batchnorm.BatchNorm1d, (BATCH, CHANNELS, 4)),
    Row("BatchNorm2d", batchnorm.BatchNorm2d, (BATCH, CHANNELS, 3, 3)),
    Row("BatchNorm3d", batchnorm.BatchNorm3d, (BATCH, CHANNELS, 2, 2, 2)),
    Row("BatchNorm", batchnorm.BatchNorm, (BATCH, CHANNELS, 3, 3)),
    Row("LazyBatchNorm1d", lambda _, **kw: batchnorm.LazyBatchNorm1d(**kw), (BATCH, CHANNELS, 4)),
    Row("LazyBatchNorm2d", lambda _, **kw: batchnorm.LazyBatchNorm2d(**kw), (BATCH, CHANNELS, 3, 3)),
    Row("LazyBatchNorm3d", lambda _, **kw: batchnorm.LazyBatchNorm3d(**kw), (BATCH, CHANNELS, 2, 2, 2)),
    Row("SyncBatchNorm", batchnorm.SyncBatchNorm, (BATCH, CHANNELS, 3, 3)),
    Row(
        "GhostBatchNorm",
        lambda c, **kw: batchnorm.GhostBatchNorm(c, virtual_batch_size=2, **kw),
        (BATCH, CHANNELS, 3, 3),
        batch_statistics="virtual",
    ),
    Row("BatchRenorm", batchnorm.BatchRenorm, (BATCH, CHANNELS, 3, 3), batch_statistics="renorm"),
    Row("FrozenBatchNorm", batchnorm.FrozenBatchNorm, (BATCH, CHANNELS, 3, 3), batch_statistics="none"),
    Row(
        "BatchNormAct",
        lambda c, **kw: batchnorm.BatchNormAct(c, activation="silu", **kw),
        (BATCH, CHANNELS, 4),
        F.silu,
    ),
    Row(
        "BatchNormAct2d",
        lambda c, **kw: batchnorm.BatchNormAct2d(c, activation="relu", **kw),
        (BATCH, CHANNELS, 3, 3),
        F.relu,
    ),
    Row(
        "SyncBatchNormAct",
        lambda c, **kw: batchnorm.SyncBatchNormAct(c, activation="silu", **kw),
        (BATCH, CHANNELS, 3, 3),
        F.silu,
    ),
    Row(
        "FrozenBatchNormAct",
        lambda c, **kw: batchnorm.FrozenBatchNormAct(c, activation="silu", **kw),
        (BATCH, CHANNELS, 3, 3),
        F.silu,
        batch_statistics="none",
    ),
    Row("InPlaceABN", batchnorm.InPlaceABN, (BATCH, CHANNELS, 3, 3), _leaky),
    Row(
        "ConvBatchNorm1d",
        lambda c, **kw: batchnorm.ConvBatchNorm1d(c, c, 3, padding=1, **kw),
        (BATCH, CHANNELS, 4),
        conv_dims=1,
    ),
    Row(
        "ConvBatchNorm2d",
        lambda c, **kw: batchnorm.ConvBatchNorm2d(c, c, 3, padding=1, **kw),
        (BATCH, CHANNELS, 3, 3),
        conv_dims=2,
    ),
    Row(
        "ConvBatchNorm3d",
        lambda c, **kw: batchnorm.ConvBatchNorm3d(c, c, 3, padding=1, **kw),
        (BATCH, CHANNELS, 2, 2, 2),
        conv_dims=3,
    ),
    Row("BatchNormFlow", batchnorm.BatchNormFlow, (BATCH, CHANNELS, 4)),
]
ROW = {row.name: row for row in ROWS}

#: column name -> what the cell checks (the header of the generated table).
COLUMNS: dict[str, str] = {
    "to_torch": "`to_torch` then `from_torch`: torch's class and back, same outputs",
    "sync": "`convert_sync_batchnorm` on 2 gloo ranks = the unconverted model on the concatenated batch",
    "freeze": "`freeze`: the eval-mode map, fixed, in either mode",
    "fold": "`fold` after a convolution: the folded model's output",
    "recalibrate": "`recalibrate`: pooled float64 statistics of the layer's input",
    "invert_prior": "`invert`'s batch-norm prior: the distance written out",
    "state_dict": "state dict into torch's batch norm and back",
    "copy": "`copy.deepcopy` and pickle",
    "to_dtype": "`.to(torch.float64)` against float64 math",
    "compile": '`torch.compile(fullgraph=True, backend="eager")`, training',
    "export": "`torch.export`, eval",
    "autocast": "autocast bfloat16 against float32",
    "channels_last": "channels_last in, channels_last out",
    "bias_false": "`bias=False` against the math without beta",
    "train_eval": "training then eval, against float64 math",
}


@dataclass(frozen=True)
class Cell:
    """``"supported"``, ``"kept"`` (the tool leaves the module as it is), ``"refused"`` (a clear
    error, naming the module and ``reason``) or ``"n/a"``."""

    status: str
    reason: str = ""


_NO_BIAS = Cell("n/a", "its constructor has no `bias`: the frozen form takes its bias from a state dict")
_NO_4D = Cell("n/a", "takes no 4D input")

#: Every cell that is not "supported" and not answered by the classes' declarations.
EXCEPTIONS: dict[tuple[str, str], Cell] = {
    **{(name, "channels_last"): _NO_4D for name in ("BatchNorm1d", "BatchNorm3d", "LazyBatchNorm1d")},
    **{(name, "channels_last"): _NO_4D for name in ("LazyBatchNorm3d", "BatchNormAct", "ConvBatchNorm1d")},
    **{(name, "channels_last"): _NO_4D for name in ("ConvBatchNorm3d", "BatchNormFlow")},
    ("FrozenBatchNorm", "bias_false"): _NO_BIAS,
    ("FrozenBatchNormAct", "bias_false"): _NO_BIAS,
    ("BatchNormFlow", "bias_false"): Cell("n/a", "the flow always has a shift: z = gamma * x_hat + beta is its map"),
    **{
        (name, "bias_false"): Cell("n/a", "`bias` is the convolution's (default False); the batch norm keeps beta")
        for name in ("ConvBatchNorm1d", "ConvBatchNorm2d", "ConvBatchNorm3d")
    },
    ("FrozenBatchNorm", "recalibrate"): Cell("kept", "its statistics are fixed; recalibrate leaves them"),
    ("FrozenBatchNormAct", "recalibrate"): Cell("kept", "its statistics are fixed; recalibrate leaves them"),
    ("BatchNormFlow", "state_dict"): Cell(
        "refused", "its scale is stored as `unconstrained_weight` (gamma = softplus(u) + 1e-3 > 0): not torch's keys"
    ),
}


def _from_declaration(answer: Any, prefix: str = "") -> Cell:
    if isinstance(answer, Refused):
        return Cell("refused", prefix + answer.reason)
    if isinstance(answer, Kept):
        return Cell("kept", prefix + answer.reason)
    return Cell("supported", f"becomes {answer.__name__}")


def sample_module(row: Row, **kwargs: Any) -> nn.Module:
    """The row's module (a lazy one materialized by a first input), for its declarations."""
    module = row.make(CHANNELS, **kwargs)
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        module(torch.randn(row.shape))
    return module


def expected(row: Row, column: str) -> Cell:
    """What the cell (row, column) must do."""
    if (row.name, column) in EXCEPTIONS:
        return EXCEPTIONS[(row.name, column)]
    module = sample_module(row)
    if column in ("to_torch", "sync", "freeze"):
        return _from_declaration(equivalent(module, {"to_torch": "torch", "sync": "sync", "freeze": "frozen"}[column]))
    if column == "fold":
        answer = equivalent(module, "frozen")
        if isinstance(answer, Refused):
            return Cell("kept", "not folded: " + answer.reason)
    return Cell("supported")


def cells() -> list[tuple[Row, str, Cell]]:
    return [(row, column, expected(row, column)) for row in ROWS for column in COLUMNS]


# ---------------------------------------------------------------------------------------------
# The generated table
# ---------------------------------------------------------------------------------------------

_MARK = {"supported": "yes", "kept": "kept", "refused": "refused", "n/a": "n/a"}


def render() -> str:
    """The markdown block of docs/compat.md: the table, then each non-supported cell's reason."""
    table = cells()
    header = "| module | " + " | ".join(f"`{column}`" for column in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    notes: list[str] = []
    for row in ROWS:
        marks = []
        for _, column, cell in [entry for entry in table if entry[0] is row]:
            mark = _MARK[cell.status]
            if cell.status != "supported":
                notes.append(f"{len(notes) + 1}. `{row.name}`, `{column}`: {cell.reason}")
                mark += f" ({len(notes)})"
            marks.append(mark)
        lines.append(f"| `{row.name}` | " + " | ".join(marks) + " |")
    counts = {status: sum(cell.status == status for _, _, cell in table) for status in _MARK}
    legend = [f"- `{column}`: {text}" for column, text in COLUMNS.items()]
    summary = (
        f"{len(ROWS)} modules x {len(COLUMNS)} operations = {len(table)} cells: "
        f"{counts['supported']} supported, {counts['kept']} kept as they are, {counts['refused']} refused, "
        f"{counts['n/a']} not applicable."
    )
    return "\n".join([summary, "", *legend, "", *lines, "", *notes]) + "\n"


_BLOCK = re.compile(r"(<!-- BEGIN generated:matrix -->\n)(.*?)(<!-- END generated:matrix -->)", re.DOTALL)


def render_into(text: str) -> str:
    if not _BLOCK.search(text):
        raise ValueError("expected a <!-- BEGIN generated:matrix --> ... <!-- END generated:matrix --> block, got none")
    return _BLOCK.sub(lambda match: match.group(1) + render() + match.group(3), text)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m tests.matrix docs/compat.md")
    path = Path(argv[0])
    updated = render_into(path.read_text())
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(updated)
    temporary.replace(path)


if __name__ == "__main__":
    main(sys.argv[1:])
