"""Which of TensorFlow's own oneDNN fusions fire in tf_bf16's graphs, read from what TensorFlow ran.

Issue 10's clean-up passes exist so that TensorFlow fuses more without tf_bf16's kernels:
residual_addn (Conv2D+BiasAdd+residual add+Relu), sink_reshapes (MatMul+BiasAdd+exact GELU),
fuse_layer_norm (one _MklLayerNorm per norm), transpose_matmul (one Transpose fewer per
attention). Models get trained-like weights (zero biases would be deleted by Grappler and no
bias fusion could fire). FP32 fusions fire on every CPU with oneDNN on (the suite turns it on);
BF16 ones only where oneDNN makes BF16 primitives (avx512_bf16/AMX), which is checked per CPU.
"""

from __future__ import annotations

import collections

import keras
import numpy as np
import pytest

from tests import zoo
from tests.executed import executed_nodes, fused_ops
from tf_bf16 import pipeline
from tf_bf16.capability import detect_cpu_features
from tf_bf16.model import Model
from tf_bf16.plan_builder import build_plan

CPU = detect_cpu_features()


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


def test_bf16_graphs_fuse_where_onednn_has_bf16_primitives(graphs):
    cnn, _ = _ran(graphs, "cnn", "bf16")
    bert, bert_nodes = _ran(graphs, "bert", "bf16")
    norms = [n for n in bert_nodes if n.op == "_MklLayerNorm"]
    assert len(norms) == 9 and all(n.attr["T"].type == 1 for n in norms)    # FP32 on every CPU
    if CPU.bf16_native:
        assert sum(v for k, v in _contraction_fusions(cnn, "Conv2D").items() if k.endswith("[BiasAdd,Add,Relu]")) == 2
        assert sum(v for k, v in _contraction_fusions(bert, "MatMul").items() if k.endswith("[BiasAdd,GeluExact]")) == 4
    elif not CPU.avx512f:
        # AVX2: oneDNN cannot make BF16 primitives, so TensorFlow runs BF16 through Eigen, unfused.
        assert not _contraction_fusions(cnn, "Conv2D") and cnn["Conv2D[]"] > 0
        assert bert["Erfc[]"] == 4
