"""The constructor every variant shares, and the tools' refusal of batch norms they do not know."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.inversion import bn_statistics_distance

# Every batch-norm variant, with the arguments of its own that it needs.
VARIANTS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "BatchNorm": (batchnorm.BatchNorm, {}),
    "BatchNorm2d": (batchnorm.BatchNorm2d, {}),
    "SyncBatchNorm": (batchnorm.SyncBatchNorm, {"process_group": None}),
    "GhostBatchNorm": (batchnorm.GhostBatchNorm, {"virtual_batch_size": 2}),
    "BatchRenorm": (batchnorm.BatchRenorm, {"rmax": 2.0, "dmax": 1.0}),
    "BatchNormAct": (batchnorm.BatchNormAct, {"activation": "elu", "activation_param": 0.5}),
    "BatchNormAct2d": (batchnorm.BatchNormAct2d, {"activation": "silu"}),
    "InPlaceABN": (batchnorm.InPlaceABN, {"activation": "elu", "min_abs_weight": 1e-3}),
    "SyncBatchNormAct": (batchnorm.SyncBatchNormAct, {"activation": "relu"}),
}
TORCH_ARGUMENTS = {"eps": 1e-3, "momentum": None, "affine": True, "track_running_stats": True}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_takes_torchs_whole_constructor(name: str) -> None:
    cls, own = VARIANTS[name]
    ours = cls(4, **TORCH_ARGUMENTS, device="cpu", dtype=torch.float64, bias=False, **own)
    theirs = nn.BatchNorm2d(4, **TORCH_ARGUMENTS, device="cpu", dtype=torch.float64, bias=False)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert ours.bias is None and ours.weight.dtype == ours.running_mean.dtype == torch.float64
    for attribute, value in own.items():
        assert getattr(ours, attribute) == value, attribute
    not_tracking = (
        cls(4, 1e-3, 0.3, False, False, **own) if name != "GhostBatchNorm" else cls(4, 2, 1e-3, 0.3, False, False)
    )
    assert not_tracking.weight is None and not_tracking.running_mean is None and not_tracking.momentum == 0.3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_shows_torchs_constructor_in_its_signature(name: str) -> None:
    """What help() shows: torch's parameters with torch's defaults, then the variant's own."""
    cls, own = VARIANTS[name]
    ours = inspect.signature(cls).parameters
    for parameter in inspect.signature(nn.BatchNorm2d).parameters.values():
        assert parameter.name in ours, parameter.name
        assert ours[parameter.name].default == parameter.default, parameter.name
    assert ours["bias"].kind is inspect.Parameter.KEYWORD_ONLY and ours["bias"].default is True
    assert set(own) <= set(ours)


def test_a_variant_checks_its_own_arguments_and_refuses_unknown_ones() -> None:
    with pytest.raises(ValueError, match="GhostBatchNorm: expected virtual_batch_size to be a positive int, got 0"):
        batchnorm.GhostBatchNorm(4, virtual_batch_size=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'rmax'"):
        batchnorm.BatchNormAct(4, rmax=2.0)
    with pytest.raises(TypeError, match="missing a required argument: 'virtual_batch_size'"):
        batchnorm.GhostBatchNorm(4)


def test_the_flow_takes_device_and_dtype() -> None:
    flow = batchnorm.BatchNormFlow(3, device="cpu", dtype=torch.float64)
    assert {tensor.dtype for name, tensor in flow.state_dict().items() if name != "num_batches_tracked"} == {
        torch.float64
    }


class ForeignBatchNormAct(nn.BatchNorm2d):
    """Another library's batch norm + activation (timm's shape, another name): a subclass of
    torch's batch norm whose forward adds something no tool knows about."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.Tanh()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(input))  # type: ignore[no-any-return]


TOOLS: dict[str, Callable[[nn.Module], Any]] = {
    "to_torch": batchnorm.to_torch,
    "freeze": batchnorm.freeze,
    "fold": lambda model: batchnorm.fold(model.eval()),
    "convert_sync_batchnorm": batchnorm.SyncBatchNorm.convert_sync_batchnorm,
    "recalibrate": lambda model: batchnorm.recalibrate(model, [torch.randn(4, 3, 2, 2)]),
    "bn_statistics_distance": lambda model: bn_statistics_distance(model, torch.randn(4, 3, 2, 2)),
    "invert": lambda model: batchnorm.invert(model, torch.zeros(4, 3, 2, 2), input_shape=(4, 3, 2, 2), bn_prior=1.0),
}


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_tool_refuses_a_batch_norm_it_does_not_know_naming_it_and_changing_nothing(tool: str) -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), ForeignBatchNormAct(3))
    first, second = model[0], model[1]
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected batch norms it knows .* got 1 \(ForeignBatchNormAct\)"):
        TOOLS[tool](model)
    assert model[0] is first and model[1] is second
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_from_torch_names_a_batch_norm_it_does_not_know_and_leaves_it() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), ForeignBatchNormAct(3))
    with pytest.warns(UserWarning, match=r"1 \(ForeignBatchNormAct\)"):
        converted = batchnorm.from_torch(model)
    assert type(converted[0]) is batchnorm.BatchNorm2d and type(converted[1]) is ForeignBatchNormAct
    with pytest.raises(ValueError, match=r"from_torch: expected only batch norms it can convert, got 1 \("):
        batchnorm.from_torch(model, strict=True)


def test_every_class_of_the_package_declares_the_protocol() -> None:
    from batchnorm._protocol import DECLARATIONS, Kept, Refused, SupportsBatchNormTools

    assert {name for name in dir(SupportsBatchNormTools) if not name.startswith("_")} <= DECLARATIONS

    classes = [value for value in vars(batchnorm).values() if isinstance(value, type) and issubclass(value, nn.Module)]
    assert len(classes) == 20
    for cls in classes:
        assert set(dir(cls)) >= DECLARATIONS, (cls.__name__, DECLARATIONS - set(dir(cls)))
        for tool in (cls.torch_equivalent, cls.sync_equivalent, cls.frozen_equivalent):
            answer = tool()
            assert isinstance(answer, (Kept, Refused)) or issubclass(answer, nn.Module), (cls.__name__, answer)


def test_recalibrate_leaves_the_frozen_batch_norm_inside_a_convolution_block() -> None:
    """The state, not the container, says whether statistics are fixed."""
    model = batchnorm.freeze(nn.Sequential(batchnorm.ConvBatchNorm2d(3, 3, 3)).eval())
    frozen = model[0].bn
    before = frozen.running_var.clone()
    batchnorm.recalibrate(model, [torch.randn(4, 3, 5, 5) * 3])
    assert isinstance(frozen, batchnorm.FrozenBatchNorm) and torch.equal(frozen.running_var, before)


class LoggingBatchNorm2d(batchnorm.BatchNorm2d):
    """A user's subclass of ours with its own forward, declaring nothing."""

    def forward(self, input: torch.Tensor, **keywords: Any) -> torch.Tensor:
        return super().forward(input, **keywords) * 2


class DeclaredBatchNorm2d(LoggingBatchNorm2d):
    """The same, declaring what the tools may do with it."""

    @classmethod
    def sync_equivalent(cls) -> Any:
        from batchnorm._protocol import Refused

        return Refused("doubles its output")


def test_a_subclass_of_ours_that_declares_nothing_is_not_converted_as_its_base() -> None:
    with pytest.raises(ValueError, match=r"got 0 \(LoggingBatchNorm2d\)"):
        batchnorm.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(LoggingBatchNorm2d(3)))
    with pytest.raises(ValueError, match=r"cannot convert 0 \(DeclaredBatchNorm2d\): doubles its output"):
        batchnorm.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(DeclaredBatchNorm2d(3)))
