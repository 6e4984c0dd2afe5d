"""Tests for tuning.tune_quantized: INT8 -> BF16 -> FP32 fallback in few evaluations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from tests import zoo
from tf_bf16 import calibration, config as config_lib, evaluation, int8_sensitivity, pipeline, tuning
from tf_bf16.capability import detect_cpu_features
from tf_bf16.model import Model
from tf_bf16.plan_builder import build_plan
from tf_bf16.transforms.plan import QuantizationSpec
from tf_bf16.transforms.quantize import calibration_tensors

CONTRACTION_PREFIXES = ("QuantizedConv2D", "QuantizedMatMul", "QuantizedDepthwise")


@pytest.fixture(scope="module")
def quantized_digits(digits):
    """(model, cleaned, plan with ranges, full INT8 result) for the trained digits CNN."""
    keras_model, _ = digits
    model = Model(keras_model)
    plan = build_plan(model.graph_def, model.input_names, model.output_names)
    cleaned = pipeline.clean_up(model.graph_def, plan)
    x_train = zoo.digits_data()[0]
    feeds = [{model.input_names[0]: x_train[i:i + 50]} for i in range(0, 200, 50)]
    ranges = calibration.calibrate(cleaned, model.input_names, calibration_tensors(cleaned, plan), feeds, 200)
    plan = dataclasses.replace(plan, quantization=QuantizationSpec(
        ranges, weight_max=detect_cpu_features().int8_weight_max))
    return model, cleaned, plan, pipeline.convert_cleaned(cleaned, plan)


def _spec(eval_func, **criterion):
    conf = config_lib.load_config({"tuning": {"accuracy_criterion": criterion or {"relative": 0.0}}})
    return evaluation.build_evaluation(conf, eval_func=eval_func)


def _int8_ops(model: Model) -> int:
    return sum(1 for n in model.graph_def.node if n.op.startswith(CONTRACTION_PREFIXES))


def test_full_int8_that_passes_is_kept_after_one_trial(quantized_digits, digits):
    model, cleaned, plan, result = quantized_digits
    _, (x_test, y_test) = digits
    spec = _spec(lambda m: zoo.accuracy(m.run([x_test])[0], y_test), relative=0.02)
    tuned = tuning.tune_quantized(spec, model, cleaned, plan, result)
    assert tuned.report["tuning"]["evaluations"] == 1 and tuned.report["goal_met"]
    assert _int8_ops(tuned) == 4


def test_bisection_finds_the_fewest_bf16_fallbacks_within_the_evaluation_bound(quantized_digits):
    model, cleaned, plan, result = quantized_digits
    candidates = tuning.int8_candidates(cleaned, plan, result)
    n = len(candidates)
    assert n == 4
    # A goal that needs all but one op out of INT8: passes when at most one INT8 contraction is left.
    spec = _spec(lambda m: 1.0 if _int8_ops(m) <= 1 else 0.0)
    tuned = tuning.tune_quantized(spec, model, cleaned, plan, result)
    info = tuned.report["tuning"]
    assert info["goal_met"] and _int8_ops(tuned) == 1
    assert info["evaluations"] <= math.ceil(math.log2(n)) + 2
    best = info["best"]
    assert sorted(best["dtypes"].values()) == ["bf16"] * (n - 1) + ["int8"]
    # The op left in INT8 is the least noisy one.
    scores = int8_sensitivity.int8_noise(cleaned, plan.quantization.ranges, candidates, model.input_names,
                                         [{model.input_names[0]: zoo.digits_data()[0][:50]}])
    kept = [name for name, dtype in best["dtypes"].items() if dtype == "int8"]
    assert kept == [min(candidates, key=lambda c: scores[c])]
    for trial in info["int8"]["trials"]:
        assert set(trial["dtypes"]) == set(candidates)


def test_tuning_with_kernels_bisects_over_the_int8_kernel_graphs(kernel_ops, quantized_digits, digits):
    """kernels=True: every trial is converted with the kernel rewrite (INT8 kernel ops, BF16 fused ops),
    the bisection still keeps the one least noisy INT8 op, and the result runs."""
    model, cleaned, plan, _ = quantized_digits
    result = pipeline.convert_cleaned(cleaned, plan, kernels=True)
    int8_kernels = lambda m: sum(1 for n in m.graph_def.node if n.op.startswith("TfBf16Quantized"))  # noqa: E731
    assert int8_kernels(model.with_graph_def(result.graph_def)) == 4
    seen = []
    spec = _spec(lambda m: seen.append(int8_kernels(m)) or (1.0 if int8_kernels(m) <= 1 else 0.0))
    tuned = tuning.tune_quantized(spec, model, cleaned, plan, result, kernels=True)
    assert tuned.report["goal_met"] and int8_kernels(tuned) == 1
    assert seen[0] == 0 and seen[1] == 4             # the FP32 baseline, then the all-INT8 kernel graph
    assert not _int8_ops(tuned)                      # no TensorFlow quantized contraction is left
    _, (x_test, y_test) = digits
    assert zoo.accuracy(tuned.run([x_test])[0], y_test) >= zoo.accuracy(model.run([x_test])[0], y_test) - 0.02


def test_when_even_all_bf16_fails_the_bf16_to_fp32_search_takes_over(quantized_digits):
    model, cleaned, plan, result = quantized_digits
    fp32_matmuls = lambda m: sum(1 for n in m.graph_def.node                             # noqa: E731
                                 if n.op == "MatMul" and n.attr["T"].type == tf.float32.as_datatype_enum)
    spec = _spec(lambda m: 1.0 if _int8_ops(m) == 0 and fp32_matmuls(m) >= 1 else 0.0)
    tuned = tuning.tune_quantized(spec, model, cleaned, plan, result)
    assert tuned.report["goal_met"]
    assert _int8_ops(tuned) == 0 and fp32_matmuls(tuned) >= 1
    assert tuned.report["tuning"]["int8"]["trials"][1]["phase"] == "all bf16"


def test_an_op_the_config_limits_to_int8_or_fp32_falls_back_to_fp32_not_bf16(quantized_digits):
    model, cleaned, plan, _ = quantized_digits
    ops = {n.name: n.op for n in cleaned.node}
    conv = next(n for n in cleaned.node if n.op == "Conv2D").name
    limited = dataclasses.replace(plan, node_allowed={conv: {"int8", "fp32"}})
    result = pipeline.convert_cleaned(cleaned, limited)
    candidates = tuning.int8_candidates(cleaned, limited, result)
    assert conv in candidates                                            # INT8 first, as any free op
    assert {tuning.int8_fallback(limited, n, ops[n]) for n in candidates} == {"bf16", "fp32"}
    spec = _spec(lambda m: 1.0 if _int8_ops(m) == 0 else 0.0)           # passes only with every op given back
    tuned = tuning.tune_quantized(spec, model, cleaned, limited, result)
    best = tuned.report["tuning"]["best"]
    assert tuned.report["goal_met"] and best["dtypes"] == {n: "fp32" if n == conv else "bf16" for n in candidates}
    node = next(n for n in tuned.graph_def.node if n.name == conv)
    assert node.op == "Conv2D" and node.attr["T"].type == tf.float32.as_datatype_enum
    row = next(line.split() for line in tuning.format_int8_table(tuned.report["tuning"]).splitlines()
               if line.split()[:1] == [str(best["trial"])])
    assert row.count("F") == 1 and row.count("B") == len(candidates) - 1


def test_noise_ranks_a_layer_whose_input_range_a_rare_outlier_stretched_first():
    graph = tf.Graph()
    rng = np.random.default_rng(0)
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 16], name="x")
        w = rng.standard_normal((16, 16)).astype(np.float32)
        h1 = tf.nn.relu(tf.matmul(tf.nn.relu(x), tf.constant(w)), name="a")
        tf.nn.relu(tf.matmul(h1, tf.constant(w)), name="b")
    gd = graph.as_graph_def()
    names = [n.name for n in gd.node if n.op == "MatMul"]
    feeds = [{"x": rng.standard_normal((32, 16)).astype(np.float32)}]
    # Both inputs typically reach ~4; a calibration outlier stretched "a" to 400: a 100x coarser step.
    ranges = {"Relu": (0.0, 4.0), "a": (0.0, 400.0)}
    scores = int8_sensitivity.int8_noise(gd, ranges, names, ["x"], feeds)
    assert scores[names[1]] > 10 * scores[names[0]]


def test_the_tuned_report_counts_the_returned_graph(quantized_digits):
    model, cleaned, plan, result = quantized_digits
    base = __import__("tf_bf16.report", fromlist=["build_report"]).build_report(
        model.graph_def, result.graph_def, result.fp32_reasons, {"precisions": ["int8", "bf16", "fp32"]},
        int8_nodes=result.int8_nodes)
    spec = _spec(lambda m: 1.0 if _int8_ops(m) <= 1 else 0.0)
    tuned = tuning.tune_quantized(spec, model, cleaned, plan, result, base_report=base)
    int8_convs = tuned.report["int8"]["by_input_op_type"]["Conv2D"]["int8"]
    assert int8_convs + tuned.report["int8"]["by_input_op_type"]["MatMul"]["int8"] == _int8_ops(tuned) == 1
