"""Tests for transforms/int8_kernels.py: TensorFlow's quantized contractions become tf_bf16's INT8
kernel ops, with QuantizeV2 / Dequantize / Cast folded in, and the graphs still compute the model.

Needs the built kernel library (the ``kernel_ops`` fixture skips where it cannot be built) and
oneDNN on (tests/conftest.py), which TensorFlow's quantized ops need.
"""

from __future__ import annotations

import collections
import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import zoo
from tests.test_quantize import _digits_feeds
from tf_bf16 import calibration, pipeline
from tf_bf16.capability import detect_cpu_features
from tf_bf16.model import Model
from tf_bf16.plan_builder import build_plan
from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.int8_kernels import CONV_OP, MATMUL_OP, int8_kernels
from tf_bf16.transforms.plan import QuantizationSpec
from tf_bf16.transforms.quantize import calibration_tensors

BF16, FP32 = tf.bfloat16.as_datatype_enum, tf.float32.as_datatype_enum
TF_QUANTIZED = ("QuantizeV2", "QuantizedConv2DWithBiasAndReluAndRequantize", "QuantizedConv2DWithBiasAndRequantize",
                "QuantizedConv2DWithBiasSumAndReluAndRequantize", "QuantizedMatMulWithBiasAndReluAndRequantize",
                "QuantizedMatMulWithBiasAndDequantize", "_QuantizedMatMul")


@pytest.fixture(autouse=True)
def _library(kernel_ops):
    return kernel_ops


def _convert(model: Model, feeds, kernels: bool, node_precisions=None):
    """Clean-up, minmax calibration on ``feeds``, then the conversion stages (with or without kernels)."""
    plan = build_plan(model.graph_def, model.input_names, model.output_names, node_precisions=node_precisions)
    cleaned = pipeline.clean_up(model.graph_def, plan)
    ranges = calibration.calibrate(cleaned, model.input_names, calibration_tensors(cleaned, plan),
                                   [{model.input_names[0]: f} for f in feeds], sum(len(f) for f in feeds), "minmax")
    spec = QuantizationSpec(ranges, weight_max=detect_cpu_features().int8_weight_max)
    return pipeline.convert_cleaned(cleaned, dataclasses.replace(plan, quantization=spec), kernels=kernels)


def _ops(graph_def) -> collections.Counter:
    return collections.Counter(n.op for n in graph_def.node)


def test_digits_runs_on_int8_kernels_without_quantize_round_trips(digits):
    keras_model, (x_test, y_test) = digits
    model = Model(keras_model)
    plain = _convert(model, _digits_feeds(), kernels=False)
    fused = _convert(model, _digits_feeds(), kernels=True)
    ops = _ops(fused.graph_def)
    assert ops[CONV_OP] == 2 and ops[MATMUL_OP] == 2 and fused.kernel_nodes == 4
    assert not set(TF_QUANTIZED) & set(ops)           # the op quantizes its float input itself
    nodes = {n.name: n for n in fused.graph_def.node}
    first = next(n for n in fused.graph_def.node if n.op == CONV_OP and n.attr["Tinput"].type == FP32)
    assert nodes[g.node_name(first.input[0])].op == "Placeholder"
    logits = [n for n in fused.graph_def.node if n.op == MATMUL_OP and n.attr["Tout"].type == FP32]
    assert len(logits) == 1 and logits[0].name in {g.node_name(s) for n in fused.graph_def.node for s in n.input
                                                  if n.op == "Softmax"}
    expected = model.with_graph_def(plain.graph_def).run([x_test])[0]
    actual = model.with_graph_def(fused.graph_def).run([x_test])[0]
    # The same INT8 arithmetic, rounded in other places (and this op's u8 + zero point for signed inputs):
    # the same predictions but for a few borderline samples.
    assert np.mean(np.argmax(actual, -1) == np.argmax(expected, -1)) >= 0.98
    assert np.abs(actual - expected).mean() < 0.005
    fp32 = zoo.accuracy(model.run([x_test])[0], y_test)
    assert zoo.accuracy(actual, y_test) >= fp32 - 0.01


def test_a_bf16_island_feeds_the_kernels_bf16_without_casts(digits):
    keras_model, (x_test, y_test) = digits
    model = Model(keras_model)
    conv2 = [n.name for n in model.graph_def.node if n.op == "Conv2D"][1]
    result = _convert(model, _digits_feeds(), kernels=True, node_precisions={conv2: "bf16"})
    ops = _ops(result.graph_def)
    assert "Cast" not in ops and not set(TF_QUANTIZED) & set(ops)
    readers_of_bf16 = [n for n in result.graph_def.node if n.op == MATMUL_OP and n.attr["Tinput"].type == BF16]
    assert len(readers_of_bf16) == 1                  # the first Dense reads the BF16 island's output directly
    fp32 = zoo.accuracy(model.run([x_test])[0], y_test)
    assert zoo.accuracy(model.with_graph_def(result.graph_def).run([x_test])[0], y_test) >= fp32 - 0.01


def _residual_model() -> keras.Model:
    """Two ResNet-style blocks: an identity shortcut of a ReLU output (UINT8 summand: the sum is
    fused) and a projection shortcut (signed: the add stays outside)."""
    keras.utils.set_random_seed(3)
    layers = keras.layers
    x = inputs = keras.Input((12, 12, 8))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    y = layers.Conv2D(16, 1, activation="relu")(x)
    y = layers.Conv2D(16, 3, padding="same")(y)
    x = layers.ReLU()(layers.Add()([x, y]))
    y = layers.Conv2D(32, 3, padding="same", strides=2)(x)
    shortcut = layers.Conv2D(32, 1, strides=2)(x)
    x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(5)(x))


def _both_ways(keras_model: keras.Model, seed: int):
    """(model, a fresh input batch, the INT8 result without kernels, the one with them), calibrated on
    two random batches of four."""
    zoo.make_trained_like(keras_model)
    model = Model(keras_model)
    rng = np.random.default_rng(seed)
    shape = tuple(keras_model.input_shape[1:])
    feeds = [rng.standard_normal((4,) + shape).astype(np.float32) for _ in range(2)]
    x = rng.standard_normal((3,) + shape).astype(np.float32)
    return model, x, _convert(model, feeds, kernels=False), _convert(model, feeds, kernels=True)


def test_residual_sum_becomes_one_kernel_and_matches_tensorflows_int8():
    model, x, plain, fused = _both_ways(_residual_model(), seed=0)
    assert _ops(plain.graph_def)["QuantizedConv2DWithBiasSumAndReluAndRequantize"] == 1
    fused_ops = sorted(tuple(s.decode() for s in n.attr["fused_ops"].list.s) for n in fused.graph_def.node
                       if n.op == CONV_OP)
    assert ("BiasAdd", "Add", "Relu") in fused_ops
    assert not set(TF_QUANTIZED) & set(_ops(fused.graph_def))
    reference = model.run([x])[0]
    expected = model.with_graph_def(plain.graph_def).run([x])[0]
    actual = model.with_graph_def(fused.graph_def).run([x])[0]
    scale = np.abs(reference).max()
    assert np.abs(actual - reference).max() / scale < 0.05
    assert np.abs(actual - expected).max() / scale < 0.05


def test_a_conv_reading_a_uint8_concat_takes_its_static_range():
    """Inception-style: two ReLU branches concatenated in UINT8 feed a convolution. The concat's output
    range is [0, max of its inputs' maxes], so that convolution becomes a kernel op too."""
    keras.utils.set_random_seed(5)
    layers = keras.layers
    inputs = keras.Input((10, 10, 4))
    left = layers.Conv2D(8, 1, activation="relu")(inputs)
    right = layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    x = layers.Concatenate()([left, right])
    x = layers.Conv2D(8, 3, activation="relu")(x)
    keras_model = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))
    model, x, plain, fused = _both_ways(keras_model, seed=1)
    assert _ops(plain.graph_def)["QuantizedConcatV2"] == 1
    ops = _ops(fused.graph_def)
    assert ops[CONV_OP] == 3 and ops["QuantizedConcatV2"] == 1 and not set(TF_QUANTIZED) & set(ops)
    expected = model.with_graph_def(plain.graph_def).run([x])[0]
    actual = model.with_graph_def(fused.graph_def).run([x])[0]
    np.testing.assert_allclose(actual, expected, atol=0.02 * np.abs(expected).max())


def test_a_conv_whose_input_range_is_not_constant_keeps_tensorflows_op(digits):
    """Ranges are read from Consts only: a QuantizeV2 whose max is computed at run time leaves its
    reader as TensorFlow's quantized op, and the graph still runs."""
    keras_model, (x_test, _) = digits
    model = Model(keras_model)
    plain = _convert(model, _digits_feeds(), kernels=False).graph_def
    graph_def = g.copy_graph(plain)
    quantize = next(n for n in graph_def.node if n.op == "QuantizeV2")
    dynamic = g.make_node("Identity", "dynamic_max", [quantize.input[2]], {"T": _attr_type(FP32)})
    graph_def.node.append(dynamic)
    quantize.input[2] = "dynamic_max"
    context = TransformContext(build_plan(graph_def, model.input_names, model.output_names))
    out = int8_kernels(graph_def, context)
    ops = _ops(out)
    assert ops["QuantizedConv2DWithBiasAndReluAndRequantize"] == 1 and ops[CONV_OP] == 1
    assert context.kernel_nodes == 3
    np.testing.assert_allclose(model.with_graph_def(out).run([x_test[:20]])[0],
                               model.with_graph_def(plain).run([x_test[:20]])[0], atol=0.05)


def _attr_type(dtype: int):
    from tensorflow.core.framework import attr_value_pb2
    return attr_value_pb2.AttrValue(type=dtype)
