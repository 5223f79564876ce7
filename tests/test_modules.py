"""Module behaviours named by torch's semantics, state dicts, errors and compatibility."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import batchnorm
from batchnorm.functional import batch_norm

from .conftest import PAIRS, assert_state_equal

# ---------------------------------------------------------------------------------------------
# Construction and state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["1d", "2d", "3d", "any"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_construction_matches_torch(kind: str, affine: bool, track: bool, bias: bool) -> None:
    ours_cls, theirs_cls = PAIRS[kind]
    ours = ours_cls(7, eps=1e-3, momentum=None, affine=affine, track_running_stats=track, bias=bias)
    theirs = theirs_cls(7, eps=1e-3, momentum=None, affine=affine, track_running_stats=track, bias=bias)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(ours, name) is None) == (getattr(theirs, name) is None), name
    assert_state_equal(ours, theirs, rtol=0, atol=0)
    if track:
        assert ours.num_batches_tracked.dtype == torch.long
    assert ours.extra_repr() == theirs.extra_repr()
    assert ours._version == theirs._version


def test_state_dicts_interchange_both_ways() -> None:
    theirs = nn.BatchNorm2d(4)
    theirs.train()
    theirs(torch.randn(8, 4, 3, 3) * 3 + 1)
    ours = batchnorm.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    assert_state_equal(ours, theirs, rtol=0, atol=0)
    ours(torch.randn(8, 4, 3, 3))
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    assert_state_equal(back, ours, rtol=0, atol=0)
    assert back.num_batches_tracked.item() == 2


def test_old_checkpoint_without_counter_loads_as_torch_does() -> None:
    source = nn.BatchNorm1d(3)
    source(torch.randn(5, 3))
    state = source.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    ours, theirs = batchnorm.BatchNorm1d(3), nn.BatchNorm1d(3)
    for module in (ours, theirs):
        module(torch.randn(5, 3))  # the module's own counter is kept: 1, not reset to 0
        module.load_state_dict(copy.deepcopy(state))
    assert_state_equal(ours, theirs, rtol=0, atol=0)
    assert ours.num_batches_tracked.item() == 1
    fresh = batchnorm.BatchNorm1d(3)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.num_batches_tracked.item() == 0


def test_save_and_load_weights_only() -> None:
    ours = batchnorm.BatchNorm2d(4)
    ours(torch.randn(3, 4, 2, 2))
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    loaded = batchnorm.BatchNorm2d(4)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert_state_equal(loaded, ours, rtol=0, atol=0)


def test_reset_running_stats_and_parameters() -> None:
    ours = batchnorm.BatchNorm1d(3)
    with torch.no_grad():
        ours.weight.fill_(2)
    ours(torch.randn(6, 3) + 5)
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(3))
    assert torch.equal(ours.running_var, torch.ones(3))
    assert ours.num_batches_tracked.item() == 0
    assert torch.equal(ours.weight, torch.full((3,), 2.0))
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Named torch behaviours
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training(shape: tuple[int, ...]) -> None:
    ours = batchnorm.BatchNorm(3)
    with pytest.raises(ValueError) as ours_error:
        ours(torch.randn(shape))
    with pytest.raises(ValueError) as torch_error:
        nn.functional.batch_norm(torch.randn(shape), None, None, training=True)
    assert str(ours_error.value) == str(torch_error.value)
    assert "Expected more than 1 value per channel when training, got input size" in str(ours_error.value)
    assert ours.num_batches_tracked.item() == 0  # torch's module would have counted it
    ours.eval()
    assert ours(torch.randn(shape)).shape == shape  # eval needs no batch statistics


def test_empty_batch_behaves_as_torch() -> None:
    ours, theirs = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    for module in (ours, theirs):
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        y = module(x)
        y.sum().backward()
        assert y.shape == x.shape
        assert x.grad is not None and x.grad.shape == x.shape
    assert_state_equal(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_input_with_float32_module(dtype: torch.dtype, training: bool) -> None:
    ours, theirs = batchnorm.BatchNorm2d(4), nn.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    x = (torch.randn(6, 4, 5, 5) * 2 + 3).to(dtype)
    ours.train(training)
    theirs.train(training)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert ya.dtype == dtype
    # Oracle: float32 math on the same low-precision values, rounded once at the end.
    reference = nn.functional.batch_norm(
        x.float(),
        None if training else theirs.running_mean,
        None if training else theirs.running_var,
        theirs.weight,
        theirs.bias,
        training,
    ).to(dtype)
    resolution = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(ya, reference, **resolution)
    torch.testing.assert_close(ya, yb, **resolution)
    ya.float().pow(2).sum().backward()
    yb.float().pow(2).sum().backward()
    assert xa.grad is not None and xa.grad.dtype == dtype
    torch.testing.assert_close(xa.grad.float(), xb.grad.float(), rtol=5e-2, atol=5e-2)
    assert ours.weight.grad is not None and ours.weight.grad.dtype == torch.float32
    assert ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("built_with", [True, False], ids=["built_tracking", "built_untracked"])
def test_flipping_track_running_stats_after_construction(built_with: bool) -> None:
    ours, theirs = (
        batchnorm.BatchNorm1d(3, track_running_stats=built_with),
        nn.BatchNorm1d(3, track_running_stats=built_with),
    )
    for module in (ours, theirs):
        module.track_running_stats = not built_with
    for step, mode in enumerate("tete"):
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(step)) * 2 + 1
        outputs = []
        for module in (ours, theirs):
            module.train(mode == "t")
            outputs.append(module(x))
        torch.testing.assert_close(*outputs)
        assert_state_equal(ours, theirs)


def test_untracked_module_uses_batch_statistics_in_eval() -> None:
    ours = batchnorm.BatchNorm1d(2, track_running_stats=False).eval()
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(ours(x), expected)


def test_momentum_none_is_the_cumulative_average() -> None:
    """Oracle written out: after k batches, running_mean is the plain average of batch means."""
    ours = batchnorm.BatchNorm1d(2, momentum=None, dtype=torch.float64)
    batches = [torch.randn(7, 2, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    for x in batches:
        ours(x)
    torch.testing.assert_close(ours.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    torch.testing.assert_close(ours.running_var, torch.stack([x.var(0) for x in batches]).mean(0))


def test_running_var_is_unbiased_and_update_is_ema() -> None:
    ours = batchnorm.BatchNorm1d(2, momentum=0.25, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64) * 3 + 2
    ours(x)
    torch.testing.assert_close(ours.running_mean, 0.75 * torch.zeros(2, dtype=torch.float64) + 0.25 * x.mean(0))
    torch.testing.assert_close(ours.running_var, 0.75 * torch.ones(2, dtype=torch.float64) + 0.25 * x.var(0))


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_lazy_modules_match_torch(kind: str) -> None:
    ours = getattr(batchnorm, f"LazyBatchNorm{kind}")(momentum=0.3)
    theirs = getattr(nn, f"LazyBatchNorm{kind}")(momentum=0.3)
    shape = {"1d": (6, 5), "2d": (3, 5, 2, 2), "3d": (2, 5, 2, 2, 2)}[kind]
    x = torch.randn(shape) + 1
    torch.testing.assert_close(ours(x), theirs(x))
    assert type(ours) is getattr(batchnorm, f"BatchNorm{kind}")
    assert ours.num_features == 5
    assert_state_equal(ours, theirs)


def test_lazy_module_stays_lazy_after_bad_first_input() -> None:
    lazy = batchnorm.LazyBatchNorm2d()
    with pytest.raises(ValueError, match="expected 4D input"):
        lazy(torch.randn(3, 5))
    assert lazy.has_uninitialized_params()
    lazy(torch.randn(2, 5, 3, 3))
    assert lazy.num_features == 5


# ---------------------------------------------------------------------------------------------
# Bad input: the error names the module, the expectation and what was given; nothing changes.
# ---------------------------------------------------------------------------------------------


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


BAD_INPUTS = [
    (
        "wrong_channels",
        batchnorm.BatchNorm2d,
        torch.randn(2, 5, 3, 3),
        ValueError,
        ["BatchNorm2d(4)", "4 channels", "5"],
    ),
    ("wrong_rank_2d", batchnorm.BatchNorm2d, torch.randn(2, 4, 3), ValueError, ["BatchNorm2d(4)", "4D", "3D"]),
    ("wrong_rank_1d", batchnorm.BatchNorm1d, torch.randn(2, 4, 3, 3), ValueError, ["2D or 3D", "4D"]),
    ("wrong_rank_3d", batchnorm.BatchNorm3d, torch.randn(2, 4, 3, 3), ValueError, ["5D", "4D"]),
    ("rank_1_generic", batchnorm.BatchNorm, torch.randn(4), ValueError, ["at least 2", "1D"]),
    ("integer", batchnorm.BatchNorm1d, torch.ones(2, 4, dtype=torch.long), TypeError, ["floating-point", "int64"]),
    ("complex", batchnorm.BatchNorm1d, torch.ones(2, 4, dtype=torch.complex64), TypeError, ["complex64"]),
    ("not_a_tensor", batchnorm.BatchNorm1d, [[1.0] * 4] * 2, TypeError, ["torch.Tensor", "list"]),
    (
        "float64_into_float32",
        batchnorm.BatchNorm1d,
        torch.randn(2, 4, dtype=torch.float64),
        TypeError,
        ["float64", "float32"],
    ),
]


@pytest.mark.parametrize(
    ("module_cls", "x", "error", "phrases"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
@pytest.mark.parametrize("training", [True, False])
def test_bad_input_raises_clearly_and_changes_nothing(
    module_cls: type[nn.Module], x: object, error: type[Exception], phrases: list[str], training: bool
) -> None:
    module = module_cls(4).train(training)
    if training:
        module(
            torch.randn(3, 4, *([2] * (3 if module_cls is batchnorm.BatchNorm3d else 2)))
            if module_cls is not batchnorm.BatchNorm1d
            else torch.randn(3, 4)
        )
    before = snapshot(module)
    with pytest.raises(error) as raised:
        module(x)
    for phrase in phrases:
        assert phrase in str(raised.value)
    assert_unchanged(module, before)


def test_mismatched_device_is_named() -> None:
    module = batchnorm.BatchNorm1d(4, device="meta")
    with pytest.raises(ValueError, match=r"device meta.*cpu"):
        module(torch.randn(2, 4))


@pytest.mark.parametrize("num_features", [0, -3, 2.0, "4", True, None])
def test_num_features_must_be_a_positive_int(num_features: object) -> None:
    with pytest.raises(ValueError, match=f"positive int, got {num_features!r}"):
        batchnorm.BatchNorm1d(num_features)  # type: ignore[arg-type]


BAD_HYPERPARAMETERS = [
    ("momentum", float("nan"), ValueError),
    ("momentum", "0.1", TypeError),
    ("eps", float("inf"), ValueError),
    ("eps", None, TypeError),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters(name: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=f"{name}"):
        batchnorm.BatchNorm1d(3, **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("momentum", [1.5, -0.5, 2])
def test_momentum_outside_zero_one_extrapolates_as_torch(momentum: float) -> None:
    ours = batchnorm.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
    theirs = nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_eps_zero_is_refused_in_training_and_accepted_in_eval_as_torch() -> None:
    ours, theirs = batchnorm.BatchNorm1d(3, eps=0.0), nn.BatchNorm1d(3, eps=0.0)
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="eps must be positive during training") as raised:
        ours(x)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        theirs(x)
    assert "expected eps > 0" in str(raised.value) and ours.num_batches_tracked.item() == 0
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


# (name, overrides, our error type, phrases, whether torch refuses too)
FUNCTIONAL_BAD = [
    ("running_mean_size", {"running_mean": torch.zeros(5)}, ValueError, ["running_mean", "(4,)", "(5,)"], True),
    ("weight_size", {"weight": torch.ones(3)}, ValueError, ["weight", "(4,)", "(3,)"], True),
    ("bias_size", {"bias": torch.ones(5)}, ValueError, ["bias", "(4,)", "(5,)"], True),
    # torch reads a (4, 1) bias by its element count; a per-channel vector of another shape is refused.
    ("bias_shape", {"bias": torch.ones(4, 1)}, ValueError, ["bias", "(4,)", "(4, 1)"], False),
    ("only_running_mean", {"running_var": None}, ValueError, ["both given or both None"], True),
    (
        "eval_without_running",
        {"running_mean": None, "running_var": None, "training": False},
        ValueError,
        ["evaluation"],
        True,
    ),
    ("weight_int", {"weight": torch.ones(4, dtype=torch.long)}, TypeError, ["weight", "int64"], True),
    ("weight_float64", {"weight": torch.ones(4, dtype=torch.float64)}, TypeError, ["weight", "float64"], True),
    ("running_float64", {"running_mean": torch.zeros(4, dtype=torch.float64)}, TypeError, ["float64"], True),
    ("momentum_none", {"momentum": None}, TypeError, ["momentum", "None"], True),
    ("momentum_string", {"momentum": "0.1"}, TypeError, ["momentum", "str"], True),
    ("eps_zero_training", {"eps": 0.0}, ValueError, ["eps", "0.0"], True),
    ("eps_negative_eval", {"eps": -1.0, "training": False}, ValueError, ["eps", "-1.0"], True),
    ("momentum_nan", {"momentum": float("nan")}, ValueError, ["momentum", "nan"], False),
    ("eps_nan", {"eps": float("nan")}, ValueError, ["eps", "nan"], False),
]


@pytest.mark.parametrize(
    ("overrides", "error", "phrases", "torch_refuses"),
    [case[1:] for case in FUNCTIONAL_BAD],
    ids=[case[0] for case in FUNCTIONAL_BAD],
)
def test_functional_bad_arguments(
    overrides: dict[str, object], error: type[Exception], phrases: list[str], torch_refuses: bool
) -> None:
    """Our clear error, which is also an instance of the type torch raises for the same call."""
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    args: dict[str, object] = {
        "running_mean": running_mean,
        "running_var": running_var,
        "weight": None,
        "bias": None,
        "training": True,
        "momentum": 0.1,
    }
    args.update(overrides)
    x = torch.randn(3, 4)
    with pytest.raises(error) as raised:
        batch_norm(x, **args)  # type: ignore[arg-type]
    for phrase in phrases:
        assert phrase in str(raised.value)
    assert torch.equal(running_mean, torch.zeros(4)) and torch.equal(running_var, torch.ones(4))
    torch_args = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    if torch_refuses:
        with pytest.raises(Exception) as theirs:
            F.batch_norm(x, **torch_args)  # type: ignore[arg-type]
        assert isinstance(raised.value, type(theirs.value)), (type(raised.value), type(theirs.value))
    else:
        F.batch_norm(x, **torch_args)  # type: ignore[arg-type]  # torch computes garbage here


def test_functional_empty_one_dimensional_input_gives_an_empty_output_as_torch() -> None:
    empty = torch.empty(0)
    assert batch_norm(empty, None, None, training=True).shape == F.batch_norm(empty, None, None, training=True).shape
    with pytest.raises(IndexError):
        batch_norm(torch.randn(3), None, None, training=True)
    with pytest.raises(IndexError):
        F.batch_norm(torch.randn(3), None, None, training=True)


# ---------------------------------------------------------------------------------------------
# Non-finite batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_batch_keeps_running_stats_of_that_channel(bad: float) -> None:
    ours = batchnorm.BatchNorm1d(3)
    ours(torch.randn(8, 3))
    before_mean, before_var = ours.running_mean.clone(), ours.running_var.clone()
    x = torch.randn(8, 3)
    x[2, 1] = bad
    y = ours(x)
    assert not torch.isfinite(y[:, 1]).all()  # NaN in, NaN out: the output is not altered
    assert torch.isfinite(y[:, [0, 2]]).all()
    assert ours.running_mean[1] == before_mean[1] and ours.running_var[1] == before_var[1]
    # The other channels are updated exactly as torch updates them.
    theirs = nn.BatchNorm1d(3)
    theirs.load_state_dict({**ours.state_dict(), "running_mean": before_mean, "running_var": before_var})
    theirs(x)
    torch.testing.assert_close(ours.running_mean[[0, 2]], theirs.running_mean[[0, 2]])
    torch.testing.assert_close(ours.running_var[[0, 2]], theirs.running_var[[0, 2]])
    assert ours.num_batches_tracked.item() == 2  # the step still counts


def test_skip_nonfinite_false_is_torch_behaviour() -> None:
    ours, theirs = batchnorm.BatchNorm1d(3, skip_nonfinite=False), nn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    x[0, 0] = float("nan")
    torch.testing.assert_close(ours(x), theirs(x), equal_nan=True)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, equal_nan=True)
    assert torch.isnan(ours.running_mean[0])


# ---------------------------------------------------------------------------------------------
# Compatibility with torch's machinery
# ---------------------------------------------------------------------------------------------


def trained_module() -> batchnorm.BatchNorm2d:
    module = batchnorm.BatchNorm2d(3, momentum=None)
    module(torch.randn(4, 3, 2, 2) + 1)
    return module


def test_deepcopy_and_pickle() -> None:
    module = trained_module()
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert_state_equal(clone, module, rtol=0, atol=0)
        x = torch.randn(4, 3, 2, 2)
        torch.testing.assert_close(clone.eval()(x), module.eval()(x))
        assert clone.momentum is None


def test_functional_call_uses_given_state() -> None:
    module = trained_module().eval()
    state = {"running_mean": torch.full((3,), 2.0), "running_var": torch.full((3,), 4.0)}
    x = torch.randn(2, 3, 2, 2)
    y = torch.func.functional_call(module, state, (x,))
    expected = (x - 2.0) / torch.sqrt(torch.tensor(4.0 + 1e-5))
    torch.testing.assert_close(y, expected)


def test_to_device_and_dtype() -> None:
    module = trained_module().to(torch.float64)
    assert module.weight.dtype == torch.float64 and module.running_mean.dtype == torch.float64
    assert module.num_batches_tracked.dtype == torch.long
    y = module(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_torch_compile_conv_bn_relu_matches_torch() -> None:
    def model(bn_cls: type[nn.Module]) -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bn_cls(4), nn.ReLU())

    ours, theirs = model(batchnorm.BatchNorm2d), model(nn.BatchNorm2d)
    compiled = torch.compile(ours, fullgraph=True)  # a graph break is an error
    for step in range(3):
        x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(step))
        y_ours, y_theirs = compiled(x), theirs(x)
        torch.testing.assert_close(y_ours, y_theirs)
        y_ours.square().sum().backward()
        y_theirs.square().sum().backward()
    # Gradients of size ~50 summed over three steps: torch's own compiled and eager runs differ
    # by 2e-4 here (another reduction order), so the comparison allows that much.
    torch.testing.assert_close(ours[0].weight.grad, theirs[0].weight.grad, rtol=1e-4, atol=1e-3)
    assert_state_equal(ours, theirs)
    ours.eval()
    theirs.eval()
    x = torch.randn(4, 2, 6, 6)
    torch.testing.assert_close(compiled(x), theirs(x))


def test_batch_statistics_follow_to_device_and_dtype() -> None:
    bn = batchnorm.BatchNorm1d(3)
    x = torch.randn(6, 3)
    y = bn(x)
    bn.double()
    assert bn.batch_mean is not None and bn.batch_mean.dtype == torch.float64
    assert bn.batch_var is not None and bn.batch_var.dtype == torch.float64
    torch.testing.assert_close(bn.inverse(y.double()), x.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cls", [batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNorm3d, batchnorm.LazyBatchNorm2d]
)
def test_our_classes_are_instances_of_torchs(cls: type[nn.Module]) -> None:
    torch_class = getattr(nn, cls.__name__)
    assert isinstance(cls() if "Lazy" in cls.__name__ else cls(3), torch_class)


@pytest.mark.parametrize(("affine", "track"), [(True, True), (True, False), (False, True), (False, False)])
def test_lazy_modules_work_in_every_configuration(affine: bool, track: bool) -> None:
    ours = batchnorm.LazyBatchNorm1d(affine=affine, track_running_stats=track)
    theirs = nn.LazyBatchNorm1d(affine=affine, track_running_stats=track)
    x = torch.randn(8, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    assert type(ours) is batchnorm.BatchNorm1d and ours.num_features == 5
    with pytest.raises(ValueError, match="expected input with 5 channels"):
        ours(torch.randn(8, 4))


def test_functional_dispatches_torch_function_to_tensor_subclasses() -> None:
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(4, 3).as_subclass(Logged)
    y = batch_norm(x, None, None, training=True)
    assert seen[0] is batch_norm and isinstance(y, Logged)
    torch.testing.assert_close(
        y.as_subclass(torch.Tensor), F.batch_norm(x.as_subclass(torch.Tensor), None, None, training=True)
    )


@pytest.mark.parametrize("layout", ["rows_2d", "channels_last"])
def test_autocast_bfloat16_keeps_float32_statistics(layout: str) -> None:
    """Under CPU autocast the statistics, output and gradients are those computed without it."""
    x = torch.randn(256, 64) * 3 + 1 if layout == "rows_2d" else torch.randn(8, 16, 6, 6) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    make = batchnorm.BatchNorm1d if x.dim() == 2 else batchnorm.BatchNorm2d
    plain, autocast = make(x.shape[1]), make(x.shape[1])
    x_plain, x_autocast = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_plain = plain(x_plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_autocast = autocast(x_autocast)
    dy = torch.randn_like(x)
    (y_plain * dy).sum().backward()
    (y_autocast * dy).sum().backward()
    torch.testing.assert_close(y_autocast, y_plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(autocast.running_var, plain.running_var, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_autocast.grad, x_plain.grad, rtol=1e-6, atol=1e-6)
