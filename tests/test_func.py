"""Every module under every ``torch.func`` transform, against an oracle under the same transform.

A generated table: transform x module class x mode. The oracle of a cell is torch's own module
(or a composition of torch modules, or the float64 formula of the class's docstring written out
here) with the same state, run through the same transform. Where torch refuses a transform,
ours must refuse it with an exception of the same type; elsewhere outputs, gradients, tangents
and the state left behind (running statistics, counters) must match.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, stack_module_state, vmap

import batchnorm

from .conftest import TorchBatchNormAnyRank

DTYPE = torch.float64
TOLERANCE = {"rtol": 1e-7, "atol": 1e-9}
ENSEMBLE_SIZE = 3
VMAP_SIZE = 2

# ---------------------------------------------------------------------------------------------
# Oracles: torch modules (or the docstring's formula) with the state-dict keys of ours
# ---------------------------------------------------------------------------------------------


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)  # (C,) broadcasts against (N, C, *)


class TorchRunningStats(TorchBatchNormAnyRank):
    """torch's batch norm whose running statistics are updated by torch itself: a subclass that
    computes its output by a formula of its own calls :meth:`update` and gets torch's update,
    under every transform exactly as torch's module does it."""

    def update(self, x: Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None:
            return
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        F.batch_norm(x, self.running_mean, self.running_var, None, None, True, factor, self.eps)


class TorchBatchNormThen(TorchBatchNormAnyRank):
    """torch's batch norm followed by an activation module (BatchNormAct, InPlaceABN)."""

    def __init__(self, num_features: int, activation: nn.Module, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(super().forward(x))


class TorchGhost(TorchBatchNormAnyRank):
    """torch's batch norm applied to each virtual batch in training."""

    def __init__(self, num_features: int, virtual_batch_size: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        chunks = torch.tensor_split(x, max(1, x.shape[0] // self.virtual_batch_size))  # k x (n_i, C, *)
        return torch.cat([super(TorchGhost, self).forward(chunk) for chunk in chunks])


class TorchRenorm(TorchRunningStats):
    """Batch Renormalization written out in float64 from the docstring of ``batchnorm.BatchRenorm``."""

    def __init__(self, num_features: int, rmax: float, dmax: float, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.rmax, self.dmax = rmax, dmax

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.running_mean is None or self.running_var is None:
            return super().forward(x)
        shape = _channel_shape(x)
        dims = [0, *range(2, x.dim())]
        mu_b = x.mean(dims)  # (N, C, *) -> (C,)
        sigma_b = torch.sqrt(x.var(dims, correction=0) + self.eps)  # (C,)
        mu = self.running_mean.clone()  # before this step's update
        sigma = torch.sqrt(self.running_var + self.eps)
        r = (sigma_b.detach() / sigma).clamp(1 / self.rmax, self.rmax)
        d = ((mu_b.detach() - mu) / sigma).clamp(-self.dmax, self.dmax)
        x_hat = (x - mu_b.view(shape)) / sigma_b.view(shape)
        y = self.weight.view(shape) * (x_hat * r.view(shape) + d.view(shape)) + self.bias.view(shape)
        self.update(x)
        return y


class TorchFrozen(nn.Module):
    """torch's batch norm in eval mode, whatever the module's mode, its affine map held in buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5, dtype: torch.dtype = DTYPE) -> None:
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class TorchFlow(TorchRunningStats):
    """The flow of ``batchnorm.BatchNormFlow`` written out in float64: (z, logabsdet)."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(num_features, affine=False, **kwargs)
        dtype = kwargs.get("dtype")
        self.unconstrained_weight = nn.Parameter(torch.zeros(num_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, dtype=dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = _channel_shape(x)
        dims = [0, *range(2, x.dim())]
        if self.training:
            mean, var = x.mean(dims), x.var(dims, correction=0)  # (N, C, *) -> (C,)
            self.update(x)
        else:
            mean, var = self.running_mean, self.running_var
        gamma = F.softplus(self.unconstrained_weight) + 1e-3
        z = gamma.view(shape) * (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps) + self.bias.view(shape)
        positions = math.prod(x.shape[2:])
        logabsdet = positions * (torch.log(gamma) - 0.5 * torch.log(var + self.eps)).sum()
        return z, logabsdet.expand(x.shape[0])


# ---------------------------------------------------------------------------------------------
# The classes: a pair (ours, oracle) with the same random state
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize(module: nn.Module) -> None:
    """Non-trivial state: scales near 1, shifts and means around 0, variances in [0.5, 2], counter 3."""
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if tensor.dtype == torch.long:
            tensor.fill_(3)
        elif leaf == "running_var":
            tensor.uniform_(0.5, 2.0)
        elif leaf == "weight" and tensor.dim() == 1:
            tensor.uniform_(0.5, 1.5)
        else:
            tensor.normal_(0.0, 0.5)


@dataclass(frozen=True)
class Case:
    """One module class: ``ours(track)`` and ``oracle(track)`` build the two (track_running_stats
    where the class has it), ``shape`` is the input's."""

    name: str
    ours: Callable[[bool], nn.Module]
    oracle: Callable[[bool], nn.Module]
    shape: tuple[int, ...]
    # The module overwrites its input: every transform feeds it a non-leaf copy (both sides).
    inplace: bool = False
    # The class has track_running_stats (a train cell without running statistics exists).
    tracks: bool = True
    # Differentiable twice; otherwise second order must be refused.
    double_backward: bool = True

    def pair(self, track: bool = True) -> tuple[nn.Module, nn.Module]:
        ours, oracle = self.ours(track), self.oracle(track)
        randomize(oracle)
        ours.load_state_dict(oracle.state_dict())
        return ours, oracle

    def prep(self, x: Tensor) -> Tensor:
        return x * 1 if self.inplace else x


def _lazy(cls: type[nn.Module], shape: tuple[int, ...]) -> Callable[[bool], nn.Module]:
    def build(track: bool) -> nn.Module:
        module = cls(track_running_stats=track, dtype=DTYPE)
        with torch.no_grad():
            module(torch.randn(shape, dtype=DTYPE))  # materializes it
        return module

    return build


def _conv_oracle(conv: type[nn.Module], bn: type[nn.Module]) -> Callable[[bool], nn.Module]:
    def build(track: bool) -> nn.Module:
        layers = OrderedDict(
            conv=conv(2, 3, 2, bias=False, dtype=DTYPE), bn=bn(3, track_running_stats=track, dtype=DTYPE)
        )
        return nn.Sequential(layers)

    return build


def _conv_ours(cls: type[nn.Module]) -> Callable[[bool], nn.Module]:
    return lambda track: cls(2, 3, 2, track_running_stats=track, dtype=DTYPE)


def _built(cls: type[nn.Module]) -> Callable[[bool], nn.Module]:
    """A batch norm over 3 channels, float64."""
    return lambda track: cls(3, track_running_stats=track, dtype=DTYPE)


def _plain(ours: type[nn.Module], theirs: type[nn.Module]) -> tuple[Callable[[bool], nn.Module], ...]:
    return _built(ours), _built(theirs)


# Tight, so that r and d clip in every channel on this input: clipped, they are constants
# whatever x, and the gradient that treats them as constants is the true one (gradcheck).
RENORM_LIMITS = {"rmax": 1.1, "dmax": 0.01}
VIRTUAL_BATCH = 2  # two virtual batches of the N = 4 input

CASES = [
    Case("BatchNorm1d-2D", *_plain(batchnorm.BatchNorm1d, nn.BatchNorm1d), (4, 3)),
    Case("BatchNorm1d-3D", *_plain(batchnorm.BatchNorm1d, nn.BatchNorm1d), (4, 3, 3)),
    Case("BatchNorm2d", *_plain(batchnorm.BatchNorm2d, nn.BatchNorm2d), (4, 3, 2, 2)),
    Case("BatchNorm3d", *_plain(batchnorm.BatchNorm3d, nn.BatchNorm3d), (4, 3, 2, 2, 2)),
    Case("BatchNorm-4D", *_plain(batchnorm.BatchNorm, TorchBatchNormAnyRank), (4, 3, 2, 3)),
    Case(
        "LazyBatchNorm1d",
        _lazy(batchnorm.LazyBatchNorm1d, (4, 3, 3)),
        _built(nn.BatchNorm1d),
        (4, 3, 3),
    ),
    Case(
        "LazyBatchNorm2d",
        _lazy(batchnorm.LazyBatchNorm2d, (4, 3, 2, 2)),
        _built(nn.BatchNorm2d),
        (4, 3, 2, 2),
    ),
    Case(
        "LazyBatchNorm3d",
        _lazy(batchnorm.LazyBatchNorm3d, (4, 3, 2, 2, 2)),
        _built(nn.BatchNorm3d),
        (4, 3, 2, 2, 2),
    ),
    Case(
        "GhostBatchNorm",
        lambda track: batchnorm.GhostBatchNorm(3, VIRTUAL_BATCH, track_running_stats=track, dtype=DTYPE),
        lambda track: TorchGhost(3, VIRTUAL_BATCH, track_running_stats=track, dtype=DTYPE),
        (4, 3, 3),
    ),
    Case(
        "BatchRenorm",
        lambda track: batchnorm.BatchRenorm(3, track_running_stats=track, dtype=DTYPE, **RENORM_LIMITS),
        lambda track: TorchRenorm(3, track_running_stats=track, dtype=DTYPE, **RENORM_LIMITS),
        (4, 3, 3),
    ),
    Case(
        "FrozenBatchNorm",
        lambda track: batchnorm.FrozenBatchNorm(3, dtype=DTYPE),
        lambda track: TorchFrozen(3),
        (4, 3, 2, 2),
        tracks=False,
    ),
    Case(
        "BatchNormAct",
        lambda track: batchnorm.BatchNormAct(3, track_running_stats=track, dtype=DTYPE),
        lambda track: TorchBatchNormThen(3, nn.ReLU(), track_running_stats=track, dtype=DTYPE),
        (4, 3, 2, 2),
        double_backward=False,
    ),
    Case(
        "BatchNormAct-silu",
        lambda track: batchnorm.BatchNormAct(3, track_running_stats=track, dtype=DTYPE, activation="silu"),
        lambda track: TorchBatchNormThen(3, nn.SiLU(), track_running_stats=track, dtype=DTYPE),
        (4, 3, 2, 2),
        double_backward=False,
    ),
    Case(
        "InPlaceABN",
        lambda track: batchnorm.InPlaceABN(3, track_running_stats=track, dtype=DTYPE),
        lambda track: TorchBatchNormThen(3, nn.LeakyReLU(0.01, inplace=True), track_running_stats=track, dtype=DTYPE),
        (4, 3, 2, 2),
        inplace=True,
        double_backward=False,
    ),
    Case(
        "ConvBatchNorm1d",
        _conv_ours(batchnorm.ConvBatchNorm1d),
        _conv_oracle(nn.Conv1d, nn.BatchNorm1d),
        (4, 2, 3),
        double_backward=False,
    ),
    Case(
        "ConvBatchNorm2d",
        _conv_ours(batchnorm.ConvBatchNorm2d),
        _conv_oracle(nn.Conv2d, nn.BatchNorm2d),
        (4, 2, 3, 3),
        double_backward=False,
    ),
    Case(
        "ConvBatchNorm3d",
        _conv_ours(batchnorm.ConvBatchNorm3d),
        _conv_oracle(nn.Conv3d, nn.BatchNorm3d),
        (4, 2, 3, 3, 3),
        double_backward=False,
    ),
    Case(
        "BatchNormFlow",
        lambda track: batchnorm.BatchNormFlow(3).to(DTYPE),
        lambda track: TorchFlow(3, dtype=DTYPE),
        (4, 3, 2),
        tracks=False,
    ),
    Case(
        "SyncBatchNorm",
        lambda track: batchnorm.SyncBatchNorm(3, track_running_stats=track, dtype=DTYPE),
        lambda track: TorchBatchNormAnyRank(3, track_running_stats=track, dtype=DTYPE),
        (4, 3, 3),
        # Without a process group it is the local batch norm, differentiable twice.
        double_backward=True,
    ),
]

# ---------------------------------------------------------------------------------------------
# The transforms: each runs one module and returns everything that must match
# ---------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The random inputs of one cell, shared by both sides."""

    x: Tensor
    batch: Tensor  # (VMAP_SIZE, *shape)
    tangent: Tensor
    param_tangents: dict[str, Tensor]
    replacement: dict[str, Tensor]  # parameters and buffers for functional_call


def outputs(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def probe(t: Tensor) -> Tensor:
    """Fixed weights shaped like t, independent of its values: no random call, which vmap refuses."""
    return torch.sin(torch.arange(t.numel(), dtype=t.dtype) * 1.7 + 0.3).reshape(t.shape)


def loss(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    """A scalar whose gradient is not zero in training (sum(y) alone is constant in x)."""
    return sum(((o * probe(o)).sum() for o in outputs(out)), torch.zeros((), dtype=DTYPE))


def params_of(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in module.named_parameters()}


def buffers_of(module: nn.Module) -> dict[str, Tensor]:
    return {name: b for name, b in module.named_buffers()}


def state_of(module: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


Transform = Callable[[Case, nn.Module, Data], Any]


def t_eager(case: Case, module: nn.Module, data: Data) -> Any:
    """No transform: plain autograd, the baseline every other row builds on."""
    x = data.x.clone().requires_grad_()
    out = module(case.prep(x))
    params = dict(module.named_parameters())
    dx, *dp = torch.autograd.grad(loss(out), [x, *params.values()])
    return [o.detach() for o in outputs(out)], dx, dict(zip(params, dp, strict=True)), state_of(module)


def t_vmap(case: Case, module: nn.Module, data: Data) -> Any:
    out = vmap(lambda x: module(case.prep(x)))(data.batch)
    return out, state_of(module)


def t_grad_input(case: Case, module: nn.Module, data: Data) -> Any:
    dx = grad(lambda x: loss(module(case.prep(x))))(data.x)
    return dx, state_of(module)


def t_grad_params(case: Case, module: nn.Module, data: Data) -> Any:
    dp = grad(lambda p: loss(functional_call(module, p, (case.prep(data.x),))))(params_of(module))
    return dp, state_of(module)


def t_jacrev(case: Case, module: nn.Module, data: Data) -> Any:
    return jacrev(lambda x: module(case.prep(x)))(data.x), state_of(module)


def t_jacfwd(case: Case, module: nn.Module, data: Data) -> Any:
    return jacfwd(lambda x: module(case.prep(x)))(data.x), state_of(module)


def t_jvp(case: Case, module: nn.Module, data: Data) -> Any:
    def f(x: Tensor, p: dict[str, Tensor]) -> Any:
        return functional_call(module, p, (case.prep(x),))

    params = params_of(module)
    tangents = {name: data.param_tangents[name] for name in params}  # in the module's order
    return jvp(f, (data.x, params), (data.tangent, tangents)), state_of(module)


def t_functional_call(case: Case, module: nn.Module, data: Data) -> Any:
    """Parameters and buffers replaced: the buffers passed in are the ones a training call updates."""
    replacement = {name: t.clone() for name, t in data.replacement.items()}
    out = functional_call(module, replacement, (case.prep(data.x),))
    return out, replacement, state_of(module)


def t_forward_ad(case: Case, module: nn.Module, data: Data) -> Any:
    with fwAD.dual_level():
        out = module(case.prep(fwAD.make_dual(data.x, data.tangent)))
        unpacked = [fwAD.unpack_dual(o) for o in outputs(out)]
        result = [(primal.clone(), tangent) for primal, tangent in unpacked]
    return result, state_of(module)


def t_per_sample_grad(case: Case, module: nn.Module, data: Data) -> Any:
    buffers = buffers_of(module)

    def sample_loss(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return loss(functional_call(module, (p, buffers), (case.prep(x.unsqueeze(0)),)))  # (C, *) -> (1, C, *)

    return vmap(grad(sample_loss), in_dims=(None, 0))(params_of(module), data.x), state_of(module)


def _checked_function(case: Case, module: nn.Module) -> tuple[Callable[..., Any], tuple[Tensor, ...]]:
    """f(x, *parameters) with fresh copies of the buffers on every call, so that the repeated
    calls of gradcheck all start from the same state; and the float64 parameters to check."""
    names = list(params_of(module))
    buffers = buffers_of(module)

    def f(x: Tensor, *params: Tensor) -> Any:
        state = {**dict(zip(names, params, strict=True)), **{k: b.clone() for k, b in buffers.items()}}
        return functional_call(module, state, (case.prep(x),))

    return f, tuple(p.clone().requires_grad_() for p in params_of(module).values())


def t_gradcheck(case: Case, module: nn.Module, data: Data) -> Any:
    f, params = _checked_function(case, module)
    x = data.x.clone().requires_grad_()
    return gradcheck(
        f,
        (x, *params),
        check_batched_grad=True,
        check_forward_ad=True,
        check_batched_forward_grad=True,
        fast_mode=True,
    )


def t_gradgradcheck(case: Case, module: nn.Module, data: Data) -> Any:
    f, params = _checked_function(case, module)
    x = data.x.clone().requires_grad_()
    return gradgradcheck(f, (x, *params), check_batched_grad=True, fast_mode=True)


TRANSFORMS: dict[str, Transform] = {
    "eager": t_eager,
    "vmap": t_vmap,
    "grad_input": t_grad_input,
    "grad_params": t_grad_params,
    "jacrev": t_jacrev,
    "jacfwd": t_jacfwd,
    "jvp": t_jvp,
    "functional_call": t_functional_call,
    "forward_ad": t_forward_ad,
    "per_sample_grad": t_per_sample_grad,
    "gradcheck": t_gradcheck,
    "gradgradcheck": t_gradgradcheck,
}
NEEDS_PARAMETERS = {"grad_params", "per_sample_grad"}

# mode -> (training, track_running_stats). Under vmap torch refuses to update unbatched running
# statistics from a batch of batches, and under grad, jvp and jac* to increment the captured
# num_batches_tracked: "train" is the refusal there, "train_untracked" the training these
# transforms are meant for.
MODES = {"eval": (False, True), "train": (True, True), "train_untracked": (True, False)}
TRANSFORM_MODES = {
    "per_sample_grad": ("eval",),
    # The slow checks take the modes whose math differs; the update of tracked running statistics
    # under forward AD and vmap is compared with torch's in the forward_ad, functional_call and
    # ensemble rows.
    "gradcheck": ("eval", "train_untracked"),
    "gradgradcheck": ("eval", "train_untracked"),
}


# Cells that do not work today, each listed in docs/compat.md with its reason: they must keep
# failing (strict), so that the day they work the table says so.
_INPLACE_BATCHED_FORWARD_GRAD = (
    "InPlaceABN: gradcheck's batched forward-mode check vmaps the jvp, and autograd does not see the "
    "in-place update of a batched tangent (docs/compat.md)"
)
KNOWN_FAILURES = {
    "gradcheck-InPlaceABN-eval": _INPLACE_BATCHED_FORWARD_GRAD,
    "gradcheck-InPlaceABN-train_untracked": _INPLACE_BATCHED_FORWARD_GRAD,
}


def _cell(*values: Any, id: str) -> Any:
    reason = KNOWN_FAILURES.get(id)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(*values, id=id, marks=marks)


def _cells() -> list[Any]:
    cells = []
    for transform in TRANSFORMS:
        for case in CASES:
            if transform in NEEDS_PARAMETERS and case.name == "FrozenBatchNorm":
                continue  # no parameters to differentiate
            if transform == "gradgradcheck" and not case.double_backward:
                continue  # test_second_order_is_refused
            modes = TRANSFORM_MODES.get(transform, tuple(MODES))
            if not case.tracks:
                # The class's only training mode is "train".
                modes = tuple(dict.fromkeys("train" if m == "train_untracked" else m for m in modes))
            for mode in modes:
                cells.append(_cell(transform, case, mode, id=f"{transform}-{case.name}-{mode}"))
    return cells


def make_data(case: Case, oracle: nn.Module) -> Data:
    x = torch.randn(case.shape, dtype=DTYPE) * 2 + 0.5
    replacement = copy.deepcopy(oracle)
    randomize(replacement)
    return Data(
        x=x,
        batch=torch.randn(VMAP_SIZE, *case.shape, dtype=DTYPE) * 2 + 0.5,
        tangent=torch.randn(case.shape, dtype=DTYPE),
        param_tangents={name: torch.randn_like(p) for name, p in params_of(oracle).items()},
        replacement=dict(chain(params_of(replacement).items(), replacement.named_buffers())),
    )


def assert_same_outcome(ours: Callable[[], Any], oracle: Callable[[], Any]) -> None:
    """Same results, or an exception of the same type where the oracle raises."""
    try:
        expected = oracle()
    except Exception as error:  # torch's refusal, whatever its type, is the expected outcome
        if isinstance(error, Warning):
            raise  # a warning turned error is no refusal: both sides would "agree" on it
        with pytest.raises(type(error)):
            ours()
        return
    torch.testing.assert_close(ours(), expected, **TOLERANCE)


# torch scripts its forward-AD decompositions on the first dual tensor of the process
# (torch/_decomp/decompositions_for_jvp.py), and torch.jit.script warns that it is deprecated.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("transform", "case", "mode"), _cells())
def test_transform(transform: str, case: Case, mode: str) -> None:
    training, track = MODES[mode]
    ours, oracle = case.pair(track)
    ours.train(training)
    oracle.train(training)
    data = make_data(case, oracle)
    run = TRANSFORMS[transform]
    assert_same_outcome(lambda: run(case, ours, data), lambda: run(case, oracle, data))


# ---------------------------------------------------------------------------------------------
# Ensembles: stack_module_state over three models
# ---------------------------------------------------------------------------------------------


def ensemble(case: Case, models: list[nn.Module], x: Tensor) -> Any:
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Any:
        return functional_call(base, (p, b), (case.prep(x),))

    # A module that overwrites its input gets a minibatch of its own per model: one shared input
    # cannot hold every model's output.
    x_dim = 0 if case.inplace else None
    xs = x.expand(ENSEMBLE_SIZE, *x.shape).clone() if case.inplace else x
    out = vmap(one, in_dims=(0, 0, x_dim))(params, buffers, xs)
    return out, buffers


@pytest.mark.parametrize(
    ("case", "mode"),
    [
        _cell(case, mode, id=f"ensemble-{case.name}-{mode}")
        for case in CASES
        for mode in MODES
        if mode != "train_untracked" or case.tracks
    ],
)
def test_ensemble(case: Case, mode: str) -> None:
    training, track = MODES[mode]
    pairs = [case.pair(track) for _ in range(ENSEMBLE_SIZE)]
    for pair in pairs:
        for module in pair:
            module.train(training)
    x = torch.randn(case.shape, dtype=DTYPE) * 2 + 0.5
    ours, oracles = [p[0] for p in pairs], [p[1] for p in pairs]
    assert_same_outcome(lambda: ensemble(case, ours, x), lambda: ensemble(case, oracles, x))


# ---------------------------------------------------------------------------------------------
# Second order where the class is differentiable once
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "mode"),
    [
        pytest.param(case, mode, id=f"gradgradcheck-{case.name}-{mode}")
        for case in CASES
        if not case.double_backward
        for mode in ("eval", "train")
    ],
)
def test_second_order_is_refused(case: Case, mode: str) -> None:
    ours, _ = case.pair()
    ours.train(mode == "train")
    x = (torch.randn(case.shape, dtype=DTYPE) * 2 + 0.5).requires_grad_()
    # A loss whose gradient depends on the output (as through any later nonlinear layer), so that
    # dL/dx has a graph to differentiate: a gradient penalty.
    (dx,) = torch.autograd.grad(loss(ours(case.prep(x)) ** 2), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"(?i)twice|double|second"):
        dx.pow(2).sum().backward()


# ---------------------------------------------------------------------------------------------
# The table's configurations change something
# ---------------------------------------------------------------------------------------------

PLAIN_ORACLE_OF = {
    "GhostBatchNorm": "BatchNorm1d-3D",
    "BatchRenorm": "BatchNorm1d-3D",
    "BatchNormAct": "BatchNorm2d",
    "BatchNormAct-silu": "BatchNorm2d",
    "InPlaceABN": "BatchNorm2d",
}


@pytest.mark.parametrize("name", list(PLAIN_ORACLE_OF))
def test_variant_oracle_differs_from_plain_batch_norm(name: str) -> None:
    """In training on the table's input, each variant's oracle is not plain batch norm: the
    virtual batches, the clipping limits and the activations all act."""
    case = {c.name: c for c in CASES}[name]
    plain = {c.name: c for c in CASES}[PLAIN_ORACLE_OF[name]]
    _, oracle = case.pair()
    _, reference = plain.pair()
    reference.load_state_dict(oracle.state_dict())
    x = torch.randn(case.shape, dtype=DTYPE) * 2 + 0.5
    with torch.no_grad():
        assert not torch.allclose(oracle(x.clone()), reference(x.clone()), **TOLERANCE)


def test_train_untracked_differs_from_eval() -> None:
    """Without running statistics the batch's own normalize, also in eval: a third mode."""
    case = CASES[0]
    _, tracked = case.pair(True)
    _, untracked = case.pair(False)
    tracked.eval()
    untracked.eval()
    with torch.no_grad():
        untracked.weight.copy_(tracked.weight)
        untracked.bias.copy_(tracked.bias)
    x = torch.randn(case.shape, dtype=DTYPE)
    assert not torch.allclose(tracked(x), untracked(x))
