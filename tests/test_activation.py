"""BatchNormAct and InPlaceABN against torch's unfused BatchNorm + activation, and gradcheck."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import batchnorm
from batchnorm.activation import batch_norm_act, inplace_abn
from batchnorm.bench import saved_bytes

from .conftest import TorchBatchNormAnyRank, assert_state_equal

TOL = {"rtol": 1e-4, "atol": 1e-5}

# name -> (activation, activation_param, torch's module)
ACTIVATIONS: dict[str, tuple[str, float | None, Callable[[], nn.Module]]] = {
    "relu": ("relu", None, nn.ReLU),
    "leaky_relu": ("leaky_relu", 0.1, lambda: nn.LeakyReLU(0.1)),
    "leaky_relu_default": ("leaky_relu", None, lambda: nn.LeakyReLU(0.01)),
    "elu": ("elu", 0.7, lambda: nn.ELU(0.7)),
    "silu": ("silu", None, nn.SiLU),
    "identity": ("identity", None, nn.Identity),
}
INVERTIBLE = ("leaky_relu", "leaky_relu_default", "elu", "identity")


def _randomize(module: nn.Module) -> None:
    """Weights away from 1, biases away from 0, running statistics away from (0, 1)."""
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)


def _pair(cls: type[nn.Module], case: str, channels: int = 3, **kwargs: object) -> tuple[nn.Module, nn.Module]:
    """Ours and the oracle nn.Sequential(torch batch norm, torch activation) with equal state."""
    activation, param, torch_activation = ACTIVATIONS[case]
    ours = cls(channels, activation=activation, activation_param=param, **kwargs)
    _randomize(ours)
    bn = TorchBatchNormAnyRank(channels)
    bn.load_state_dict(ours.state_dict())
    return ours, nn.Sequential(bn, torch_activation())


def _compare(ours: nn.Module, oracle: nn.Module, x: Tensor, training: bool, *, in_place: bool, steps: int = 2) -> None:
    """Outputs, input and parameter gradients and running statistics over ``steps`` steps."""
    ours.train(training)
    oracle.train(training)
    for _ in range(steps):
        leaf_ours, leaf_oracle = x.clone().requires_grad_(), x.clone().requires_grad_()
        # InPlaceABN overwrites its input: give it a non-leaf, as a convolution's output would be.
        input_ours = leaf_ours * 1.0 if in_place else leaf_ours
        out_ours, out_oracle = ours(input_ours), oracle(leaf_oracle)
        grad = torch.randn_like(out_oracle)
        out_ours.backward(grad)
        out_oracle.backward(grad)
        torch.testing.assert_close(out_ours, out_oracle, **TOL)
        torch.testing.assert_close(leaf_ours.grad, leaf_oracle.grad, **TOL)
        bn = oracle[0]
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(ours, name).grad, getattr(bn, name).grad, rtol=1e-4, atol=1e-4)
            getattr(ours, name).grad = getattr(bn, name).grad = None
    assert_state_equal(ours, bn, **TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(ACTIVATIONS))
def test_batch_norm_act_matches_unfused_torch(case: str, training: bool) -> None:
    ours, oracle = _pair(batchnorm.BatchNormAct, case)
    _compare(ours, oracle, torch.randn(8, 3, 5, 4), training, in_place=False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", INVERTIBLE)
def test_inplace_abn_matches_unfused_torch(case: str, training: bool) -> None:
    ours, oracle = _pair(batchnorm.InPlaceABN, case)
    _compare(ours, oracle, torch.randn(8, 3, 5, 4), training, in_place=True)


@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 7), (2, 3, 3, 4, 2)], ids=["2d", "3d", "5d"])
@pytest.mark.parametrize("cls", [batchnorm.BatchNormAct, batchnorm.InPlaceABN])
def test_any_rank(cls: type[nn.Module], shape: tuple[int, ...]) -> None:
    ours, oracle = _pair(cls, "elu")
    _compare(ours, oracle, torch.randn(shape), True, in_place=cls is batchnorm.InPlaceABN, steps=1)


def test_inplace_abn_channels_last_stays_in_place() -> None:
    ours, oracle = _pair(batchnorm.InPlaceABN, "leaky_relu")
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    expected = oracle(x)
    out = ours(x)
    assert out is x and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("cls", [batchnorm.BatchNormAct, batchnorm.InPlaceABN])
def test_not_affine_not_tracking(cls: type[nn.Module]) -> None:
    ours = cls(3, affine=False, track_running_stats=False, activation="elu")
    oracle = nn.Sequential(nn.BatchNorm2d(3, affine=False, track_running_stats=False), nn.ELU())
    x = torch.randn(6, 3, 4, 4)
    leaf_ours, leaf_oracle = x.clone().requires_grad_(), x.clone().requires_grad_()
    for training in (True, False):  # without running statistics eval uses the batch's
        ours.train(training)
        oracle.train(training)
        out_ours, out_oracle = ours(leaf_ours * 1.0), oracle(leaf_oracle)
        grad = torch.randn_like(x)
        torch.testing.assert_close(out_ours, out_oracle, **TOL)
        out_ours.backward(grad)
        out_oracle.backward(grad)
        torch.testing.assert_close(leaf_ours.grad, leaf_oracle.grad, **TOL)


# ----------------------------------------------------------------------------------------------
# gradcheck in float64: batch statistics (training) and running statistics (eval)
# ----------------------------------------------------------------------------------------------


def _gradcheck_inputs(training: bool) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, generator=generator)
    weight = torch.rand(3, dtype=torch.float64, generator=generator) + 0.5
    bias = torch.randn(3, dtype=torch.float64, generator=generator) * 0.3
    tensors = [x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()]
    if not training:
        tensors += [torch.randn(3, dtype=torch.float64) * 0.2, torch.rand(3, dtype=torch.float64) + 0.5]
    return tuple(tensors)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(ACTIVATIONS))
def test_batch_norm_act_gradcheck(case: str, training: bool) -> None:
    activation, param, _ = ACTIVATIONS[case]

    def fn(x: Tensor, weight: Tensor, bias: Tensor, *stats: Tensor) -> Tensor:
        mean, var = stats if stats else (None, None)
        return batch_norm_act(x, mean, var, weight, bias, training, activation=activation, activation_param=param)

    assert torch.autograd.gradcheck(fn, _gradcheck_inputs(training))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", INVERTIBLE)
def test_inplace_abn_gradcheck(case: str, training: bool) -> None:
    activation, param, _ = ACTIVATIONS[case]

    def fn(x: Tensor, weight: Tensor, bias: Tensor, *stats: Tensor) -> Tensor:
        mean, var = stats if stats else (None, None)
        # The clone is the tensor overwritten in place; gradcheck's own x stays intact.
        return inplace_abn(x.clone(), mean, var, weight, bias, training, activation=activation, activation_param=param)

    assert torch.autograd.gradcheck(fn, _gradcheck_inputs(training))


# ----------------------------------------------------------------------------------------------
# The in-place contract, and what it saves
# ----------------------------------------------------------------------------------------------


def test_inplace_abn_overwrites_its_input_and_returns_it() -> None:
    ours, oracle = _pair(batchnorm.InPlaceABN, "leaky_relu")
    x = torch.randn(4, 3, 5, 5)
    expected = oracle(x)
    pointer = x.data_ptr()
    out = ours(x)
    assert out.data_ptr() == pointer == x.data_ptr()
    torch.testing.assert_close(x, expected, **TOL)  # the input's storage holds the output


def test_inplace_abn_on_a_view_of_a_tensor_that_requires_grad_works_as_torch_in_place_ops() -> None:
    """A view of a non-leaf: overwritten as torch.relu_ would overwrite it, with the oracle's gradients."""
    ours, oracle = _pair(batchnorm.InPlaceABN, "leaky_relu")
    x = torch.randn(4, 3, 5, 5)
    leaf_ours, leaf_oracle = x.clone().requires_grad_(), x.clone().requires_grad_()
    base = leaf_ours * 1.0
    view = base[:, :, 1:]  # a strided view: the other positions of base keep their values
    out = ours(view)
    expected = oracle(leaf_oracle[:, :, 1:])
    assert out is view
    torch.testing.assert_close(base[:, :, 1:], expected, **TOL)
    torch.testing.assert_close(base[:, :, :1], x[:, :, :1], rtol=0, atol=0)
    dy = torch.randn_like(expected)
    (out * dy).sum().backward()
    (expected * dy).sum().backward()
    torch.testing.assert_close(leaf_ours.grad, leaf_oracle.grad, **TOL)
    torch.testing.assert_close(ours.weight.grad, oracle[0].weight.grad, **TOL)
    torch.testing.assert_close(ours.running_var, oracle[0].running_var, **TOL)


def test_inplace_abn_refuses_the_views_torch_in_place_ops_refuse_before_changing_anything() -> None:
    """Views autograd cannot rebase (one of several outputs of unbind, one made under no_grad):
    the same error as torch.relu_ gives, raised before the input or the running statistics change."""
    leaf = torch.randn(2, 4, 3, 5, requires_grad=True)
    base = leaf * 1.0
    with torch.no_grad():
        made_without_grad = base[0]
    for view in (base.unbind(0)[0], made_without_grad):
        abn = batchnorm.InPlaceABN(3)
        before = base.detach().clone()
        with pytest.raises(RuntimeError) as ours:
            abn(view)
        with pytest.raises(RuntimeError) as theirs:
            torch.relu_(view)
        assert str(ours.value).split(".")[0] == str(theirs.value).split(".")[0]
        torch.testing.assert_close(base.detach(), before, rtol=0, atol=0)
        assert abn.num_batches_tracked.item() == 0 and torch.equal(abn.running_mean, torch.zeros(3))


def test_inplace_abn_saves_only_its_output_and_vectors() -> None:
    ours = batchnorm.InPlaceABN(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True) * 1.0
    saved = saved_bytes(lambda: ours(x))
    # z (the input's storage, 300 floats) + floored gamma, beta, r (3 floats each)
    assert saved == (x.numel() + 3 * 3) * 4


def _stack(block: Callable[[], list[nn.Module]], blocks: int = 3) -> nn.Sequential:
    return nn.Sequential(*(layer for _ in range(blocks) for layer in block()))


def test_saved_bytes_of_a_conv_stack_against_torch() -> None:
    """The issue's target as a count: InPlaceABN <= 0.55x torch's conv-BN-LeakyReLU stack."""
    channels = 4
    torch_stack = _stack(
        lambda: [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.LeakyReLU(0.01)]
    )
    act_stack = _stack(lambda: [nn.Conv2d(channels, channels, 3, padding=1), batchnorm.BatchNormAct(channels)])
    abn_stack = _stack(lambda: [nn.Conv2d(channels, channels, 3, padding=1), batchnorm.InPlaceABN(channels)])
    x = torch.randn(8, channels, 16, 16)
    theirs = saved_bytes(lambda: torch_stack(x))
    act = saved_bytes(lambda: act_stack(x))
    abn = saved_bytes(lambda: abn_stack(x))
    big = x.numel() * 4
    # torch keeps x, then per block the BN input and the activation input (+ conv output of the
    # last block kept by LeakyReLU): 1 + 3 * 2 + 2 big tensors; InPlaceABN: x + one per block.
    assert theirs // big == 1 + 3 * 2 + 2
    assert abn // big == 1 + 3
    assert act // big == 1 + 3 * 2
    assert abn / theirs <= 0.55
    assert act < theirs


# ----------------------------------------------------------------------------------------------
# Zero weight, state dicts, errors
# ----------------------------------------------------------------------------------------------


def test_inplace_abn_zero_weight_is_lifted_to_min_abs_weight() -> None:
    """Documented: a channel with |gamma| < min_abs_weight computes with ±min_abs_weight and
    passes its gradient to the weight unchanged: torch with the lifted weight is the oracle."""
    ours = batchnorm.InPlaceABN(3, activation="identity", min_abs_weight=1e-3)
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([0.0, -1e-4, 2.0]))
    oracle = nn.BatchNorm2d(3)
    with torch.no_grad():
        oracle.weight.copy_(torch.tensor([1e-3, -1e-3, 2.0]))
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    ours.double()
    oracle.double()
    leaf_ours, leaf_oracle = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_oracle = ours(leaf_ours * 1.0), oracle(leaf_oracle)
    torch.testing.assert_close(out_ours, out_oracle)
    grad = torch.randn_like(x)
    out_ours.backward(grad)
    out_oracle.backward(grad)
    torch.testing.assert_close(leaf_ours.grad, leaf_oracle.grad)
    torch.testing.assert_close(ours.weight.grad, oracle.weight.grad)
    assert float(ours.weight.grad.abs().min()) > 0  # a zero weight still gets a gradient
    torch.testing.assert_close(ours.bias.grad, oracle.bias.grad)


@pytest.mark.parametrize("cls", [batchnorm.BatchNormAct, batchnorm.InPlaceABN])
def test_state_dict_interchangeable_with_batch_norm(cls: type[nn.Module]) -> None:
    source = nn.BatchNorm2d(5)
    _randomize(source)
    source.num_batches_tracked.fill_(7)
    ours = cls(5)
    ours.load_state_dict(source.state_dict())
    assert_state_equal(ours, source)
    back = batchnorm.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    assert_state_equal(back, source)


def test_skip_nonfinite_keeps_running_stats_of_a_poisoned_channel() -> None:
    for cls in (batchnorm.BatchNormAct, batchnorm.InPlaceABN):
        ours = cls(2, activation="identity")
        x = torch.randn(6, 2, 3)
        x[0, 1, 0] = float("nan")
        ours(x)
        assert torch.isfinite(ours.running_mean).all() and float(ours.running_var[1]) == 1.0
        assert float(ours.running_var[0]) != 1.0


@pytest.mark.parametrize("cls", [batchnorm.BatchNormAct, batchnorm.InPlaceABN])
def test_unknown_activation_names_the_valid_ones(cls: type[nn.Module]) -> None:
    with pytest.raises(ValueError, match=r"'leaky_relu', 'elu'.*got 'tanh'"):
        cls(3, activation="tanh")


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_inplace_abn_refuses_non_invertible_activations(activation: str) -> None:
    with pytest.raises(ValueError, match=f"got '{activation}' \\({activation} is not invertible"):
        batchnorm.InPlaceABN(3, activation=activation)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "leaky_relu", "activation_param": 0.0}, "positive negative slope"),
        ({"activation": "elu", "activation_param": -1.0}, "positive alpha"),
        ({"activation": "identity", "activation_param": 0.5}, "takes no activation_param"),
        ({"min_abs_weight": 0.0}, "min_abs_weight to be a positive number"),
    ],
)
def test_inplace_abn_invalid_parameters(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        batchnorm.InPlaceABN(3, **kwargs)  # type: ignore[arg-type]


def test_activation_param_defaults_follow_the_activation() -> None:
    assert batchnorm.InPlaceABN(2).activation_param == 0.01
    assert batchnorm.InPlaceABN(2, activation="elu").activation_param == 1.0
    assert batchnorm.BatchNormAct(2).activation_param is None


def test_inplace_abn_failed_call_changes_nothing() -> None:
    ours = batchnorm.InPlaceABN(3)
    leaf = torch.randn(4, 3, 2, 2, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        ours(leaf)
    wrong = torch.randn(4, 2, 2, 2)
    wrong_before = wrong.clone()
    with pytest.raises(ValueError, match="expected input with 3 channels"):
        ours(wrong)
    assert torch.equal(leaf.detach(), before) and torch.equal(wrong, wrong_before)
    assert int(ours.num_batches_tracked) == 0 and torch.equal(ours.running_mean, torch.zeros(3))


def test_double_backward_is_refused_clearly() -> None:
    ours = batchnorm.BatchNormAct(3, activation="silu")
    x = torch.randn(4, 3, 2, requires_grad=True)
    # The square makes the incoming gradient depend on x, so a second derivative is asked for.
    (grad,) = torch.autograd.grad(ours(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="trying to differentiate twice"):
        grad.sum().backward()
