"""Tests for tf_bf16/pipeline.py: stages of registered passes, and what the converter and tuner get back."""

from __future__ import annotations

import numpy as np
import pytest

from tests import zoo
from tests.test_function_bodies import _graph_with_call
from tf_bf16 import pipeline
from tf_bf16.plan_builder import build_plan
from tf_bf16.report import node_precision
from tf_bf16.transforms import driver, graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.plan import PrecisionPlan


@pytest.fixture(scope="module")
def three_conv():
    graph_def = zoo.three_conv_graph()
    return graph_def, build_plan(graph_def, ["input"], ["final"])


def test_stages_are_registered_and_in_pipeline_order():
    assert list(pipeline.STAGES) == ["clean_up", "int8", "bf16", "cast_folding", "kernels", "function_bodies"]
    for names in pipeline.STAGES.values():
        driver.check_names(names)            # every stage names registered passes
    assert pipeline.CONVERSION == pipeline.BF16 + pipeline.CAST_FOLDING + pipeline.FUNCTION_BODIES
    assert pipeline.conversion(kernels=True, int8=True) == (pipeline.INT8 + pipeline.BF16 + pipeline.CAST_FOLDING
                                                            + pipeline.KERNELS + pipeline.FUNCTION_BODIES)
    assert pipeline.BODY_TRANSFORMS == pipeline.BF16 + pipeline.CAST_FOLDING


def test_bf16_switch_drops_the_bf16_stage_and_nothing_else():
    """INT8 + FP32 (bf16=False) runs every other stage: cast folding's rewrites are exact and not only for BF16."""
    assert pipeline.conversion(bf16=False) == pipeline.CAST_FOLDING + pipeline.FUNCTION_BODIES
    assert pipeline.conversion(kernels=True, int8=True, bf16=False) == (
        pipeline.INT8 + pipeline.CAST_FOLDING + pipeline.KERNELS + pipeline.FUNCTION_BODIES)
    assert pipeline.body_transforms() == pipeline.BODY_TRANSFORMS
    assert pipeline.body_transforms(bf16=False) == pipeline.CAST_FOLDING
    assert pipeline.new_context(PrecisionPlan(), bf16=False).body_transforms == pipeline.CAST_FOLDING


def test_convert_graph_is_clean_up_then_convert_cleaned(three_conv):
    graph_def, plan = three_conv
    before = graph_def.SerializeToString()
    full = pipeline.convert_graph(graph_def, plan)
    cleaned = pipeline.clean_up(graph_def, plan)
    staged = pipeline.convert_cleaned(cleaned, plan)
    assert graph_def.SerializeToString() == before          # the input is never modified
    assert full.cleaned == cleaned and full.graph_def == staged.graph_def
    assert set(full.seconds) == {"clean_up", "convert"}
    # The same list of names through the driver gives the same graph.
    by_names = driver.run_transforms(graph_def, pipeline.new_context(plan), pipeline.CLEAN_UP + pipeline.CONVERSION)
    assert by_names == full.graph_def


def test_result_partitions_float_nodes_with_reasons(three_conv):
    graph_def, plan = three_conv
    result = pipeline.convert_graph(graph_def, plan)
    sigs = g.OpSignatures(result.graph_def)
    precision = {n.name: node_precision(n, sigs) for n in result.graph_def.node}
    assert result.bf16_nodes == {"conv1", "conv1_bias_add", "relu", "conv2", "conv2_bias_add", "relu2", "conv3"}
    assert all(precision[n] == "bf16" for n in result.bf16_nodes)
    assert "deny" in result.fp32_reasons["log1"] and not set(result.fp32_reasons) & result.bf16_nodes
    assert all(precision[n] == "fp32" for n in result.fp32_reasons if n in precision)
    assert result.consts_converted == 5 and result.functions == {}   # 3 conv weights, 2 biases


def test_tuner_rerun_with_fp32_nodes(three_conv):
    graph_def, plan = three_conv
    full = pipeline.convert_graph(graph_def, plan)
    rerun = pipeline.convert_cleaned(full.cleaned, plan.with_fp32(["conv3"]))
    assert "conv3" not in rerun.bf16_nodes and rerun.fp32_reasons["conv3"] == "forced FP32 by config"
    x = np.abs(np.random.default_rng(0).standard_normal((1, 8, 8, 3))).astype(np.float32)
    reference = zoo.run_graph(graph_def, "final:0", {"input:0": x})
    for result in (full, rerun):
        np.testing.assert_allclose(zoo.run_graph(result.graph_def, "final:0", {"input:0": x}), reference,
                                   rtol=0.05, atol=0.05 * np.abs(reference).max())


def test_contexts_are_independent(three_conv):
    graph_def, plan = three_conv
    first, second = pipeline.new_context(plan), pipeline.new_context(plan)
    pipeline.run(graph_def, first, pipeline.BF16)
    assert first.decisions and not second.decisions
    assert isinstance(first, TransformContext) and first.body_transforms == pipeline.BODY_TRANSFORMS


def test_convert_without_bf16_keeps_the_graph_and_function_bodies_fp32(three_conv):
    graph_def, plan = three_conv
    result = pipeline.convert_graph(graph_def, plan, bf16=False)
    sigs = g.OpSignatures(result.graph_def)
    assert result.bf16_nodes == frozenset() and result.consts_converted == 0
    assert {node_precision(n, sigs) for n in result.graph_def.node} <= {"fp32", None}
    assert not any(n.op == "Cast" for n in result.graph_def.node)
    x = np.abs(np.random.default_rng(0).standard_normal((1, 8, 8, 3))).astype(np.float32)
    np.testing.assert_allclose(zoo.run_graph(result.graph_def, "final:0", {"input:0": x}),
                               zoo.run_graph(graph_def, "final:0", {"input:0": x}), rtol=1e-5)
    # A library function's body is left FP32 too (it gets cast folding only).
    with_call = _graph_with_call()
    call_plan = PrecisionPlan(inputs=("x",), outputs=("Identity",))
    (name, painted), = pipeline.convert_cleaned(with_call, call_plan).functions.items()
    (_, kept), = pipeline.convert_cleaned(with_call, call_plan, bf16=False).functions.items()
    assert painted.bf16_nodes >= 1 and kept.converted and kept.bf16_nodes == 0 and kept.casts == 0
