"""Tests for transforms/function_bodies.py: library functions converted with FP32 borders."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import function_pb2

from tf_bf16 import pipeline
from tf_bf16.model import Model
from tf_bf16.transforms import driver, graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.plan import PrecisionPlan

RNG = np.random.RandomState(3)
W = RNG.randn(16, 16).astype(np.float32)
SPEC = tf.TensorSpec([None, 16], tf.float32, name="x")

# A function whose signature has a type attr: it serves every T, so its body is not converted.
POLYMORPHIC = """
signature { name: "poly_identity" input_arg { name: "x" type_attr: "T" } output_arg { name: "y" type_attr: "T" }
            attr { name: "T" type: "type" } }
node_def { name: "id" op: "Identity" input: "x" attr { key: "T" value { placeholder: "T" } } }
ret { key: "y" value: "id:output:0" }
"""


def _graph_with_call():
    """An unfrozen graph: x -> PartitionedCall(inner: relu(x @ W) + 1) -> Identity."""
    @tf.function(autograph=False)
    def inner(x):
        return tf.nn.relu(tf.matmul(x, tf.constant(W))) + 1.0

    return tf.function(lambda x: inner(x)).get_concrete_function(SPEC).graph.as_graph_def()


def _run(graph_def, plan_kw=None, names=("convert_function_bodies",)):
    plan = PrecisionPlan(inputs=("x",), outputs=("Identity",), **(plan_kw or {}))
    context = TransformContext(plan, body_transforms=pipeline.BODY_TRANSFORMS)
    return driver.run_transforms(graph_def, context, names), context


def _body(graph_def, name):
    return next(f for f in graph_def.library.function if f.signature.name == name)


def test_body_goes_bf16_behind_unchanged_fp32_signature():
    gd = _graph_with_call()
    out, context = _run(gd)
    (name, report), = context.functions.items()
    before, after = _body(gd, name), _body(out, name)
    assert after.signature == before.signature         # callers stay valid: FP32 arguments and results
    ops = {n.op: n for n in after.node_def}
    assert ops["MatMul"].attr["T"].type == g.BFLOAT16
    assert report.converted and report.bf16_nodes >= 1
    assert report.casts == sum(n.op == "Cast" for n in after.node_def) >= 2
    x = RNG.rand(4, 16).astype(np.float32)
    reference = Model(gd, inputs=["x"], outputs=["Identity"]).run([x])[0]
    converted = Model(out, inputs=["x"], outputs=["Identity"]).run([x])[0]
    np.testing.assert_allclose(converted, reference, rtol=0.03, atol=0.1)
    assert not np.array_equal(converted, reference)   # it really ran in BF16
    # The outer graph's nodes are untouched: only the library changed.
    assert list(out.node) == list(gd.node)   # compared as messages: attr map order is not fixed in bytes


def test_op_type_precisions_apply_inside_bodies_but_node_names_do_not():
    gd = _graph_with_call()
    _, by_type = _run(gd, {"op_type_precisions": {"MatMul": "fp32"}})
    (report,) = by_type.functions.values()
    assert any("forced FP32" in reason for reason in report.fp32_nodes.values())
    out, by_name = _run(gd, {"node_precisions": {"MatMul": "fp32"}})   # an outer-graph name, not the body's
    (name,) = by_name.functions
    assert {n.op: n for n in _body(out, name).node_def}["MatMul"].attr["T"].type == g.BFLOAT16


def test_polymorphic_function_left_as_is_and_reported():
    gd = _graph_with_call()
    poly = text_format.Parse(POLYMORPHIC, function_pb2.FunctionDef())
    gd.library.function.append(poly)
    out, context = _run(gd)
    report = context.functions["poly_identity"]
    assert not report.converted and "polymorphic" in report.reason
    assert _body(out, "poly_identity") == poly
    assert sum(r.converted for r in context.functions.values()) == 1


def test_nothing_to_do_without_body_transforms():
    gd = _graph_with_call()
    context = TransformContext(PrecisionPlan(inputs=("x",), outputs=("Identity",)))
    out = driver.run_transforms(gd, context, "convert_function_bodies")
    assert out == gd and context.functions == {}
