"""Port of PyTorch's OpInfo tests for batch norm (test/test_ops.py, test_ops_gradients.py, test_ops_fwd_gradients.py).

The OpInfos of ``nn.functional.batch_norm`` (both variants) and of the aten ops ``native_batch_norm``,
``_native_batch_norm_legit`` and ``_batch_norm_with_update`` from
``torch.testing._internal.common_methods_invocations.op_db`` run through the test bodies of those
files, copied with only the style changed, with the op replaced by the target's (tests/torch_suite.py):
``batch_norm`` itself, and for the aten ops the tiny adapters below built on the target's
``batch_norm`` and batch statistics. The control run (``BATCHNORM_TORCH_SUITE=torch``) runs the same
adapters on ``torch.nn.functional.batch_norm``, which proves them. Test ids keep torch's op names.

Ported: TestCommon.test_noncontiguous_samples, test_variant_consistency_eager, test_dtypes, test_out and
test_out_warning (``nn.functional.batch_norm``: checks that ``out=`` is refused); TestBwdGradients.test_fn_grad,
test_fn_gradgrad (gradcheck / gradgradcheck with batched grad); TestFwdGradients.test_fn_fwgrad_bwgrad,
test_forward_mode_AD (forward AD with batched forward grad). The OpInfos' own skips apply (torch skips
test_forward_mode_AD of the three aten ops). Cut for time: test_dtypes and the gradient tests run on
``nn.functional.batch_norm`` only (see ``ported_grad_op_db``).

Not ported, and why:
- the ``without_cudnn`` variant: CUDA-only (``dtypes=empty_types()`` on CPU, ``@onlyCUDA``): no CPU test.
- test_errors: none of these OpInfos has error inputs; test_complex_half_reference_testing,
  test_non_standard_bool_values,
  TestMathBits (conj/neg views), test_promotes_int_to_float: batch norm supports none of those dtypes.
- test_inplace_grad/gradgrad, test_inplace_forward_mode_AD: no in-place variant (they only skip);
  test_fn_fail_gradgrad: batch norm supports gradgrad (it only skips).
- test_out / test_out_warning / test_out_requires_grad_error / test_meta_consistency_out_dtype_mismatch of the
  aten ops: the ``out=`` overloads of torch's dispatcher ops, not batch-norm behaviour (the adapters have none).
- test_multiple_devices, test_compare_cpu: CUDA/XPU only. test_numpy_ref, test_python_ref*: these OpInfos have
  no NumPy reference and the python refs test torch's decompositions, not this op.
- TestCompositeCompliance (incl. test_cow_input), TestFakeTensor, TestTags, TestRefsOpsInfo, TestJit, TestMeta,
  TestDecomp: torch internals (tensor-subclass compliance of CompositeImplicit kernels, copy-on-write storage,
  fake/meta tensors, dispatcher tags, TorchScript, decompositions), not batch-norm behaviour.
"""

# Ported code is kept as torch wrote it: zip() without strict=, nested ifs, test_forward_mode_AD, and the blind
# `except Exception` / `assertRaises(Exception)` of its dtype and out= checks.
# E402: torch.testing._internal is imported after torch_suite.import_torch_testing().
# ruff: noqa: B017, B905, BLE001, E402, N802, SIM102

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial

import pytest
import torch

from . import torch_suite

# Before anything imports torch.testing._internal: keeps its global side effects from the rest of the suite.
torch_suite.import_torch_testing("common_cuda", "common_device_type", "common_dtype", "common_methods_invocations")

from torch.testing._internal.common_cuda import with_tf32_off
from torch.testing._internal.common_device_type import (
    OpDTypes,
    instantiate_device_type_tests,
    onlyNativeDeviceTypesAnd,
    ops,
    skipMeta,
    skipXPU,
)
from torch.testing._internal.common_dtype import (
    all_types_and_complex_and,
    floating_and_complex_types_and,
)
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_utils import (
    TEST_WITH_TORCHDYNAMO,
    TestCase,
    TestGradients,
    clone_input_helper,
    is_iterable_of_tensors,
    noncontiguous_like,
    suppress_warnings,
    unMarkDynamoStrictTest,
)

pytestmark = [
    # gradgradcheck's forward-over-reverse check (test_fn_fwgrad_bwgrad) calls torch.jit.script inside
    # torch, for torch's own batch_norm as well: torch internals, not about batch norm.
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


# --- Adapters: the aten batch-norm ops computed with the target's batch_norm + batch statistics. ---
# They map (output, save_mean, save_invstd[, reserve]) of the aten ops: output = batch_norm(...);
# in training save_mean = batch mean, save_invstd = 1 / sqrt(biased batch var + eps), as torch, not
# differentiable (torch marks them so); in eval both are empty, as torch on CPU; reserve (cuDNN's
# workspace) is an empty uint8 tensor on CPU.


def _native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    output = torch_suite.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if not training:
        return output, input.new_empty(0), input.new_empty(0)
    with torch.no_grad():
        mean, var = torch_suite.batch_norm_stats(input)
        return output, mean.to(input.dtype), (var + eps).rsqrt().to(input.dtype)


def _native_batch_norm_legit(input, weight, bias, *args):
    # (running_mean, running_var, training, momentum, eps) or, the no_stats overload, (training, momentum, eps).
    running_mean, running_var, training, momentum, eps = args if len(args) == 5 else (None, None, *args)
    return _native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)


def _batch_norm_with_update(input, weight, bias, running_mean, running_var, momentum, eps):
    output, mean, invstd = _native_batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps)
    return output, mean, invstd, torch.empty(0, dtype=torch.uint8, device=input.device)


_TARGET_OPS = {
    "nn.functional.batch_norm": torch_suite.batch_norm,
    "native_batch_norm": _native_batch_norm,
    "_native_batch_norm_legit": _native_batch_norm_legit,
    "_batch_norm_with_update": _batch_norm_with_update,
}


def _port(torch_op):
    op = copy.copy(torch_op)
    op.op = _TARGET_OPS[torch_op.name]
    assert op.method_variant is None and op.inplace_variant is None and not op.aliases
    return op


ported_op_db = [_port(op) for op in op_db if op.name in _TARGET_OPS]
assert sorted((op.name, op.variant_test_name) for op in ported_op_db) == [
    ("_batch_norm_with_update", ""),
    ("_native_batch_norm_legit", ""),
    ("native_batch_norm", ""),
    ("nn.functional.batch_norm", ""),
    ("nn.functional.batch_norm", "without_cudnn"),
]
# The ops without an out= variant (nn.functional.batch_norm): test_out checks they refuse out=.
ported_ops_without_out = [op for op in ported_op_db if not op.supports_out]
# Cut for time: test_dtypes and the gradient tests run on nn.functional.batch_norm only. The adapters
# compute with that same batch_norm (plus detached batch statistics), on the same samples less the
# empty ones: their dtype support and their only differentiable output are batch_norm's.
ported_grad_op_db = [op for op in ported_op_db if op.name == "nn.functional.batch_norm"]

# variant testing is only done with torch.float and torch.cfloat to avoid
#   excessive test times and maximize signal to noise ratio
_variant_ops = partial(ops, dtypes=OpDTypes.supported, allowed_dtypes=(torch.float, torch.cfloat))

# gradcheck requires double precision
_gradcheck_ops = partial(ops, dtypes=OpDTypes.supported, allowed_dtypes=[torch.double, torch.cdouble])


# Tests that apply to all operators and aren't related to any particular
#   system
@unMarkDynamoStrictTest
class TestCommon(TestCase):
    exact_dtype = True

    # Tests that the function produces the same result when called with
    #   noncontiguous tensors.
    @skipXPU
    @with_tf32_off
    @onlyNativeDeviceTypesAnd(["hpu"])
    @suppress_warnings
    @ops(ported_op_db, allowed_dtypes=(torch.float32, torch.long, torch.complex64))
    def test_noncontiguous_samples(self, device, dtype, op):
        test_grad = dtype in op.supported_backward_dtypes(torch.device(device).type)
        sample_inputs = op.sample_inputs(device, dtype, requires_grad=test_grad)
        for sample_input in sample_inputs:
            t_inp, t_args, t_kwargs = (
                sample_input.input,
                sample_input.args,
                sample_input.kwargs,
            )
            noncontig_sample = sample_input.noncontiguous()
            n_inp, n_args, n_kwargs = (
                noncontig_sample.input,
                noncontig_sample.args,
                noncontig_sample.kwargs,
            )

            # validates forward
            expected = op(t_inp, *t_args, **t_kwargs)
            actual = op(n_inp, *n_args, **n_kwargs)

            self.assertEqual(actual, expected)

            # Validate backward
            # Short-circuits if the op doesn't support grad in this device x dtype
            if not test_grad:
                continue

            expected = sample_input.output_process_fn_grad(expected)
            actual = sample_input.output_process_fn_grad(actual)

            if isinstance(expected, torch.Tensor):
                grad_for_expected = torch.randn_like(expected)
                grad_for_actual = noncontiguous_like(grad_for_expected)
            elif isinstance(expected, Sequence):
                # Filter output elements that do not require grad
                expected = [t for t in expected if isinstance(t, torch.Tensor) and t.requires_grad]
                actual = [n for n in actual if isinstance(n, torch.Tensor) and n.requires_grad]
                grad_for_expected = [torch.randn_like(t) for t in expected]
                grad_for_actual = [noncontiguous_like(n) for n in grad_for_expected]
            else:
                # Nothing to do if it returns a scalar or things like that
                continue

            # Concatenate inputs into a tuple
            t_inputs = (t_inp, *t_args) if isinstance(t_inp, torch.Tensor) else tuple(t_inp) + t_args
            n_inputs = (n_inp, *n_args) if isinstance(n_inp, torch.Tensor) else tuple(n_inp) + n_args

            # Filter the elements that are tensors that require grad
            t_input_tensors = [t for t in t_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
            n_input_tensors = [n for n in n_inputs if isinstance(n, torch.Tensor) and n.requires_grad]

            self.assertEqual(len(t_input_tensors), len(n_input_tensors))

            # Some functions may not use all the inputs to generate gradients. One of the
            # few examples of this "odd" behaviour is F.hinge_embedding_loss
            t_grads = torch.autograd.grad(expected, t_input_tensors, grad_for_expected, allow_unused=True)
            n_grads = torch.autograd.grad(actual, n_input_tensors, grad_for_actual, allow_unused=True)

            msg = "Got different gradients for contiguous / non-contiguous inputs wrt input {}."
            for i, (t, n) in enumerate(zip(t_grads, n_grads)):
                self.assertEqual(t, n, msg=msg.format(i))

    # Separates one case from the following test_out because many ops don't properly implement the
    #   incorrectly sized out parameter warning properly yet
    # Cases test here:
    #   - out= with the correct dtype and device, but the wrong shape
    # (Ported for the ops without out=: what runs is the check that out= is refused.)
    @skipXPU
    @ops(ported_ops_without_out, dtypes=OpDTypes.none)
    def test_out_warning(self, device, op):
        # Prefers running in float32 but has a fallback for the first listed supported dtype
        supported_dtypes = op.supported_dtypes(self.device_type)
        if len(supported_dtypes) == 0:
            self.skipTest("Skipped! Op has not supported dtypes on this device.")
        dtype = torch.float32 if torch.float32 in supported_dtypes else next(iter(supported_dtypes))

        samples = op.sample_inputs(device, dtype)
        for sample in samples:
            # calls it normally to get the expected result
            expected = op(sample.input, *sample.args, **sample.kwargs)
            op_out = partial(op, sample.input, *sample.args, **sample.kwargs)

            # Short-circuits if output is not a single tensor or an
            #   iterable of tensors
            if not isinstance(expected, torch.Tensor) and not is_iterable_of_tensors(expected, include_empty=True):
                self.skipTest("Skipped! Only supports single tensor or iterable of tensor outputs.")

            # Validates the op doesn't support out if it claims not to
            assert not op.supports_out
            with self.assertRaises(Exception):
                assert op_out(out=expected) != NotImplemented
            return

    # Validates ops implement the correct out= behavior
    # (Ported for the ops without out=: what runs is the check that out= is refused.)
    @skipXPU
    @ops(ported_ops_without_out, dtypes=OpDTypes.any_one)
    def test_out(self, device, dtype, op):
        # Prefers running in float32 but has a fallback for the first listed supported dtype
        samples = op.sample_inputs(device, dtype)

        for sample in samples:
            # calls it normally to get the expected result
            expected = op(sample.input, *sample.args, **sample.kwargs)
            op_out = partial(op, sample.input, *sample.args, **sample.kwargs)

            # Short-circuits if output is not a single tensor or an
            #   iterable of tensors
            if not isinstance(expected, torch.Tensor) and not is_iterable_of_tensors(expected, include_empty=True):
                self.skipTest("Skipped! Only supports single tensor or iterable of tensor outputs.")

            # Validates the op doesn't support out if it claims not to
            assert not op.supports_out
            with self.assertRaises(Exception):
                assert op_out(out=expected) != NotImplemented
            return

    # Tests that the forward and backward passes of operations produce the
    #   same values for the cross-product of op variants (method, inplace)
    #   against eager's gold standard op function variant
    @skipXPU
    @_variant_ops(ported_op_db)
    def test_variant_consistency_eager(self, device, dtype, op):
        # Acquires variants (method variant, inplace variant, operator variant, inplace_operator variant, aliases)

        method = op.method_variant
        inplace = op.inplace_variant
        operator = op.operator_variant
        inplace_operator = op.inplace_operator_variant

        # list of all inplace ops: inplace variant + alias inplace variants if exist
        inplace_ops = [inplace, inplace_operator]
        variants = [method, inplace, operator, inplace_operator]
        operators = [operator, inplace_operator]

        for a_op in op.aliases:
            variants.append(a_op.op)
            variants.append(a_op.method_variant)
            variants.append(a_op.inplace_variant)
            inplace_ops.append(a_op.inplace_variant)

        inplace_variants = tuple(filter(None, inplace_ops))
        variants = tuple(filter(None, variants))
        operators = tuple(filter(None, operators))

        _requires_grad = dtype in op.supported_backward_dtypes(torch.device(device).type)

        include_conjugated_inputs = op.test_conjugated_samples and dtype.is_complex
        samples = op.sample_inputs(
            device,
            dtype,
            requires_grad=_requires_grad,
            include_conjugated_inputs=include_conjugated_inputs,
        )
        samples = list(samples)

        def _test_consistency_helper(samples, variants):
            for sample in samples:
                # TODO: Check grad for all Tensors requiring grad if sample.input is TensorList
                tensor = sample.input if isinstance(sample.input, torch.Tensor) else sample.input[0]

                # Computes function forward and backward values
                tensor.grad = None
                expected_forward = op(sample.input, *sample.args, **sample.kwargs)
                expected_grad = None

                output_process_fn_grad = sample.output_process_fn_grad if sample.output_process_fn_grad else lambda x: x

                # Skips inplace variants if the output dtype is not the same as
                #   the input dtype
                skip_inplace = False
                if isinstance(expected_forward, torch.Tensor) and expected_forward.dtype is not tensor.dtype:
                    skip_inplace = True

                # TODO: backward consistency only supported for single tensor outputs
                # TODO: backward consistency only checked on sample.input, not all
                #   tensor inputs
                # TODO: update to handle checking grads of all tensor inputs as
                #   derived from each tensor output
                if isinstance(expected_forward, torch.Tensor) and dtype in op.supported_backward_dtypes(
                    torch.device(device).type
                ):
                    out = output_process_fn_grad(expected_forward).sum()
                    if out.dtype.is_complex:
                        out = out.abs()
                    out.backward()
                    expected_grad = tensor.grad

                # Test eager consistency
                for variant in variants:
                    # Skips inplace ops
                    if variant in inplace_ops and skip_inplace:
                        continue

                    # Compares variant's forward
                    # Note: copies the to-be-modified input when testing the inplace variant
                    tensor.grad = None
                    cloned = clone_input_helper(sample.input) if variant in inplace_ops else sample.input

                    if variant in inplace_ops and sample.broadcasts_input:
                        with self.assertRaises(
                            RuntimeError,
                            msg=(
                                "inplace variant either incorrectly allowed "
                                f"resizing or you have marked the sample {sample.summary()}"
                                " incorrectly with `broadcasts_self=True"
                            ),
                        ):
                            variant_forward = variant(cloned, *sample.args, **sample.kwargs)
                        continue

                    if variant in operators and sample.kwargs:
                        # skip samples with kwargs for operator variants
                        continue

                    variant_forward = variant(cloned, *sample.args, **sample.kwargs)
                    self.assertEqual(expected_forward, variant_forward)

                    # Compares variant's backward
                    if expected_grad is not None and (variant not in inplace_ops or op.supports_inplace_autograd):
                        out = output_process_fn_grad(variant_forward).sum()
                        if out.dtype.is_complex:
                            out = out.abs()
                        out.backward()
                        self.assertEqual(expected_grad, tensor.grad)

        _test_consistency_helper(samples, variants)

        def _test_inplace_preserve_storage(samples, variants):
            for sample in samples:
                # Skips inplace variants if the output dtype is not the same as
                #   the input dtype
                expected_forward = op(sample.input, *sample.args, **sample.kwargs)
                tensor = sample.input if isinstance(sample.input, torch.Tensor) else sample.input[0]
                skip_inplace = False
                if isinstance(expected_forward, torch.Tensor) and expected_forward.dtype is not tensor.dtype:
                    skip_inplace = True
                if skip_inplace:
                    return
                for variant in variants:
                    cloned = clone_input_helper(sample.input) if variant in inplace_ops else sample.input
                    inp_tensor = cloned if isinstance(cloned, torch.Tensor) else cloned[0]
                    data_ptr = inp_tensor.data_ptr()
                    if variant in operators and sample.kwargs:
                        # skip samples with kwargs for operator variants
                        continue

                    variant_forward = variant(cloned, *sample.args, **sample.kwargs)
                    # TODO Support non-tensor outputs if they exist for inplace ops
                    if isinstance(variant_forward, torch.Tensor):
                        self.assertEqual(data_ptr, variant_forward.data_ptr(), atol=0, rtol=0)
                    else:
                        self.assertTrue(
                            False,
                            "Non-tensor outputs for inplace ops are not supported",
                        )

        if len(inplace_ops) > 0:
            inplace_samples = list(filter(lambda sample: not sample.broadcasts_input, samples))
            _test_inplace_preserve_storage(inplace_samples, inplace_variants)

    # Validates that each OpInfo specifies its forward and backward dtypes
    #   correctly for CPU and CUDA devices
    @skipXPU
    @skipMeta
    @onlyNativeDeviceTypesAnd(["hpu"])
    @ops(ported_grad_op_db, dtypes=OpDTypes.none)
    def test_dtypes(self, device, op):
        # Check complex32 support only if the op claims.
        # TODO: Once the complex32 support is better, we should add check for complex32 unconditionally.
        device_type = torch.device(device).type
        include_complex32 = (torch.complex32,) if op.supports_dtype(torch.complex32, device_type) else ()

        # dtypes to try to backward in
        allowed_backward_dtypes = floating_and_complex_types_and(*((torch.half, torch.bfloat16, *include_complex32)))

        # lists for (un)supported dtypes
        supported_dtypes = set()
        unsupported_dtypes = set()
        supported_backward_dtypes = set()
        unsupported_backward_dtypes = set()
        dtype_error: dict[torch.dtype, Exception] = {}

        def unsupported(dtype, e):
            dtype_error[dtype] = e
            unsupported_dtypes.add(dtype)
            if dtype in allowed_backward_dtypes:
                unsupported_backward_dtypes.add(dtype)

        for dtype in all_types_and_complex_and(*((torch.half, torch.bfloat16, torch.bool, *include_complex32))):
            # tries to acquire samples - failure indicates lack of support
            requires_grad = dtype in allowed_backward_dtypes
            try:
                samples = tuple(op.sample_inputs(device, dtype, requires_grad=requires_grad))
            except Exception as e:
                unsupported(dtype, e)
                continue

            for sample in samples:
                # tries to call operator with the sample - failure indicates
                #   lack of support
                try:
                    result = op(sample.input, *sample.args, **sample.kwargs)
                    supported_dtypes.add(dtype)
                except Exception as e:
                    # NOTE: some ops will fail in forward if their inputs
                    #   require grad but they don't support computing the gradient
                    #   in that type! This is a bug in the op!
                    unsupported(dtype, e)
                    continue

                # Checks for backward support in the same dtype, if the input has
                # one or more tensors requiring grad
                def _tensor_requires_grad(x):
                    if isinstance(x, dict):
                        for v in x.values():
                            if _tensor_requires_grad(v):
                                return True
                    if isinstance(x, (list, tuple)):
                        for a in x:
                            if _tensor_requires_grad(a):
                                return True
                    return isinstance(x, torch.Tensor) and x.requires_grad

                requires_grad = (
                    _tensor_requires_grad(sample.input)
                    or _tensor_requires_grad(sample.args)
                    or _tensor_requires_grad(sample.kwargs)
                )
                if not requires_grad:
                    continue

                try:
                    result = sample.output_process_fn_grad(result)
                    if isinstance(result, torch.Tensor):
                        backward_tensor = result
                    elif isinstance(result, Sequence) and isinstance(result[0], torch.Tensor):
                        backward_tensor = result[0]
                    else:
                        continue

                    # Note: this grad may not have the same dtype as dtype
                    # For functions like complex (float -> complex) or abs
                    #   (complex -> float) the grad tensor will have a
                    #   different dtype than the input.
                    #   For simplicity, this is still modeled as these ops
                    #   supporting grad in the input dtype.
                    grad = torch.randn_like(backward_tensor)
                    backward_tensor.backward(grad)
                    supported_backward_dtypes.add(dtype)
                except Exception as e:
                    dtype_error[dtype] = e
                    unsupported_backward_dtypes.add(dtype)

        # Checks that dtypes are listed correctly and generates an informative
        #   error message

        supported_forward = supported_dtypes - unsupported_dtypes
        partially_supported_forward = supported_dtypes & unsupported_dtypes
        unsupported_forward = unsupported_dtypes - supported_dtypes
        supported_backward = supported_backward_dtypes - unsupported_backward_dtypes
        partially_supported_backward = supported_backward_dtypes & unsupported_backward_dtypes
        unsupported_backward = unsupported_backward_dtypes - supported_backward_dtypes

        device_type = torch.device(device).type

        claimed_forward = set(op.supported_dtypes(device_type))
        supported_but_unclaimed_forward = supported_forward - claimed_forward
        claimed_but_unsupported_forward = claimed_forward & unsupported_forward

        claimed_backward = set(op.supported_backward_dtypes(device_type))
        supported_but_unclaimed_backward = supported_backward - claimed_backward
        claimed_but_unsupported_backward = claimed_backward & unsupported_backward

        # Partially supporting a dtype is not an error, but we print a warning
        if (len(partially_supported_forward) + len(partially_supported_backward)) > 0:
            msg = f"Some dtypes for {op.name} on device type {device_type} are only partially supported!\n"
            if len(partially_supported_forward) > 0:
                msg = (
                    msg
                    + "The following dtypes only worked on some samples during forward: "
                    + f"{partially_supported_forward}.\n"
                )
            if len(partially_supported_backward) > 0:
                msg = (
                    msg
                    + "The following dtypes only worked on some samples during backward: "
                    + f"{partially_supported_backward}.\n"
                )
            print(msg)

        if (
            len(supported_but_unclaimed_forward)
            + len(claimed_but_unsupported_forward)
            + len(supported_but_unclaimed_backward)
            + len(claimed_but_unsupported_backward)
        ) == 0:
            return

        if TEST_WITH_TORCHDYNAMO:
            # NOTE: Also for TEST_WITH_TORCHINDUCTOR tests
            # Under compile, some ops may be decomposed into supported ops
            # So it is okay to have supported_but_unclaimed_*
            if (len(claimed_but_unsupported_forward) + len(claimed_but_unsupported_backward)) == 0:
                return

        # Generates error msg
        msg = f"The supported dtypes for {op.name} on device type {device_type} are incorrect!\n"
        if len(supported_but_unclaimed_forward) > 0:
            msg = (
                msg
                + "The following dtypes worked in forward but are not listed by the OpInfo: "
                + f"{supported_but_unclaimed_forward}.\n"
            )
        if len(supported_but_unclaimed_backward) > 0:
            msg = (
                msg
                + "The following dtypes worked in backward but are not listed by the OpInfo: "
                + f"{supported_but_unclaimed_backward}.\n"
            )
        if len(claimed_but_unsupported_forward) > 0:
            msg = (
                msg
                + "The following dtypes did not work in forward but are listed by the OpInfo: "
                + f"{claimed_but_unsupported_forward}.\n"
            )
        if len(claimed_but_unsupported_backward) > 0:
            msg = (
                msg
                + "The following dtypes did not work in backward "
                + f"but are listed by the OpInfo: {claimed_but_unsupported_backward}.\n"
            )

        all_claimed_but_unsupported = set.union(claimed_but_unsupported_backward, claimed_but_unsupported_forward)
        if all_claimed_but_unsupported:
            msg += "Unexpected failures raised the following errors:\n"
            for dtype in all_claimed_but_unsupported:
                msg += f"{dtype} - {dtype_error[dtype]}\n"

        self.fail(msg)


# From test/test_ops_gradients.py.
@unMarkDynamoStrictTest
class TestBwdGradients(TestGradients):
    # Tests that gradients are computed correctly
    @_gradcheck_ops(ported_grad_op_db)
    def test_fn_grad(self, device, dtype, op):
        # This is verified by test_dtypes in test_ops.py
        if dtype not in op.supported_backward_dtypes(torch.device(device).type):
            self.skipTest("Skipped! Dtype is not in supported backward dtypes!")
        else:
            self._grad_test_helper(device, dtype, op, op.get_op())

    # Test that gradients of gradients are computed correctly
    @_gradcheck_ops(ported_grad_op_db)
    def test_fn_gradgrad(self, device, dtype, op):
        self._skip_helper(op, device, dtype)
        if not op.supports_gradgrad:
            self.skipTest("Op claims it doesn't support gradgrad. This is not verified.")
        else:
            self._check_helper(device, dtype, op, op.get_op(), "bwgrad_bwgrad")


# From test/test_ops_fwd_gradients.py.
@unMarkDynamoStrictTest
class TestFwdGradients(TestGradients):
    # Test that forward-over-reverse gradgrad is computed correctly
    @_gradcheck_ops(ported_grad_op_db)
    def test_fn_fwgrad_bwgrad(self, device, dtype, op):
        self._skip_helper(op, device, dtype)

        if op.supports_fwgrad_bwgrad:
            self._check_helper(device, dtype, op, op.get_op(), "fwgrad_bwgrad")
        else:
            err_msg = r"Trying to use forward AD with .* that does not support it"
            hint_msg = (
                "Running forward-over-backward gradgrad for an OP that has does not support it did not "
                "raise any error. If your op supports forward AD, you should set supports_fwgrad_bwgrad=True."
            )
            with self.assertRaisesRegex(NotImplementedError, err_msg, msg=hint_msg):
                self._check_helper(device, dtype, op, op.get_op(), "fwgrad_bwgrad")

    def _forward_grad_helper(self, device, dtype, op, variant, is_inplace):
        # TODO: clean up how attributes are passed to gradcheck from OpInfos
        def call_grad_test_helper():
            check_batched_forward_grad = (op.check_batched_forward_grad and not is_inplace) or (
                op.check_inplace_batched_forward_grad and is_inplace
            )
            self._grad_test_helper(
                device,
                dtype,
                op,
                variant,
                check_forward_ad=True,
                check_backward_ad=False,
                check_batched_grad=False,
                check_batched_forward_grad=check_batched_forward_grad,
            )

        if op.supports_forward_ad:
            call_grad_test_helper()
        else:
            err_msg = r"Trying to use forward AD with .* that does not support it"
            hint_msg = (
                "Running forward AD for an OP that has does not support it did not "
                "raise any error. If your op supports forward AD, you should set supports_forward_ad=True"
            )
            with self.assertRaisesRegex(NotImplementedError, err_msg, msg=hint_msg):
                call_grad_test_helper()

    @_gradcheck_ops(ported_grad_op_db)
    def test_forward_mode_AD(self, device, dtype, op):
        self._skip_helper(op, device, dtype)

        self._forward_grad_helper(device, dtype, op, op.get_op(), is_inplace=False)


instantiate_device_type_tests(TestCommon, globals(), only_for="cpu")
instantiate_device_type_tests(TestBwdGradients, globals(), only_for="cpu")
instantiate_device_type_tests(TestFwdGradients, globals(), only_for="cpu")

torch_suite.apply_deviations(globals())
