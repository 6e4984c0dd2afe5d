"""Which of TensorFlow's own oneDNN fusions fire in tf_bf16's graphs, read from what TensorFlow ran.

Issue 10's clean-up passes exist so that TensorFlow fuses more without tf_bf16's kernels:
residual_addn (Conv2D+BiasAdd+residual add+Relu), sink_reshapes (MatMul+BiasAdd+exact GELU),
fuse_layer_norm (one _MklLayerNorm per norm), transpose_matmul (one Transpose fewer per
attention). Models get trained-like weights (zero biases would be deleted by Grappler and no
bias fusion could fire). FP32 fusions fire on every CPU with oneDNN on (the suite turns it on)
and are read from what TensorFlow executed; BF16 ones fire only where oneDNN makes BF16
primitives, so for BF16 the test checks the fusable patterns in the graph, the same on every CPU.
"""

from __future__ import annotations

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import zoo
from tests.executed import executed_nodes, fused_ops
from tf_bf16 import pipeline
from tf_bf16.model import Model
from tf_bf16.plan_builder import build_plan
from tf_bf16.transforms import graph as g

BF16, FP32 = tf.bfloat16.as_datatype_enum, tf.float32.as_datatype_enum


def _residual_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 8), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    for i in range(2):
        h = keras.layers.Conv2D(16, 3, padding="same", name=f"block{i}_a")(x)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
        h = keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 3, padding="same", name=f"block{i}_b")(h))
        x = keras.layers.ReLU()(keras.layers.Add()([x, h]))
    out = keras.layers.Dense(10, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, out)


@pytest.fixture(scope="module")
def graphs():
    """name -> (model, FP32 cleaned graph, BF16 converted graph, feeds), trained-like weights."""
    out = {}
    for name, keras_model, feeds in (
            ("cnn", _residual_cnn(), [np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 8)).astype(np.float32)]),
            ("bert", zoo.keras_model("bert"), zoo.sample_inputs("bert", batch=1))):
        zoo.make_trained_like(keras_model)
        model = Model(keras_model)
        plan = build_plan(model.graph_def, model.input_names, model.output_names)
        out[name] = (model, pipeline.clean_up(model.graph_def, plan),
                     pipeline.convert_graph(model.graph_def, plan).graph_def, feeds)
    return out


def _ran(graphs, name, which):
    model, fp32, bf16, feeds = graphs[name]
    nodes, outputs = executed_nodes(fp32 if which == "fp32" else bf16, model.input_names, model.output_names, feeds)
    reference = model.run(feeds)
    for got, want in zip(outputs, reference):
        assert np.abs(got - want).max() <= (1e-4 if which == "fp32" else 3e-2) * max(1.0, np.abs(want).max())
    return collections.Counter(f"{n.op}[{','.join(fused_ops(n))}]" for n in nodes), nodes


def _contraction_fusions(counts, kind):
    return {k: v for k, v in counts.items() if kind in k and "Fused" in k}


def test_fp32_residual_blocks_run_as_one_fused_convolution(graphs):
    counts, _ = _ran(graphs, "cnn", "fp32")
    fused = _contraction_fusions(counts, "Conv2D")
    assert sum(v for k, v in fused.items() if k.endswith("[BiasAdd,Add,Relu]")) == 2    # both residual adds
    assert counts["AddN[]"] == counts["AddV2[]"] == counts["Relu[]"] == 0


def test_fp32_bert_fuses_gelu_layer_norm_and_runs_fewer_transposes(graphs):
    counts, _ = _ran(graphs, "bert", "fp32")
    fused = _contraction_fusions(counts, "MatMul")
    assert sum(v for k, v in fused.items() if k.endswith("[BiasAdd,GeluExact]")) == 4    # one per layer
    assert counts["Erfc[]"] == 0
    assert counts["_MklLayerNorm[]"] == 9                                                # 2 per layer + embeddings
    assert sum(v for k, v in counts.items() if "Transpose" in k) == 4 * 4                # 4 per layer (5 before)


def test_bf16_graphs_hand_tensorflow_the_fusable_patterns(graphs):
    """What TensorFlow fuses in BF16 depends on the CPU (oneDNN makes BF16 primitives only with
    AVX-512), so this checks, on every CPU, that the BF16 graph holds the patterns the remapper
    matches, all in BF16 and adjacent; the fused LayerNorms execute in FP32 everywhere."""
    _, _, cnn, _ = graphs["cnn"]
    nodes = {n.name: n for n in cnn.node}
    readers = _readers(cnn)
    residuals = 0
    for add in (n for n in cnn.node if n.op == "AddN"):
        producers = [nodes[g.node_name(i)] for i in add.input]
        bias = next((p for p in producers if p.op == "BiasAdd" and nodes[g.node_name(p.input[0])].op == "Conv2D"),
                    None)
        if bias is None:
            continue
        conv = nodes[g.node_name(bias.input[0])]
        (relu,) = readers[add.name]
        assert relu.op == "Relu" and readers[bias.name] == [add] and readers[conv.name] == [bias]
        assert {n.attr["T"].type for n in (conv, bias, add, relu)} == {BF16}
        residuals += 1
    assert residuals == 2

    _, _, bert, _ = graphs["bert"]
    nodes = {n.name: n for n in bert.node}
    readers = _readers(bert)
    gelus = 0
    for bias in (n for n in bert.node if n.op == "BiasAdd" and nodes[g.node_name(n.input[0])].op == "MatMul"):
        ops = {r.op for r in readers[bias.name]}
        if ops and ops <= {"Mul", "Neg"}:          # the exact GELU reads the bias directly, no Reshape between
            assert bias.attr["T"].type == BF16 == nodes[g.node_name(bias.input[0])].attr["T"].type
            gelus += 1
    assert gelus == 4 and all(n.attr["T"].type == BF16 for n in bert.node if n.op == "Erfc")
    _, bert_nodes = _ran(graphs, "bert", "bf16")
    norms = [n for n in bert_nodes if n.op == "_MklLayerNorm"]
    assert len(norms) == 9 and all(n.attr["T"].type == FP32 for n in norms)


def _readers(graph_def):
    """node name -> the nodes reading its output 0."""
    out = collections.defaultdict(list)
    for node in graph_def.node:
        for spec in node.input:
            if not spec.startswith("^") and g.parse_input(spec)[1] == 0:
                out[g.parse_input(spec)[0]].append(node)
    return out
