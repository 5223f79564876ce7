"""Inversion: module.inverse, functional.batch_norm_inverse, NonInvertibleError and invert().

Oracles: the input itself (round trips), torch's own batch norm, float64 formulas written out
here, and batch-norm statistics computed here with torch.var_mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import batchnorm
from batchnorm.functional import NonInvertibleError, batch_norm_inverse
from batchnorm.inversion import bn_statistics_distance


@dataclass(frozen=True)
class Case:
    name: str
    cls: type[nn.Module]
    shape: tuple[int, ...]
    lazy: bool = False


# The last dimension equals C in several shapes, so that a per-channel vector wrongly broadcast
# against the last dimension gives wrong numbers instead of a shape error.
CASES = [
    Case("bn1d_2d", batchnorm.BatchNorm1d, (16, 4)),
    Case("bn1d_3d", batchnorm.BatchNorm1d, (5, 4, 4)),
    Case("bn2d", batchnorm.BatchNorm2d, (3, 4, 5, 4)),
    Case("bn3d", batchnorm.BatchNorm3d, (2, 4, 3, 2, 4)),
    Case("bn_any_2d", batchnorm.BatchNorm, (16, 4)),
    Case("bn_any_6d", batchnorm.BatchNorm, (2, 4, 2, 3, 2, 4)),
    Case("lazy1d", batchnorm.LazyBatchNorm1d, (5, 4, 4), lazy=True),
    Case("lazy2d", batchnorm.LazyBatchNorm2d, (3, 4, 5, 4), lazy=True),
    Case("lazy3d", batchnorm.LazyBatchNorm3d, (2, 4, 3, 2, 4), lazy=True),
]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def make(case: Case, dtype: torch.dtype, track: bool = True) -> nn.Module:
    module = case.cls(track_running_stats=track) if case.lazy else case.cls(4, track_running_stats=track)
    return module.to(dtype)


def channel_data(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> Tensor:
    """Per-channel offsets and scales far from 0 and 1, so that wrong statistics show."""
    generator = torch.Generator().manual_seed(seed)
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    offsets = torch.tensor([3.0, -2.0, 0.5, 10.0], dtype=torch.float64).view(view)
    scales = torch.tensor([0.5, 4.0, 1.0, 2.0], dtype=torch.float64).view(view)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scales + offsets).to(dtype)


def set_affine(module: nn.Module) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.tensor([1.5, -0.7, 0.3, 2.0]))  # type: ignore[operator]
        module.bias.copy_(torch.tensor([0.2, -1.0, 4.0, 0.0]))  # type: ignore[operator]


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_not_tracking"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_round_trip(case: Case, mode: str, dtype: torch.dtype) -> None:
    module = make(case, dtype, track=mode != "eval_not_tracking")
    for seed in range(3):  # a few training steps: running statistics away from 0 and 1
        module(channel_data(case.shape, dtype, seed=seed + 10))
    set_affine(module)
    if mode != "train":
        module.eval()
    x = channel_data(case.shape, dtype)
    y = module(x)
    x_back = module.inverse(y)  # type: ignore[operator]
    assert x_back.dtype == dtype and x_back.shape == x.shape
    assert rel_err(x_back, x) <= TOLERANCE[dtype]


def test_eval_inverse_uses_running_stats_not_the_batch() -> None:
    """In eval the running statistics normalized; inverting with batch statistics would differ."""
    module = batchnorm.BatchNorm2d(4).double()
    module(channel_data((3, 4, 5, 4), torch.float64, seed=1))
    module.eval()
    x = channel_data((3, 4, 5, 4), torch.float64, seed=2)
    assert rel_err(module.inverse(module(x)), x) <= 1e-12
    wrong = module.inverse(module(x), mean=module.batch_mean, var=module.batch_var)
    assert rel_err(wrong, x) > 1e-3


def test_functional_inverse_of_torch_batch_norm_float64_formula() -> None:
    """Inverts torch's own eval-mode batch norm, and matches the formula written out here."""
    torch_bn = nn.BatchNorm2d(4).double().eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        torch_bn.running_mean.copy_(torch.randn(4, generator=generator, dtype=torch.float64))
        torch_bn.running_var.copy_(torch.rand(4, generator=generator, dtype=torch.float64) + 0.1)
        torch_bn.weight.copy_(torch.tensor([1.5, -0.7, 0.3, 2.0]))
        torch_bn.bias.copy_(torch.tensor([0.2, -1.0, 4.0, 0.0]))
    x = channel_data((2, 4, 3, 4), torch.float64)
    y = torch_bn(x).detach()
    args = (torch_bn.running_mean, torch_bn.running_var, torch_bn.weight.detach(), torch_bn.bias.detach())
    x_back = batch_norm_inverse(y, *args, eps=torch_bn.eps)
    assert rel_err(x_back, x) <= 1e-12
    mean, var, weight, bias = (t.view(1, 4, 1, 1) for t in args)
    formula = mean + (y - bias) * torch.sqrt(var + torch_bn.eps) / weight
    assert rel_err(x_back, formula) <= 1e-14


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_explicit_stats_override(training: bool) -> None:
    module = batchnorm.BatchNorm1d(4).double()
    set_affine(module)
    module.train(training)
    module(channel_data((8, 4), torch.float64))
    mean = torch.tensor([1.0, -2.0, 0.0, 5.0], dtype=torch.float64)
    var = torch.tensor([0.5, 2.0, 1.0, 9.0], dtype=torch.float64)
    y = channel_data((8, 4), torch.float64, seed=5)
    expected = mean + (y - module.bias.detach()) * torch.sqrt(var + module.eps) / module.weight.detach()
    assert rel_err(module.inverse(y, mean=mean, var=var), expected) <= 1e-14


def test_explicit_stats_without_any_forward() -> None:
    module = batchnorm.BatchNorm1d(2).double()
    y = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mean, var = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 0.0], dtype=torch.float64)
    x = module.inverse(y, mean=mean, var=var)
    expected = torch.tensor([[1.0 + math.sqrt(3.0 + 1e-5), 2.0 - math.sqrt(1e-5)]], dtype=torch.float64)
    assert torch.allclose(x, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("track", [True, False], ids=["tracking", "not_tracking"])
def test_inverse_before_any_training_forward_raises(track: bool) -> None:
    module = batchnorm.BatchNorm2d(4, track_running_stats=track)
    with pytest.raises(ValueError, match="batch statistics from an earlier forward"):
        module.inverse(torch.randn(2, 4, 3, 3))
    assert module.batch_mean is None


def test_eval_with_running_stats_needs_no_forward() -> None:
    """Fresh running statistics (0, 1) are the ones eval would normalize with."""
    module = batchnorm.BatchNorm1d(3).eval().double()
    y = torch.randn(5, 3, dtype=torch.float64)
    assert rel_err(module.inverse(y), y * math.sqrt(1 + 1e-5)) <= 1e-15


def test_uninitialized_lazy_module_raises() -> None:
    with pytest.raises(ValueError, match="uninitialized lazy module"):
        batchnorm.LazyBatchNorm2d().eval().inverse(torch.randn(2, 4, 3, 3))


def test_zero_weight_raises_naming_the_channels() -> None:
    module = batchnorm.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([1.0, 0.0, 2.0, 1e-13]))
    y = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(NonInvertibleError, match=r"BatchNorm2d\(4\)\.inverse: .*channels \[1, 3\]") as info:
        module.inverse(y)
    assert isinstance(info.value, ValueError)
    assert info.value.channels == [1, 3]
    assert batchnorm.NonInvertibleError is NonInvertibleError


def test_zero_weight_mean_fills_those_channels() -> None:
    module = batchnorm.BatchNorm2d(4).double()
    module(channel_data((3, 4, 5, 4), torch.float64, seed=1))
    module.eval()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([1.0, 0.0, 2.0, -1e-13]))
    x = channel_data((3, 4, 5, 4), torch.float64)
    x_back = module.inverse(module(x), on_zero_weight="mean")
    assert module.running_mean is not None
    for channel in (1, 3):
        assert torch.equal(x_back[:, channel], torch.full_like(x_back[:, channel], float(module.running_mean[channel])))
    for channel in (0, 2):
        assert rel_err(x_back[:, channel], x[:, channel]) <= 1e-12


def test_keeps_dtype_of_half_input() -> None:
    module = batchnorm.BatchNorm2d(4)
    x = channel_data((3, 4, 5, 4), torch.float32).to(torch.bfloat16)
    y = module(x)
    x_back = module.inverse(y)
    assert x_back.dtype == torch.bfloat16
    assert rel_err(x_back, x) <= 2e-2  # bfloat16 has 8 significant bits


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mean": torch.zeros(3), "var": torch.ones(4)}, ValueError, r"mean of shape \(4,\).*got shape \(3,\)"),
        ({"mean": torch.zeros(4), "var": -torch.ones(4)}, ValueError, "non-negative var"),
        ({"mean": None, "var": torch.ones(4)}, TypeError, "mean to be a torch.Tensor"),
        ({"mean": torch.zeros(4, dtype=torch.long), "var": torch.ones(4)}, TypeError, "floating-point mean"),
        ({"mean": torch.zeros(4), "var": torch.ones(4), "eps": -1.0}, ValueError, "eps"),
        ({"mean": torch.zeros(4), "var": torch.ones(4), "on_zero_weight": "zero"}, ValueError, "'raise', 'mean'"),
        ({"mean": torch.zeros(4), "var": torch.ones(4), "weight": torch.ones(4).double()}, TypeError, "weight"),
    ],
    ids=["wrong_shape", "negative_var", "missing_mean", "integer_mean", "negative_eps", "bad_mode", "weight_dtype"],
)
def test_functional_validation(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        batch_norm_inverse(torch.randn(2, 4, 3), **kwargs)  # type: ignore[arg-type]


def test_module_inverse_validation_names_the_module() -> None:
    module = batchnorm.BatchNorm2d(4).eval()
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\).*4 channels.*got 3"):
        module.inverse(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"4D input"):
        module.inverse(torch.randn(2, 4, 2))
    with pytest.raises(TypeError, match="floating-point"):
        module.inverse(torch.ones(2, 4, 2, 2, dtype=torch.long))


def test_batch_stats_are_not_in_the_state_dict() -> None:
    module = batchnorm.BatchNorm1d(4)
    module(torch.randn(8, 4))
    assert module.batch_mean is not None and not module.batch_mean.requires_grad
    assert not any(key.startswith("batch_") for key in module.state_dict())


# ---------------------------------------------------------------------------------------------
# invert()
# ---------------------------------------------------------------------------------------------


def invertible_network(seed: int = 0) -> nn.Module:
    """Orthogonal linear maps around a batch norm with moderate statistics: well conditioned."""
    torch.manual_seed(seed)
    first, last = nn.Linear(6, 6), nn.Linear(6, 6)
    nn.init.orthogonal_(first.weight)
    nn.init.orthogonal_(last.weight)
    bn = batchnorm.BatchNorm1d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
        bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
        bn.weight.uniform_(0.8, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(first, bn, nn.LeakyReLU(0.5), last)


def test_invert_recovers_input_of_invertible_network() -> None:
    model = invertible_network()
    model.train()
    model[1].eval()  # a mixed state, restored exactly afterwards
    model[0].bias.requires_grad_(False)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model.eval()(x)
    model.train()
    model[1].eval()
    result = batchnorm.invert(model, target, input_shape=(8, 6), steps=600, lr=0.05)
    assert float((result.input - x).norm() / x.norm()) <= 0.05
    assert float((result.output - target).abs().max()) <= 1e-3
    assert len(result.losses) == 600 and result.losses[-1] < result.losses[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [m.training for m in model] == [True, False, True, True]
    assert model[0].bias.requires_grad is False and model[0].weight.requires_grad is True


def test_invert_cross_entropy_reaches_the_classes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), batchnorm.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    target = torch.tensor([0, 1, 2])
    result = batchnorm.invert(model, target, input_shape=(3, 5), steps=150, loss="cross_entropy")
    assert torch.equal(result.output.argmax(dim=1), target)


def conv_model() -> nn.Module:
    """Our BatchNorm2d and torch's BatchNorm1d, with running statistics far from a random input's."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        batchnorm.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(1.5, 3.0)
    return model.eval()


def oracle_bn_distance(model: nn.Module, x: Tensor) -> float:
    """sum over BN layers of ||mean - running_mean|| + ||biased var - running_var||, hooks written here."""
    inputs: list[tuple[nn.Module, Tensor]] = []
    bn_types = (batchnorm.BatchNorm2d, nn.BatchNorm1d)
    handles = [
        m.register_forward_hook(lambda m, i, o: inputs.append((m, i[0])))
        for m in model.modules()
        if isinstance(m, bn_types)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    total = 0.0
    for module, value in inputs:
        dims = [0, *range(2, value.dim())]
        var, mean = torch.var_mean(value.double(), dim=dims, correction=0)
        total += float((mean - module.running_mean.double()).norm() + (var - module.running_var.double()).norm())
    assert len(inputs) == 2
    return total


def test_bn_statistics_distance_matches_oracle() -> None:
    model = conv_model()
    x = torch.randn(5, 1, 6, 6)
    assert bn_statistics_distance(model, x) == pytest.approx(oracle_bn_distance(model, x), rel=1e-5)


def test_bn_prior_lowers_the_bn_statistics_distance() -> None:
    model = conv_model()
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    common = {"input_shape": (6, 1, 6, 6), "steps": 100, "loss": "cross_entropy", "lr": 0.05}
    without = batchnorm.invert(model, target, **common)  # type: ignore[arg-type]
    with_prior = batchnorm.invert(model, target, bn_prior=1.0, **common)  # type: ignore[arg-type]
    # Measured: 6.3 with the prior against 9.5 without.
    assert oracle_bn_distance(model, with_prior.input) < 0.8 * oracle_bn_distance(model, without.input)


def test_tv_and_l2_priors_change_the_result() -> None:
    model = conv_model()
    target = torch.tensor([0, 1])
    common = {"input_shape": (2, 1, 6, 6), "steps": 60, "loss": "cross_entropy"}
    plain = batchnorm.invert(model, target, **common).input  # type: ignore[arg-type]
    smooth = batchnorm.invert(model, target, tv=1.0, **common).input  # type: ignore[arg-type]
    small = batchnorm.invert(model, target, l2=1.0, **common).input  # type: ignore[arg-type]

    def tv(x: Tensor) -> float:
        return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean())

    assert tv(smooth) < 0.8 * tv(plain)
    assert float(small.pow(2).mean()) < 0.8 * float(plain.pow(2).mean())


def test_invert_init_is_the_start_and_is_not_modified() -> None:
    model = invertible_network()
    init = torch.randn(2, 6)
    saved = init.clone()
    result = batchnorm.invert(model, torch.zeros(2, 6), init=init, steps=0)
    assert torch.equal(init, saved) and torch.equal(result.input, init) and result.losses == []
    with torch.no_grad():
        assert torch.equal(result.output, model.eval()(init))


def test_invert_seed_makes_it_reproducible() -> None:
    model = invertible_network()
    runs = [batchnorm.invert(model, torch.zeros(2, 6), input_shape=(2, 6), steps=5, seed=s).input for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_invert_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    batchnorm.invert(invertible_network(), torch.zeros(2, 6), input_shape=(2, 6), steps=3, progress=True)
    assert "invert" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "input_shape or init"),
        ({"input_shape": (2, 6), "loss": "l1"}, ValueError, "'mse', 'cross_entropy'"),
        ({"input_shape": (3, 6)}, ValueError, r"output's shape \(3, 6\)"),
        ({"input_shape": (2, 6), "loss": "cross_entropy"}, ValueError, "class indices"),
        ({"input_shape": (2, 6), "tv": 1.0}, ValueError, "dimensions after C"),
        ({"input_shape": (2, 6), "lr": 0.0}, ValueError, "lr to be a positive number"),
        ({"input_shape": (2, 6), "bn_prior": -1.0}, ValueError, "bn_prior"),
        ({"input_shape": (2, 6), "steps": 1.5}, ValueError, "steps"),
        ({"init": torch.ones(2, 6, dtype=torch.long)}, TypeError, "floating-point"),
        ({"init": torch.ones(2, 6), "input_shape": (2, 5)}, ValueError, r"init of shape \(2, 5\)"),
    ],
    ids=[
        "no_shape",
        "bad_loss",
        "target_shape",
        "ce_float_target",
        "tv_2d",
        "lr",
        "prior",
        "steps",
        "init",
        "init_shape",
    ],
)
def test_invert_validation_changes_nothing(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    model = invertible_network().train()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(error, match=match):
        batchnorm.invert(model, torch.zeros(2, 6), **kwargs)  # type: ignore[arg-type]
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_bn_prior_needs_bn_layers() -> None:
    with pytest.raises(ValueError, match="batch-norm running statistics"):
        batchnorm.invert(nn.Linear(3, 3), torch.zeros(2, 3), input_shape=(2, 3), bn_prior=1.0)


def test_statistics_prior_reads_the_input_of_an_inplace_layer() -> None:
    """InPlaceABN overwrites its input: the prior must see the batch norm's input, as for the
    same block computed out of place."""
    torch.manual_seed(0)
    inplace = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.InPlaceABN(4)).eval()
    out_of_place = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNormAct(4, activation="leaky_relu", activation_param=0.01)
    ).eval()
    out_of_place.load_state_dict(inplace.state_dict())
    with torch.no_grad():
        for model in (inplace, out_of_place):
            model[1].running_mean.fill_(0.3)
            model[1].running_var.fill_(2.0)
    x = torch.randn(4, 3, 6, 6)
    assert bn_statistics_distance(inplace, x) == pytest.approx(bn_statistics_distance(out_of_place, x), rel=1e-6)
