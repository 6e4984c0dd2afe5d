"""Tests for transforms/fold_batch_norms.py: inference BN merged into conv/matmul filter + bias."""

from __future__ import annotations

import collections
import os
from typing import Dict, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

from tests import zoo  # noqa: E402
from tf_bf16.pipeline import clean_up  # noqa: E402
from tf_bf16.transforms.context import TransformContext  # noqa: E402
from tf_bf16.transforms.fold_batch_norms import fold_batch_norms  # noqa: E402
from tf_bf16.transforms.graph import GraphIndex, const_value, parse_input  # noqa: E402
from tf_bf16.transforms.plan import PrecisionPlan  # noqa: E402

RNG = np.random.default_rng(7)


def _run(graph_def: graph_pb2.GraphDef, fetches, feeds):
    """Run with Grappler off, so the comparison checks this pass and not Grappler's folding."""
    g = tf.Graph()
    with g.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    with tf.compat.v1.Session(graph=g, config=config) as session:
        return session.run(fetches, feeds)


def _nodes(graph_def: graph_pb2.GraphDef) -> Dict[str, tf.compat.v1.NodeDef]:
    return {n.name: n for n in graph_def.node}


def _ops(graph_def: graph_pb2.GraphDef) -> collections.Counter:
    return collections.Counter(n.op for n in graph_def.node)


def _bn_params(channels: int) -> List[tf.Tensor]:
    """Constant gamma, beta, mean, variance far enough from identity to make folding visible."""
    values = [RNG.uniform(0.5, 2.0, channels), RNG.normal(0, 1, channels), RNG.normal(0, 1, channels),
              RNG.uniform(0.2, 3.0, channels)]
    return [tf.constant(v.astype(np.float32), name=n) for v, n in zip(values, ("gamma", "beta", "mean", "var"))]


def _conv_bn_graph(base: str, data_format: str = "NHWC", bias: bool = False, bn_op: str = "FusedBatchNormV3",
                   is_training: bool = False, extra_fetch: Optional[str] = None) -> graph_pb2.GraphDef:
    """x -> conv/depthwise [-> BiasAdd] -> FusedBatchNorm* ("bn") -> Relu ("out")."""
    g = tf.Graph()
    shape = [2, 6, 6, 3] if data_format == "NHWC" else [2, 3, 6, 6]
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, shape, name="x")
        if base == "conv2d":
            w = tf.constant(RNG.normal(0, 1, (3, 3, 3, 4)).astype(np.float32), name="w")
            y = tf.nn.conv2d(x, w, 1, "SAME", data_format=data_format, name="conv")
            channels = 4
        else:
            w = tf.constant(RNG.normal(0, 1, (3, 3, 3, 2)).astype(np.float32), name="w")
            y = tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME", data_format=data_format, name="conv")
            channels = 6
        if bias:
            y = tf.nn.bias_add(y, tf.constant(RNG.normal(0, 1, channels).astype(np.float32), name="b"),
                               data_format=data_format, name="bias")
        gamma, beta, mean, var = _bn_params(channels)
        bn_fn = getattr(tf.raw_ops, bn_op)
        bn = bn_fn(x=y, scale=gamma, offset=beta, mean=mean, variance=var, epsilon=1e-3,
                   data_format=data_format, is_training=is_training, name="bn")
        tf.nn.relu(bn.y, name="out")
        if extra_fetch == "batch_mean":
            tf.identity(bn.batch_mean, name="stats")
    return g.as_graph_def()


@pytest.mark.parametrize("base", ["conv2d", "depthwise"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_batch_norm_v3_folds_nhwc(base, bias):
    gd = _conv_bn_graph(base, bias=bias)
    before = gd.SerializeToString(deterministic=True)
    out = fold_batch_norms(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    assert gd.SerializeToString(deterministic=True) == before
    nodes = _nodes(out)
    assert _ops(out)["FusedBatchNormV3"] == 0
    assert nodes["bn"].op == "BiasAdd" and nodes["bn"].input[0] == "conv"
    assert nodes["bn"].attr["data_format"].s == b"NHWC"
    assert "bias" not in nodes and "gamma" not in nodes and "var" not in nodes
    # the four BN parameters and the old bias are gone, one folded bias is new
    assert _ops(out)["BiasAdd"] == 1 and _ops(out)["Const"] == _ops(gd)["Const"] - 4 - bias + 1
    feeds = {"x:0": RNG.normal(0, 1, (2, 6, 6, 3)).astype(np.float32)}
    np.testing.assert_allclose(_run(out, "out:0", feeds), _run(gd, "out:0", feeds), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bn_op", ["FusedBatchNorm", "FusedBatchNormV2"])
def test_older_fused_batch_norms_fold(bn_op):
    gd = _conv_bn_graph("conv2d", bias=True, bn_op=bn_op)
    out = fold_batch_norms(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    assert _ops(out)[bn_op] == 0 and _nodes(out)["bn"].op == "BiasAdd"
    feeds = {"x:0": RNG.normal(0, 1, (2, 6, 6, 3)).astype(np.float32)}
    np.testing.assert_allclose(_run(out, "out:0", feeds), _run(gd, "out:0", feeds), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", ["conv2d", "depthwise"])
def test_nchw_filter_and_bias_values(base):
    """CPU kernels cannot run NCHW convolutions, so check the folded values directly."""
    gd = _conv_bn_graph(base, data_format="NCHW", bias=True)
    src = _nodes(gd)
    out = fold_batch_norms(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    nodes = _nodes(out)
    bn = nodes["bn"]
    assert bn.op == "BiasAdd" and bn.attr["data_format"].s == b"NCHW" and bn.input[0] == "conv"
    gamma, beta, mean, var, b = (const_value(src[n]).astype(np.float64) for n in ("gamma", "beta", "mean", "var", "b"))
    scale = gamma / np.sqrt(var + 1e-3)
    w = const_value(src["w"]).astype(np.float64)
    expected_w = w * scale if base == "conv2d" else w * scale.reshape(w.shape[2], w.shape[3])
    np.testing.assert_allclose(const_value(nodes["w"]), expected_w, rtol=1e-6)
    np.testing.assert_allclose(const_value(nodes[bn.input[1]]), (b - mean) * scale + beta, rtol=1e-5, atol=1e-6)
    g = tf.Graph()
    with g.as_default():
        tf.graph_util.import_graph_def(out, name="")  # still a valid graph


@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_decomposed_bn_folds(transpose_b):
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 5], name="x")
        w = RNG.normal(0, 1, (5, 3)).astype(np.float32)
        w_const = tf.constant(w.T if transpose_b else w, name="w")
        y = tf.matmul(x, w_const, transpose_b=transpose_b, name="dense")
        y = tf.nn.bias_add(y, tf.constant(RNG.normal(0, 1, 3).astype(np.float32)), name="bias")
        y = tf.multiply(tf.constant(RNG.uniform(0.5, 2, 3).astype(np.float32), name="s"), y, name="scale")
        y = tf.add(y, tf.constant(RNG.normal(0, 1, (1, 3)).astype(np.float32), name="t"), name="shift")
        tf.nn.tanh(y, name="out")
    gd = g.as_graph_def()
    out = fold_batch_norms(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    nodes = _nodes(out)
    assert set(nodes) == {"x", "w", "dense", "shift", "out", nodes["shift"].input[1]}
    assert nodes["shift"].op == "BiasAdd" and list(nodes["shift"].input)[0] == "dense"
    feeds = {"x:0": RNG.normal(0, 1, (4, 5)).astype(np.float32)}
    np.testing.assert_allclose(_run(out, "out:0", feeds), _run(gd, "out:0", feeds), atol=1e-5, rtol=1e-5)


def _decomposed_conv(mul_shape, add_shape=(4,), share_filter=False, extra_consumer=False) -> graph_pb2.GraphDef:
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 6, 6, 3], name="x")
        w = tf.constant(RNG.normal(0, 1, (3, 3, 3, 4)).astype(np.float32), name="w")
        y = tf.nn.conv2d(x, w, 1, "SAME", name="conv")
        y = tf.multiply(y, tf.constant(RNG.uniform(0.5, 2, mul_shape).astype(np.float32), name="s"), name="mul")
        y = tf.add(y, tf.constant(RNG.normal(0, 1, add_shape).astype(np.float32), name="t"), name="add")
        out = tf.nn.relu(y, name="out")
        if share_filter:
            tf.identity(tf.nn.conv2d(x, w, 1, "SAME", name="conv_b"), name="out_b")
        if extra_consumer:  # the conv output is read twice: its filter cannot change
            tf.identity(tf.reduce_mean(tf.compat.v1.get_default_graph().get_tensor_by_name("conv:0")), name="out_b")
        del out
    return g.as_graph_def()


@pytest.mark.parametrize("mul_shape", [(4,), (1, 1, 1, 4), (), (1,)])
def test_decomposed_per_channel_or_scalar_folds(mul_shape):
    gd = _decomposed_conv(mul_shape, add_shape=(1, 1, 4))
    out = fold_batch_norms(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("out",))))
    nodes = _nodes(out)
    assert "mul" not in nodes and nodes["add"].op == "BiasAdd" and nodes["add"].input[0] == "conv"
    assert _ops(out)["Mul"] == 0 and _ops(out)["AddV2"] == 0
    feeds = {"x:0": RNG.normal(0, 1, (2, 6, 6, 3)).astype(np.float32)}
    np.testing.assert_allclose(_run(out, "out:0", feeds), _run(gd, "out:0", feeds), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["spatial_mul", "spatial_add", "rank_growing_mul", "shared_filter",
                                  "extra_consumer"])
def test_unsafe_decomposed_chains_untouched(case):
    kwargs = {
        "spatial_mul": dict(mul_shape=(1, 6, 1, 1)),
        "spatial_add": dict(mul_shape=(4,), add_shape=(6, 1, 1)),
        "rank_growing_mul": dict(mul_shape=(1, 1, 1, 1, 4)),
        "shared_filter": dict(mul_shape=(4,), share_filter=True),
        "extra_consumer": dict(mul_shape=(4,), extra_consumer=True),
    }[case]
    gd = _decomposed_conv(**kwargs)
    outputs = ("out", "out_b") if case in ("shared_filter", "extra_consumer") else ("out",)
    out = fold_batch_norms(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=outputs)))
    if case == "spatial_add":  # the Mul alone is still exact to fold; the Add must stay
        nodes = _nodes(out)
        assert nodes["mul"].op == "BiasAdd" and nodes["mul"].input[0] == "conv"
        assert nodes["add"].op == "AddV2" and nodes["add"].input[0] == "mul"
    else:
        assert out.SerializeToString(deterministic=True) == gd.SerializeToString(deterministic=True)


def test_training_mode_and_used_statistics_untouched():
    for gd, outputs in ((_conv_bn_graph("conv2d", is_training=True), ("out",)),
                        (_conv_bn_graph("conv2d", extra_fetch="batch_mean"), ("out", "stats"))):
        out = fold_batch_norms(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=outputs)))
        assert _nodes(out)["bn"].op == "FusedBatchNormV3"


def test_protected_final_node_untouched():
    gd = _conv_bn_graph("conv2d")
    out = fold_batch_norms(gd, TransformContext(PrecisionPlan(inputs=("x",), outputs=("bn",))))
    assert _nodes(out)["bn"].op == "FusedBatchNormV3"


def test_keras_conv_bn_without_bias():
    """Keras Conv2D(use_bias=False) + BatchNormalization with non-trivial moving statistics."""
    from tf_bf16.model import Model

    keras_model = zoo.digits_cnn_model()
    for layer in keras_model.layers:
        if "bn" in layer.name:
            layer.set_weights([RNG.uniform(0.5, 2, w.shape).astype(np.float32) if i in (0, 3) else
                               RNG.normal(0, 1, w.shape).astype(np.float32)
                               for i, w in enumerate(layer.get_weights())])
    model = Model(keras_model)
    plan = PrecisionPlan(inputs=model.input_names, outputs=model.output_names)
    out = clean_up(model.graph_def, plan)
    ops = _ops(out)
    assert ops["Mul"] == 0 and ops["Sub"] == 0 and ops["Rsqrt"] == 0
    assert ops["BiasAdd"] == 4  # conv1, conv2 (from their BN) and the two Dense layers
    feeds = [RNG.random((3, 8, 8, 1)).astype(np.float32)]
    np.testing.assert_allclose(model.run(feeds)[0], model.with_graph_def(out).run(feeds)[0], atol=1e-5)


def test_resnet50_no_decomposed_bn_after_conv(zoo_model):
    model = zoo_model("resnet50")
    plan = PrecisionPlan(inputs=model.input_names, outputs=model.output_names)
    out = clean_up(model.graph_def, plan)
    index = GraphIndex(out)
    for node in out.node:
        if node.op != "Mul":
            continue
        producer = index[parse_input(node.input[0])[0]]
        assert producer.op not in ("BiasAdd", "Conv2D"), node.name
    ops = _ops(out)
    assert ops["FusedBatchNormV3"] == 0 and ops["Mul"] == 0
    assert ops["BiasAdd"] == ops["Conv2D"] + ops["MatMul"] == 54
    feeds = zoo.sample_inputs(model, batch=2)
    for a, b in zip(model.run(feeds), model.with_graph_def(out).run(feeds)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
