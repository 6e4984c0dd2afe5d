"""Tests for transforms/op_classes.py: consistent, immutable lists grounded in TF's kernel registry."""

import itertools
import types

import pytest
from tensorflow.core.framework import types_pb2
from tensorflow.python.framework import op_def_registry

from tf_bf16.capability import KernelRegistry

try:
    from tf_bf16.transforms import op_classes as oc
except ImportError:  # source checkout: transforms/ is importable from the repository root
    from transforms import op_classes as oc

BF16 = types_pb2.DT_BFLOAT16
FLOAT = types_pb2.DT_FLOAT
PAINTABLE = (oc.OpClass.ALLOW, oc.OpClass.INFER, oc.OpClass.CLEAR)
ALL_LISTED = sorted(set().union(*oc.OPS_BY_CLASS.values()))


@pytest.fixture(scope="module")
def registry():
    return KernelRegistry()


def test_no_op_in_two_classes():
    for (a, ops_a), (b, ops_b) in itertools.combinations(oc.OPS_BY_CLASS.items(), 2):
        assert not (ops_a & ops_b), f"{a.name} and {b.name} share {sorted(ops_a & ops_b)}"
    for cls, ops in oc.OPS_BY_CLASS.items():
        for op in ops:
            assert oc.op_class(op) is cls


def test_index_guard_rejects_duplicates():
    with pytest.raises(ValueError, match="MatMul"):
        oc._index({oc.OpClass.ALLOW: frozenset({"MatMul"}), oc.OpClass.DENY: frozenset({"MatMul"})})


def test_every_listed_op_exists_in_tensorflow():
    # Guards against typos such as TF's own historical "Sum" "Tanh" -> "SumTanh".
    unknown = [op for op in ALL_LISTED if op_def_registry.get(op) is None]
    assert unknown == []


@pytest.mark.parametrize("cls", PAINTABLE, ids=lambda c: c.name)
def test_paintable_ops_have_a_cpu_bf16_kernel(registry, cls):
    """Each ALLOW/INFER/CLEAR op: one CPU kernel takes all its float attrs as bf16 (U-type attrs fp32)."""
    lacking = []
    for op in sorted(oc.OPS_BY_CLASS[cls]):
        if op_def_registry.get(op) is None or op in oc.KERNEL_CHECK_OPS:
            continue
        fp32_only = oc.FP32_ONLY_ATTRS.get(op, frozenset())
        data_attrs = registry.float_attrs(op) - fp32_only
        assignment = {**{a: BF16 for a in data_attrs}, **{a: FLOAT for a in fp32_only}}
        if not data_attrs or not data_attrs <= registry.bf16_attrs(op) or not registry.supports(op, assignment):
            lacking.append(op)
    assert lacking == []


def test_kernel_check_ops_are_listed_and_really_lack_bf16(registry):
    # If a TF upgrade adds the kernel/OpDef support, this fails so the set is trimmed.
    assert oc.KERNEL_CHECK_OPS <= set(ALL_LISTED)
    for op in oc.KERNEL_CHECK_OPS:
        assert not registry.float_attrs(op) <= registry.bf16_attrs(op), op
    assert "T" not in registry.bf16_attrs("_FusedConv2D")


def test_numerically_unsafe_ops_are_deny():
    for op in ("Exp", "Expm1", "Log", "Log1p", "LogSoftmax", "Pow", "SoftmaxCrossEntropyWithLogits"):
        assert oc.op_class(op) is oc.OpClass.DENY, op


def test_representative_classes():
    assert oc.op_class("Conv2D") is oc.OpClass.ALLOW
    assert oc.op_class("MatMul") is oc.OpClass.ALLOW
    assert oc.op_class("_FusedMatMul") is oc.OpClass.ALLOW
    assert oc.op_class("FusedBatchNormV3") is oc.OpClass.INFER
    assert oc.op_class("Mean") is oc.OpClass.INFER
    assert oc.op_class("Relu") is oc.OpClass.CLEAR
    assert oc.op_class("Maximum") is oc.OpClass.CLEAR
    assert oc.op_class("Reshape") is oc.OpClass.CLEAR


def test_unlisted_ops_stay_fp32():
    for op in ("Cast", "Const", "Placeholder", "QuantizeV2", "NoSuchOp", *oc.CONTROL_FLOW_OPS):
        assert oc.op_class(op) is None, op


def test_bf16_accumulating_ops_and_island_epilogues_are_infer_ops():
    assert oc.BF16_ACCUMULATE_OPS == {"Prod", "AvgPool", "AvgPool3D"}
    assert not {"Sum", "Mean"} & oc.BF16_ACCUMULATE_OPS   # TF's BF16 Sum/Mean accumulate in FP32
    assert oc.BF16_ACCUMULATE_OPS <= oc.INFER_OPS and oc.ISLAND_EPILOGUE_OPS <= oc.INFER_OPS
    assert 4 <= oc.MAX_BF16_ACCUMULATION < 16


def test_fp32_only_attrs_match_kernel_registry(registry):
    assert oc.FP32_ONLY_ATTRS["FusedBatchNormV3"] == frozenset({"U"})
    for op, attrs in oc.FP32_ONLY_ATTRS.items():
        assert op in oc.INFER_OPS | oc.ALLOW_OPS | oc.CLEAR_OPS
        assert attrs <= registry.float_attrs(op), op           # real float attrs of the op
        assert not attrs & registry.bf16_attrs(op), op         # that no CPU kernel takes as bf16


def test_data_is_immutable():
    for ops in (oc.ALLOW_OPS, oc.INFER_OPS, oc.CLEAR_OPS, oc.DENY_OPS, oc.BF16_ACCUMULATE_OPS, oc.ISLAND_EPILOGUE_OPS,
                oc.KERNEL_CHECK_OPS, oc.CONTROL_FLOW_OPS, *oc.FP32_ONLY_ATTRS.values()):
        assert isinstance(ops, frozenset)
    for mapping in (oc.FP32_ONLY_ATTRS, oc.OPS_BY_CLASS, oc._CLASS_OF):
        assert isinstance(mapping, types.MappingProxyType)
        with pytest.raises(TypeError):
            mapping["Exp"] = None
