"""Tests for transforms/plan.py: the immutable PrecisionPlan every pass reads."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_bf16.transforms.graph import GraphIndex  # noqa: E402
from tf_bf16.transforms.plan import BF16, FP32, INT8, PrecisionPlan  # noqa: E402


def test_fields_are_frozen_and_copied():
    """A plan cannot be reassigned or edited, and later edits to the caller's dicts/lists do not reach it."""
    nodes = {"conv": BF16}
    op_types = {"Softmax": FP32}
    kernels = {"MatMul": frozenset({"T"})}
    inputs = ["x"]
    plan = PrecisionPlan(inputs=inputs, outputs=["out"], bf16_kernel_attrs=kernels,
                         node_precisions=nodes, op_type_precisions=op_types)
    assert plan.inputs == ("x",) and plan.outputs == ("out",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.inputs = ("y",)  # type: ignore[misc]
    for mapping in (plan.node_precisions, plan.op_type_precisions, plan.bf16_kernel_attrs):
        with pytest.raises(TypeError):
            mapping["new"] = FP32  # type: ignore[index]
    nodes["relu"] = FP32
    op_types["Softmax"] = BF16
    kernels["Relu"] = frozenset({"T"})
    inputs.append("y")
    assert dict(plan.node_precisions) == {"conv": BF16}
    assert plan.forced("s", "Softmax") == FP32
    assert not plan.kernel_has_bf16("Relu", "T")
    assert plan.inputs == ("x",)


@pytest.mark.parametrize("field, value", [
    ("node_precisions", {"conv": "fp16"}),
    ("node_precisions", {"conv": "BF16"}),
    ("op_type_precisions", {"Conv2D": "INT8"}),
    ("op_type_precisions", {"Conv2D": None}),
])
def test_bad_precision_refused(field, value):
    """Only 'int8', 'bf16' and 'fp32' are accepted; the error names the field and the bad entry."""
    with pytest.raises(ValueError, match=field) as info:
        PrecisionPlan(**{field: value})
    assert "Conv2D" in str(info.value) or "conv" in str(info.value)


def test_derived_plans_are_validated_too():
    """Copies made with with_fp32 or dataclasses.replace go through the same precision check."""
    plan = PrecisionPlan(node_precisions={"a": BF16})
    assert dict(plan.with_fp32(["b"]).node_precisions) == {"a": BF16, "b": FP32}
    with pytest.raises(ValueError):
        dataclasses.replace(plan, op_type_precisions={"MatMul": "half"})


def test_protected_are_node_names_of_inputs_and_outputs():
    """protected holds the node names behind input and output tensors, whatever port suffix they carry."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        values, indices = tf.math.top_k(x, k=2, name="topk")
        tf.identity(values, name="out")
    index = GraphIndex(graph.as_graph_def())
    plan = PrecisionPlan(inputs=("x:0",), outputs=("out:0", "topk:1"))
    assert plan.protected == frozenset({"x", "out", "topk"})
    assert all(name in index for name in plan.protected)
    assert PrecisionPlan().protected == frozenset()


def test_forced_node_entry_beats_op_type():
    """A node's own precision wins over its op type's; otherwise the op type's applies; else None."""
    plan = PrecisionPlan(node_precisions={"special_conv": BF16, "head": FP32},
                         op_type_precisions={"Conv2D": FP32, "MatMul": BF16})
    assert plan.forced("special_conv", "Conv2D") == BF16
    assert plan.forced("other_conv", "Conv2D") == FP32
    assert plan.forced("head", "MatMul") == FP32
    assert plan.forced("dense", "MatMul") == BF16
    assert plan.forced("relu", "Relu") is None


def test_allowed_sets_keep_the_forced_api_and_rank_below_forced_entries():
    """allowed(): a node's forced precision, else its allowed set, else its op type's (forced, then set), else
    all; forced() ignores the sets, and a node set hides an op-type force, as a node entry does."""
    plan = PrecisionPlan(node_precisions={"forced": BF16}, op_type_precisions={"MatMul": BF16, "Relu": FP32},
                         node_allowed={"forced": [INT8, FP32], "no_int8": [BF16, FP32], "no_bf16": (INT8, FP32)},
                         op_type_allowed={"Conv2D": {BF16, FP32}})
    assert plan.allowed("forced", "Conv2D") == {BF16} and plan.forced("forced", "Conv2D") == BF16
    assert plan.allowed("no_int8", "MatMul") == {BF16, FP32} and plan.forced("no_int8", "MatMul") is None
    assert plan.allowed("no_bf16", "Relu") == {INT8, FP32} and plan.forced("no_bf16", "Relu") is None
    assert plan.allowed("dense", "MatMul") == {BF16} and plan.forced("dense", "MatMul") == BF16
    assert plan.allowed("conv", "Conv2D") == {BF16, FP32} and plan.forced("conv", "Conv2D") is None
    assert plan.allowed("relu", "Softmax") == {INT8, BF16, FP32}
    tuned = plan.with_fp32(["no_bf16"])            # the tuner's force beats the user's set
    assert tuned.allowed("no_bf16", "Relu") == {FP32} and dict(tuned.node_allowed) == dict(plan.node_allowed)
    with pytest.raises(TypeError):
        plan.node_allowed["x"] = frozenset({BF16, FP32})  # type: ignore[index]
    assert isinstance(plan.node_allowed["no_int8"], frozenset)


@pytest.mark.parametrize("field, value", [
    ("node_allowed", {"conv": {BF16}}),                 # one precision is a force: node_precisions
    ("node_allowed", {"conv": {INT8, BF16}}),           # fp32, the fallback, must be in the set
    ("op_type_allowed", {"Conv2D": {"fp16", FP32}}),
    ("op_type_allowed", {"Conv2D": set()}),
])
def test_bad_allowed_set_refused(field, value):
    """An allowed set holds fp32 and one or two of int8, bf16; the error names the field and the entry."""
    with pytest.raises(ValueError, match=field) as info:
        PrecisionPlan(**{field: value})
    assert "conv" in str(info.value).lower()


def test_with_fp32_returns_a_new_plan():
    """with_fp32 forces the names FP32 (overriding BF16 entries) in a copy; the original and other fields stay."""
    plan = PrecisionPlan(inputs=("x",), outputs=("out",), bf16_kernel_attrs={"MatMul": frozenset({"T"})},
                         node_precisions={"a": BF16, "keep": BF16}, op_type_precisions={"Relu": BF16})
    tuned = plan.with_fp32(name for name in ("a", "b"))  # any iterable, a generator included
    assert tuned is not plan
    assert dict(tuned.node_precisions) == {"a": FP32, "keep": BF16, "b": FP32}
    assert tuned.forced("b", "Relu") == FP32 and plan.forced("b", "Relu") == BF16
    assert dict(plan.node_precisions) == {"a": BF16, "keep": BF16}
    assert (tuned.inputs, tuned.outputs) == (plan.inputs, plan.outputs)
    assert dict(tuned.op_type_precisions) == {"Relu": BF16}
    assert tuned.kernel_has_bf16("MatMul", "T") and not tuned.kernel_has_bf16("Relu", "T")
    with pytest.raises(TypeError):
        tuned.node_precisions["c"] = FP32  # type: ignore[index]


def test_kernel_has_bf16_without_table_assumes_yes():
    """With no kernel table (pure-algorithm tests) every op and attr is assumed to have a BF16 kernel."""
    plan = PrecisionPlan()
    assert plan.bf16_kernel_attrs is None
    assert plan.kernel_has_bf16("MatMul", "T")
    assert plan.kernel_has_bf16("NoSuchOp", "U")


def test_kernel_has_bf16_with_table():
    """With a table, only the listed attrs of listed ops have a BF16 kernel; an empty entry means none."""
    plan = PrecisionPlan(bf16_kernel_attrs={"MatMul": frozenset({"T"}), "FusedBatchNormV3": frozenset({"T"}),
                                            "Erf": frozenset()})
    assert plan.kernel_has_bf16("MatMul", "T")
    assert plan.kernel_has_bf16("FusedBatchNormV3", "T")
    assert not plan.kernel_has_bf16("FusedBatchNormV3", "U")
    assert not plan.kernel_has_bf16("Erf", "T")
    assert not plan.kernel_has_bf16("Conv2D", "T")
    assert PrecisionPlan(bf16_kernel_attrs={}).kernel_has_bf16("MatMul", "T") is False


def test_quantization_spec_is_frozen_and_checks_granularity():
    from tf_bf16.transforms.plan import QuantizationSpec

    spec = QuantizationSpec({"conv": (0.0, 6.0)})
    with pytest.raises(TypeError):
        spec.ranges["other"] = (0.0, 1.0)  # type: ignore[index]
    with pytest.raises(ValueError, match="weight_granularity"):
        QuantizationSpec({}, weight_granularity="per_row")
    assert PrecisionPlan(node_precisions={"conv": "int8"}).forced("conv", "Conv2D") == "int8"
