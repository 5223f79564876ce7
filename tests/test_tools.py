"""fold, recalibrate, from_torch, to_torch and freeze against independent references."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm import FrozenBatchNorm, SyncBatchNorm, fold, fold_conv_bn, fold_linear_bn, freeze, recalibrate


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(current[key], value), key


def trained_bn(bn: nn.Module, channels: int, gen: torch.Generator) -> nn.Module:
    """Random affine and running statistics away from (0, 1); float64."""
    bn = bn.double()
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) * 3 + 0.1)
    return bn


# ---------------------------------------------------------------------------------------------
# fold
# ---------------------------------------------------------------------------------------------

LAYERS: dict[str, tuple[Callable[[bool], nn.Module], tuple[int, ...], int]] = {
    # name: (layer given bias, input shape, output channels)
    "conv1d": (lambda bias: nn.Conv1d(3, 4, 3, bias=bias), (2, 3, 9), 4),
    "conv2d": (lambda bias: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=bias), (2, 4, 5, 5), 6),
    "conv3d": (lambda bias: nn.Conv3d(2, 3, 2, stride=2, bias=bias), (2, 2, 4, 4, 4), 3),
    "conv_transpose1d": (lambda bias: nn.ConvTranspose1d(3, 4, 3, bias=bias), (2, 3, 7), 4),
    "conv_transpose2d": (lambda bias: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=bias), (2, 4, 3, 3), 6),
    "conv_transpose3d": (lambda bias: nn.ConvTranspose3d(2, 3, 2, bias=bias), (2, 2, 3, 3, 3), 3),
    "linear": (lambda bias: nn.Linear(5, 4, bias=bias), (6, 5), 4),
}
BNS: dict[str, Callable[[int], nn.Module]] = {
    "torch": lambda c: nn.BatchNorm1d(c) if c == 4 else nn.BatchNorm2d(c),  # torch checks the rank only in forward
    "ours": lambda c: batchnorm.BatchNorm(c),
    "ours_not_affine": lambda c: batchnorm.BatchNorm(c, affine=False),
    "frozen": lambda c: FrozenBatchNorm(c),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("bn_kind", list(BNS))
@pytest.mark.parametrize("layer_kind", list(LAYERS))
def test_fold_equals_the_unfolded_model(layer_kind: str, bn_kind: str, bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    make_layer, shape, channels = LAYERS[layer_kind]
    torch.manual_seed(0)
    bn = trained_bn(BNS[bn_kind](channels), channels, gen)
    if bn_kind == "torch":  # torch's per-rank input check, bypassed: the rank is the layer's
        bn._check_input_dim = lambda input: None  # type: ignore[method-assign]
    model = nn.Sequential(make_layer(bias).double(), bn, nn.Tanh()).eval()
    before = state(model)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    expected = model(x)
    folded = fold(model, example_input=x)
    assert isinstance(folded[1], nn.Identity) and type(folded[0]) is type(model[0])
    assert not folded.training and folded[0].bias is not None
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)
    assert_same_state(model, before)  # the argument is untouched
    assert isinstance(model[1], type(bn))


def test_fold_keeps_float32_layers_float32_and_close() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), batchnorm.BatchNorm2d(4)
    )
    model(torch.randn(16, 3, 8, 8) * 3 + 1)  # running statistics from data
    model.eval()
    folded = fold(model)
    assert [type(m).__name__ for m in folded] == ["Conv2d", "Identity", "ReLU", "Conv2d", "Identity"]
    assert folded[0].weight.dtype == torch.float32
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_only_folds_consecutive_sequential_children() -> None:
    class Block(nn.Module):
        """conv then bn as attributes: registration order says nothing about execution order."""

        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.bn(x))

    model = nn.Sequential(
        Block(),
        nn.Conv2d(3, 3, 1),
        nn.ReLU(),
        nn.BatchNorm2d(3),  # follows a ReLU: kept
        nn.Conv2d(3, 3, 1),
        batchnorm.BatchNorm2d(3, track_running_stats=False),  # no running statistics: kept
    ).eval()
    folded = fold(model)
    assert [type(m).__name__ for m in folded] == ["Block", "Conv2d", "ReLU", "BatchNorm2d", "Conv2d", "BatchNorm2d"]
    assert type(folded[0].bn).__name__ == "BatchNorm2d"
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(folded(x), model(x))


def _linear_then_batch_norm() -> nn.Sequential:
    """Linear(5, 3) then BatchNorm1d(3), with running statistics away from 0 and 1."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 3), batchnorm.BatchNorm1d(3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-2.0, 2.0)
        model[1].running_var.uniform_(0.5, 3.0)
        model[1].weight.uniform_(0.5, 2.0)
    return model.eval()


def test_fold_keeps_a_linear_batch_norm_pair_whose_batch_norm_sees_channels_not_features() -> None:
    """On (N, C, L) input the Linear acts on L and the batch norm on C; with C equal to the
    Linear's output features by coincidence, folding would give a wrong model with no error."""
    model = _linear_then_batch_norm()
    x = torch.randn(4, 3, 5, dtype=torch.float64)  # C = 3 = out_features, L = 5 = in_features
    expected = model(x)
    folded = fold(model, example_input=x)
    assert type(folded[1]) is batchnorm.BatchNorm1d and type(folded[0]) is nn.Linear
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)
    with pytest.warns(
        UserWarning, match=r"fold: kept 1 batch norm\(s\) after a Linear: 1 \(BatchNorm1d\); .*example_input"
    ):
        unproven = fold(model)
    assert type(unproven[1]) is batchnorm.BatchNorm1d
    torch.testing.assert_close(unproven(x), expected, rtol=0, atol=0)


def test_fold_folds_a_linear_batch_norm_pair_proven_two_dimensional() -> None:
    model = _linear_then_batch_norm()
    x = torch.randn(6, 5, dtype=torch.float64)
    example = x[:2].clone()
    folded = fold(model, example_input=example)
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(example, x[:2], rtol=0, atol=0)  # the example input is untouched


def test_fold_refuses_training_mode_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"fold: expected a model in eval mode \(call model.eval\(\)\), got training"):
        fold(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match=r"training mode in 1"):
        fold(model)
    assert isinstance(model[1], nn.BatchNorm1d) and not model[0].training


def test_fold_pair_helpers_validate_their_arguments() -> None:
    conv, linear, bn = nn.Conv2d(3, 4, 1), nn.Linear(3, 4), nn.BatchNorm2d(4).eval()
    with pytest.raises(TypeError, match="fold_conv_bn: expected a Conv1d/2d/3d or ConvTranspose1d/2d/3d, got Linear"):
        fold_conv_bn(linear, bn)
    with pytest.raises(TypeError, match=r"fold_linear_bn: expected a torch\.nn\.Linear, got Conv2d"):
        fold_linear_bn(conv, bn)
    with pytest.raises(TypeError, match=r"fold_conv_bn: expected a batch norm .* got ReLU"):
        fold_conv_bn(conv, nn.ReLU())
    with pytest.raises(ValueError, match="output channels, got num_features=5"):
        fold_conv_bn(conv, nn.BatchNorm2d(5).eval())
    with pytest.raises(ValueError, match="fold_linear_bn: expected the batch norm in eval mode"):
        fold_linear_bn(linear, nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="expected a batch norm with running statistics"):
        fold_conv_bn(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())


# ---------------------------------------------------------------------------------------------
# recalibrate
# ---------------------------------------------------------------------------------------------


def recal_model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, momentum=0.3),
        nn.ReLU(),
        nn.Flatten(),  # (N, 3, 4, 4) -> (N, 48)
        nn.Linear(48, 5),
        batchnorm.BatchNorm1d(5, momentum=None),
    ).double()


def population_stats(model: nn.Module, data: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each BN's input over all batches, as in training, pooled; mean and unbiased variance, written out."""
    conv, bn1, lin = model[0], model[1], model[4]
    inputs1, inputs2 = [], []
    for x in data:
        z1 = conv(x)
        inputs1.append(z1.transpose(0, 1).reshape(3, -1))  # (N, 3, 4, 4) -> (3, N * 16)
        h = F.batch_norm(z1, None, None, bn1.weight, bn1.bias, training=True)  # batch statistics
        inputs2.append(lin(torch.relu(h).flatten(1)).t())  # (N, 5) -> (5, N)
    pooled = []
    for values in (torch.cat(inputs1, 1), torch.cat(inputs2, 1)):
        mean = values.mean(1)
        pooled.append((mean, ((values - mean[:, None]) ** 2).sum(1) / (values.shape[1] - 1)))
    return pooled


def test_recalibrate_sets_pooled_population_statistics_in_place_and_restores_the_rest() -> None:
    model = recal_model()
    gen = torch.Generator().manual_seed(3)
    # Batches with different means: the average of per-batch variances misses their spread.
    data = [
        torch.randn(n, 2, 6, 6, generator=gen, dtype=torch.float64) + shift for n, shift in [(4, -1), (7, 2), (5, 0)]
    ]
    model(data[0])  # some history in the running statistics and counters
    model.eval()
    model[5].train()  # a mixed mode, to be restored as it was
    parameters = {key: value.clone() for key, value in model.named_parameters()}
    counters = [model[1].num_batches_tracked.item(), model[5].num_batches_tracked.item()]

    with torch.no_grad():
        expected = population_stats(model, data)
    assert recalibrate(model, [(x, None) for x in data], progress=True) is model

    for bn, (mean, var) in zip((model[1], model[5]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
    per_batch = torch.stack([model[0](x).transpose(0, 1).reshape(3, -1).var(1) for x in data]).mean(0)
    assert not torch.allclose(per_batch, expected[0][1], rtol=1e-2)  # the oracle tells the two apart
    assert (model.training, model[1].training, model[5].training) == (False, False, True)
    assert (model[1].momentum, model[5].momentum) == (0.3, None)
    assert [model[1].num_batches_tracked.item(), model[5].num_batches_tracked.item()] == counters
    for key, value in model.named_parameters():
        assert torch.equal(value, parameters[key]), key


def test_recalibrate_uses_at_most_num_batches() -> None:
    model, reference = recal_model(), recal_model()
    gen = torch.Generator().manual_seed(4)
    data = [torch.randn(4, 2, 6, 6, generator=gen, dtype=torch.float64) * (k + 1) for k in range(4)]
    recalibrate(model, iter(data), num_batches=2)
    recalibrate(reference, data[:2])
    assert torch.equal(model[5].running_var, reference[5].running_var)
    assert not torch.allclose(recalibrate(recal_model(), data)[5].running_var, reference[5].running_var)


def test_recalibrate_failure_changes_nothing() -> None:
    model = recal_model()
    model(torch.randn(4, 2, 6, 6, dtype=torch.float64))
    model.eval()
    before = state(model)
    bad = [torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(4, 3, 6, 6, dtype=torch.float64)]
    with pytest.raises(RuntimeError):
        recalibrate(model, bad)
    assert_same_state(model, before)
    assert not model.training and model[1].momentum == 0.3 and model[5].momentum is None
    with pytest.raises(ValueError, match="recalibrate: expected at least one batch, got none"):
        recalibrate(model, [])
    with pytest.raises(ValueError, match="recalibrate: expected num_batches to be a positive int or None, got 0"):
        recalibrate(model, bad, num_batches=0)
    with pytest.raises(TypeError, match=r"recalibrate: expected a torch\.nn\.Module, got list"):
        recalibrate([], bad)  # type: ignore[arg-type]
    assert_same_state(model, before)


# ---------------------------------------------------------------------------------------------
# from_torch, to_torch, freeze
# ---------------------------------------------------------------------------------------------


def torch_model() -> nn.Module:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3),
        nn.BatchNorm1d(3, eps=1e-3, momentum=0.2),
        nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, affine=False)),
        nn.BatchNorm3d(4, track_running_stats=False),
    )
    model[1](torch.randn(8, 3, 5) * 2 + 1)
    model[1].eval()
    return model


def compare_models(a: nn.Module, b: nn.Module) -> None:
    for (name_a, ma), (name_b, mb) in zip(a.named_modules(), b.named_modules(), strict=True):
        assert name_a == name_b and ma.training == mb.training, name_a
    assert_same_state(b, state(a))
    for module_a, module_b in zip(a.modules(), b.modules(), strict=True):
        for attr in ("eps", "momentum", "affine", "track_running_stats"):
            assert getattr(module_a, attr, None) == getattr(module_b, attr, None)
    a, b = copy.deepcopy(a), copy.deepcopy(b)  # training-mode forwards below move running statistics
    x1, x2, x3 = torch.randn(4, 3, 5), torch.randn(4, 2, 3, 3), torch.randn(4, 4, 2, 2, 2)
    torch.testing.assert_close(a[1](x1), b[1](x1))
    torch.testing.assert_close(a[2][1](x2), b[2][1](x2))
    torch.testing.assert_close(a[3](x3), b[3](x3))


def test_from_torch_and_back_keep_weights_buffers_and_mode_and_leave_the_argument() -> None:
    original = torch_model()
    saved = state(original)
    ours = batchnorm.from_torch(original)
    assert [type(m) for m in (ours[1], ours[2][1], ours[3])] == [
        batchnorm.BatchNorm1d,
        batchnorm.BatchNorm2d,
        batchnorm.BatchNorm3d,
    ]
    assert ours[0] is not original[0] and ours[1].weight is not original[1].weight
    compare_models(torch_model(), ours)
    back = batchnorm.to_torch(ours)
    assert [type(m) for m in (back[1], back[2][1], back[3])] == [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]
    compare_models(torch_model(), back)
    assert_same_state(original, saved)
    assert type(original[1]) is nn.BatchNorm1d and type(ours[1]) is batchnorm.BatchNorm1d


def test_to_torch_maps_sync_batch_norm_and_keeps_modules_without_a_torch_counterpart() -> None:
    model = nn.Sequential(SyncBatchNorm(3, process_group="g"), batchnorm.BatchNorm(3), batchnorm.GhostBatchNorm(3, 2))
    converted = batchnorm.to_torch(model)
    assert type(converted[0]) is nn.SyncBatchNorm and converted[0].process_group == "g"
    assert [type(m) for m in converted[1:]] == [batchnorm.BatchNorm, batchnorm.GhostBatchNorm]
    assert type(batchnorm.from_torch(converted)[0]) is SyncBatchNorm
    with pytest.raises(ValueError, match=r"0 \(LazyBatchNorm1d\): expected a materialized batch norm"):
        batchnorm.to_torch(nn.Sequential(batchnorm.LazyBatchNorm1d()))


def test_freeze_equals_eval_in_any_mode_and_leaves_the_argument() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), batchnorm.BatchNorm2d(3, affine=False))
    model(torch.randn(8, 2, 6, 6) * 2 + 1)
    saved = state(model)
    frozen = freeze(model)
    assert [type(m) for m in frozen] == [nn.Conv2d, FrozenBatchNorm, nn.ReLU, FrozenBatchNorm]
    assert frozen.training  # mode kept; frozen layers ignore it
    assert [name for name, _ in frozen.named_parameters()] == ["0.weight", "0.bias"]
    x = torch.randn(4, 2, 6, 6)
    reference = copy.deepcopy(model).eval()
    torch.testing.assert_close(frozen(x), reference(x))
    assert_same_state(model, saved) and model.training
    with pytest.raises(ValueError, match=r"freeze: expected every batch norm to have running statistics, got 1 \("):
        freeze(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3, track_running_stats=False)))


@pytest.mark.parametrize("tool", [fold, freeze, batchnorm.from_torch, batchnorm.to_torch])
def test_tools_refuse_what_is_not_a_module(tool: Callable[[Any], Any]) -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got int"):
        tool(3)


def test_from_torch_and_back_keep_bias_false() -> None:
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4, bias=False))
    converted = batchnorm.from_torch(model)
    assert type(converted[0]) is batchnorm.BatchNorm2d and converted[0].bias is None
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(converted(x), model(x))
    back = batchnorm.to_torch(converted)
    assert type(back[0]) is torch.nn.BatchNorm2d and back[0].bias is None


FUSED_BLOCKS = {
    "batch_norm_act_relu": lambda: batchnorm.BatchNormAct(4, activation="relu"),
    "batch_norm_act_silu": lambda: batchnorm.BatchNormAct(4, activation="silu"),
    "inplace_abn_elu": lambda: batchnorm.InPlaceABN(4, activation="elu", activation_param=0.5),
}


def _trained_block(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FUSED_BLOCKS[name]())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    model(torch.randn(8, 3, 6, 6) * 2 + 1)  # running statistics away from 0 and 1
    return model.eval()


@pytest.mark.parametrize("name", list(FUSED_BLOCKS))
def test_fold_and_freeze_keep_the_activation_of_fused_blocks(name: str) -> None:
    model = _trained_block(name)
    x = torch.randn(2, 3, 6, 6)
    expected = model(x.clone())
    folded, frozen = fold(model), freeze(model)
    assert not isinstance(folded[1], nn.Identity) and isinstance(frozen[1], batchnorm.FrozenBatchNormAct)
    torch.testing.assert_close(folded(x.clone()), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen(x.clone()), expected)
    frozen.train()
    torch.testing.assert_close(frozen(x.clone()), expected)
