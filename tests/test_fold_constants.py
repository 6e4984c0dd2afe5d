"""Tests for transforms/fold_constants.py: constant subgraphs become Consts, nothing else moves."""

from __future__ import annotations

import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

from tests import zoo  # noqa: E402
from tests.zoo import run_graph as _run  # noqa: E402
from tf_bf16.transforms.fold_constants import fold_constants  # noqa: E402
from tf_bf16.transforms.graph import const_value, parse_input  # noqa: E402
from tf_bf16.transforms.context import TransformContext  # noqa: E402
from tf_bf16.transforms.plan import PrecisionPlan  # noqa: E402
from tf_bf16.transforms.remove_identity import remove_identity  # noqa: E402


def _nodes(graph_def: graph_pb2.GraphDef) -> dict:
    return {n.name: n for n in graph_def.node}


def test_folds_chain_into_const_with_same_name():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
        a = tf.constant([1.0, 2.0, 3.0], name="a")
        b = tf.reshape(tf.constant([[4.0, 5.0, 6.0]], name="b0"), [3], name="b")
        scale = tf.math.rsqrt(tf.add(a, b, name="sum"), name="scale")
        tf.multiply(x, scale, name="out")
    gd = g.as_graph_def()
    before = gd.SerializeToString(deterministic=True)
    out = fold_constants(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    assert gd.SerializeToString(deterministic=True) == before
    nodes = _nodes(out)
    assert set(nodes) == {"x", "scale", "out"}
    assert nodes["scale"].op == "Const"
    np.testing.assert_allclose(const_value(nodes["scale"]), 1 / np.sqrt([5.0, 7.0, 9.0]), rtol=1e-6)
    feeds = {"x:0": np.ones((2, 3), np.float32)}
    np.testing.assert_array_equal(_run(gd, "out:0", feeds), _run(out, "out:0", feeds))


def test_multi_output_op_gets_one_const_per_used_port():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        parts = tf.unstack(tf.constant(np.arange(6, dtype=np.float32).reshape(3, 2), name="table"), name="rows")
        tf.add(x, parts[0], name="use0")
        tf.add(x, parts[2], name="use2")
        tf.identity(tf.add(x, parts[2]), name="use2_again")
    gd = g.as_graph_def()
    out = fold_constants(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("use0", "use2", "use2_again"))))
    nodes = _nodes(out)
    assert nodes["rows"].op == "Const"  # port 0 keeps the name
    np.testing.assert_array_equal(const_value(nodes["rows"]), [0.0, 1.0])
    port2 = parse_input(nodes["use2"].input[1])[0]
    assert port2 != "rows" and nodes[port2].op == "Const"
    np.testing.assert_array_equal(const_value(nodes[port2]), [4.0, 5.0])
    assert "table" not in nodes
    assert sum(n.op == "Const" for n in out.node) == 2  # port 2 read twice, one Const
    feeds = {"x:0": np.array([10.0, 20.0], np.float32)}
    fetches = ["use0:0", "use2:0", "use2_again:0"]
    for a, b in zip(_run(gd, fetches, feeds), _run(out, fetches, feeds)):
        np.testing.assert_array_equal(a, b)


def test_non_constant_sources_not_folded():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
        shape_x = tf.shape(x, name="shape_x")  # Shape of a Placeholder: runtime value
        shape_c = tf.raw_ops.Shape(input=tf.constant(np.zeros((4, 5), np.float32)), name="shape_c")
        default = tf.compat.v1.placeholder_with_default(tf.constant(2.0), [], name="default")
        noise = tf.random.uniform([3], seed=1, name="noise")
        tf.identity(tf.cast(shape_x, tf.float32) * default, name="out1")
        tf.identity(x + noise + tf.reduce_sum(tf.cast(shape_c, tf.float32)), name="out2")
    gd = g.as_graph_def()
    out = fold_constants(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out1", "out2"))))
    ops = {n.name: n.op for n in out.node}
    assert ops["shape_x"] == "Shape"
    assert ops["default"] == "PlaceholderWithDefault"
    assert ops["noise/RandomUniform"] == "RandomUniform"
    assert "shape_c" not in ops  # folded into the Sum that reads it
    assert collections.Counter(ops.values())["Sum"] == 0


def test_control_edges_from_constants_dropped_keras_style():
    """A NoOp that only waits on constants (Keras freezing's variable reads) disappears."""
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        w = tf.constant([2.0, 3.0], name="w")
        read = tf.identity(w, name="read")
        with tf.control_dependencies([read]):
            gate = tf.no_op(name="gate")
        y = tf.multiply(x, read, name="y")
        with tf.control_dependencies([gate]):
            tf.identity(y, name="out")
    gd = g.as_graph_def()
    out = fold_constants(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    nodes = _nodes(out)
    assert "gate" not in nodes
    assert list(nodes["out"].input) == ["y"]
    assert nodes["read"].op == "Const"  # Identity of a Const is constant too


def test_const_gated_by_runtime_value_not_folded():
    """A Const with a control input from a non-constant node is executed in that node's context."""
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [], name="x")
        check = tf.debugging.check_numerics(x, "x", name="check")
        with tf.control_dependencies([check]):
            c = tf.constant(3.0, name="gated")
        tf.add(tf.multiply(c, 2.0, name="double"), x, name="out")
    gd = g.as_graph_def()
    out = fold_constants(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    nodes = _nodes(out)
    assert nodes["double"].op == "Mul" and "^check" in nodes["gated"].input


def test_protected_constant_output_keeps_op():
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.placeholder(tf.float32, [], name="x")
        tf.add(tf.constant(1.0) * 2.0, 3.0, name="answer")
    gd = g.as_graph_def()
    out = fold_constants(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("answer",))))
    nodes = _nodes(out)
    assert nodes["answer"].op == "AddV2"
    assert all(nodes[parse_input(s)[0]].op == "Const" for s in nodes["answer"].input)
    assert _run(out, "answer:0", {}) == 5.0


def test_large_expanding_result_stays_an_op():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [], name="x")
        dims = tf.add(tf.constant([4000, 1100]), tf.constant([1000, 1000]), name="dims")  # 5000 x 2100
        big = tf.fill(dims, 1.5, name="big")  # 10.5 M elements from 2: stays a Fill
        reduced = tf.reduce_sum(tf.fill(dims, 0.5, name="big_reduced"), name="reduced")
        small = tf.fill(tf.constant([2, 2]), 2.5, name="small")
        tf.add(big, x, name="out_big")
        tf.add(reduced, x, name="out_reduced")
        tf.add(small, x, name="out_small")
    gd = g.as_graph_def()
    out = fold_constants(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out_big", "out_reduced", "out_small"))))
    nodes = _nodes(out)
    assert nodes["small"].op == "Const"
    assert nodes["big"].op == "Fill" and nodes["dims"].op == "Const"
    np.testing.assert_array_equal(const_value(nodes["dims"]), [5000, 2100])
    # a big intermediate is fine when the folded result is small
    assert nodes["reduced"].op == "Const" and "big_reduced" not in nodes
    assert const_value(nodes["reduced"]) == 0.5 * 5000 * 2100
    assert max(n.attr["value"].tensor.ByteSize() for n in out.node if n.op == "Const") < 1000


def test_runtime_error_leaves_graph_unfolded():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [], name="x")
        bad = tf.gather(tf.constant([1.0, 2.0, 3.0]), tf.constant(7), name="bad")  # out of range at run time
        tf.add(bad, x, name="out")
    gd = g.as_graph_def()
    out = fold_constants(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    assert _nodes(out)["bad"].op == "GatherV2"


def test_keras_batchnorm_folds_to_one_mul_and_add(zoo_model):
    model = zoo_model("resnet50")
    plan = PrecisionPlan(inputs=model.input_names, outputs=model.output_names)
    gd = remove_identity(model.graph_def, TransformContext(plan))
    out = fold_constants(gd, TransformContext(plan))
    ops = collections.Counter(n.op for n in out.node)
    for gone in ("Rsqrt", "Sub", "Reshape", "Squeeze", "NoOp"):
        assert ops[gone] == 0, gone
    bn_count = 53
    assert ops["Mul"] == bn_count  # x * scale per BN
    assert ops["AddV2"] == bn_count + 16  # + shift per BN, plus the residual adds
    assert len(out.node) < len(gd.node) // 2
    feeds = zoo.sample_inputs(model, batch=2)
    for a, b in zip(model.run(feeds), model.with_graph_def(out).run(feeds)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_folds_when_default_type_attrs_are_stripped():
    """Frozen files often omit attrs equal to the OpDef default (Shape's out_type)."""
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.int32, [2], name="x")
        tf.add(x, tf.raw_ops.Shape(input=tf.constant(np.zeros((3, 4), np.float32)), name="shape"), name="out")
    gd = g.as_graph_def()
    shape_node = next(n for n in gd.node if n.name == "shape")
    del shape_node.attr["out_type"]
    out = fold_constants(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    nodes = _nodes(out)
    assert nodes["shape"].op == "Const"
    np.testing.assert_array_equal(const_value(nodes["shape"]), [3, 4])
