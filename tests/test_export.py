"""``torch.export`` and ONNX export of a converted ResNet-18: one node per batch norm.

torch.export keeps each native kernel call as one opaque ``batchnorm::forward_train`` or
``forward_eval`` node (the fake kernels give the shapes); the ONNX exporter emits the standard
``BatchNormalization`` operator in eval mode, which runtimes fold into the convolution before it.
Both exported programs compute what torch's model computes.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import Tensor, nn

import batchnorm
from batchnorm import _native
from batchnorm.experiments.models import resnet18

from .conftest import tolerances

TOL = tolerances(torch.float32)
BATCH_NORMS = 20  # in a ResNet-18

native = pytest.mark.skipif(not _native.AVAILABLE, reason="the native kernels are not built")


def pair() -> tuple[nn.Module, nn.Module, Tensor]:
    """(torch's narrow ResNet-18, its conversion, an input); running statistics away from 0 and 1."""
    torch.manual_seed(0)
    model = resnet18(width=8, norm=nn.BatchNorm2d)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.3)
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    return model, batchnorm.from_torch(model), torch.randn(4, 3, 32, 32)


def call_counts(program: torch.export.ExportedProgram) -> collections.Counter[str]:
    return collections.Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")


@native
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_export_keeps_each_normalization_one_node(mode: str) -> None:
    model, converted, x = pair()
    model.train(mode == "train")
    converted.train(mode == "train")
    program = torch.export.export(converted, (x,))
    counts = call_counts(program)
    assert counts[f"batchnorm.forward_{mode}.default"] == BATCH_NORMS
    # Nothing of the normalization's arithmetic is left in the graph beside the op.
    for decomposed in ("aten.var_mean.correction", "aten.rsqrt.default", "aten.mul.Tensor", "aten.addcmul.default"):
        assert counts[decomposed] == 0, decomposed
    exported = program.module()
    torch.testing.assert_close(exported(x), model(x), **TOL)
    # In training the exported program updates the running statistics as the module does.
    torch.testing.assert_close(exported.state_dict(), model.state_dict(), **TOL)


onnx_tests = pytest.mark.filterwarnings(
    # Raised inside torch's ONNX exporter on this torch version, not by our code.
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
    # The TorchScript exporter traces the module: the shape checks become constants of the trace.
    "ignore::torch.jit.TracerWarning",
)


def onnx_ops(proto: object) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in proto.graph.node)  # type: ignore[attr-defined]


def run_onnx(proto: object, x: Tensor) -> Tensor:
    from onnx.reference import ReferenceEvaluator

    (output, *_) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})  # type: ignore[attr-defined]
    return torch.from_numpy(output)


@onnx_tests
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_onnx_export_emits_one_batch_normalization_per_batch_norm(backend: str) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model, converted, x = pair()
    model.eval()
    converted.eval()
    # Unoptimized: what the exporter emits for each of our modules, whatever the backend.
    with batchnorm.using_backend(backend):
        ours = torch.onnx.export(converted, (x,), dynamo=True, optimize=False).model_proto
    ops = onnx_ops(ours)
    assert ops["BatchNormalization"] == BATCH_NORMS
    assert ops["Mul"] == 0 and ops["Sqrt"] == 0 and ops["Div"] == 0
    torch.testing.assert_close(run_onnx(ours, x), model(x), **TOL)
    # Optimized, as exported by default: the batch norms folded into the convolutions, as torch's.
    ours_optimized = torch.onnx.export(converted, (x,), dynamo=True).model_proto
    torch_optimized = torch.onnx.export(model, (x,), dynamo=True).model_proto
    assert onnx_ops(ours_optimized) == onnx_ops(torch_optimized)
    torch.testing.assert_close(run_onnx(ours_optimized, x), model(x), **TOL)


@onnx_tests
def test_torchscript_onnx_export_emits_batch_normalization() -> None:
    """The older TorchScript-based exporter too: no autograd.Function node, one BatchNormalization."""
    pytest.importorskip("onnx")
    import io

    import onnx

    model, converted, x = pair()
    model.eval()
    converted.eval()
    buffer = io.BytesIO()
    torch.onnx.export(converted, (x,), buffer, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    ops = onnx_ops(proto)
    assert ops["BatchNormalization"] == BATCH_NORMS and ops["Mul"] == 0
    torch.testing.assert_close(run_onnx(proto, x), model(x), **TOL)
