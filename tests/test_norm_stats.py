"""Tests for transforms/norm_stats.py: which reductions are mean/variance statistics of their own input."""

from __future__ import annotations

import os
from typing import Any, Callable, Set

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_bf16.model import Model  # noqa: E402
from tf_bf16.transforms.graph import GraphIndex  # noqa: E402
from tf_bf16.transforms.norm_stats import normalization_statistics  # noqa: E402


def _stats(build: Callable[[Any, Any], Any]) -> Set[str]:
    """normalization_statistics of a graph ``build(x, y)`` makes from two float placeholders [2, 8]."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 8], name="x")
        y = tf.compat.v1.placeholder(tf.float32, [2, 8], name="y")
        build(x, y)
    return normalization_statistics(GraphIndex(graph.as_graph_def()))


def test_tf_nn_moments_mean_and_variance_but_not_a_pool():
    """tf.nn.moments' mean (centres x) and variance (mean of squared difference) count; a pooling Mean of x does not."""
    def build(x, _):
        mean, variance = tf.nn.moments(x, axes=[1], keepdims=True, name="moments")
        tf.identity((x - mean) * tf.math.rsqrt(variance + 1e-5), name="normalized")
        tf.reduce_mean(x, axis=0, name="pool")

    assert _stats(build) == {"moments/mean", "moments/variance"}


def test_keras_layer_norm_and_rms_norm_but_not_global_pooling():
    """In a frozen Keras model, LayerNormalization's two moments and RMSNormalization's mean(x^2) count; GAP does not."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 8), name="inp")
    h = keras.layers.LayerNormalization(name="layernorm")(inp)
    h = keras.layers.RMSNormalization(name="rmsnorm")(h)
    out = keras.layers.GlobalAveragePooling1D(name="avgpool")(h)
    graph_def = Model(keras.Model(inp, out)).graph_def
    means = {layer: {n.name for n in graph_def.node if n.op == "Mean" and layer in n.name}
             for layer in ("layernorm", "rmsnorm", "avgpool")}
    assert [len(means[k]) for k in ("layernorm", "rmsnorm", "avgpool")] == [2, 1, 1]
    assert normalization_statistics(GraphIndex(graph_def)) == means["layernorm"] | means["rmsnorm"]


def test_second_moments_of_a_tensor():
    """mean(square(x)), mean(x*x) and sum of a squared difference count; mean(x*y) and mean(|x|) do not."""
    def build(x, y):
        tf.reduce_mean(tf.square(x), axis=1, name="mean_square")
        tf.reduce_mean(x * x, axis=1, name="mean_x_times_x")
        tf.reduce_sum(tf.math.squared_difference(x, y), axis=1, name="sum_sq_diff")
        tf.reduce_mean(x * y, axis=1, name="mean_x_times_y")
        tf.reduce_mean(tf.abs(x), axis=1, name="mean_abs")

    assert _stats(build) == {"mean_square", "mean_x_times_x", "sum_sq_diff"}


def test_centring_is_seen_through_identities():
    """A mean of identity(x) read back through StopGradient and subtracted from x is still a centring statistic."""
    def build(x, _):
        mean = tf.reduce_mean(tf.identity(x, name="x_read"), axis=1, keepdims=True, name="mean")
        tf.subtract(x, tf.stop_gradient(tf.identity(mean, name="mean_read")), name="centred")

    assert _stats(build) == {"mean"}


def test_sum_centring_counts_but_max_does_not():
    """x - sum(x) centres x with a Sum reduction; x - max(x) (softmax's shift) is not a Mean/Sum statistic."""
    def build(x, _):
        tf.subtract(x, tf.reduce_sum(x, axis=1, keepdims=True, name="total"), name="centred")
        tf.subtract(x, tf.reduce_max(x, axis=1, keepdims=True, name="peak"), name="shifted")

    assert _stats(build) == {"total"}


def test_mean_used_otherwise_is_not_a_statistic():
    """A mean of x subtracted from another tensor, added to x or scaling x (squeeze-excite) is no statistic."""
    def build(x, y):
        tf.subtract(y, tf.reduce_mean(x, axis=1, keepdims=True, name="mean_from_y"), name="y_minus")
        tf.add(x, tf.reduce_mean(x, axis=1, keepdims=True, name="mean_added"), name="x_plus")
        tf.multiply(x, tf.sigmoid(tf.reduce_mean(x, axis=1, keepdims=True, name="mean_gate")), name="excite")

    assert _stats(build) == set()


def test_graph_without_reductions_has_none():
    """A graph with no Mean or Sum node yields the empty set."""
    assert _stats(lambda x, y: tf.nn.relu(x - y, name="out")) == set()
