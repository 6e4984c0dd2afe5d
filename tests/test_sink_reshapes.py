"""Tests for transforms/sink_reshapes.py: a MatMul's Reshape moves behind its bias and activation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_bf16.model import Model
from tf_bf16.transforms import driver, graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.plan import PrecisionPlan
from tf_bf16.transforms.sink_reshapes import sink_reshapes


def _dense_model(activation) -> Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8), name="x")
    h = keras.layers.Dense(16, activation=activation, name="dense")(inputs)
    return Model(keras.Model(inputs, keras.layers.Dense(4, name="head")(h)))


def _run(model: Model, graph_def) -> np.ndarray:
    x = np.random.default_rng(1).uniform(-2, 2, (3, 6, 8)).astype(np.float32)
    return model.with_graph_def(graph_def).run([x])[0]


def _producer_op(index, spec):
    return index[g.node_name(spec)].op


@pytest.mark.parametrize("activation", ["gelu", "relu", "tanh", None])
def test_bias_and_activation_move_ahead_of_the_reshape(activation):
    model = _dense_model(activation)
    plan = PrecisionPlan(inputs=model.input_names, outputs=model.output_names)
    # As in the pipeline: after identities are gone and the bias is a Const.
    cleaned = driver.run_transforms(model.graph_def, TransformContext(plan),
                                    ("strip_unused", "remove_identity", "fold_constants"))
    assert any(_producer_op(g.GraphIndex(cleaned), n.input[0]) == "Reshape" for n in cleaned.node if n.op == "BiasAdd")
    out = sink_reshapes(cleaned, TransformContext(plan))
    index = g.GraphIndex(out)
    biases = [n for n in out.node if n.op == "BiasAdd"]
    assert len(biases) == 2
    assert all(_producer_op(index, b.input[0]) == "MatMul" for b in biases)   # adjacent now: fusable
    if activation == "gelu":
        assert not any(_producer_op(index, n.input[0]) == "Reshape" for n in out.node if n.op in ("Mul", "Neg"))
    np.testing.assert_allclose(_run(model, out), _run(model, model.graph_def), rtol=1e-5, atol=1e-6)
    assert {g.node_name(o) for o in model.output_names} <= {n.name for n in out.node}


def test_reshape_that_changes_the_last_dimension_stays():
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        y = tf.reshape(tf.matmul(x, tf.ones((8, 16))), [-1, 4, 4])
        tf.identity(tf.nn.bias_add(y, tf.ones(4)), name="out")
    gd = graph.as_graph_def()
    out = sink_reshapes(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    assert out == gd


def test_nothing_moves_past_a_graph_output():
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3, 8], name="x")
        y = tf.reshape(tf.matmul(tf.reshape(x, [-1, 8]), tf.ones((8, 16))), [-1, 3, 16])
        tf.nn.relu(tf.nn.bias_add(y, tf.ones(16)), name="out")
    gd = graph.as_graph_def()
    out = sink_reshapes(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    index = g.GraphIndex(out)
    assert index["out"].op == "Relu"                  # the output keeps its node, op and dtype
    assert _producer_op(index, index["BiasAdd"].input[0]) == "MatMul" or out == gd
