"""The report's building blocks: what a section returns, the context it receives, and the writer.

A section is a function ``section(ctx: Context) -> Section``. It trains or reuses models
through ``ctx``, draws matplotlib figures, and returns them with captions, tables and the
numbers for ``summary.json``. :func:`write_report` turns the sections into ``index.html``,
one PNG per figure and ``summary.json``, written to temporary names and renamed into place.
The list of sections and the driver are in :mod:`batchnorm.experiments.demo`.
"""

from __future__ import annotations

import html
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from matplotlib.figure import Figure as MplFigure
from torch import Tensor

from .data import Dataset, resize

__all__ = ["Context", "DemoError", "Figure", "Section", "Table", "check_output_dir", "render_html", "write_report"]

T = TypeVar("T")


class DemoError(ValueError):
    """Bad input to the demo (output folder, device, options): reported as one line by the CLI."""


@dataclass(frozen=True)
class Figure:
    """One figure of the report, saved as ``<name>.png``.

    Attributes:
        name: file stem, unique within the report (letters, digits, ``_``, ``-``).
        title: short heading.
        caption: what to see in the figure and the numbers behind it (plain text).
        figure: the matplotlib figure (built with ``matplotlib.figure.Figure``, no pyplot).
    """

    name: str
    title: str
    caption: str
    figure: MplFigure


@dataclass(frozen=True)
class Table:
    """A small table of the report (plain-text cells)."""

    caption: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Section:
    """What a section function returns.

    Attributes:
        key: the section's key in ``summary.json`` (e.g. ``"paper_mlp"``).
        title: heading in ``index.html``.
        intro: one paragraph above the figures.
        figures: in display order.
        tables: shown after the figures.
        summary: JSON-serializable numbers, stored under ``key``.
    """

    key: str
    title: str
    intro: str
    figures: tuple[Figure, ...] = ()
    tables: tuple[Table, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Shared by every section of one demo run.

    Attributes:
        data: the dataset, already on ``device``.
        device: where models and data live.
        seed: seeds every run (model initialization and batch order).
        steps: optimizer steps of every training run.
        eval_points: about how many evaluations each run records.
        progress: show progress bars.
        out: the report folder (sections never write there themselves).
    """

    data: Dataset
    device: torch.device
    seed: int
    steps: int
    eval_points: int
    progress: bool
    out: Path
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def cached(self, key: str, build: Callable[[], T]) -> T:
        """``build()`` once per key and run; later sections reuse trained models this way."""
        if key not in self._cache:
            self._cache[key] = build()
        value: T = self._cache[key]
        return value

    def flat(self) -> tuple[Tensor, Tensor]:
        """Train and test images flattened to (N, H*W), for the MLPs."""
        return self.data.train_images.flatten(1), self.data.test_images.flatten(1)

    def images28(self) -> tuple[Tensor, Tensor]:
        """Train and test images as (N, 1, 28, 28), for LeNet (digits are resized bilinearly)."""
        return self.cached("images28", lambda: (resize(self.data.train_images, 28), resize(self.data.test_images, 28)))


def check_output_dir(out: Path) -> None:
    """Create ``out`` if needed and check that a file can be written there; else :class:`DemoError`."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise DemoError(f"cannot write the report to {out}: {reason}") from error


def _png(figure: MplFigure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><caption>{html.escape(table.caption)}</caption><tr>{head}</tr>{body}</table>"


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
figure { margin: 1.5rem 0; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.95rem; line-height: 1.4; }
table { border-collapse: collapse; margin: 1rem 0; } caption { text-align: left; padding-bottom: 0.4rem; }
td, th { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; font-variant-numeric: tabular-nums; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.1rem 1rem; }
"""


def render_html(sections: list[Section], run: dict[str, Any]) -> str:
    """``index.html``: the run's settings, then each section's intro, figures (linked PNGs) and tables.

    Example:
        >>> page = render_html([Section("k", "A <title>", "intro")], {"seed": 0})
        >>> "A &lt;title&gt;" in page and "<dt>seed</dt><dd>0</dd>" in page
        True
    """
    settings = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in run.items())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>batchnorm demo report</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>What batch normalization does to training</h1>",
        f"<dl>{settings}</dl>",
    ]
    for section in sections:
        parts.append(f'<section id="{html.escape(section.key)}"><h2>{html.escape(section.title)}</h2>')
        parts.append(f"<p>{html.escape(section.intro)}</p>")
        for fig in section.figures:
            parts.append(
                f'<figure id="{html.escape(fig.name)}"><img src="{html.escape(fig.name)}.png" '
                f'alt="{html.escape(fig.title)}"><figcaption><b>{html.escape(fig.title)}.</b> '
                f"{html.escape(fig.caption)}</figcaption></figure>"
            )
        parts.extend(_table_html(table) for table in section.tables)
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out: Path, sections: list[Section], summary: dict[str, Any], run: dict[str, Any]) -> list[Path]:
    """Write every PNG, ``index.html`` and ``summary.json`` into ``out``; return their paths.

    Everything is rendered in memory first, then written to hidden temporary files in ``out``
    and renamed into place (``summary.json`` last), so a failure leaves no half-written file.
    """
    files: dict[str, bytes] = {}
    for section in sections:
        for fig in section.figures:
            if f"{fig.name}.png" in files:
                raise ValueError(f"write_report: expected unique figure names, got {fig.name!r} twice")
            files[f"{fig.name}.png"] = _png(fig.figure)
    files["index.html"] = render_html(sections, run).encode()
    files["summary.json"] = (json.dumps(summary, indent=2) + "\n").encode()
    temporaries: dict[str, Path] = {}
    try:
        for name, content in files.items():
            handle, path = tempfile.mkstemp(dir=out, prefix=f".{name}.")
            temporaries[name] = Path(path)
            with os.fdopen(handle, "wb") as stream:
                stream.write(content)
            # mkstemp creates files readable only by their owner; a report is for everyone.
            os.chmod(path, 0o644)
        for name, temporary in temporaries.items():
            os.replace(temporary, out / name)
    except OSError as error:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
        raise DemoError(f"cannot write the report to {out}: {error.strerror or error}") from error
    return [out / name for name in files]
