"""Tests of batchnorm.experiments: IDX loaders, models, training loop, report writer, quick demo."""

from __future__ import annotations

import copy
import gzip
import html as html_lib
import json
import math
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.cli import main
from batchnorm.experiments import DataError, DemoConfig, DemoError, run_demo
from batchnorm.experiments.data import MNIST_FILES, load_digits, load_mnist, load_mnist5k, parse_idx, read_idx
from batchnorm.experiments.models import lenet, paper_mlp
from batchnorm.experiments.report import Figure, Section, write_report
from batchnorm.experiments.training import TrainConfig, evaluate, train

# --------------------------------------------------------------------------- IDX files


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding written out independently of the loader: magic, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_mnist(directory: Path, *, n_train: int = 12, n_test: int = 5, compress: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        raw = idx_bytes(array)
        if compress:
            (directory / f"{MNIST_FILES[key]}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / MNIST_FILES[key]).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_load_mnist_reads_generated_files(tmp_path: Path, compress: bool) -> None:
    arrays = make_mnist(tmp_path, compress=compress)
    data = load_mnist(tmp_path)
    assert data.name == "mnist"
    assert data.train_images.shape == (12, 1, 28, 28) and data.test_images.shape == (5, 1, 28, 28)
    assert data.train_images.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    torch.testing.assert_close(
        data.train_images[:, 0], torch.tensor(arrays["train_images"] / 255.0, dtype=torch.float32)
    )
    assert data.test_labels.tolist() == arrays["test_labels"].tolist()


def test_load_mnist_mixes_raw_and_gzip(tmp_path: Path) -> None:
    arrays = make_mnist(tmp_path)
    raw = tmp_path / MNIST_FILES["test_labels"]
    (tmp_path / f"{raw.name}.gz").write_bytes(gzip.compress(raw.read_bytes()))
    raw.unlink()
    assert load_mnist(tmp_path).test_labels.tolist() == arrays["test_labels"].tolist()


def corrupt(directory: Path, name: str, change: str) -> None:
    path = directory / name
    raw = path.read_bytes()
    if change == "truncated":
        path.write_bytes(raw[:-7])
    elif change == "too_long":
        path.write_bytes(raw + b"\x00")
    elif change == "wrong_magic":
        path.write_bytes(bytes([0, 0, 0x08, 4]) + raw[4:])
    elif change == "wrong_type":
        path.write_bytes(bytes([0, 0, 0x0D, raw[3]]) + raw[4:])
    elif change == "empty":
        path.write_bytes(b"")
    elif change == "missing":
        path.unlink()
    elif change == "not_gzip":
        path.unlink()
        (directory / f"{name}.gz").write_bytes(raw)
    elif change == "truncated_gzip":
        path.unlink()
        (directory / f"{name}.gz").write_bytes(gzip.compress(raw)[:-20])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("truncated", "truncated: header says 12 x 28 x 28 = 9408 bytes of data, got 9401"),
        ("too_long", "longer than its header says"),
        ("wrong_magic", "expected IDX magic number 0x00000803"),
        ("wrong_type", "got 0x00000d03"),
        ("empty", "expected an IDX file, got only 0 bytes"),
        ("missing", "MNIST file not found"),
        ("not_gzip", "not a valid gzip file"),
        ("truncated_gzip", "not a valid gzip file"),
    ],
)
def test_load_mnist_rejects_bad_files(tmp_path: Path, change: str, message: str) -> None:
    make_mnist(tmp_path)
    corrupt(tmp_path, MNIST_FILES["train_images"], change)
    with pytest.raises(DataError, match=message) as info:
        load_mnist(tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value)


def test_load_mnist_rejects_mismatched_counts_and_labels(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    (tmp_path / MNIST_FILES["train_labels"]).write_bytes(idx_bytes(np.zeros(11)))
    with pytest.raises(DataError, match="expected 12 labels"):
        load_mnist(tmp_path)
    (tmp_path / MNIST_FILES["train_labels"]).write_bytes(idx_bytes(np.full(12, 10)))
    with pytest.raises(DataError, match=r"expected labels 0\.\.9, got 10"):
        load_mnist(tmp_path)


def test_load_mnist_rejects_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="MNIST directory not found"):
        load_mnist(tmp_path / "nowhere")


def test_read_idx_matches_numpy_of_generated_file(tmp_path: Path) -> None:
    array = np.arange(24).reshape(2, 3, 4)
    path = tmp_path / "a.gz"
    path.write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(path, ndim=3), array)
    with pytest.raises(DataError, match="2 dimensions"):
        parse_idx(idx_bytes(array), "a", ndim=2)


def test_load_digits_split_is_a_seeded_partition() -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    torch.testing.assert_close(a.test_images, b.test_images, rtol=0, atol=0)
    assert not torch.equal(a.test_labels, c.test_labels)
    assert len(a.train_labels) + len(a.test_labels) == 1797
    # Train and test together are exactly sklearn's images, each once: compare sorted pixel rows.
    ours = torch.cat([a.train_images, a.test_images]).flatten(1) * 16
    reference = torch.tensor(sklearn_digits().data, dtype=torch.float32)
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, reference.tolist()))


def test_load_mnist5k_is_a_seeded_partition_of_5000_mnist_images() -> None:
    a, b = load_mnist5k(seed=0), load_mnist5k(seed=1)
    assert a.name == "mnist5k"
    assert a.train_images.shape == (4000, 1, 28, 28) and a.test_images.shape == (1000, 1, 28, 28)
    assert float(a.train_images.min()) == 0.0 and float(a.train_images.max()) == 1.0
    assert sorted(torch.cat([a.train_labels, a.test_labels]).bincount().tolist()) == [500] * 10
    assert not torch.equal(a.test_labels, b.test_labels)
    # The same 5,000 images whatever the split: compare the sums of all pixels.
    total = float(torch.cat([a.train_images, a.test_images]).sum())
    assert total == pytest.approx(float(torch.cat([b.train_images, b.test_images]).sum()), rel=1e-6)


# --------------------------------------------------------------------------- models, training


def test_paper_mlp_layout_and_init() -> None:
    torch.manual_seed(0)
    bn, plain = paper_mlp(784, bn=True), paper_mlp(784, bn=False, width=200)
    linears = [m for m in bn if isinstance(m, nn.Linear)]
    assert [type(m).__name__ for m in bn] == ["Linear", "BatchNorm1d", "Sigmoid"] * 3 + ["Linear"]
    assert all(isinstance(m, batchnorm.BatchNorm1d) for m in bn if type(m).__name__ == "BatchNorm1d")
    assert [m.bias is None for m in linears] == [True, True, True, False]
    assert [type(m).__name__ for m in plain] == ["Linear", "Sigmoid"] * 3 + ["Linear"]
    weight = plain[0].weight.detach()
    assert weight.shape == (200, 784)
    # 156,800 draws from N(0, 0.01^2): the sample std is within 1% of 0.01.
    assert abs(float(weight.std()) - 0.01) < 1e-4
    assert paper_mlp(64, bn=True, momentum=None)[1].momentum is None


def test_lenet_layout() -> None:
    names = [type(m).__name__ for m in lenet(bn=True)]
    assert names == [
        "Conv2d", "BatchNorm2d", "Sigmoid", "AvgPool2d",
        "Conv2d", "BatchNorm2d", "Sigmoid", "AvgPool2d", "Flatten",
        "Linear", "BatchNorm1d", "Sigmoid", "Linear", "BatchNorm1d", "Sigmoid", "Linear",
    ]  # fmt: skip
    assert [type(m).__name__ for m in lenet(bn=False)] == [n for n in names if not n.startswith("BatchNorm")]
    bn_layers = [m for m in lenet(bn=True) if "BatchNorm" in type(m).__name__]
    assert [m.num_features for m in bn_layers] == [6, 16, 120, 84]
    assert all(type(m).__module__ == "batchnorm.modules" for m in bn_layers)


def test_evaluate_counts_correct_predictions() -> None:
    model = nn.Linear(3, 10, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[2, 0] = 1.0  # class 2 wins exactly when x[0] > 0
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0], [1.0, 0, 0]])
    y = torch.tensor([2, 2, 2, 5])
    accuracy, loss = evaluate(model, x, y, chunk=3)
    assert accuracy == 0.5
    # Cross-entropy written out: logits are 0 except +-1 for class 2.
    e = math.e
    expected = (2 * -math.log(e / (e + 9)) - math.log((1 / e) / (1 / e + 9)) - math.log(1 / (e + 9))) / 4
    assert loss == pytest.approx(expected, rel=1e-6)


def test_train_same_seed_same_weights_and_batches_of_60() -> None:
    x, y = torch.randn(150, 8, generator=torch.Generator().manual_seed(0)), torch.arange(150) % 10
    config = TrainConfig(steps=5, lr=0.1, eval_points=5, seed=7)
    sizes: list[int] = []
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 10))
        handle = model.register_forward_pre_hook(
            lambda _m, args: sizes.append(args[0].shape[0]) if _m.training else None
        )
        history = train(model, x, y, x, y, config, progress=False)
        handle.remove()
        weights.append(model[0].weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    # 150 examples: two full batches of 60 per epoch, the 30 left over are dropped.
    assert sizes == [60] * 10
    assert history.steps == [0, 1, 2, 3, 4, 5] and len(history.train_loss) == 5


def test_train_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="expected steps to be a positive int, got 0"):
        TrainConfig(steps=0, lr=0.1)
    with pytest.raises(ValueError, match="expected lr > 0, got -1"):
        TrainConfig(steps=1, lr=-1)


# --------------------------------------------------------------------------- report writer


def test_write_report_replaces_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    from matplotlib.figure import Figure as MplFigure

    (tmp_path / "summary.json").write_text("old")
    figure = MplFigure()
    figure.subplots().plot([0, 1], [1, 0])
    section = Section("s", "title", "intro", figures=(Figure("f", "F", "caption <b>", figure),), summary={"x": 1})
    write_report(tmp_path, [section], {"s": {"x": 1}}, {"seed": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "index.html", "summary.json"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written.pop("figures") == {"f": {"width_px": 640, "height_px": 480, "smallest_font_pt": 10.0}}
    assert written == {"s": {"x": 1}}
    assert "caption &lt;b&gt;" in (tmp_path / "index.html").read_text()
    with pytest.raises(ValueError, match="unique figure names"):
        write_report(tmp_path, [section, section], {}, {})


# --------------------------------------------------------------------------- the quick demo


def leaves(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


# A run small enough for the test suite: 2 seeds, 60 MLP steps (the other sections take fractions).
TINY = ["--quick", "--seeds", "2", "--steps", "60", "--seed", "3"]
TEST_SIZE = 1000  # mnist5k: 5,000 images, 80/20


@pytest.fixture(scope="module")
def quick_reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """``batchnorm demo`` at tiny size through the command line, then the same seeds through run_demo."""
    first = tmp_path_factory.mktemp("cli") / "bn-report"
    assert main(["demo", *TINY, "--out", str(first)]) == 0
    summary = json.loads((first / "summary.json").read_text())
    second = tmp_path_factory.mktemp("api") / "bn-report"
    again = run_demo(DemoConfig(quick=True, seeds=2, steps=60, seed=3, out=second, progress=False))
    return first, summary, again


EXPECTED_FIGURES = [
    "paper_mlp", "paper_mlp_percentiles", "lr_sweep", "landscape", "lenet_curves", "running_stats",
    "twenty_points", "small_batch", "fold_speedup", "inversion", "flow", "masked",
]  # fmt: skip


def test_quick_demo_writes_every_file(quick_reports: tuple[Path, dict, dict]) -> None:
    out = quick_reports[0]
    html = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{name}.png" for name in EXPECTED_FIGURES)
    for name in pngs:
        raw = (out / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", raw[16:24])
        assert 300 <= width <= 800 and height >= 250, name  # shown at its own size on the page and in the README
        assert f'src="{name}"' in html
    from matplotlib.image import imread

    assert imread(out / "paper_mlp.png").shape[2] in (3, 4)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_quick_demo_figures_are_readable(quick_reports: tuple[Path, dict, dict]) -> None:
    out, summary, _ = quick_reports
    facts = summary["figures"]
    assert sorted(facts) == sorted(EXPECTED_FIGURES)
    for name, fact in facts.items():
        raw = (out / f"{name}.png").read_bytes()
        assert (fact["width_px"], fact["height_px"]) == struct.unpack(">II", raw[16:24]), name
        assert fact["smallest_font_pt"] >= 9.0, name


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key == "id" and value:
                self.ids.append(value)
            if tag == "a" and key == "href" and value and value.startswith("#"):
                self.links.append(value[1:])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_quick_demo_page_structure(quick_reports: tuple[Path, dict, dict]) -> None:
    out = quick_reports[0]
    page = _Page()
    page.feed((out / "index.html").read_text())
    assert len(page.ids) == len(set(page.ids)), sorted(i for i in page.ids if page.ids.count(i) > 1)
    assert set(page.links) <= set(page.ids) and len(page.links) >= 10  # the table of contents resolves
    for part in ("contents", "findings", "introduction", "reproduce", "sec-paper_mlp", "sec-lr_sweep", "sec-landscape"):
        assert part in page.ids
    text = " ".join(page.text)
    assert text.index("Data: MNIST") < text.index("Contents") < text.index("Summary of findings")
    assert "4,000 training and 1,000 test images" in text
    assert "batchnorm demo --data mnist5k --seeds 2 --seed 3 --quick --steps 60" in text
    # No caption is repeated on the page.
    captions = [chunk for chunk in page.text if len(chunk) > 200]
    assert len(captions) == len(set(captions))


def percent(interval: list[float], mean: float) -> str:
    return f"{100 * mean:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def test_quick_demo_page_numbers_are_the_summary(quick_reports: tuple[Path, dict, dict]) -> None:
    out, summary, _ = quick_reports
    text = html_lib.unescape((out / "index.html").read_text())
    for key in ("paper_mlp", "lenet"):
        for name in ("bn", "plain"):
            numbers = summary[key][name]
            assert percent(numbers["final_test_accuracy_ci"], numbers["final_test_accuracy"]) in text, (key, name)
    sweep = summary["lr_sweep"]
    for name in ("bn", "plain"):
        best = max(range(len(sweep["learning_rates"])), key=lambda i: sweep[name]["final_test_accuracy"][i])
        expected = percent(sweep[name]["final_test_accuracy_ci"][best], sweep[name]["final_test_accuracy"][best])
        assert expected in text, name
    exact = summary["inversion"]["round_trip"]
    assert f"{exact['train_max_abs_error']:.1e}" in text


def test_quick_demo_summary_fields(quick_reports: tuple[Path, dict, dict]) -> None:
    _, summary, _ = quick_reports
    flat = leaves(summary)
    for key in (
        "paper_mlp.bn.final_test_accuracy",
        "paper_mlp.plain.final_test_accuracy",
        "lenet.bn.final_test_accuracy",
        "lenet.plain.final_test_accuracy",
    ):
        value = flat[key]
        assert isinstance(value, float) and 0.0 <= value <= 1.0
        low, high = summary[key.split(".")[0]][key.split(".")[1]]["final_test_accuracy_ci"]
        assert 0.0 <= low <= value <= high <= 1.0
        # Each seed's accuracy is a count over the 1,000 test images; the mean is over 2 seeds.
        assert round(value * 2 * TEST_SIZE) == pytest.approx(value * 2 * TEST_SIZE, abs=1e-6)
    assert (summary["data"], summary["seed"], summary["seeds"], summary["steps"], summary["device"]) == (
        "mnist5k",
        3,
        [3, 4],
        60,
        "cpu",
    )
    assert (summary["train_size"], summary["test_size"]) == (4 * TEST_SIZE, TEST_SIZE)
    assert summary["runtime_seconds"] > 0
    sweep = summary["lr_sweep"]
    rates = sweep["learning_rates"]
    assert rates == sorted(rates) and len(rates) >= 4
    for name in ("bn", "plain"):
        assert len(sweep[name]["final_test_accuracy"]) == len(rates) == len(sweep[name]["final_test_accuracy_ci"])
        assert all(0.0 <= a <= 1.0 for a in sweep[name]["final_test_accuracy"])
    landscape = summary["landscape"]
    for name in ("bn", "plain"):
        for key in ("loss_variation", "gradient_change", "beta_smoothness"):
            assert landscape[name][key] >= 0 and len(landscape[name][f"{key}_ci"]) == 2
    # Running statistics: training never reads them, so both momenta give the same weights ...
    assert summary["running_stats"]["max_weight_difference_between_momenta"] == 0.0
    # ... evaluation leaves them alone, a training-mode forward moves them and counts the batch.
    table = summary["running_stats"]["eval_leaves_running_stats"]
    steps = 15  # a quarter of --steps
    assert table["after_eval"]["max_abs_change"] == 0.0
    assert table["after_eval"]["num_batches_tracked"] == table["trained"]["num_batches_tracked"] == steps
    assert table["after_train_forward"]["max_abs_change"] > 0
    assert table["after_train_forward"]["num_batches_tracked"] == steps + 1
    # 20 points: batch norm takes each coordinate to mean 0 and std sqrt(var / (var + eps)).
    points = summary["twenty_points"]
    for std in points["before"]["std"]:
        assert 1.0 < std < 3.5
    assert points["after"]["mean"] == pytest.approx([0.0, 0.0], abs=1e-12)
    expected = [(s**2 / (s**2 + 1e-5)) ** 0.5 for s in points["before"]["std"]]
    assert points["after"]["std"] == pytest.approx(expected, rel=1e-12)
    # The exact inverse: float32 rounding.
    assert summary["inversion"]["round_trip"]["train_relative_error"] < 1e-5


def test_quick_demo_new_sections_in_range(quick_reports: tuple[Path, dict, dict]) -> None:
    _, summary, _ = quick_reports
    flat = leaves(summary)
    accuracies = [key for key in flat if key.endswith("accuracy") and not isinstance(flat[key], list)]
    assert {
        "running_stats.lenet_recalibrate.before.accuracy",
        "running_stats.lenet_recalibrate.after.accuracy",
        "tools.small_batch.batchnorm.final_test_accuracy",
        "tools.small_batch.ghost.recalibrated_test_accuracy",
        "tools.small_batch.batchnorm64.final_test_accuracy",
    } <= set(accuracies)
    for key in accuracies:
        assert 0.0 <= flat[key] <= 1.0, key
    assert summary["tools"]["small_batch"]["steps"] == 5  # a twelfth of 60
    assert (
        summary["tools"]["small_batch"]["ghost"]["images_seen"]
        == summary["tools"]["small_batch"]["batchnorm64"]["images_seen"]
    )
    timing = summary["tools"]["fold"]["timing"]
    assert all(t["speedup"] > 0 for t in timing.values()) and summary["tools"]["fold"]["max_abs_difference"] < 1e-4
    inversion = summary["inversion"]
    for key in ("reconstruction.mean_relative_error", "flow.nll_with_batchnorm", "flow.nll_without_batchnorm"):
        assert math.isfinite(leaves(inversion)[key]), key
    assert all(0 <= p <= 1 for p in inversion["synthesis"]["confidence_with_prior"])


def test_quick_demo_same_seed_same_summary(quick_reports: tuple[Path, dict, dict]) -> None:
    _, first, second = quick_reports
    first, second = copy.deepcopy(first), copy.deepcopy(second)
    # Wall-clock figures differ from run to run; everything else must not. The writer adds the
    # figure facts to the summary it writes (the first), not to the one run_demo returns.
    for summary in (first, second):
        assert summary.pop("runtime_seconds") > 0 and summary.pop("section_seconds")
        assert summary["tools"]["fold"].pop("timing")
        summary.pop("figures", None)
    assert first == second


def test_quick_demo_shows_batch_norm_learning_faster(quick_reports: tuple[Path, dict, dict]) -> None:
    # After 60 steps from N(0, 0.01^2) weights the plain MLP is still at chance; batch norm is not.
    _, summary, _ = quick_reports
    assert summary["paper_mlp"]["bn"]["final_test_accuracy"] > 0.5
    assert summary["paper_mlp"]["plain"]["final_test_accuracy"] < 0.3


def test_run_demo_rejects_bad_config(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="--data mnist needs --data-dir"):
        run_demo(DemoConfig(data="mnist", out=tmp_path))
    with pytest.raises(DemoError, match="expected --data to be one of mnist5k, digits, mnist, got 'cifar'"):
        run_demo(DemoConfig(data="cifar", out=tmp_path))
    with pytest.raises(DemoError, match="expected --seeds to be a positive integer, got 0"):
        run_demo(DemoConfig(seeds=0, out=tmp_path))
    with pytest.raises(DataError, match="MNIST directory not found"):
        run_demo(DemoConfig(data="mnist", data_dir=tmp_path / "none", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the documents


def test_docs_numbers_come_from_the_default_run() -> None:
    """docs/experiments.md and the README's demo paragraph are generated from the default run's summary."""
    from batchnorm.experiments.docs import render

    root = Path(__file__).resolve().parents[1]
    summary = json.loads((root / "docs" / "figures" / "summary.json").read_text())
    assert summary["data"] == "mnist5k" and summary["quick"] is False and len(summary["seeds"]) >= 3
    for document in ("README.md", "docs/experiments.md"):
        text = (root / document).read_text()
        assert "<!-- BEGIN generated:" in text, document
        assert render(text, summary) == text, f"{document} does not match docs/figures/summary.json: make figures"
    # The README's figure is the default run's, at the size the facts in its summary say.
    raw = (root / "docs" / "figures" / "paper_mlp.png").read_bytes()
    facts = summary["figures"]["paper_mlp"]
    assert struct.unpack(">II", raw[16:24]) == (facts["width_px"], facts["height_px"])
    assert facts["width_px"] <= 800 and facts["smallest_font_pt"] >= 9
