"""ConvBatchNorm1d/2d/3d against torch's unfused ConvNd + BatchNormNd, gradcheck, and fold()."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import batchnorm
from batchnorm.bench import saved_bytes
from batchnorm.inversion import bn_statistics_distance

TOL = {"rtol": 1e-4, "atol": 1e-5}

MODULES: dict[int, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    1: (batchnorm.ConvBatchNorm1d, nn.Conv1d, nn.BatchNorm1d),
    2: (batchnorm.ConvBatchNorm2d, nn.Conv2d, nn.BatchNorm2d),
    3: (batchnorm.ConvBatchNorm3d, nn.Conv3d, nn.BatchNorm3d),
}

# name -> constructor keywords beyond (in_channels=4, out_channels=6, kernel_size=3)
CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "stride_padding_bias": {"stride": 2, "padding": 1, "bias": True},
    "dilation_groups": {"dilation": 2, "groups": 2, "padding": 2},
    "not_affine": {"affine": False},
    "not_tracking": {"track_running_stats": False},
}


def _pair(dims: int, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    cls, conv_cls, bn_cls = MODULES[dims]
    ours = cls(4, 6, 3, **kwargs)
    if ours.bn.affine:
        with torch.no_grad():
            ours.bn.weight.uniform_(0.5, 1.5)
            ours.bn.bias.uniform_(-0.5, 0.5)
    conv_keys = ("stride", "padding", "dilation", "groups", "bias")
    conv_kwargs = {"bias": False} | {k: v for k, v in kwargs.items() if k in conv_keys}  # our default: no bias
    conv = conv_cls(4, 6, 3, **conv_kwargs)
    bn = bn_cls(6, **{k: v for k, v in kwargs.items() if k not in conv_keys})
    oracle = nn.Sequential()
    oracle.add_module("conv", conv)
    oracle.add_module("bn", bn)
    oracle.load_state_dict(ours.state_dict())  # same keys: conv.*, bn.*
    return ours, oracle


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_matches_unfused_torch(dims: int, case: str, training: bool) -> None:
    ours, oracle = _pair(dims, **CASES[case])
    if not training and ours.bn.running_mean is not None:
        with torch.no_grad():
            for module in (ours.bn, oracle.bn):
                module.running_mean.fill_(0.3)
                module.running_var.fill_(1.7)
    ours.train(training)
    oracle.train(training)
    x = torch.randn(3, 4, *([7] * dims))
    for _ in range(2):
        leaf_ours, leaf_oracle = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ours, out_oracle = ours(leaf_ours), oracle(leaf_oracle)
        torch.testing.assert_close(out_ours, out_oracle, **TOL)
        grad = torch.randn_like(out_oracle)
        out_ours.backward(grad)
        out_oracle.backward(grad)
        torch.testing.assert_close(leaf_ours.grad, leaf_oracle.grad, **TOL)
        oracle_params = dict(oracle.named_parameters())
        for name, parameter in ours.named_parameters():
            torch.testing.assert_close(parameter.grad, oracle_params[name].grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, ours_value), oracle_value in zip(ours.state_dict().items(), oracle.state_dict().values(), strict=True):
        torch.testing.assert_close(ours_value, oracle_value, **TOL, msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ["plain", "stride_padding_bias"])
def test_gradcheck(case: str, training: bool) -> None:
    ours = batchnorm.ConvBatchNorm2d(2, 2, 3, **CASES[case]).double()
    with torch.no_grad():
        ours.bn.weight.uniform_(0.5, 1.5)
        ours.bn.running_var.fill_(1.5)
    ours.train(training)
    ours.bn.momentum = 0.0  # gradcheck calls forward many times; keep the running statistics put
    params = dict(ours.named_parameters())
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)

    def fn(x: Tensor, *values: Tensor) -> Tensor:
        result: Tensor = torch.func.functional_call(ours, dict(zip(params, values, strict=True)), (x,))
        return result

    assert torch.autograd.gradcheck(fn, (x, *(p.detach().clone().requires_grad_() for p in params.values())))


def test_saves_only_the_convolution_input() -> None:
    ours = batchnorm.ConvBatchNorm2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    # x, conv weight (6*4*3*3), bn weight, mean, r (6 each): no (2, 6, 8, 8) conv output
    assert saved_bytes(lambda: ours(x)) == (x.numel() + 6 * 4 * 3 * 3 + 3 * 6) * 4


def test_saved_bytes_of_a_stack_against_torch() -> None:
    """The issue's target as a count: <= 0.70x torch's Conv2d + BatchNorm2d + LeakyReLU stack."""
    channels, blocks = 8, 3
    ours = nn.Sequential(
        *(
            m
            for _ in range(blocks)
            for m in (batchnorm.ConvBatchNorm2d(channels, channels, 3, padding=1), nn.LeakyReLU())
        )
    )
    theirs = nn.Sequential(
        *(
            m
            for _ in range(blocks)
            for m in (nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.LeakyReLU())
        )
    )
    x = torch.randn(8, channels, 16, 16)
    ratio = saved_bytes(lambda: ours(x)) / saved_bytes(lambda: theirs(x))
    assert ratio <= 0.70


def test_fold_equals_eval_mode() -> None:
    ours = batchnorm.ConvBatchNorm2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
    with torch.no_grad():
        ours.bn.weight.uniform_(0.5, 1.5)
        ours.bn.bias.uniform_(-0.5, 0.5)
    for _ in range(3):
        ours(torch.randn(8, 4, 9, 9) * 2 + 1)  # running statistics away from (0, 1)
    ours.eval()
    folded = ours.fold()
    assert type(folded) is nn.Conv2d and not folded.training
    x = torch.randn(5, 4, 9, 9)
    # the oracle: torch's unfused pair in eval mode with the same state
    oracle = nn.Sequential()
    oracle.add_module("conv", nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True))
    oracle.add_module("bn", nn.BatchNorm2d(6))
    oracle.load_state_dict(ours.state_dict())
    oracle.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), oracle(x), **TOL)
        torch.testing.assert_close(ours(x), oracle(x), **TOL)


def test_fold_refuses_training_mode_and_missing_statistics() -> None:
    with pytest.raises(ValueError, match="expected a module in eval mode"):
        batchnorm.ConvBatchNorm2d(2, 2, 1).fold()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        batchnorm.ConvBatchNorm2d(2, 2, 1, track_running_stats=False).eval().fold()


def test_state_dict_keys() -> None:
    keys = set(batchnorm.ConvBatchNorm2d(2, 3, 3, bias=True).state_dict())
    assert keys == {
        "conv.weight",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }


@pytest.mark.parametrize(
    ("make_input", "error", "message"),
    [
        (lambda: torch.randn(2, 3, 5), ValueError, r"expected 4D input .* got 3D"),
        (lambda: torch.randn(2, 5, 5, 5), ValueError, "expected input with 2 channels .* got 5"),
        (lambda: torch.randn(2, 2, 5, 5, dtype=torch.float64), TypeError, "dtype torch.float32, got torch.float64"),
        (lambda: torch.ones(2, 2, 5, 5, dtype=torch.long), TypeError, "floating-point input"),
    ],
)
def test_bad_input_raises_and_changes_nothing(make_input: Any, error: type[Exception], message: str) -> None:
    ours = batchnorm.ConvBatchNorm2d(2, 3, 3)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(error, match=message):
        ours(make_input())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_string_padding_is_refused() -> None:
    with pytest.raises(ValueError, match="expected padding to be an int or a tuple of 2 ints, got 'same'"):
        batchnorm.ConvBatchNorm2d(2, 3, 3, padding="same")  # type: ignore[arg-type]


def test_conv_batch_norm_under_autocast_matches_the_unfused_pair() -> None:
    torch.manual_seed(0)
    fused = batchnorm.ConvBatchNorm2d(3, 4, 3, padding=1)
    unfused = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4))
    unfused[0].weight.data.copy_(fused.conv.weight.data)
    x = torch.randn(2, 3, 6, 6)
    outputs, grads = [], []
    for model in (fused, unfused):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(leaf)
        y.float().square().sum().backward()
        outputs.append(y.float())
        grads.append((leaf.grad, next(model.parameters()).grad))
    assert grads[0][0].dtype == torch.float32 and grads[0][1].dtype == torch.float32
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)
    for ours, theirs in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=5e-2, atol=5e-2)


def _trained_conv_block() -> tuple[batchnorm.ConvBatchNorm2d, torch.nn.Sequential]:
    """A ConvBatchNorm2d and the equal unfused pair, after a few training steps."""
    torch.manual_seed(0)
    fused = batchnorm.ConvBatchNorm2d(3, 4, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        fused.bn.weight.uniform_(0.5, 2.0)
        fused.bn.bias.uniform_(-1.0, 1.0)
    unfused = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=torch.float64),
        torch.nn.BatchNorm2d(4, dtype=torch.float64),
    )
    unfused[0].load_state_dict(fused.conv.state_dict())
    unfused[1].load_state_dict(fused.bn.state_dict())
    for step in range(3):
        x = torch.randn(6, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step)) * 2 + 1
        fused(x), unfused(x)
    return fused, unfused


def test_tools_see_the_batch_norm_inside_conv_batch_norm() -> None:
    fused, unfused = _trained_conv_block()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    fused.eval(), unfused.eval()
    torch.testing.assert_close(batchnorm.freeze(fused)(x), unfused(x))
    torch.testing.assert_close(batchnorm.to_torch(fused)(x), unfused(x))
    batches = [torch.randn(8, 3, 5, 5, dtype=torch.float64) * 3 for _ in range(3)]
    batchnorm.recalibrate(fused, batches)
    batchnorm.recalibrate(unfused, batches)
    torch.testing.assert_close(fused.bn.running_var, unfused[1].running_var)
    torch.testing.assert_close(fused(x), unfused(x))
    assert bn_statistics_distance(fused, x) == pytest.approx(bn_statistics_distance(unfused, x), rel=1e-9)
