"""Tests for transforms/residual_addn.py: a convolution's same-shape residual AddV2 becomes AddN."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_bf16.model import Model
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.plan import PrecisionPlan
from tf_bf16.transforms.residual_addn import residual_addn

RNG = np.random.default_rng(5)


def _block(residual):
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 4], name="x")
        w = tf.constant(RNG.standard_normal((3, 3, 4, 4)).astype(np.float32))
        h = tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), tf.constant(np.ones(4, np.float32)))
        tf.nn.relu(residual(h, x), name="out")
    return graph.as_graph_def()


def _ops(graph_def):
    return sorted(n.op for n in graph_def.node if n.op in ("AddV2", "AddN", "Add"))


def _convert(graph_def):
    return residual_addn(graph_def, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))


def test_residual_add_becomes_addn_with_the_same_values():
    gd = _block(lambda h, x: h + x)
    out = _convert(gd)
    assert _ops(gd) == ["AddV2"] and _ops(out) == ["AddN"]
    x = RNG.standard_normal((2, 8, 8, 4)).astype(np.float32)
    model = Model(gd, inputs=["x"], outputs=["out"])
    np.testing.assert_array_equal(model.with_graph_def(out).run([x])[0], model.run([x])[0])


def test_broadcasting_or_unrelated_adds_stay():
    broadcast = _block(lambda h, x: h + tf.reduce_mean(x, axis=[1, 2], keepdims=True))
    assert _convert(broadcast) == broadcast                   # shapes differ: AddV2 would broadcast
    no_conv = _block(lambda h, x: tf.nn.relu(h) + x)
    assert _convert(no_conv) == no_conv                       # not a conv+bias input: nothing to fuse into
