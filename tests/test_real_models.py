"""Whole models converted by ``batchnorm.from_torch``, against the unconverted torch model.

Two small networks in the style of the libraries people convert: a ResNet (torchvision's
BasicBlock with its ``downsample`` branch, from :mod:`batchnorm.experiments.models` with torch's
batch norm) and a MobileNet (depthwise convolutions, inverted residuals) built on a
``BatchNormAct2d`` as timm's ``timm/layers/norm_act.py`` defines it. The converted model must
compute what the torch model computes (outputs, gradients, running statistics) and keep working
with the tools that walk or trace a model: ``isinstance`` loops, ``torch.fx``,
``torch.ao.quantization.fuse_modules`` and ``torch.jit.trace``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.experiments.models import BasicBlock

from .conftest import assert_state_equal, tolerances

TOL = tolerances(torch.float32)

# ---------------------------------------------------------------------------------------------
# A ResNet: BasicBlocks with downsample branches, a BatchNorm1d in the head
# ---------------------------------------------------------------------------------------------


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(8, 8, norm=nn.BatchNorm2d)
        self.layer2 = BasicBlock(8, 16, stride=2, norm=nn.BatchNorm2d)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU())
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.head(x))


# ---------------------------------------------------------------------------------------------
# A MobileNet on timm's BatchNormAct2d
# ---------------------------------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` (``timm/layers/norm_act.py``): batch norm, then drop, then act."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: type[nn.Module] = nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: type[nn.Module] | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        if apply_act:
            kwargs = {"inplace": inplace, **(act_kwargs or {})}
            self.act: nn.Module = act_layer(**kwargs)
        else:
            self.act = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # torch.nn.BatchNorm2d.forward, as timm pastes it
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = nn.functional.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class ConvBnAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, **bn: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, **bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, no activation); a shortcut where shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.conv_pw = ConvBnAct(cin, hidden, 1, act_layer=nn.SiLU)
        self.conv_dw = ConvBnAct(hidden, hidden, 3, stride, groups=hidden, act_layer=nn.SiLU)
        self.conv_pwl = ConvBnAct(hidden, cout, 1, apply_act=False)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_pwl(self.conv_dw(self.conv_pw(x)))
        return out + x if self.has_skip else out


class SmallMobileNet(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = ConvBnAct(3, 8, 3, 2)  # relu, timm's default act_layer
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 12, 2, 2))
        self.head = ConvBnAct(12, 16, 1, act_layer=nn.SiLU)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize(model: nn.Module) -> nn.Module:
    """Batch-norm state away from its initial values, so that a lost parameter or buffer shows."""
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0.0, 0.3)
            module.running_mean.normal_(0.0, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(7)
    return model


MODELS = {"resnet": SmallResNet, "mobilenet": SmallMobileNet}
ACTIVATION_NAMES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: "identity"}


def pair(name: str) -> tuple[nn.Module, nn.Module]:
    """(torch model, its conversion); the torch model is not touched by the conversion."""
    model = randomize(MODELS[name]())
    converted = batchnorm.from_torch(model)
    # Every comparison below is between two different implementations only if nothing is left
    # unconverted (test_from_torch_converts_every_batch_norm says which layer is).
    unconverted = [path for path, m in converted.named_modules() if type(m) in EXPECTED_CLASSES]
    assert not unconverted, f"from_torch left torch batch norms: {unconverted}"
    return model, converted


def inputs() -> Tensor:
    return torch.randn(4, 3, 8, 8) * 2 + 0.5


def batch_norms(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if isinstance(m, _BatchNorm)}


def step(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Output and parameter gradients of a nonlinear loss."""
    model.zero_grad()
    out = model(x.clone())
    (out**2).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


# ---------------------------------------------------------------------------------------------
# from_torch
# ---------------------------------------------------------------------------------------------

EXPECTED_CLASSES = {
    nn.BatchNorm1d: batchnorm.BatchNorm1d,
    nn.BatchNorm2d: batchnorm.BatchNorm2d,
    BatchNormAct2d: batchnorm.BatchNormAct,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_from_torch_converts_every_batch_norm(name: str) -> None:
    model = randomize(MODELS[name]())
    converted = batchnorm.from_torch(model)
    originals = batch_norms(model)
    assert len(originals) == {"resnet": 7, "mobilenet": 8}[name]
    modules = dict(converted.named_modules())
    for path, original in originals.items():
        new = modules[path]
        assert isinstance(new, EXPECTED_CLASSES[type(original)]), path
        if isinstance(original, BatchNormAct2d):
            assert new.activation == ACTIVATION_NAMES[type(original.act)], path
    # the original is left as it was
    assert all(type(m) in EXPECTED_CLASSES for m in batch_norms(model).values())
    assert_state_equal(converted, model)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_computes_as_torch(name: str, mode: str) -> None:
    model, converted = pair(name)
    model.train(mode == "train")
    converted.train(mode == "train")
    x = inputs()
    for _ in range(2):  # the second step sees the running statistics the first one updated
        out, grads = step(converted, x)
        expected_out, expected_grads = step(model, x)
        torch.testing.assert_close(out, expected_out, **TOL)
        torch.testing.assert_close(grads, expected_grads, **TOL)
    assert_state_equal(converted, model, **TOL)


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A batch norm whose forward is its own: from_torch cannot know what it computes."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


class ShiftedBatchNorm1d(nn.BatchNorm1d):
    """Another one, in the head: the warning lists every unknown layer."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + 1


def model_with_unknown_batch_norm() -> nn.Module:
    model = SmallResNet()
    model.layer1.bn2 = ScaledBatchNorm2d(8)
    model.head[1] = ShiftedBatchNorm1d(12)
    return model


def test_from_torch_warns_about_unknown_batch_norms() -> None:
    model = model_with_unknown_batch_norm()
    with pytest.warns(UserWarning, match=r"layer1\.bn2") as record:
        converted = batchnorm.from_torch(model)
    message = "\n".join(str(warning.message) for warning in record)
    for name in ("layer1.bn2", "ScaledBatchNorm2d", "head.1", "ShiftedBatchNorm1d"):
        assert name in message
    assert type(converted.layer1.bn2) is ScaledBatchNorm2d  # kept as they are
    assert type(converted.head[1]) is ShiftedBatchNorm1d
    assert type(converted.layer1.bn1) is batchnorm.BatchNorm2d  # the known ones still converted


def test_from_torch_strict_refuses_unknown_batch_norms_and_changes_nothing() -> None:
    model = model_with_unknown_batch_norm()
    before = {path: type(m) for path, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer1\.bn2.*ScaledBatchNorm2d|ScaledBatchNorm2d.*layer1\.bn2"):
        batchnorm.from_torch(model, strict=True)
    assert {path: type(m) for path, m in model.named_modules()} == before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_from_torch_strict_accepts_a_model_it_knows() -> None:
    """strict only refuses what is unknown: the ResNet converts without a warning."""
    model = randomize(SmallResNet())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = batchnorm.from_torch(model, strict=True)
    assert type(converted.bn1) is batchnorm.BatchNorm2d


# ---------------------------------------------------------------------------------------------
# Tools that walk the tree: isinstance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_batch_norms_are_torch_batch_norms(name: str) -> None:
    model, converted = pair(name)
    for path, module in batch_norms(model).items():
        new = dict(converted.named_modules())[path]
        assert type(new).__module__.split(".")[0] == "batchnorm", path  # converted, and still a torch one
        assert isinstance(new, _BatchNorm), path
        if isinstance(module, nn.BatchNorm2d):
            assert isinstance(new, nn.BatchNorm2d), path
        if isinstance(module, nn.BatchNorm1d):
            assert isinstance(new, nn.BatchNorm1d), path


@pytest.mark.parametrize("name", list(MODELS))
def test_isinstance_loop_finds_the_same_layers(name: str) -> None:
    """The fine-tuning idiom that freezes batch-norm statistics finds every layer it found before."""
    matched: dict[str, list[str]] = {"torch": [], "ours": []}
    for label, model in zip(("torch", "ours"), pair(name), strict=True):
        model.train()
        for path, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                matched[label].append(path)
    assert matched["ours"] == matched["torch"]
    assert len(matched["torch"]) == {"resnet": 6, "mobilenet": 8}[name]


# ---------------------------------------------------------------------------------------------
# torch.fx, fuse_modules, torch.jit.trace
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fx_symbolic_trace(name: str, mode: str) -> None:
    model, converted = pair(name)
    for module in (model, converted):
        module.train(mode == "train")
    # Traced in the mode it runs in: fx records the branch that ``self.training`` takes.
    traced = torch.fx.symbolic_trace(converted)
    x = inputs()
    out, grads = step(traced, x)
    expected_out, expected_grads = step(model, x)
    torch.testing.assert_close(out, expected_out, **TOL)
    torch.testing.assert_close(grads, expected_grads, **TOL)
    # The graph updates the running statistics that it shares with ``converted``. The counters are
    # left out: fx does not record a Python-side ``num_batches_tracked.add_(1)`` (timm's paste of
    # torch's forward loses it too), and only momentum=None reads them.
    statistics = [key for key in model.state_dict() if key.endswith(("running_mean", "running_var"))]
    state, expected_state = converted.state_dict(), model.state_dict()
    torch.testing.assert_close([state[k] for k in statistics], [expected_state[k] for k in statistics], **TOL)


def test_fuse_modules_with_the_custom_config() -> None:
    model, converted = pair("resnet")
    fuse = torch.ao.quantization.fuse_modules
    expected = fuse(model.eval(), [["conv1", "bn1", "relu"]])
    fused = fuse(
        converted.eval(),
        [["conv1", "bn1", "relu"]],
        fuse_custom_config_dict=batchnorm.tools.fuse_custom_config(),
    )
    assert type(fused.bn1) is nn.Identity and type(expected.bn1) is nn.Identity
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected(x), **TOL)
        torch.testing.assert_close(fused(x), model(x), **TOL)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_jit_trace(name: str, mode: str) -> None:
    model, converted = pair(name)
    for module in (model, converted):
        module.train(mode == "train")
    x = inputs()
    reference = copy.deepcopy(model)  # the trace runs the model (twice, with its check): state moves
    with warnings.catch_warnings():
        # torch.jit.trace warns that TorchScript is deprecated, on every call
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        # torch's own F.batch_norm checks the batch size with a Python bool in training, and our
        # modules check shapes with Python bools (docs/compat.md): the traced graph is the same
        # for every input of the traced shape, which the comparison below checks.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(converted, (x,))
        torch.jit.trace(reference, (x,))
    out, grads = step(traced, x)
    expected_out, expected_grads = step(reference, x)
    torch.testing.assert_close(out, expected_out, **TOL)
    torch.testing.assert_close(grads, expected_grads, **TOL)
    assert_state_equal(converted, reference, **TOL)
