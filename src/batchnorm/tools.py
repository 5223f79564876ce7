r"""Tools that walk a model: fold, recalibrate, from_torch, to_torch, freeze.

Each returns a new model and leaves its argument untouched, except :func:`recalibrate`, which
works in place by design. They work on torch's batch-norm modules and on ours. The tensor math
sits in small helpers (:func:`fold_conv_bn`, :func:`fold_linear_bn`) that the tree walks call.

Folding, for a batch norm in eval mode with running statistics mu, var and affine gamma, beta:

    BN(z) = a * z + c,   a = gamma / sqrt(var + eps),   c = beta - mu * a      (per channel)
    BN(W x + b) = (a W) x + (a b + c)                                         (a scales W's rows)
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable, Sized
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from . import modules as M
from ._convert import (
    batch_norm_like,
    check_known,
    check_materialized,
    check_materialized_batch_norms,
    convert_batch_norms,
    convert_to,
    declares_protocol,
    describe,
    equivalent,
    known,
    rebuild,
    statistics_layers,
    swap_modules,
)
from ._masked import masked_stats, resolve_mask, valid_count
from .activation import BatchNormAct, BatchNormAct2d
from .sync import SyncBatchNorm

__all__ = [
    "fold",
    "fold_conv_bn",
    "fold_linear_bn",
    "freeze",
    "from_torch",
    "fuse_custom_config",
    "recalibrate",
    "to_torch",
]

_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: M.BatchNorm1d,
    nn.BatchNorm2d: M.BatchNorm2d,
    nn.BatchNorm3d: M.BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {ours: theirs for theirs, ours in _TO_OURS.items()}


def _eval_is_affine(module: nn.Module) -> bool:
    """Eval mode is the per-channel affine map of the running statistics (then the fused
    activation, if any): what fold and freeze rely on. Exactly the modules that freeze, or are
    frozen already."""
    if not known(module):
        return False
    answer = equivalent(module, "frozen")
    return isinstance(answer, type) or (declares_protocol(module) and not getattr(module, "tracks_statistics", True))


def _check_model(model: object, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: expected a torch.nn.Module, got {type(model).__name__}")


# ---------------------------------------------------------------------------------------------
# fold
# ---------------------------------------------------------------------------------------------


def _eval_affine(module: object, who: str) -> tuple[Tensor, Tensor]:
    """(a, c) of BN(z) = a * z + c, both (C,) in float64, from an eval-mode batch norm."""
    bn: Any = module
    if not isinstance(module, nn.Module) or not _eval_is_affine(module):
        raise TypeError(
            f"{who}: expected a batch norm (torch's or batchnorm's) whose eval mode is an affine map, "
            f"got {type(bn).__name__}"
        )
    check_materialized(bn, "")
    if bn.training and getattr(bn, "tracks_statistics", True):
        raise ValueError(f"{who}: expected the batch norm in eval mode (call .eval()), got training mode")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{who}: expected a batch norm with running statistics, got one without "
            f"(track_running_stats=False normalizes every batch with its own statistics, which no weight can hold)"
        )
    invstd = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    weight = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(invstd)
    bias = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(invstd)
    scale = weight * invstd
    return scale, bias - bn.running_mean.detach().double() * scale


def _folded_copy(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    """A copy of ``layer`` with new weight and bias (always present), in the layer's dtype."""
    new = copy.deepcopy(layer)
    old_weight = layer.weight
    assert isinstance(old_weight, Tensor)
    new.weight = nn.Parameter(weight.to(old_weight.dtype), requires_grad=old_weight.requires_grad)
    new.bias = nn.Parameter(bias.to(old_weight.dtype), requires_grad=old_weight.requires_grad)
    return new


def _check_channels(out_features: int, bn: nn.Module, who: str) -> None:
    if bn.num_features != out_features:
        raise ValueError(
            f"{who}: expected a batch norm over the layer's {out_features} output channels, got num_features="
            f"{bn.num_features}"
        )


def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    r"""A convolution equal to ``bn(conv(x))`` for eval-mode ``bn``: the batch norm in the weights.

    Works for ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` with any ``groups``, with or without
    bias (the result always has one). Computed in float64 and stored in the convolution's dtype.
    Neither argument changes.

    Example:
        >>> import torch, batchnorm
        >>> conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(batchnorm.fold_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-5)
        True
    """
    who = "fold_conv_bn"
    if not isinstance(conv, _ConvNd):
        raise TypeError(f"{who}: expected a Conv1d/2d/3d or ConvTranspose1d/2d/3d, got {type(conv).__name__}")
    scale, shift = _eval_affine(bn, who)
    _check_channels(conv.out_channels, bn, who)
    weight = conv.weight.detach().double()
    kernel = (1,) * (weight.dim() - 2)
    if isinstance(conv, _ConvTransposeNd):
        # (in, out/g, *k) -> (g, in/g, out/g, *k): output channel o is column o % (out/g) of group o // (out/g).
        groups = conv.groups
        grouped = weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])
        weight = (grouped * scale.view(groups, 1, -1, *kernel)).view_as(weight)
    else:
        weight = weight * scale.view(-1, 1, *kernel)  # (out, in/g, *k): row o scaled by a_o
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    return _folded_copy(conv, weight, bias * scale + shift)


def fold_linear_bn(linear: nn.Module, bn: nn.Module) -> nn.Module:
    """A ``Linear`` equal to ``bn(linear(x))`` for eval-mode ``bn``; neither argument changes.

    Example:
        >>> import torch, batchnorm
        >>> linear, bn = torch.nn.Linear(5, 3, bias=False), batchnorm.BatchNorm1d(3).eval()
        >>> x = torch.randn(4, 5)
        >>> torch.allclose(batchnorm.fold_linear_bn(linear, bn)(x), bn(linear(x)), atol=1e-6)
        True
    """
    who = "fold_linear_bn"
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{who}: expected a torch.nn.Linear, got {type(linear).__name__}")
    scale, shift = _eval_affine(bn, who)
    _check_channels(linear.out_features, bn, who)
    weight = linear.weight.detach().double() * scale[:, None]  # (out, in): row o scaled by a_o
    bias = linear.bias.detach().double() if linear.bias is not None else torch.zeros_like(scale)
    return _folded_copy(linear, weight, bias * scale + shift)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if not _eval_is_affine(bn) or getattr(bn, "running_mean", None) is None:
        return False
    if isinstance(layer, _ConvNd):
        return bool(bn.num_features == layer.out_channels)
    return isinstance(layer, nn.Linear) and bool(bn.num_features == layer.out_features)


def _what_remains(bn: nn.Module) -> nn.Module:
    """What a folded batch norm leaves behind: its fused activation, or nothing."""
    activation = bn.fused_activation() if declares_protocol(bn) else None
    return nn.Identity() if activation is None else activation


def _input_ranks(model: nn.Module, layers: list[nn.Module], example_input: Any) -> dict[nn.Module, int]:
    """The rank of the input each of ``layers`` receives when ``model`` runs ``example_input``."""
    ranks: dict[nn.Module, int] = {}

    def record(layer: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor):
            ranks[layer] = args[0].dim()

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        with torch.no_grad():
            # A clone: an in-place layer (InPlaceABN) would overwrite the caller's tensor.
            model(example_input.clone() if isinstance(example_input, Tensor) else example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return ranks


def fold(model: nn.Module, *, example_input: Any = None) -> nn.Module:
    """A new eval-mode model with every batch norm that follows a convolution or linear layer folded.

    The rule for "follows": the two are consecutive children of an ``nn.Sequential`` (the only
    container whose order of children is the order of execution). The layer is a
    ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear``; the batch norm is any whose eval
    mode is the affine map of its running statistics (torch's, ours, frozen ones, fused ones
    followed by their activation), has running statistics, and normalizes the layer's output
    channels. The layer becomes :func:`fold_conv_bn` / :func:`fold_linear_bn` of the pair and the
    batch norm becomes ``nn.Identity`` (a :class:`BatchNormAct` or :class:`InPlaceABN` becomes its
    activation, e.g. ``nn.ReLU``), so the module names stay. A ``ConvBatchNorm*d`` becomes its
    convolution with its batch norm folded in. Batch norms that follow anything else are kept.
    ``model`` itself does not change.

    A ``Linear`` followed by a batch norm folds only when the batch norm normalizes the Linear's
    output features, i.e. its input is 2D (N, features): on (N, C, L) input the Linear acts on L
    and the batch norm on C, and no weight can hold the pair. The modules alone cannot show which
    it is, so such pairs fold only when ``example_input`` (one input of ``model``, run once on a
    copy, in eval mode, without gradients) proves that the batch norm receives 2D input; without
    ``example_input`` they are kept, with a warning naming them.

    Args:
        model: an eval-mode model (not changed).
        example_input: an input for ``model``, to tell which Linear -> batch norm pairs fold
            (keyword-only). Default: None (those pairs are kept).

    Raises:
        ValueError: ``model`` or one of its modules is in training mode (folding uses the running
            statistics, which training mode does not); a batch-norm-like module fold does not
            know (another library's subclass of torch's batch norm), naming it.

    Example:
        >>> import torch, batchnorm
        >>> model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), batchnorm.BatchNorm1d(4), torch.nn.ReLU()).eval()
        >>> folded = batchnorm.fold(model)
        >>> folded
        Sequential(
          (0): Conv1d(2, 4, kernel_size=(3,), stride=(1,))
          (1): Identity()
          (2): ReLU()
        )
        >>> x = torch.randn(3, 2, 10)
        >>> torch.allclose(folded(x), model(x), atol=1e-6)
        True
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(5, 3), batchnorm.BatchNorm1d(3)).eval()
        >>> batchnorm.fold(mlp, example_input=torch.randn(2, 5))[1]
        Identity()
    """
    _check_model(model, "fold")
    training = [path or "the model" for path, module in model.named_modules() if module.training]
    if training:
        raise ValueError(
            f"fold: expected a model in eval mode (call model.eval()), got training mode in {', '.join(training[:3])}"
            + (f" and {len(training) - 3} more" if len(training) > 3 else "")
        )
    check_materialized_batch_norms(model)
    check_known(model, "fold")
    folded = copy.deepcopy(model)
    pairs = [
        (container, first, second)
        for container in folded.modules()
        if isinstance(container, nn.Sequential)
        for first, second in itertools.pairwise(list(container._modules))
        if _foldable(container._modules[first], container._modules[second])
    ]
    after_linear = [
        container._modules[second]
        for container, first, second in pairs
        if isinstance(container._modules[first], nn.Linear)
    ]
    ranks = {} if example_input is None or not after_linear else _input_ranks(folded, after_linear, example_input)
    if example_input is None and after_linear:
        names = [describe(bn, path) for path, bn in folded.named_modules() if any(bn is m for m in after_linear)]
        warnings.warn(
            f"fold: kept {len(names)} batch norm(s) after a Linear: {', '.join(names)}; they fold only when the "
            f"batch norm's input is 2D (N, features), which fold(model, example_input=...) checks",
            UserWarning,
            stacklevel=2,
        )
    for container, first, second in pairs:
        layer, bn = container._modules[first], container._modules[second]
        assert layer is not None and bn is not None
        if isinstance(layer, nn.Linear) and ranks.get(bn) != 2:
            continue
        fold_pair = fold_linear_bn if isinstance(layer, nn.Linear) else fold_conv_bn
        container._modules[first] = fold_pair(layer, bn)
        container._modules[second] = _what_remains(bn)

    def fold_fused(module: nn.Module, path: str) -> nn.Module | None:
        """A convolution + batch norm module folded into its convolution (the pair's own rule)."""
        if not declares_protocol(module):
            return None
        convolution, state = module.fused_convolution(), module.batch_norm_state()
        if convolution is None:
            return None
        if state.running_mean is None or state.running_var is None:
            return None
        return fold_conv_bn(convolution, state)

    return swap_modules(folded, fold_fused)


# ---------------------------------------------------------------------------------------------
# recalibrate
# ---------------------------------------------------------------------------------------------


class _PooledStats:
    """Count, mean and sum of squared deviations M2 of every value a layer saw, per channel, in float64.

    Batches merge by Chan et al.'s parallel formula: n = n_a + n_b,
    mu = mu_a + (mu_b - mu_a) n_b / n,  M2 = M2_a + M2_b + (mu_b - mu_a)^2 n_a n_b / n.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Pool the values of ``x`` (N, C, *); with ``mask`` (N, *), only its valid positions."""
        n = x.numel() // x.shape[1] if mask is None else valid_count(mask)
        if n == 0:
            return
        if mask is None:
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x.detach().double(), dim=dims, correction=0)  # (N, C, *) -> (C,), (C,)
        else:
            mean, var, _ = masked_stats(x.detach().double(), mask)  # (N, C, *) -> (C,), (C,) over valid positions
        m2 = var * n
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total


def _batch_input(batch: object) -> tuple[Any, dict[str, Tensor]]:
    """The model input of one batch and the keywords of the call: the batch itself, or the first
    element of a tuple or list; ``{"mask": m}`` when the second element is a boolean tensor."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(
                "recalibrate: expected a non-empty tuple or list (input, ...) as a batch, got an empty one"
            )
        if len(batch) >= 2 and isinstance(batch[1], Tensor) and batch[1].dtype == torch.bool:
            return batch[0], {"mask": batch[1]}
        return batch[0], {}
    return batch, {}


def _pool(stats: _PooledStats, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The pre-hook of :func:`recalibrate`: pool the layer's input over the valid positions of the
    mask (or lengths) the layer itself is called with."""
    (input,) = args[:1]
    stats.add(input, resolve_mask(input, kwargs.get("mask"), kwargs.get("lengths"), "recalibrate"))


def recalibrate(
    model: nn.Module, batches: Iterable[Any], num_batches: int | None = None, progress: bool = False
) -> nn.Module:
    """Precise batch norm, IN PLACE: running statistics from the population of the given batches.

    Runs ``batches`` through ``model`` in training mode under ``no_grad`` (every batch norm
    normalizes with its batch statistics, as in training; no parameter changes), and replaces the
    ``running_mean`` and ``running_var`` of every batch norm with running statistics with the
    mean and the unbiased variance of ALL the values each one saw in its input, pooled over
    every batch (not the average of per-batch variances, which underestimates the population
    variance by the spread of the batch means). During the pass the running statistics are held
    still (momentum 0); afterwards every module's mode and every batch norm's momentum and
    ``num_batches_tracked`` are as they were. A batch norm that sees no input keeps its
    statistics. When it raises (a failing forward, no batches) the model is as it was.

    Args:
        model: the model (changed in place).
        batches: an iterable of inputs, or of tuples/lists whose first element is the input
            (a DataLoader of ``(x, y)`` works); already on the model's device. A batch of the
            form ``(input, mask)``, ``mask`` a boolean tensor, is a padded variable-length batch:
            the model is called as ``model(input, mask=mask)``, and each batch norm pools the
            valid positions of the mask it is called with, only (masked batch norm, see
            :func:`batchnorm.functional.batch_norm`).
        num_batches: use at most this many batches. Default: all.
        progress: show a tqdm progress bar. Default: False.

    Returns:
        ``model``.

    Example:
        >>> import torch, batchnorm
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), batchnorm.BatchNorm1d(2)).eval()
        >>> data = [torch.randn(16, 3) for _ in range(4)]
        >>> _ = batchnorm.recalibrate(model, data)
        >>> z = model[0](torch.cat(data)).detach()
        >>> torch.allclose(model[1].running_var, z.var(0)), model.training
        (True, False)
    """
    _check_model(model, "recalibrate")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0
    ):
        raise ValueError(f"recalibrate: expected num_batches to be a positive int or None, got {num_batches!r}")
    layers = statistics_layers(model, "recalibrate", frozen=False)
    pooled = {layer: _PooledStats() for layer in layers}
    modes = {module: module.training for module in model.modules()}
    saved = {layer: (layer.momentum, [t.clone() for t in _state(layer)]) for layer in layers}
    hooks = [layer.register_forward_pre_hook(partial(_pool, pooled[layer]), with_kwargs=True) for layer in layers]
    iterator: Iterable[Any] = batches
    if progress:
        from tqdm.auto import tqdm

        total = num_batches if num_batches is not None else (len(batches) if isinstance(batches, Sized) else None)
        iterator = tqdm(batches, total=total, desc="recalibrate", unit="batch")
    seen = 0
    try:
        model.train()
        for layer in layers:
            layer.momentum = 0.0
        with torch.no_grad():
            for batch in iterator:
                if num_batches is not None and seen >= num_batches:
                    break
                input, keywords = _batch_input(batch)
                model(input, **keywords)
                seen += 1
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
        for layer, (momentum, state) in saved.items():
            layer.momentum = momentum
            for tensor, value in zip(_state(layer), state, strict=True):
                tensor.copy_(value)
        if progress:
            iterator.close()  # type: ignore[attr-defined]
    if seen == 0:
        raise ValueError("recalibrate: expected at least one batch, got none")
    with torch.no_grad():
        for layer, stats in pooled.items():
            if stats.mean is None or stats.m2 is None or stats.count < 2:
                continue
            layer.running_mean.copy_(stats.mean)
            layer.running_var.copy_(stats.m2 / (stats.count - 1))  # unbiased: M2 / (n - 1)
    return model


def _state(layer: nn.Module) -> list[Tensor]:
    """The tensors a training forward may change: running statistics and the batch counter."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    return [tensor for tensor in (getattr(layer, name, None) for name in names) if isinstance(tensor, Tensor)]


# ---------------------------------------------------------------------------------------------
# from_torch, to_torch, freeze
# ---------------------------------------------------------------------------------------------


# timm's batch norm + activation family: subclasses of torch's batch norm with children ``act``
# (the activation) and ``drop`` (identity unless dropout is asked for), computing act(drop(BN(x))).
_TIMM_NORM_ACT = ("BatchNormAct2d", "SyncBatchNormAct")


def _activation_of(act: nn.Module) -> tuple[str, float | None] | None:
    """Our activation name and parameter for a torch activation module, or None if we have none."""
    if isinstance(act, nn.Identity):
        return "identity", None
    if type(act) is nn.ReLU:
        return "relu", None
    if type(act) is nn.SiLU:
        return "silu", None
    if type(act) is nn.LeakyReLU:
        return "leaky_relu", float(act.negative_slope)
    if type(act) is nn.ELU:
        return "elu", float(act.alpha)
    return None


def _convert_norm_act(module: nn.Module, path: str) -> nn.Module | None:
    """timm's ``BatchNormAct2d`` (and its synchronized kin) as our :class:`BatchNormAct`."""
    if type(module).__name__ not in _TIMM_NORM_ACT or not isinstance(module, _BatchNorm):
        return None
    act, drop = getattr(module, "act", None), getattr(module, "drop", None)
    activation = _activation_of(act) if isinstance(act, nn.Module) else None
    if activation is None or not isinstance(drop, nn.Identity):
        return None
    name, param = activation
    fused = BatchNormAct2d if isinstance(module, nn.BatchNorm2d) else BatchNormAct
    return rebuild(module, partial(fused, activation=name, activation_param=param), path)


def from_torch(model: nn.Module, *, strict: bool = False) -> nn.Module:
    """A new model with torch's batch norms replaced by ours.

    torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` become ours; timm's ``BatchNormAct2d``
    and ``SyncBatchNormAct`` (a batch norm followed by a ReLU, LeakyReLU, ELU, SiLU or identity,
    without dropout) become :class:`batchnorm.BatchNormAct2d` (:class:`batchnorm.BatchNormAct`
    when not 2d) with the same state. Weights,
    buffers, mode, device and dtype are kept; ``model`` does not change. Any other batch-norm-like
    module (a subclass of torch's batch norm it does not know, a frozen batch norm from another
    library) is left as it is, with one warning that lists their names and types; with
    ``strict=True`` that is a ``ValueError`` instead, raised before anything is built. Raises
    ValueError for a lazy batch norm that has not seen an input.

    Example:
        >>> import torch, batchnorm
        >>> model = batchnorm.from_torch(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)))
        >>> type(model[1])
        <class 'batchnorm.modules.BatchNorm1d'>
    """
    if not isinstance(strict, bool):
        raise TypeError(f"from_torch: expected strict to be a bool, got {type(strict).__name__}")
    _check_model(model, "from_torch")
    check_materialized_batch_norms(model)
    left = [
        describe(module, path)
        for path, module in model.named_modules()
        if batch_norm_like(module) and not known(module) and _convert_norm_act(module, path) is None
    ]
    if left and strict:
        raise ValueError(f"from_torch: expected only batch norms it can convert, got {', '.join(left)}")

    def convert(module: nn.Module, path: str) -> nn.Module | None:
        target = _TO_OURS.get(type(module))
        return _convert_norm_act(module, path) if target is None else convert_to(module, target, path)

    converted = swap_modules(copy.deepcopy(model), convert)
    if left:
        warnings.warn(
            f"from_torch: left {len(left)} batch-norm-like module(s) it cannot convert unchanged: {', '.join(left)}",
            UserWarning,
            stacklevel=2,
        )
    return converted


def to_torch(model: nn.Module) -> nn.Module:
    """A new model with our batch norms replaced by torch's, where torch has the class.

    ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` become torch's; the batch norm inside
    ``ConvBatchNorm*d`` becomes torch's (the module then runs the pair unfused). Weights,
    buffers, mode, device and dtype are kept; ``model`` does not change. Modules with no torch
    counterpart (the rank-agnostic ``BatchNorm``, the ghost, renorm, frozen, fused and flow
    modules) are kept as they are (``docs/compat.md`` lists them). Raises ValueError, before
    anything is built, for a batch-norm-like module it does not know.

    Example:
        >>> import torch, batchnorm
        >>> type(batchnorm.to_torch(torch.nn.Sequential(batchnorm.BatchNorm2d(4)))[0])
        <class 'torch.nn.modules.batchnorm.BatchNorm2d'>
    """
    _check_model(model, "to_torch")
    check_materialized_batch_norms(model)
    return convert_batch_norms(copy.deepcopy(model), "torch", "to_torch")


def freeze(model: nn.Module) -> nn.Module:
    """A new model with every batch norm (torch's and ours) replaced by a :class:`FrozenBatchNorm`
    (a :class:`FrozenBatchNormAct` for :class:`BatchNormAct`, :class:`InPlaceABN` and
    :class:`SyncBatchNormAct`; the batch norm inside ``ConvBatchNorm*d`` is frozen in place).

    Each frozen layer computes what the batch norm computes in eval mode, whatever the model's
    mode; its weight and bias become buffers, so they no longer train. ``model`` does not change.
    Raises ValueError, naming it, for a batch norm without running statistics, a
    :class:`BatchNormFlow` (a frozen batch norm would drop its log-determinant) and a
    batch-norm-like module it does not know, before anything is built.

    Example:
        >>> import torch, batchnorm
        >>> frozen = batchnorm.freeze(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
        >>> frozen[0], list(frozen.parameters())
        (FrozenBatchNorm(4, eps=1e-05), [])
    """
    _check_model(model, "freeze")
    check_materialized_batch_norms(model)
    check_known(model, "freeze")
    return convert_batch_norms(copy.deepcopy(model), "frozen", "freeze")


# ---------------------------------------------------------------------------------------------
# torch.ao.quantization.fuse_modules
# ---------------------------------------------------------------------------------------------


def _with_torch_batch_norms(fuser: Any) -> Any:
    """``fuser`` (one of torch's fuser methods) applied with our batch norms rebuilt as torch's,
    sharing their parameters and buffers: torch's fused modules check exact types."""

    def fuse(is_qat: bool, *layers: nn.Module) -> nn.Module:
        torch_layers = [
            rebuild(layer, _TO_TORCH[type(layer)], "") if type(layer) in _TO_TORCH else layer for layer in layers
        ]
        return fuser(is_qat, *torch_layers)  # type: ignore[no-any-return]

    return fuse


def fuse_custom_config() -> dict[str, Any]:
    """The ``fuse_custom_config_dict`` with which ``torch.ao.quantization.fuse_modules`` fuses our
    ``BatchNorm1d/2d/3d`` as it fuses torch's: convolution + batch norm (+ ReLU) and linear +
    batch norm (torch's fuser table is keyed by exact types).

    Example:
        >>> import torch, batchnorm
        >>> from torch.ao.quantization import fuse_modules
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), torch.nn.ReLU()).eval()
        >>> fused = fuse_modules(model, [["0", "1", "2"]], fuse_custom_config_dict=batchnorm.fuse_custom_config())
        >>> type(fused[0]).__name__, type(fused[1]).__name__
        ('ConvReLU2d', 'Identity')
    """
    from torch.ao.quantization import fuser_method_mappings as methods

    convs = {M.BatchNorm1d: nn.Conv1d, M.BatchNorm2d: nn.Conv2d, M.BatchNorm3d: nn.Conv3d}
    mapping: dict[tuple[type[nn.Module], ...], Any] = {}
    for bn, conv in convs.items():
        mapping[(conv, bn)] = _with_torch_batch_norms(methods.fuse_conv_bn)
        mapping[(conv, bn, nn.ReLU)] = _with_torch_batch_norms(methods.fuse_conv_bn_relu)
    mapping[(nn.Linear, M.BatchNorm1d)] = _with_torch_batch_norms(methods.fuse_linear_bn)
    return {"additional_fuser_method_mapping": mapping}
