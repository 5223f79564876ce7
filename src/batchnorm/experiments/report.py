"""The report's building blocks: what a section returns, the context it receives, and the writer.

A section is a function ``section(ctx: Context) -> Section``. It trains or reuses models
through ``ctx``, draws matplotlib figures, and returns them with captions, tables and the
numbers for ``summary.json``. :func:`write_report` turns the sections into ``index.html``,
one PNG per figure and ``summary.json``, written to temporary names and renamed into place.
The list of sections and the driver are in :mod:`batchnorm.experiments.demo`.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import matplotlib
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from matplotlib.text import Text
from matplotlib.ticker import PercentFormatter
from torch import Tensor
from tqdm import tqdm

from .data import Dataset, resize

__all__ = [
    "DPI",
    "MIN_FONT_PT",
    "STYLE",
    "Context",
    "DemoError",
    "Figure",
    "Section",
    "Table",
    "check_output_dir",
    "figure_facts",
    "new_figure",
    "percent_axis",
    "render_html",
    "styled",
    "write_report",
]

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
    """What a section function returns: one claim, how it was tested, the evidence, the caveat.

    Attributes:
        key: the section's key in ``summary.json`` (e.g. ``"paper_mlp"``); its HTML id is ``sec-<key>``.
        title: heading in ``index.html``.
        claim: what is claimed (by the paper or the literature) and what the section tests.
        setup: networks, data, steps, seeds: how the claim was tested.
        figures: the evidence, in display order.
        tables: more evidence, shown after the figures.
        caveat: what the evidence does not show.
        findings: sentences for the report's summary of findings (generated from the numbers).
        summary: JSON-serializable numbers, stored under ``key``.
    """

    key: str
    title: str
    claim: str
    setup: str = ""
    figures: tuple[Figure, ...] = ()
    tables: tuple[Table, ...] = ()
    caveat: str = ""
    findings: tuple[str, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Shared by every section of one demo run.

    Attributes:
        data: the dataset, already on ``device``.
        device: where models and data live.
        seed: the base seed: it fixes the data split; ``seeds`` are the training seeds.
        steps: optimizer steps of the main runs (sections take fixed fractions of it).
        eval_points: about how many evaluations each run records.
        progress: show progress bars.
        out: the report folder (sections never write there themselves).
        seeds: one run per seed (model initialization and batch order) of every experiment.
    """

    data: Dataset
    device: torch.device
    seed: int
    steps: int
    eval_points: int
    progress: bool
    out: Path
    seeds: tuple[int, ...] = (0,)
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

    def bar(self, total: int, desc: str) -> tqdm[NoReturn]:
        """A progress bar on stderr for one phase of a section (silent when ``progress`` is off)."""
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)


# Every figure is drawn at 100 dpi and at most 8 inches (800 px) wide, the width at which the
# README and the page show it, so a font size in points is its size on screen; nothing under 9 pt.
DPI = 100
MAX_WIDTH_IN = 8.0
MIN_FONT_PT = 9.0
STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "figure.titlesize": 11,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def new_figure(width: float = MAX_WIDTH_IN, height: float = 3.4) -> MplFigure:
    """A figure in the report's style (:data:`STYLE`), ``width`` x ``height`` inches, constrained layout."""
    if width > MAX_WIDTH_IN:
        raise ValueError(f"new_figure: expected width <= {MAX_WIDTH_IN} inches (the display width), got {width}")
    with styled():
        return MplFigure(figsize=(width, height), layout="constrained", dpi=DPI)


@contextlib.contextmanager
def styled() -> Iterator[None]:
    """The report's matplotlib style (:data:`STYLE`) inside the block; fonts are fixed when text is drawn."""
    with matplotlib.rc_context():
        for key, value in STYLE.items():
            matplotlib.rcParams[key] = value  # type: ignore[index]
        yield


def percent_axis(ax: Axes, axis: str = "y") -> None:
    """Label the ticks of a 0..100 axis as percentages."""
    formatter = PercentFormatter(xmax=100, decimals=0)
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(formatter)


def figure_facts(figure: MplFigure) -> dict[str, float]:
    """Width and height in pixels as saved, and the smallest font size (pt) of any visible text.

    Call after the figure was drawn (the writer saves it first): tick labels exist only then.
    """
    sizes = [
        float(text.get_fontsize())
        for text in figure.findobj(Text)
        if isinstance(text, Text) and text.get_visible() and text.get_text().strip()
    ]
    width, height = figure.get_size_inches() * DPI
    return {
        "width_px": round(float(width)),
        "height_px": round(float(height)),
        "smallest_font_pt": min(sizes, default=0),
    }


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
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><caption>{html.escape(table.caption)}</caption><tr>{head}</tr>{body}</table>"


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 54rem; margin: 2rem auto; padding: 0 1rem; color: #222;
       line-height: 1.45; }
figure { margin: 1.5rem 0; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.95rem; }
table { border-collapse: collapse; margin: 1rem 0; } caption { text-align: left; padding-bottom: 0.4rem; }
td, th { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; font-variant-numeric: tabular-nums; }
td:first-child, th:first-child { text-align: left; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.1rem 1rem; }
.eq { text-align: center; font-family: "Cambria Math", serif; font-size: 1.1rem; }
.lead { font-size: 1.05rem; background: #f5f5f5; padding: 0.6rem 0.8rem; }
pre { background: #f5f5f5; padding: 0.6rem; overflow-x: auto; }
"""

# Batch norm in two paragraphs, with the equations of Ioffe & Szegedy (2015), Algorithm 1.
_INTRODUCTION = """
<p>Batch normalization (Ioffe &amp; Szegedy 2015) inserts, before a nonlinearity, a layer that
normalizes each channel over the current minibatch B = {x<sub>1</sub>, &hellip;, x<sub>m</sub>} and then
rescales it with two learned parameters per channel, &gamma; and &beta;:</p>
<p class="eq">&mu;<sub>B</sub> = (1/m) &sum;<sub>i</sub> x<sub>i</sub>, &emsp;
&sigma;<sub>B</sub><sup>2</sup> = (1/m) &sum;<sub>i</sub> (x<sub>i</sub> &minus; &mu;<sub>B</sub>)<sup>2</sup>, &emsp;
x&#770;<sub>i</sub> = (x<sub>i</sub> &minus; &mu;<sub>B</sub>) /
&radic;(&sigma;<sub>B</sub><sup>2</sup> + &epsilon;), &emsp;
y<sub>i</sub> = &gamma; x&#770;<sub>i</sub> + &beta;.</p>
<p>Gradients flow through &mu;<sub>B</sub> and &sigma;<sub>B</sub><sup>2</sup>, so each example's output depends
on the others in its batch. During training the layer also keeps running averages of &mu;<sub>B</sub> and
&sigma;<sub>B</sub><sup>2</sup> (&mu; &larr; (1 &minus; momentum) &mu; + momentum &mu;<sub>B</sub>); at
inference it normalizes with those instead, so that the output of one example no longer depends on the
batch. With &gamma; &ne; 0 the layer is an affine bijection per channel, which is why it can be inverted
exactly. The paper argued that normalizing fights <em>internal covariate shift</em> (the change of each
layer's input distribution as earlier layers learn) and showed that it lets networks train with much
higher learning rates and in fewer steps. This report tests those claims on small networks, over several
seeds, and adds the later measurements of Santurkar et al. (2018) on what batch norm does to the loss
landscape.</p>
"""


def _anchor(key: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise ValueError(f"render_html: expected keys and figure names of letters, digits, _ and -, got {key!r}")
    return key


def render_html(sections: list[Section], run: dict[str, Any], *, lead: str = "", reproduce: str = "") -> str:
    """``index.html``: the data set and seeds (``lead``), a table of contents, the summary of findings,
    an introduction to batch norm, one part per section (claim, setup, evidence, caveat), and how
    to reproduce the run (``reproduce``, then the run's settings). Every id on the page is unique.

    Example:
        >>> page = render_html([Section("k", "A <title>", "claim")], {"seed": 0}, reproduce="batchnorm demo")
        >>> "A &lt;title&gt;" in page and "<dt>seed</dt><dd>0</dd>" in page and 'href="#sec-k"' in page
        True
    """
    ids = ["contents", "findings", "introduction", "reproduce"]
    ids += [f"sec-{_anchor(section.key)}" for section in sections]
    ids += [f"fig-{_anchor(fig.name)}" for section in sections for fig in section.figures]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(
            f"render_html: expected unique section keys and figure names, got {', '.join(duplicates)} twice"
        )
    settings = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in run.items())
    contents = [("findings", "Summary of findings"), ("introduction", "Batch normalization in two paragraphs")]
    contents += [(f"sec-{section.key}", section.title) for section in sections]
    contents.append(("reproduce", "Reproduce this report"))
    findings = [finding for section in sections for finding in section.findings]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>batchnorm demo report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>What batch normalization does to training: Ioffe &amp; Szegedy (2015) on a small scale</h1>",
        f'<p class="lead">{html.escape(lead)}</p>' if lead else "",
        '<nav id="contents"><h2>Contents</h2><ol>',
        *(f'<li><a href="#{anchor}">{html.escape(title)}</a></li>' for anchor, title in contents),
        "</ol></nav>",
        '<section id="findings"><h2>Summary of findings</h2><ul>',
        *(f"<li>{html.escape(finding)}</li>" for finding in findings),
        "</ul></section>",
        f'<section id="introduction"><h2>Batch normalization in two paragraphs</h2>{_INTRODUCTION}</section>',
    ]
    for section in sections:
        parts.append(f'<section id="sec-{section.key}"><h2>{html.escape(section.title)}</h2>')
        parts.append(f"<p><b>Claim.</b> {html.escape(section.claim)}</p>")
        if section.setup:
            parts.append(f"<p><b>Setup.</b> {html.escape(section.setup)}</p>")
        for fig in section.figures:
            parts.append(
                f'<figure id="fig-{fig.name}"><img src="{fig.name}.png" '
                f'alt="{html.escape(fig.title)}"><figcaption><b>{html.escape(fig.title)}.</b> '
                f"{html.escape(fig.caption)}</figcaption></figure>"
            )
        parts.extend(_table_html(table) for table in section.tables)
        if section.caveat:
            parts.append(f"<p><b>Caveat.</b> {html.escape(section.caveat)}</p>")
        parts.append("</section>")
    parts.append('<section id="reproduce"><h2>Reproduce this report</h2>')
    if reproduce:
        parts.append(f"<pre>{html.escape(reproduce)}</pre>")
    parts.append(f"<dl>{settings}</dl></section>")
    parts.append("</body></html>\n")
    return "\n".join(part for part in parts if part)


def write_report(
    out: Path,
    sections: list[Section],
    summary: dict[str, Any],
    run: dict[str, Any],
    *,
    lead: str = "",
    reproduce: str = "",
) -> list[Path]:
    """Write every PNG, ``index.html`` and ``summary.json`` into ``out``; return their paths.

    Adds ``summary["figures"]``: each figure's size in pixels and smallest font in points.
    Everything is rendered in memory first, then written to hidden temporary files in ``out``
    and renamed into place (``summary.json`` last), so a failure leaves no half-written file.
    """
    files: dict[str, bytes] = {}
    facts: dict[str, dict[str, float]] = {}
    for section in sections:
        for fig in section.figures:
            if f"{fig.name}.png" in files:
                raise ValueError(f"write_report: expected unique figure names, got {fig.name!r} twice")
            files[f"{fig.name}.png"] = _png(fig.figure)
            facts[fig.name] = figure_facts(fig.figure)
    if facts:
        summary["figures"] = facts
    files["index.html"] = render_html(sections, run, lead=lead, reproduce=reproduce).encode()
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
