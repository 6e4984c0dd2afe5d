"""Tests for transforms/driver.py: the registry, running named passes, and the clean-up stage on real models."""

from __future__ import annotations

import collections
import logging
import os
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

from tests import zoo  # noqa: E402
from tf_bf16 import pipeline  # noqa: E402
from tf_bf16.errors import GraphError  # noqa: E402
from tf_bf16.transforms import driver  # noqa: E402
from tf_bf16.transforms.context import TransformContext  # noqa: E402
from tf_bf16.transforms.graph import parse_input  # noqa: E402
from tf_bf16.transforms.plan import PrecisionPlan  # noqa: E402


def _tiny_graph() -> graph_pb2.GraphDef:
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
        tf.identity(tf.identity(x) * tf.add(tf.constant(1.0), 1.0), name="out")
        tf.constant(0.0, name="dead")
    return g.as_graph_def()


def _ctx(**plan_kw) -> TransformContext:
    return TransformContext(PrecisionPlan(**plan_kw))


def test_registry_is_immutable_and_holds_every_stage():
    assert isinstance(driver.TRANSFORMS, types.MappingProxyType)
    staged = {name for names in pipeline.STAGES.values() for name in names} | set(pipeline.BODY_TRANSFORMS)
    assert staged <= set(driver.TRANSFORMS)
    assert set(driver.TRANSFORMS) - staged == set()   # every registered pass is used by the pipeline
    assert pipeline.CLEAN_UP == ("strip_unused", "remove_identity", "fold_constants", "fold_batch_norms",
                                 "sink_reshapes", "residual_addn", "fuse_layer_norm", "transpose_matmul",
                                 "strip_unused")
    with pytest.raises(TypeError):
        driver.TRANSFORMS["mine"] = lambda g, c: g  # type: ignore[index]


def test_unknown_transform_named_before_anything_runs():
    calls = []
    registry = {"record": lambda g, c: calls.append(1) or g}
    with pytest.raises(GraphError, match=r"'no_such_pass'.*record"):
        driver.run_transforms(_tiny_graph(), _ctx(), ("record", "no_such_pass"), transforms=registry)
    assert calls == []
    with pytest.raises(GraphError, match="fold_constants"):  # the default registry lists its names
        driver.run_transforms(_tiny_graph(), _ctx(), ("bogus",))


def test_runs_in_order_and_logs_counts(caplog):
    order = []

    def make(tag):
        def transform(graph_def, context):
            order.append((tag, context.plan.outputs))
            return graph_def
        return transform

    registry = dict(driver.TRANSFORMS, first=make("first"), second=make("second"))
    context = _ctx(inputs=("x",), outputs=("out",))
    with caplog.at_level(logging.INFO, logger="absl"):
        out = driver.run_transforms(_tiny_graph(), context, ("second", "strip_unused", "first"), transforms=registry)
    assert order == [("second", ("out",)), ("first", ("out",))]
    assert "dead" not in {n.name for n in out.node}
    assert any("strip_unused" in r.getMessage() and "->" in r.getMessage() for r in caplog.records)
    single = driver.run_transforms(_tiny_graph(), context, "strip_unused")  # one name as a string
    assert len(single.node) == len(out.node)


def test_passes_report_facts_through_the_context():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        w = tf.constant(np.ones((8, 8), np.float32))
        tf.identity(tf.exp(tf.matmul(tf.matmul(x, w), w)), name="out")
    context = _ctx(inputs=("x",), outputs=("out",))
    out = driver.run_transforms(g.as_graph_def(), context, ("bf16_convert", "fold_casts"))
    assert {n.op for n in out.node if n.name in context.bf16_nodes()} == {"MatMul"}
    assert "deny" in context.fp32_reasons()["Exp"]
    assert context.consts_converted == 1    # one BF16 copy of the shared weight


def test_function_bodies_need_the_driver():
    @tf.function(autograph=False)
    def inner(x):
        return tf.matmul(x, x)

    gd = tf.function(lambda x: inner(x)).get_concrete_function(tf.TensorSpec([4, 4], tf.float32)).graph.as_graph_def()
    assert gd.library.function
    context = TransformContext(PrecisionPlan(), body_transforms=pipeline.BODY_TRANSFORMS)
    with pytest.raises(GraphError, match="run_transforms"):
        driver.TRANSFORMS["convert_function_bodies"](gd, context)
    out = driver.run_transforms(gd, context, "convert_function_bodies")
    (report,) = context.functions.values()
    assert report.converted and report.bf16_nodes == 1 and report.casts == 2
    body = [f for f in out.library.function if f.node_def][0]
    assert [n.op for n in body.node_def if n.op != "Identity"].count("Cast") == 2


def test_default_cleanup_on_tiny_graph():
    gd = _tiny_graph()
    out = pipeline.clean_up(gd, PrecisionPlan(inputs=("x",), outputs=("out",)))
    assert collections.Counter(n.op for n in out.node) == {"Placeholder": 1, "Const": 1, "Mul": 1, "Identity": 1}


# Upper bounds on node counts after the default clean-up (measured: 291, 270, 780, 555).
EXPECTED_MAX_NODES = {"resnet50": 300, "mobilenetv2": 280, "efficientnetb0": 800, "bert": 560}


def _io_dtypes(graph_def, names):
    g = tf.Graph()
    with g.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    result = []
    for name in names:
        node, port, _ = parse_input(name)
        result.append(g.get_operation_by_name(node).outputs[port].dtype)
    return result


@pytest.mark.parametrize("name", sorted(EXPECTED_MAX_NODES))
def test_default_cleanup_on_zoo_models(zoo_model, name):
    model = zoo_model(name)
    plan = PrecisionPlan(inputs=model.input_names, outputs=model.output_names)
    gd = model.graph_def
    out = pipeline.clean_up(gd, plan)
    assert len(out.node) <= EXPECTED_MAX_NODES[name] < len(gd.node)
    ops = collections.Counter(n.op for n in out.node)
    outputs = {parse_input(o)[0] for o in model.output_names}
    assert {n.name for n in out.node if n.op == "Identity"} <= outputs  # only protected ones remain
    assert ops["NoOp"] == 0 and ops["FusedBatchNormV3"] == 0
    if name != "bert":  # a CNN's Rsqrt is all BatchNorm (constant); LayerNorm's is data-dependent
        assert ops["Rsqrt"] == 0 and ops["Sub"] <= 1
    io = list(model.input_names) + list(model.output_names)
    assert _io_dtypes(out, io) == _io_dtypes(gd, io)
    feeds = zoo.sample_inputs(model, batch=2)
    for a, b in zip(model.run(feeds), model.with_graph_def(out).run(feeds)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
