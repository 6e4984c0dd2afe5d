"""Tests for transforms/patterns.py: static shapes, Reshapes that keep the last dimension, and
activations recognised by evaluating the element-wise region that computes them."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.patterns import StaticShapes, activation_region, keeps_last_dim


def _graph(build):
    graph = tf.Graph()
    with graph.as_default():
        build()
    return graph.as_graph_def()


def _region(build, start="start", protected=frozenset({"x", "out"})):
    gd = _graph(build)
    index = g.GraphIndex(gd)
    return activation_region(index[start], index, protected, dtype=g.FLOAT)


def _x():
    return tf.identity(tf.compat.v1.placeholder(tf.float32, [None, 4], name="x"), name="start")


FORMS = {
    "GeluErf": lambda h: 0.5 * h * (1.0 + tf.math.erf(h / np.sqrt(2.0).astype(np.float32))),
    "GeluTanh": lambda h: tf.nn.gelu(h, approximate=True),
    "Swish": lambda h: h * tf.sigmoid(h),
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_known_activations_are_identified(name):
    region = _region(lambda: tf.identity(tf.matmul(FORMS[name](_x()), tf.ones((4, 2))), name="out"))
    assert region is not None and region.function == name
    assert region.nodes[-1].op == "Mul" or name == "GeluTanh"   # ends in the region's last node


@pytest.mark.parametrize("build", [
    lambda: tf.identity(tf.matmul(_x() * _x() + 1.0, tf.ones((4, 2))), name="out"),      # not an activation
    lambda: tf.identity(tf.matmul(tf.nn.relu(_x()), tf.ones((4, 2))), name="out"),          # one node: not a region
    lambda: (lambda h: tf.identity(tf.matmul(h * tf.sigmoid(h * tf.constant([1.0, 2.0, 3.0, 4.0])),
                                                tf.ones((4, 2))), name="out"))(_x()),       # a vector Const
])
def test_other_regions_are_not(build):
    assert _region(build) is None


def test_a_region_read_from_outside_is_not_one():
    def build():
        h = _x()
        inner = h * tf.sigmoid(h)
        tf.identity(tf.matmul(inner, tf.ones((4, 2))) + tf.reduce_sum(tf.sigmoid(h)), name="out")
    assert _region(build) is None   # the Sigmoid is also read by the ReduceSum


def test_static_shapes_and_reshape_keeping_the_last_dimension():
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 8], name="x")
        m = tf.matmul(tf.reshape(x, [-1, 8]), tf.ones((8, 16)), name="mm")
        tf.reshape(m, [-1, 6, 16], name="keeps")
        tf.reshape(m, [-1, 6, 4, 4], name="splits")
    gd = _graph(build)
    index, shapes = g.GraphIndex(gd), StaticShapes(gd)
    assert shapes.of("mm") == [None, 16] and shapes.of("keeps:0") == [None, 6, 16]
    assert shapes.of("no_such_node") is None
    assert keeps_last_dim(index["keeps"], index["mm"], index, shapes)
    assert not keeps_last_dim(index["splits"], index["mm"], index, shapes)
