"""Tests for transforms/fuse_kernels.py: which BF16 chains become tf_bf16's fused kernel ops.

These check the rewritten GraphDef itself, so they run on every machine; running the
rewritten graphs against TensorFlow is in ``test_kernels.py`` (it needs the built library).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tests import zoo
from tf_bf16 import MixedPrecision, pipeline
from tf_bf16.errors import ConfigError
from tf_bf16.model import Model
from tf_bf16.plan_builder import build_plan
from tf_bf16.transforms import graph as g
from tf_bf16.transforms.fuse_kernels import CONV_OP, MATMUL_OP

RNG = np.random.default_rng(7)


def _const(*shape):
    return tf.constant(RNG.standard_normal(shape).astype(np.float32) * 0.1)


def _convert(build, inputs=("x",), outputs=("out",), kernels=True):
    gd = _graph_def(build)
    return pipeline.convert_graph(gd, build_plan(gd, inputs, outputs), kernels=kernels)


def _graph_def(build):
    graph = tf.Graph()
    with graph.as_default():
        build()
    return graph.as_graph_def()


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


def _check_runs_like_the_original(original_gd, converted) -> None:
    """Where the kernel library builds: the fused graph's output is the original's to BF16 precision."""
    from tf_bf16.kernels import build as kernel_build

    if not kernel_build.build_if_needed().ok:
        return
    original = Model(original_gd, inputs=["x"], outputs=["out"])
    x = RNG.uniform(-2, 2, (4, 32)).astype(np.float32)
    reference = original.run([x])[0]
    ours = original.with_graph_def(converted).run([x])[0]
    assert np.abs(ours - reference).max() <= 3e-2 * np.abs(reference).max()


def test_keras_dense_on_3d_input_fuses_across_its_reshape():
    """Keras' Dense on [batch, seq, features] is MatMul -> Reshape -> BiasAdd -> GELU: the bias and
    GELU move into the kernel and the Reshape follows it under the last node's name."""
    bert = zoo.bert_like(num_layers=1, seq_len=16, hidden=32, heads=2, intermediate=64, vocab=100)
    model = Model(bert)
    result = pipeline.convert_graph(model.graph_def, build_plan(model.graph_def, model.input_names,
                                                                model.output_names), kernels=True)
    out = result.graph_def
    gelu = [n for n in _ops(out, MATMUL_OP) if _fused(n) == ["BiasAdd", "GeluErf"]]
    assert len(gelu) == 1 and not _ops(out, "Erfc")
    index = g.GraphIndex(out)
    (reader, _), = index.consumers(gelu[0].name)
    assert reader.op == "Reshape"                      # the moved Reshape, named as the GELU's last node was
    assert all(g.node_name(i) in index for n in out.node for i in n.input)


ACTIVATION_FORMS = {
    "keras_gelu_exact": (lambda h: keras_gelu(h, approximate=False), "GeluErf"),
    "tf_gelu_exact": (lambda h: tf.nn.gelu(h, approximate=False), "GeluErf"),
    "tf_gelu_tanh": (lambda h: tf.nn.gelu(h, approximate=True), "GeluTanh"),
    "swish": (lambda h: h * tf.sigmoid(h), "Swish"),
    "not_an_activation": (lambda h: h * h + 0.5 * h, None),
}


def keras_gelu(h, approximate):
    import keras

    return keras.activations.gelu(h, approximate=approximate)


@pytest.mark.parametrize("form", sorted(ACTIVATION_FORMS))
def test_activations_written_out_in_several_nodes_are_recognised(form):
    activation, expected = ACTIVATION_FORMS[form]

    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 32], name="x")
        h = activation(tf.nn.bias_add(tf.matmul(x, _const(32, 64)), _const(64)))
        tf.identity(tf.matmul(h, _const(64, 8)), name="out")

    gd = _graph_def(build)
    result = pipeline.convert_graph(gd, build_plan(gd, ["x"], ["out"]), kernels=True)
    fused = sorted(_fused(n) for n in _ops(result.graph_def, MATMUL_OP))
    _check_runs_like_the_original(gd, result.graph_def)
    if expected is None:
        assert fused == [[], ["BiasAdd"]]       # the region computes no known activation: left alone
        assert _ops(result.graph_def, "Mul")
    else:
        assert fused == [[], ["BiasAdd", expected]]
        leftover = {n.op for n in result.graph_def.node} & {"Erf", "Erfc", "Tanh", "Sigmoid", "Mul", "Pow"}
        assert leftover == set()


# ------------------------------------------------------------------------------------------
# End to end through MixedPrecision(kernels=True): needs the built library.

@pytest.fixture(scope="module")
def library():
    from tf_bf16.kernels import build as kernel_build

    result = kernel_build.build_if_needed()
    if not result.ok:
        pytest.skip(f"tf_bf16 kernels cannot be built here: {result.reason}")
    return result.path


def _model(build, inputs=("x",), outputs=("out",)) -> Model:
    return Model(_graph_def(build), inputs=list(inputs), outputs=list(outputs))


def _mixed(model: Model, kernels: bool) -> Model:
    converter = MixedPrecision(env={"FORCE_BF16": "1"}, kernels=kernels)
    converter.model = model
    return converter()


def test_converted_residual_block_runs_with_kernels_and_saves(library, tmp_path):
    model = _model(residual_block)
    with_kernels, without = _mixed(model, True), _mixed(model, False)
    assert with_kernels.report["kernels"]["nodes"] == 3 and "tf_bf16.kernels" in with_kernels.report["kernels"]["requires"]
    assert with_kernels.report["op_types"][CONV_OP]["bf16"] == 3
    x = RNG.uniform(-1, 1, (2, 8, 8, 16)).astype(np.float32)
    reference, ours, stock = model.run([x])[0], with_kernels.run([x])[0], without.run([x])[0]
    scale = np.abs(reference).max()
    assert np.abs(ours - reference).max() <= 2e-2 * scale        # BF16 rounding only
    assert np.abs(ours - reference).max() <= 1.5 * np.abs(stock - reference).max() + 1e-3 * scale
    path = str(tmp_path / "fused.pb")
    with_kernels.save(path)
    np.testing.assert_array_equal(Model(path).run([x])[0], ours)   # the reloaded model loads the library itself


def test_saved_model_with_kernels_loads_in_a_fresh_process(library, tmp_path):
    """The SavedModel says it needs the library (assets.extra) and tf_bf16.Model loads it itself."""
    import subprocess
    import sys

    converted = _mixed(_model(residual_block), True)
    path = tmp_path / "fused_saved_model"
    converted.save(str(path))
    assert "tf_bf16.kernels" in (path / "assets.extra" / "tf_bf16_kernels.txt").read_text()
    x = RNG.uniform(-1, 1, (2, 8, 8, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = ("import numpy as np, sys; from tf_bf16 import Model; "
              f"np.save(sys.argv[2], Model(sys.argv[1]).run([np.load(sys.argv[3])])[0])")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "y.npy"), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), converted.run([x])[0])


def test_bert_like_matmuls_fuse_and_match(library):
    bert = zoo.bert_like(num_layers=1, seq_len=16, hidden=32, heads=2, intermediate=64, vocab=100)
    model = Model(bert)
    with_kernels, without = _mixed(model, True), _mixed(model, False)
    assert with_kernels.report["kernels"]["nodes"] >= 4
    feeds = zoo.sample_inputs(bert, batch=2)
    for ref, ours, stock in zip(model.run(feeds), with_kernels.run(feeds), without.run(feeds)):
        scale = np.abs(ref).max()
        assert np.abs(ours - ref).max() <= max(1.5 * np.abs(stock - ref).max(), 2e-2 * scale)


def test_kernels_requested_without_the_library_is_a_config_error(monkeypatch):
    from tf_bf16 import kernels

    monkeypatch.setattr(kernels, "load_kernels", lambda path=None: None)
    converter = MixedPrecision(env={"FORCE_BF16": "1"}, kernels=True)
    converter.model = _model(residual_block)
    with pytest.raises(ConfigError, match="tf_bf16.kernels.build"):
        converter()
