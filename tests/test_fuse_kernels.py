"""Tests for transforms/fuse_kernels.py: which BF16 chains become tf_bf16's fused kernel ops.

These check the rewritten GraphDef itself, so they run on every machine; running the
rewritten graphs against TensorFlow is in ``test_kernels.py`` (it needs the built library).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_bf16 import pipeline
from tf_bf16.plan_builder import build_plan
from tf_bf16.transforms import graph as g
from tf_bf16.transforms.fuse_kernels import CONV_OP, MATMUL_OP

RNG = np.random.default_rng(7)


def _const(*shape):
    return tf.constant(RNG.standard_normal(shape).astype(np.float32) * 0.1)


def _convert(build, inputs=("x",), outputs=("out",), kernels=True):
    graph = tf.Graph()
    with graph.as_default():
        build()
    gd = graph.as_graph_def()
    return pipeline.convert_graph(gd, build_plan(gd, inputs, outputs), kernels=kernels)


def _ops(graph_def, op):
    return [n for n in graph_def.node if n.op == op]


def _fused(node):
    return [s.decode() for s in node.attr["fused_ops"].list.s]


def residual_block():
    x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 16], name="x")
    h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, _const(3, 3, 16, 16), 1, "SAME"), _const(16)))
    h = tf.nn.bias_add(tf.nn.conv2d(h, _const(3, 3, 16, 16), 1, "SAME"), _const(16))
    h = tf.nn.relu(h + x)                                  # residual Add, then Relu
    d = tf.nn.depthwise_conv2d(h, _const(3, 3, 16, 2), [1, 2, 2, 1], "VALID")
    tf.identity(tf.reduce_mean(tf.nn.relu6(d), axis=[1, 2]), name="out")


def test_residual_block_becomes_three_fused_convs():
    result = _convert(residual_block)
    out = result.graph_def
    assert not _ops(out, "Conv2D") and not _ops(out, "DepthwiseConv2dNative") and not _ops(out, "BiasAdd")
    convs = {n.name: n for n in _ops(out, CONV_OP)}
    assert len(convs) == 3 and result.kernel_nodes == 3
    fused = sorted(_fused(n) for n in convs.values())
    assert fused == [["BiasAdd", "Add", "Relu"], ["BiasAdd", "Relu"], ["Relu6"]]
    residual = next(n for n in convs.values() if "Add" in _fused(n))
    assert residual.attr["num_args"].i == 2 and len([i for i in residual.input if not i.startswith("^")]) == 4
    assert all(n.attr["T"].type == g.BFLOAT16 and n.attr["weights_constant"].b for n in convs.values())
    depthwise = next(n for n in convs.values() if _fused(n) == ["Relu6"])
    assert depthwise.attr["groups"].i == 16 and list(depthwise.attr["strides"].list.i) == [1, 2, 2, 1]
    grouped = next(n for n in out.node if n.name == g.node_name(depthwise.input[1]))
    assert [d.size for d in grouped.attr["value"].tensor.tensor_shape.dim] == [3, 3, 1, 32]
    # Every consumer still finds its input: fused nodes keep the last fused node's name.
    names = {n.name for n in out.node}
    assert all(g.node_name(i) in names for n in out.node for i in n.input)


def test_matmul_chain_and_transpose_attrs():
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 32], name="x")
        h = tf.nn.relu(tf.nn.bias_add(tf.matmul(x, _const(32, 64)), _const(64)))
        h = tf.matmul(h, _const(16, 64), transpose_b=True)
        tf.identity(tf.nn.softmax(tf.matmul(h, _const(16, 8))), name="out")

    out = _convert(build).graph_def
    mms = _ops(out, MATMUL_OP)
    assert not _ops(out, "MatMul") and len(mms) == 3
    assert sorted(_fused(n) for n in mms) == [[], [], ["BiasAdd", "Relu"]]
    assert sum(n.attr["transpose_b"].b for n in mms) == 1


def test_broadcast_add_fp32_nodes_and_outputs_are_left_alone():
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 4], name="x")
        y = tf.compat.v1.placeholder(tf.float32, [None, 1, 1, 8], name="y")
        c = tf.nn.conv2d(x, _const(1, 1, 4, 8), 1, "SAME")
        h = tf.nn.conv2d(tf.nn.relu(c + y), _const(3, 3, 8, 8), 1, "SAME")   # Add broadcasts y
        tf.identity(h, name="out")

    result = _convert(build, inputs=("x", "y"))
    convs = _ops(result.graph_def, CONV_OP)
    assert len(convs) == 2 and all("Add" not in _fused(n) for n in convs)
    assert len(_ops(result.graph_def, "AddV2")) == 1
    fp32 = _convert(build, inputs=("x", "y"), kernels=False)
    assert not _ops(fp32.graph_def, CONV_OP) and fp32.kernel_nodes == 0


def test_forced_fp32_contraction_stays_a_stock_op():
    graph = tf.Graph()
    with graph.as_default():
        residual_block()
    gd = graph.as_graph_def()
    first = next(n.name for n in gd.node if n.op == "Conv2D")
    plan = build_plan(gd, ["x"], ["out"], node_precisions={first: "fp32"})
    out = pipeline.convert_graph(gd, plan, kernels=True).graph_def
    assert [n.name for n in _ops(out, "Conv2D")] == [first]
    assert len(_ops(out, CONV_OP)) == 2
