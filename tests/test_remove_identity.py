"""Tests for transforms/remove_identity.py: pass-through ops go, semantics and names stay."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import attr_value_pb2, graph_pb2, types_pb2  # noqa: E402

from tests import zoo  # noqa: E402
from tests.zoo import run_graph as _run  # noqa: E402
from tf_bf16.transforms.graph import GraphIndex, make_const, make_node, parse_input  # noqa: E402
from tf_bf16.transforms.context import TransformContext  # noqa: E402
from tf_bf16.transforms.plan import PrecisionPlan  # noqa: E402
from tf_bf16.transforms.remove_identity import remove_identity  # noqa: E402


def _ops(graph_def: graph_pb2.GraphDef) -> dict:
    return {n.name: n.op for n in graph_def.node}


def _node(graph_def: graph_pb2.GraphDef, name: str):
    return next(n for n in graph_def.node if n.name == name)


def test_chain_removed_and_protected_output_kept():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
        y = tf.identity(x, name="id1")
        y = tf.stop_gradient(y, name="stop")
        y = tf.debugging.check_numerics(y, "bad", name="check")
        y = tf.raw_ops.Snapshot(input=y, name="snap")
        y = tf.raw_ops.PreventGradient(input=y, name="prevent")
        y = tf.nn.relu(y, name="relu")
        y = tf.identity(y, name="inner_id")
        tf.identity(y, name="out")
    gd = g.as_graph_def()
    before = gd.SerializeToString(deterministic=True)
    out = remove_identity(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out:0",))))
    assert gd.SerializeToString(deterministic=True) == before  # input untouched
    assert _ops(out) == {"x": "Placeholder", "relu": "Relu", "out": "Identity"}
    assert list(_node(out, "relu").input) == ["x"]
    assert list(_node(out, "out").input) == ["relu"]
    feeds = {"x:0": np.array([[-1.0, 0.5, 2.0]], np.float32)}
    np.testing.assert_array_equal(_run(gd, "out:0", feeds), _run(out, "out:0", feeds))


def test_control_inputs_move_to_consumers():
    f32 = {"T": attr_value_pb2.AttrValue(type=types_pb2.DT_FLOAT)}
    nodes = [
        make_node("Placeholder", "x", attrs={"dtype": attr_value_pb2.AttrValue(type=types_pb2.DT_FLOAT)}),
        make_const("c1", np.float32(2.0)),
        make_const("c2", np.float32(3.0)),
        make_node("NoOp", "gate", ["^c1"]),
        make_node("Identity", "idc", ["x", "^gate"], attrs=f32),
        make_node("Mul", "mul", ["idc", "c2"], attrs=f32),
        make_node("Identity", "waits", ["c2", "^idc"], attrs=f32),
        make_node("AddV2", "out", ["mul", "waits"], attrs=f32),
    ]
    gd = graph_pb2.GraphDef(node=nodes)
    out = remove_identity(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    assert "idc" not in _ops(out) and "waits" not in _ops(out)
    assert list(_node(out, "mul").input) == ["x", "c2", "^gate"]
    # ^idc became ^x plus idc's own ^gate; both then moved from `waits` onto `out`
    out_inputs = list(_node(out, "out").input)
    assert out_inputs[:2] == ["mul", "c2"] and sorted(out_inputs[2:]) == ["^gate", "^x"]
    feeds = {"x:0": np.float32(5.0)}
    assert _run(out, "out:0", feeds) == _run(gd, "out:0", feeds) == 18.0


def test_identity_n_ports_forwarded():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        z = tf.constant([1.0, 2.0], name="z")
        first, second = tf.raw_ops.IdentityN(input=[x * 2.0, z], name="idn")
        tf.add(first, second, name="out")
        tf.identity(second, name="out2")
    gd = g.as_graph_def()
    out = remove_identity(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out", "out2"))))
    assert "idn" not in _ops(out)
    assert list(_node(out, "out2").input) == ["z"]
    feeds = {"x:0": np.array([1.0, -1.0], np.float32)}
    for a, b in zip(_run(gd, ["out:0", "out2:0"], feeds), _run(out, ["out:0", "out2:0"], feeds)):
        np.testing.assert_array_equal(a, b)


def test_identity_after_switch_and_into_merge_kept():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [], name="x")
        pred = tf.compat.v1.placeholder(tf.bool, [], name="pred")
        false_out, true_out = tf.raw_ops.Switch(data=x, pred=pred, name="switch")
        pivot_t = tf.identity(true_out, name="pivot_t")
        pivot_f = tf.identity(false_out, name="pivot_f")
        with tf.control_dependencies([pivot_t]):
            two = tf.constant(2.0, name="two")
        doubled = tf.multiply(pivot_t, two, name="doubled")
        branch_t = tf.identity(doubled, name="branch_t")  # feeds Merge: kept
        branch_f = tf.identity(tf.negative(pivot_f, name="neg"), name="branch_f")
        merged, _ = tf.raw_ops.Merge(inputs=[branch_f, branch_t], name="merge")
        tf.identity(tf.identity(merged, name="after_merge"), name="out")
    gd = g.as_graph_def()
    out = remove_identity(gd, TransformContext(PrecisionPlan(inputs=("x", "pred"), outputs=("out",))))
    ops = _ops(out)
    for kept in ("pivot_t", "pivot_f", "branch_t", "branch_f", "after_merge", "out"):
        assert ops[kept] == "Identity", kept
    for pred_value in (True, False):
        feeds = {"x:0": np.float32(3.0), "pred:0": pred_value}
        assert _run(out, "out:0", feeds) == _run(gd, "out:0", feeds)


def test_keras_variable_reads_removed(zoo_model):
    model = zoo_model("mobilenetv2")
    plan = PrecisionPlan(inputs=model.input_names, outputs=model.output_names)
    gd = model.graph_def
    out = remove_identity(gd, TransformContext(plan))
    index = GraphIndex(out)
    identities = [n.name for n in out.node if n.op == "Identity"]
    assert identities == [parse_input(o)[0] for o in model.output_names]
    assert len(out.node) < len(gd.node) - 200
    assert all(parse_input(s)[0] in index for n in out.node for s in n.input)
    feeds = zoo.sample_inputs(model, batch=1)
    for a, b in zip(model.run(feeds), model.with_graph_def(out).run(feeds)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
