"""Tests for transforms/quantize.py (stage 1, FP32+INT8 generation) and its place in the pipeline.

The quantized ops run through oneDNN, which tests/conftest.py turns on for the suite.
"""

from __future__ import annotations

import collections
import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import zoo
from tf_bf16 import calibration, pipeline
from tf_bf16.capability import detect_cpu_features
from tf_bf16.model import Model
from tf_bf16.plan_builder import build_plan
from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.plan import PrecisionPlan, QuantizationSpec
from tf_bf16.transforms.quantize import calibration_tensors, quantize

CPU = detect_cpu_features()
BF16, FP32, QUINT8 = tf.bfloat16.as_datatype_enum, tf.float32.as_datatype_enum, tf.quint8.as_datatype_enum


def _quantized(model: Model, feeds, node_precisions=None, granularity="per_channel", algorithm="minmax"):
    """(converted GraphDef, conversion result, ranges): clean-up, calibration, INT8 + BF16 + cast folding."""
    plan = build_plan(model.graph_def, model.input_names, model.output_names, node_precisions=node_precisions)
    cleaned = pipeline.clean_up(model.graph_def, plan)
    tensors = calibration_tensors(cleaned, plan)
    ranges = calibration.calibrate(cleaned, model.input_names, tensors,
                                   [{model.input_names[0]: f} for f in feeds], sum(len(f) for f in feeds), algorithm)
    spec = QuantizationSpec(ranges, weight_granularity=granularity, weight_max=CPU.int8_weight_max)
    result = pipeline.convert_cleaned(cleaned, dataclasses.replace(plan, quantization=spec))
    return result.graph_def, result, ranges


def _ops(graph_def):
    return collections.Counter(n.op for n in graph_def.node)


def _digits_feeds(n=200, batch=50):
    x_train = zoo.digits_data()[0]
    return [x_train[i:i + batch] for i in range(0, n, batch)]


def test_digits_int8_within_one_point_and_one_chain(digits):
    keras_model, (x_test, y_test) = digits
    model = Model(keras_model)
    converted, result, _ = _quantized(model, _digits_feeds())
    ops = _ops(converted)
    assert ops["QuantizedConv2DWithBiasAndReluAndRequantize"] == 2
    assert ops["QuantizedMaxPool"] == 2 and ops["QuantizedReshape"] == 1
    assert ops["QuantizedMatMulWithBiasAndReluAndRequantize"] == 1
    assert ops["QuantizedMatMulWithBiasAndDequantize"] == 1      # the logits: TF requantizes MatMul only to UINT8
    assert not {"Conv2D", "MatMul", "MaxPool", "Cast"} & set(ops)
    assert ops["QuantizeV2"] == 1                                # one chain, one QuantizeV2 at its start
    assert {n for n in result.int8_nodes} >= {n.name for n in model.graph_def.node if n.op == "Conv2D"}
    fp32 = zoo.accuracy(model.run([x_test])[0], y_test)
    int8 = zoo.accuracy(model.with_graph_def(converted).run([x_test])[0], y_test)
    assert int8 >= fp32 - 0.01


def test_a_conv_forced_bf16_is_fed_by_dequantize_to_bf16_and_leaves_through_one_cast(digits):
    keras_model, (x_test, y_test) = digits
    model = Model(keras_model)
    conv2 = [n.name for n in model.graph_def.node if n.op == "Conv2D"][1]
    converted, _, _ = _quantized(model, _digits_feeds(), node_precisions={conv2: "bf16"})
    nodes = {n.name: n for n in converted.node}
    conv = nodes[conv2]
    assert conv.op == "Conv2D" and conv.attr["T"].type == BF16
    feeder = nodes[g.node_name(conv.input[0])]
    assert feeder.op == "Dequantize" and feeder.attr["dtype"].type == BF16
    for quantizer in (n for n in converted.node if n.op == "QuantizeV2" and nodes[g.node_name(n.input[0])].op == "Cast"):
        cast = nodes[g.node_name(quantizer.input[0])]
        assert nodes[g.node_name(cast.input[0])].op != "Cast"          # no Cast pair
        assert cast.attr["SrcT"].type == BF16 and cast.attr["DstT"].type == FP32
    assert _ops(converted)["Cast"] == 1
    fp32 = zoo.accuracy(model.run([x_test])[0], y_test)
    mixed = zoo.accuracy(model.with_graph_def(converted).run([x_test])[0], y_test)
    assert mixed >= fp32 - 0.01


def _residual_cnn(relu6=False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 8), name="image")
    act = (lambda: keras.layers.ReLU(6.0)) if relu6 else keras.layers.ReLU
    x = act()(keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 3, padding="same")(inputs)))
    for _ in range(2):
        h = act()(keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 3, padding="same")(x)))
        h = keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 1)(h))
        x = keras.layers.ReLU()(keras.layers.Add()([x, h]))
    x = keras.layers.ZeroPadding2D(1)(x)
    x = act()(keras.layers.DepthwiseConv2D(3, strides=2)(x))
    out = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, out)
    zoo.make_trained_like(model)
    return Model(model)


def _rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("relu6", [False, True])
def test_residual_blocks_pads_and_depthwise_quantize_as_one_chain(relu6):
    model = _residual_cnn(relu6)
    rng = np.random.default_rng(0)
    feeds = [rng.uniform(0, 1, (4, 12, 12, 8)).astype(np.float32) for _ in range(3)]
    converted, _, ranges = _quantized(model, feeds)
    ops = _ops(converted)
    assert ops["QuantizedConv2DWithBiasSumAndReluAndRequantize"] == 2               # both residual adds fused
    assert ops["QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize"] == 1
    assert not {"Conv2D", "DepthwiseConv2dNative", "AddV2", "AddN", "Pad"} & set(ops)
    depthwise = next(n for n in converted.node if n.op.startswith("QuantizedDepthwise"))
    assert list(depthwise.attr["padding_list"].list.i) == [0, 0, 1, 1, 1, 1, 0, 0]   # ZeroPadding2D folded in
    assert ops["QuantizeV2"] == 2            # the image, and the global average pool (no INT8 Mean)
    if relu6:
        maxima = [float(g.const_value(next(c for c in converted.node if c.name == n.input[8])))
                  for n in converted.node if n.op == "QuantizedConv2DWithBiasAndReluAndRequantize"]
        assert max(maxima) <= 6.0
    x = [rng.uniform(0, 1, (2, 12, 12, 8)).astype(np.float32)]
    assert _rel_err(model.with_graph_def(converted).run(x)[0], model.run(x)[0]) < 5e-2


def _dense_graph(signed: bool):
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 16], name="x")
        h = tf.nn.relu(x) if not signed else x
        w = tf.constant(np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32))
        tf.identity(tf.nn.relu(tf.nn.bias_add(tf.matmul(h, w), tf.constant(np.full(8, 0.1, np.float32)))), name="out")
    return Model(graph.as_graph_def(), inputs=["x"], outputs=["out"])


@pytest.mark.parametrize("signed", [False, True])
def test_matmul_of_unsigned_input_chains_and_of_signed_input_dequantizes(signed):
    model = _dense_graph(signed)
    feeds = [np.random.default_rng(2).standard_normal((256, 16)).astype(np.float32)]
    converted, _, _ = _quantized(model, feeds)
    ops = _ops(converted)
    assert "MatMul" not in ops
    if signed:     # INT8 x INT8 -> FP32 with the bias fused; the ReLU stays a float op
        (matmul,) = [n for n in converted.node if n.op == "_QuantizedMatMul"]
        assert [s.decode() for s in matmul.attr["fused_ops"].list.s] == ["BiasAdd", "Dequantize"]
        assert ops["Relu"] == 1
    else:
        assert ops["QuantizedMatMulWithBiasAndReluAndRequantize"] == 1
        assert ops["Relu"] == 1        # the input's ReLU; the output's is fused
    x = [feeds[0][:4]]     # inside the calibrated ranges
    assert _rel_err(model.with_graph_def(converted).run(x)[0], model.run(x)[0]) < 3e-2


def test_forced_precisions_and_missing_ranges_keep_nodes_float(digits):
    keras_model, _ = digits
    model = Model(keras_model)
    plan = build_plan(model.graph_def, model.input_names, model.output_names)
    cleaned = pipeline.clean_up(model.graph_def, plan)
    # No ranges: nothing can be quantized, the graph is returned unchanged.
    empty = dataclasses.replace(plan, quantization=QuantizationSpec({}))
    assert quantize(cleaned, TransformContext(empty)) is cleaned
    convs = [n.name for n in cleaned.node if n.op == "Conv2D"]
    ranges = {t: (0.0, 4.0) for t in calibration_tensors(cleaned, plan)}
    forced = dataclasses.replace(plan, node_precisions={convs[0]: "fp32"}, op_type_precisions={"MatMul": "bf16"},
                                 quantization=QuantizationSpec(ranges))
    out = quantize(cleaned, TransformContext(forced))
    ops = _ops(out)
    assert ops["Conv2D"] == 1 and ops["MatMul"] == 2
    assert ops["QuantizedConv2DWithBiasAndReluAndRequantize"] == 1
    assert convs[0] in {n.name for n in out.node}


def test_allowed_sets_decide_what_the_int8_stage_takes(digits):
    """{bf16, fp32} keeps a conv float (for the BF16 stage, which paints it); {int8, fp32} lets it be quantized."""
    keras_model, _ = digits
    model = Model(keras_model)
    plan = build_plan(model.graph_def, model.input_names, model.output_names)
    cleaned = pipeline.clean_up(model.graph_def, plan)
    convs = [n.name for n in cleaned.node if n.op == "Conv2D"]
    limited = dataclasses.replace(plan, node_allowed={convs[0]: {"bf16", "fp32"}, convs[1]: {"int8", "fp32"}})
    ranges = {t: (0.0, 4.0) for t in calibration_tensors(cleaned, plan)}
    assert set(calibration_tensors(cleaned, limited)) < set(ranges)      # convs[0]'s pattern needs no range
    result = pipeline.convert_cleaned(cleaned, dataclasses.replace(limited, quantization=QuantizationSpec(ranges)))
    assert convs[0] not in result.int8_nodes and convs[1] in result.int8_nodes
    assert convs[0] in result.bf16_nodes
    assert _ops(result.graph_def)["QuantizedConv2DWithBiasAndReluAndRequantize"] == 1


def test_calibration_tensors_are_the_pattern_borders(digits):
    keras_model, _ = digits
    model = Model(keras_model)
    plan = build_plan(model.graph_def, model.input_names, model.output_names)
    cleaned = pipeline.clean_up(model.graph_def, plan)
    tensors = calibration_tensors(cleaned, plan)
    producers = [next(n for n in cleaned.node if n.name == g.node_name(t)).op for t in tensors]
    assert tensors[0] == model.input_names[0]
    assert producers.count("Relu") == 3 and "BiasAdd" in producers     # 3 ReLU patterns, the logits
    assert len(tensors) == len(set(tensors))


def test_per_tensor_weights_use_one_range(digits):
    keras_model, (x_test, y_test) = digits
    model = Model(keras_model)
    converted, _, _ = _quantized(model, _digits_feeds(), granularity="per_tensor")
    nodes = {n.name: n for n in converted.node}
    for conv in (n for n in converted.node if n.op.startswith("QuantizedConv2D")):
        assert np.asarray(g.const_value(nodes[conv.input[5]])).size == 1
    fp32 = zoo.accuracy(model.run([x_test])[0], y_test)
    assert zoo.accuracy(model.with_graph_def(converted).run([x_test])[0], y_test) >= fp32 - 0.02


def test_the_input_graph_is_never_modified(digits):
    keras_model, _ = digits
    model = Model(keras_model)
    before = model.graph_def.SerializeToString(deterministic=True)
    _quantized(model, _digits_feeds(100))
    assert model.graph_def.SerializeToString(deterministic=True) == before


def test_without_a_spec_the_stage_is_skipped():
    graph_def = zoo.three_conv_graph()
    plan = build_plan(graph_def, ["input"], ["final"])
    assert quantize(graph_def, TransformContext(PrecisionPlan(inputs=plan.inputs, outputs=plan.outputs))) is graph_def
    assert "quantize" not in pipeline.conversion()


@pytest.mark.parametrize("name, float_ops, max_err", [
    ("resnet50", {"Conv2D", "MatMul"}, 5e-2),       # max relative error of the class probabilities
    ("mobilenetv2", {"Conv2D", "DepthwiseConv2dNative", "MatMul"}, 5e-2),
    ("bert", {"MatMul"}, 5e-2),        # relative L2 of the hidden states (2.5e-2 measured)
])
def test_zoo_models_quantize_every_eligible_op_with_one_quantize_per_chain(zoo_model, zoo_inputs, name, float_ops,
                                                                           max_err):
    model = zoo_model(name)
    feeds = [zoo_inputs(name, batch=4, seed=s)[0] for s in (11, 12)]
    converted, _, _ = _quantized(model, feeds)
    ops = _ops(converted)
    assert not float_ops & set(ops), {op: ops[op] for op in float_ops & set(ops)}
    nodes = {n.name: n for n in converted.node}
    for node in converted.node:
        if node.op == "QuantizeV2":      # a chain starts from a float op, never right after a Dequantize
            assert nodes[g.node_name(node.input[0])].op != "Dequantize", node.name
    x = zoo_inputs(name, batch=2, seed=5)
    got, want = model.with_graph_def(converted).run(x)[0], model.run(x)[0]
    err = _rel_err(got, want) if name != "bert" else float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert err < max_err


def test_weights_use_the_levels_the_cpu_computes_exactly(digits):
    keras_model, (x_test, y_test) = digits
    model = Model(keras_model)
    plan = build_plan(model.graph_def, model.input_names, model.output_names)
    cleaned = pipeline.clean_up(model.graph_def, plan)
    ranges = {t: (0.0, 8.0) for t in calibration_tensors(cleaned, plan)}
    for levels in (127, 63):
        spec = QuantizationSpec(ranges, weight_max=levels)
        out = quantize(cleaned, TransformContext(dataclasses.replace(plan, quantization=spec)))
        nodes = {n.name: n for n in out.node}
        conv = next(n for n in out.node if n.op == "QuantizedConv2DWithBiasAndReluAndRequantize")
        raw = np.asarray(g.const_value(nodes[conv.input[1]]))
        weights = raw.view(np.int8).reshape(raw.shape).astype(np.float32)      # qint8 reads as a record dtype
        assert np.abs(weights).max() == levels
        # Dequantized with the op's +-127 convention, the weights are the FP32 ones to within a step.
        original = np.asarray(g.const_value(next(n for n in cleaned.node if n.name == g.node_name(
            next(c for c in cleaned.node if c.op == "Conv2D").input[1]))))
        top = np.asarray(g.const_value(nodes[conv.input[6]]))
        np.testing.assert_allclose(weights * top / 127.0, original, atol=float(np.max(top)) / 127.0)


def test_a_summand_that_is_also_the_convolutions_input_stays_outside_the_fused_sum():
    """relu(x + conv(x)) with x a ReLU output: TensorFlow's fused sum writes its output over the
    summand, which here the convolution itself still reads (measured: a segmentation fault)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    y = keras.layers.Conv2D(8, 3, padding="same")(x)
    out = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    keras_model = keras.Model(inputs, out)
    zoo.make_trained_like(keras_model)
    model = Model(keras_model)
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((4, 8, 8, 4)).astype(np.float32) for _ in range(2)]
    converted, _, _ = _quantized(model, feeds)
    ops = _ops(converted)
    assert ops["QuantizedConv2DWithBiasSumAndReluAndRequantize"] == 0
    assert ops["QuantizedConv2DWithBiasAndRequantize"] == 1     # the convolution is still INT8
    x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    reference = model.run([x])[0]
    actual = model.with_graph_def(converted).run([x])[0]
    assert np.abs(actual - reference).max() < 0.05 * np.abs(reference).max()
