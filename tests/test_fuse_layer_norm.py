"""Tests for transforms/fuse_layer_norm.py: a written-out LayerNorm becomes one ``_MklLayerNorm``."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.executed import executed_nodes
from tf_bf16 import pipeline
from tf_bf16.model import Model
from tf_bf16.plan_builder import build_plan
from tf_bf16.transforms import driver
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.fuse_layer_norm import fuse_layer_norm
from tf_bf16.transforms.plan import PrecisionPlan

RNG = np.random.default_rng(3)
BEFORE = ("strip_unused", "remove_identity", "fold_constants")   # the clean-up passes that run first


def _keras_norm(shape, epsilon=1e-12, axis=-1, **kwargs) -> Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape, name="x")
    h = keras.layers.Dense(shape[-1], name="dense")(inputs)
    norm = keras.layers.LayerNormalization(epsilon=epsilon, axis=axis, name="norm", **kwargs)
    out = norm(h)
    model = keras.Model(inputs, out)
    # Non-trivial gamma/beta, as after training.
    norm.set_weights([w + RNG.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in norm.get_weights()])
    return Model(model)


def _cleaned(model: Model):
    plan = PrecisionPlan(inputs=model.input_names, outputs=model.output_names)
    return driver.run_transforms(model.graph_def, TransformContext(plan), BEFORE), TransformContext(plan)


def _feeds(shape, batch=3):
    return [RNG.uniform(-3, 3, (batch,) + tuple(shape)).astype(np.float32) * 4 + 1]


def _ops(graph_def):
    return [n.op for n in graph_def.node]


@pytest.mark.parametrize("shape", [(7, 32), (32,)])
def test_keras_layer_norm_becomes_one_op_with_its_epsilon(shape):
    model = _keras_norm(shape, epsilon=1e-12)
    cleaned, context = _cleaned(model)
    out = fuse_layer_norm(cleaned, context)
    fused = [n for n in out.node if n.op == "_MklLayerNorm"]
    assert len(fused) == 1
    assert fused[0].attr["epsilon"].f == pytest.approx(1e-12)
    assert fused[0].name == [n.name for n in cleaned.node if n.op in ("AddV2", "Add")][-1]   # the norm's output
    for op in ("Mean", "SquaredDifference", "Rsqrt", "Neg"):
        assert op not in _ops(out)
    x = _feeds(shape)
    # The remapper's own fusion would drop epsilon (its default 1e-3 moves these values by ~1e-2).
    np.testing.assert_allclose(model.with_graph_def(out).run(x)[0], model.run(x)[0], rtol=1e-4, atol=1e-4)


def test_the_fused_op_executes_as_written():
    model = _keras_norm((5, 16))
    cleaned, context = _cleaned(model)
    out = fuse_layer_norm(cleaned, context)
    executed, _ = executed_nodes(out, model.input_names, model.output_names, _feeds((5, 16)))
    assert [n.op for n in executed].count("_MklLayerNorm") == 1
    assert "Mean" not in [n.op for n in executed]


def test_tf_nn_batch_normalization_form_is_fused_too():
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 8], name="x")
        mean = tf.reduce_mean(x, axis=2, keepdims=True)
        var = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=2, keepdims=True)
        gamma, beta = (RNG.uniform(0.5, 1.5, 8).astype(np.float32) for _ in range(2))
        tf.identity(tf.nn.batch_normalization(x, mean, var, tf.constant(beta), tf.constant(gamma), 1e-5), name="out")
    model = Model(graph.as_graph_def(), inputs=["x"], outputs=["out"])
    cleaned, context = _cleaned(model)
    out = fuse_layer_norm(cleaned, context)
    assert _ops(out).count("_MklLayerNorm") == 1
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    # Compared with NumPy: TensorFlow's remapper fuses the original graph itself and, dropping
    # epsilon (it uses 1e-3), gets these values wrong by ~4e-3 on TF 2.21.
    centred = x - x.mean(axis=2, keepdims=True)
    want = centred / np.sqrt((centred ** 2).mean(axis=2, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(model.with_graph_def(out).run([x])[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["rank4", "not_last_axis"])
def test_norms_the_kernel_cannot_take_stay_written_out(case):
    model = _keras_norm((3, 4, 8)) if case == "rank4" else _keras_norm((6, 8), axis=1)
    cleaned, context = _cleaned(model)
    out = fuse_layer_norm(cleaned, context)
    assert "_MklLayerNorm" not in _ops(out)
    assert out.SerializeToString(deterministic=True) == cleaned.SerializeToString(deterministic=True)


def test_a_statistic_read_elsewhere_keeps_the_norm_written_out():
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        mean = tf.reduce_mean(x, axis=1, keepdims=True)
        var = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=1, keepdims=True)
        inv = tf.math.rsqrt(var + 1e-5) * tf.constant(np.full(8, 2.0, np.float32))
        tf.identity(x * inv + (tf.constant(np.ones(8, np.float32)) - mean * inv), name="out")
        tf.identity(mean, name="mean_out")
    model = Model(graph.as_graph_def(), inputs=["x"], outputs=["out", "mean_out"])
    cleaned, context = _cleaned(model)
    assert "_MklLayerNorm" not in _ops(fuse_layer_norm(cleaned, context))


def test_bf16_conversion_keeps_the_fused_norm_fp32_and_accurate(zoo_model, zoo_inputs):
    model = zoo_model("bert")
    plan = build_plan(model.graph_def, model.input_names, model.output_names)
    result = pipeline.convert_graph(model.graph_def, plan)
    norms = [n for n in result.graph_def.node if n.op == "_MklLayerNorm"]
    assert len(norms) == sum(1 for n in model.graph_def.node if n.op == "Rsqrt") > 0
    assert all(n.attr["T"].type == tf.float32.as_datatype_enum for n in norms)
    x = zoo_inputs("bert")
    got, want = model.with_graph_def(result.graph_def).run(x)[0], model.run(x)[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-2
