"""Tests for transforms/strip_unused.py: only the outputs' ancestors and the inputs survive."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

from tf_bf16.transforms.context import TransformContext  # noqa: E402
from tf_bf16.transforms.plan import PrecisionPlan  # noqa: E402
from tf_bf16.transforms.strip_unused import strip_unused  # noqa: E402


def _graph() -> graph_pb2.GraphDef:
    """x, an unused input y, a live branch with a control dependency, and a dead branch."""
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        tf.compat.v1.placeholder(tf.float32, [None, 4], name="y")
        c = tf.constant(np.arange(4, dtype=np.float32), name="c")
        ordered = tf.constant(1.0, name="ordered")
        with tf.control_dependencies([ordered]):
            gate = tf.no_op(name="gate")
        live = tf.add(x, c, name="live")
        tf.multiply(x, c, name="dead_mul")
        tf.nn.relu(tf.constant(-1.0, name="dead_const"), name="dead_relu")
        with tf.control_dependencies([gate]):
            tf.identity(live, name="out")
        parts = tf.split(tf.reshape(live, [-1, 2, 2]), 2, axis=1, name="split")
        tf.identity(parts[1], name="second")
    return g.as_graph_def()


def _names(graph_def: graph_pb2.GraphDef) -> set:
    return {n.name for n in graph_def.node}


def test_keeps_ancestors_and_unused_inputs():
    gd = _graph()
    plan = PrecisionPlan(inputs=("x", "y"), outputs=("out",))
    out = strip_unused(gd, TransformContext(plan))
    assert _names(out) == {"x", "y", "c", "live", "gate", "ordered", "out"}
    # order of surviving nodes is the original order
    order = [n.name for n in gd.node if n.name in _names(out)]
    assert [n.name for n in out.node] == order
    assert out.versions == gd.versions


def test_output_port_and_result_unchanged():
    gd = _graph()
    plan = PrecisionPlan(inputs=("x",), outputs=("second:0", "out"))
    out = strip_unused(gd, TransformContext(plan))
    assert "dead_mul" not in _names(out) and "split" in _names(out)
    feeds = {"x:0": np.random.default_rng(0).random((3, 4), dtype=np.float32)}
    results = []
    for graph_def in (gd, out):
        g = tf.Graph()
        with g.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as session:
            results.append(session.run(["second:0", "out:0"], feeds))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_input_graph_not_mutated():
    gd = _graph()
    before = gd.SerializeToString(deterministic=True)
    strip_unused(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    assert gd.SerializeToString(deterministic=True) == before


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="missing_node"):
        strip_unused(_graph(), TransformContext(PrecisionPlan(inputs=("x",), outputs=("missing_node:0",))))


def test_no_outputs_raises():
    with pytest.raises(ValueError, match="no outputs"):
        strip_unused(_graph(), TransformContext(PrecisionPlan(inputs=("x",))))
