"""Module-tree surgery shared by ``SyncBatchNorm.convert_sync_batchnorm`` and :mod:`batchnorm.tools`.

Which modules count as batch norm, how one is rebuilt as another class with the same state, and
how modules are swapped in a tree so that a failure half-way changes nothing: every replacement
is built first, and the tree is only rewired once all of them exist.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeGuard

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from ._protocol import DECLARATIONS, Equivalent, Kept, Refused, SupportsBatchNormTools
from .modules import _BatchNormBase

#: Every module whose state is a batch norm's: torch's (including its SyncBatchNorm) and ours.
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, _BatchNormBase)

#: torch's own batch norms, by exact type (a lazy one has become one of these once materialized):
#: they cannot declare the protocol, so the tools know them by name.
TORCH_BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, BATCH_NORM_TYPES)


def declares_protocol(module: object) -> TypeGuard[SupportsBatchNormTools]:
    return isinstance(module, SupportsBatchNormTools)


def batch_norm_like(module: nn.Module) -> bool:
    """A module that normalizes with batch statistics or keeps running ones, by type or by state."""
    if isinstance(module, _BatchNorm) or declares_protocol(module):
        return True
    return "batchnorm" in type(module).__name__.lower() and isinstance(getattr(module, "running_mean", None), Tensor)


def known(module: nn.Module) -> bool:
    """A batch-norm-like module that the tools know: torch's own, one of this package's classes, or
    a subclass that declares (part of) the protocol itself. A subclass that declares nothing may
    compute something else than the class it inherits its declarations from (its own forward),
    so it is not trusted with them."""
    if type(module) in TORCH_BATCH_NORMS:
        return True
    if not declares_protocol(module):
        return False
    cls = type(module)
    return cls.__module__.split(".")[0] == __name__.split(".")[0] or any(name in vars(cls) for name in DECLARATIONS)


def check_known(model: nn.Module, caller: str) -> None:
    """Raise before any change when ``model`` holds a batch-norm-like module the tools do not know
    (a subclass of torch's batch norm from another library, say): converting it by its base class
    would silently drop whatever it adds."""
    unknown = [
        describe(module, path)
        for path, module in model.named_modules()
        if batch_norm_like(module) and not known(module)
    ]
    if unknown:
        raise ValueError(
            f"{caller}: expected batch norms it knows (torch's BatchNorm1d/2d/3d and SyncBatchNorm, and batchnorm's), "
            f"got {', '.join(unknown)}"
        )


def equivalent(module: nn.Module, tool: str) -> Equivalent:
    """What ``tool`` (``"torch"``, ``"sync"`` or ``"frozen"``) turns ``module`` into (:mod:`batchnorm._protocol`)."""
    if declares_protocol(module):
        answers = {
            "torch": module.torch_equivalent,
            "sync": module.sync_equivalent,
            "frozen": module.frozen_equivalent,
        }
        return answers[tool]()
    from .sync import SyncBatchNorm
    from .variants import FrozenBatchNorm

    answers_for_torch: dict[str, Equivalent] = {
        "torch": Kept("already torch's"),
        "sync": SyncBatchNorm,
        "frozen": FrozenBatchNorm,
    }
    return answers_for_torch[tool]


def refuse(answer: Equivalent, module: nn.Module, path: str, caller: str) -> None:
    """Raise the ValueError of a :class:`Refused` answer, naming the module and the reason."""
    if isinstance(answer, Refused):
        raise ValueError(f"{caller}: cannot convert {describe(module, path)}: {answer.reason}")


def describe(module: nn.Module, path: str) -> str:
    """'features.1 (BatchNorm2d)', or the class name alone for the root module."""
    return f"{path} ({type(module).__name__})" if path else type(module).__name__


def check_materialized(module: nn.Module, path: str) -> None:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"{describe(module, path)}: expected a materialized batch norm, got a lazy module that has "
            f"not seen an input yet; run one forward pass first"
        )


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """Device and dtype of a batch norm's tensors, so that its replacement is built alike."""
    for tensor in (getattr(module, "weight", None), getattr(module, "running_mean", None)):
        if isinstance(tensor, Tensor):
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def rebuild(old: nn.Module, cls: Callable[..., nn.Module], path: str, **extra: Any) -> nn.Module:
    """A ``cls`` batch norm configured as ``old`` that shares its parameters and buffers.

    Sharing (not copying) keeps optimizers that already hold the parameters working, as torch's
    ``convert_sync_batchnorm`` does; the tools deep-copy the model first.
    """
    check_materialized(old, path)
    affine = bool(old.affine)
    new = cls(
        num_features=old.num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=affine,
        track_running_stats=old.track_running_stats,
        bias=old.bias is not None or not affine,
        **extra,
        **factory_kwargs(old),
    )
    if affine:
        new.weight = old.weight
        new.bias = old.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        # Buffers registered as None stay None: setattr on a registered buffer name keeps it a buffer.
        setattr(new, name, getattr(old, name))
    if isinstance(old, _BatchNormBase) and isinstance(new, _BatchNormBase):
        new.skip_nonfinite = old.skip_nonfinite
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def convert_to(module: nn.Module, target: type[nn.Module], path: str, **extra: Any) -> nn.Module:
    """``module`` rebuilt as ``target`` (sharing its parameters and buffers), keeping the activation
    it fuses, if any; a frozen target gets copies of the batch-norm state as its buffers."""
    fused: Any = module
    if "process_group" not in extra and "process_group" in inspect.signature(target).parameters:
        extra = {**extra, "process_group": getattr(module, "process_group", None)}
    if declares_protocol(module) and fused.fused_activation() is not None:
        extra = {**extra, "activation": fused.activation, "activation_param": fused.activation_param}
    from .variants import FrozenBatchNorm

    if issubclass(target, FrozenBatchNorm):
        return _frozen(module, target, path, **extra)
    return rebuild(module, target, path, **extra)


def _frozen(module: Any, target: type[nn.Module], path: str, **extra: Any) -> nn.Module:
    check_materialized(module, path)
    if module.running_mean is None or module.running_var is None:
        raise ValueError(
            f"freeze: expected every batch norm to have running statistics, got {describe(module, path)} "
            f"without (track_running_stats=False)"
        )
    factory = {"device": module.running_mean.device, "dtype": module.running_mean.dtype}
    frozen: Any = target(module.num_features, module.eps, **factory, **extra)
    frozen.running_mean = module.running_mean.detach().clone()
    frozen.running_var = module.running_var.detach().clone()
    if module.weight is not None:
        frozen.weight = module.weight.detach().clone()
    if module.bias is not None:
        frozen.bias = module.bias.detach().clone()
    frozen.train(module.training)
    return frozen  # type: ignore[no-any-return]


def swap_modules(model: nn.Module, convert: Callable[[nn.Module, str], nn.Module | None]) -> nn.Module:
    """Replace every module for which ``convert(module, path)`` returns a module; returns the root.

    A replaced module's children are not visited. All replacements are built before the first
    one is installed, so that an error raised by ``convert`` leaves ``model`` as it was.
    """
    root = convert(model, "")
    if root is not None:
        return root
    replacements: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}.{name}" if prefix else name
            new = convert(child, path)
            if new is None:
                visit(child, path)
            else:
                replacements.append((parent, name, new))

    visit(model, "")
    for parent, name, new in replacements:
        setattr(parent, name, new)
    return model


def check_materialized_batch_norms(model: nn.Module) -> None:
    """Before any copy or change: a lazy batch norm that has not seen an input has no state to convert."""
    for path, module in model.named_modules():
        if is_batch_norm(module):
            check_materialized(module, path)


def convert_batch_norms(model: nn.Module, tool: str, caller: str, **extra: Any) -> nn.Module:
    """Every batch norm of ``model`` replaced, IN PLACE, by what it declares for ``tool`` (``"torch"``,
    ``"sync"`` or ``"frozen"``, see :func:`equivalent`); returns the (possibly new) root.

    Raises ValueError before any change for a lazy batch norm that has not seen an input, a
    batch-norm-like module the tools do not know, or one whose answer is :class:`Refused`.
    """
    check_materialized_batch_norms(model)
    check_known(model, caller)

    def convert(module: nn.Module, path: str) -> nn.Module | None:
        if not batch_norm_like(module):
            return None
        answer = equivalent(module, tool)
        refuse(answer, module, path, caller)
        if isinstance(answer, Kept):
            return None  # its children are still visited: the inner batch norm of a fused module
        assert not isinstance(answer, Refused)
        return convert_to(module, answer, path, **extra)

    return swap_modules(model, convert)


def statistics_layers(model: nn.Module, caller: str, *, frozen: bool) -> list[Any]:
    """The batch-norm state (``batch_norm_state()``) of every batch norm in ``model`` that has
    running statistics, each once; with ``frozen=False`` only those that training updates.

    Raises ValueError, naming it, for a batch-norm-like module the tools do not know.
    """
    check_known(model, caller)
    layers: dict[int, Any] = {}
    for module in model.modules():
        if not batch_norm_like(module):
            continue
        state = module.batch_norm_state() if declares_protocol(module) else module
        # Asked of the state: a convolution + batch norm whose batch norm was frozen has fixed statistics.
        if not (frozen or getattr(state, "tracks_statistics", True)):
            continue
        if isinstance(getattr(state, "running_mean", None), Tensor) and isinstance(
            getattr(state, "running_var", None), Tensor
        ):
            layers[id(state)] = state
    return list(layers.values())
