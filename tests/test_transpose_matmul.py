"""Tests for transforms/transpose_matmul.py: innermost-dimension Transposes fold into matmul adjoints."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tests.executed import executed_nodes
from tf_bf16 import pipeline
from tf_bf16.model import Model
from tf_bf16.transforms import driver
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.plan import PrecisionPlan
from tf_bf16.transforms.transpose_matmul import transpose_matmul

RNG = np.random.default_rng(11)


def _graph(build, shapes, outputs=("out",)):
    graph = tf.Graph()
    with graph.as_default():
        xs = [tf.compat.v1.placeholder(tf.float32, s, name=f"x{i}") for i, s in enumerate(shapes)]
        build(*xs)
    return Model(graph.as_graph_def(), inputs=[f"x{i}" for i in range(len(shapes))], outputs=list(outputs))


def _convert(model: Model):
    context = TransformContext(PrecisionPlan(inputs=model.input_names, outputs=model.output_names))
    return driver.run_transforms(model.graph_def, context, ("transpose_matmul", "strip_unused"))


def _feeds(shapes):
    return [RNG.standard_normal([d or 2 for d in s]).astype(np.float32) for s in shapes]


def _check_same(model: Model, out, shapes):
    x = _feeds(shapes)
    for got, want in zip(model.with_graph_def(out).run(x), model.run(x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _count(graph_def, op):
    return sum(1 for n in graph_def.node if n.op == op)


@pytest.mark.parametrize("matmul", ["bmm", "matmul"])
def test_transposed_product_becomes_the_swapped_product(matmul):
    if matmul == "bmm":
        shapes = [(None, 5, 3), (None, 3, 4)]
        build = lambda a, b: tf.transpose(tf.matmul(a, b), [0, 2, 1], name="out")  # noqa: E731
    else:
        shapes = [(5, 3), (3, 4)]
        build = lambda a, b: tf.transpose(tf.linalg.matmul(a, b), name="out")  # noqa: E731
    model = _graph(build, shapes)
    out = _convert(model)
    assert _count(out, "Transpose") == 0
    (product,) = [n for n in out.node if n.op in ("MatMul", "BatchMatMulV2")]
    assert product.name == "out" and [s.split(":")[0] for s in product.input] == ["x1", "x0"]
    flags = ("transpose_a", "transpose_b") if product.op == "MatMul" else ("adj_x", "adj_y")
    assert all(product.attr[f].b for f in flags)
    _check_same(model, out, shapes)


def test_operand_swaps_fold_into_adjoint_flags_and_flip_existing_ones():
    shapes = [(None, 3, 5), (None, 3, 4)]
    model = _graph(lambda a, b: tf.identity(
        tf.matmul(tf.transpose(a, [0, 2, 1]), tf.transpose(b, [0, 2, 1]), adjoint_b=True), name="out"), shapes)
    out = _convert(model)
    assert _count(out, "Transpose") == 0
    (product,) = [n for n in out.node if n.op == "BatchMatMulV2"]
    assert product.attr["adj_x"].b and not product.attr["adj_y"].b
    _check_same(model, out, shapes)


def test_adjoint_of_a_last_dim_moving_transpose_becomes_a_row_preserving_one():
    shapes = [(None, 4, 2, 3), (None, 2, 4, 3)]    # [batch, seq, heads, dim]-like
    model = _graph(lambda q, k: tf.identity(
        tf.matmul(tf.transpose(q, [0, 2, 3, 1]), tf.transpose(k, [0, 1, 3, 2]), adjoint_a=True), name="out"), shapes)
    out = _convert(model)
    perms = sorted(tuple(tf.make_ndarray(next(c for c in out.node if c.name == n.input[1]).attr["value"].tensor))
                   for n in out.node if n.op == "Transpose")
    assert perms == [(0, 2, 1, 3)]          # q's [0,2,3,1] composed with the adjoint; k's swap is gone
    (product,) = [n for n in out.node if n.op == "BatchMatMulV2"]
    assert not product.attr["adj_x"].b and product.attr["adj_y"].b
    _check_same(model, out, shapes)


def test_products_read_elsewhere_or_protected_are_left_alone():
    shapes = [(None, 5, 3), (None, 3, 4)]

    def build(a, b):
        product = tf.matmul(a, b, name="product")
        tf.transpose(product, [0, 2, 1], name="out")
        tf.identity(product * 2.0, name="other")

    out = _convert(_graph(build, shapes, outputs=("out", "other")))
    assert _count(out, "Transpose") == 1
    protected = _convert(_graph(lambda a, b: tf.transpose(tf.matmul(a, b, name="product"), [0, 2, 1], name="out"),
                                shapes, outputs=("out", "product")))
    assert _count(protected, "Transpose") == 1


def test_non_swap_permutations_are_left_alone():
    shapes = [(None, 5, 3), (None, 3, 4)]
    model = _graph(lambda a, b: tf.transpose(tf.matmul(a, b), [1, 0, 2], name="out"), shapes)
    out = _convert(model)
    assert _count(out, "Transpose") == 1


def test_bert_attention_runs_one_transpose_fewer_per_layer_with_the_same_values(zoo_model, zoo_inputs):
    # The zoo BERT (4 layers) as the benchmarks build it: TensorFlow lowered its attention
    # einsums into BatchMatMulV2 with Transposes; the scores were transposed after the product.
    model = zoo_model("bert")
    plan = PrecisionPlan(inputs=model.input_names, outputs=model.output_names)
    without = tuple(p for p in pipeline.CLEAN_UP if p != "transpose_matmul")
    before = driver.run_transforms(model.graph_def, TransformContext(plan), without)
    after = driver.run_transforms(model.graph_def, TransformContext(plan), pipeline.CLEAN_UP)
    x = zoo_inputs("bert")
    ran_before, want = executed_nodes(before, model.input_names, model.output_names, x)
    ran_after, got = executed_nodes(after, model.input_names, model.output_names, x)
    transposes = lambda nodes: sum(1 for n in nodes if "Transpose" in n.op)  # noqa: E731
    assert transposes(ran_after) == transposes(ran_before) - 4
    for g_, w in zip(got, want):
        np.testing.assert_allclose(g_, w, rtol=1e-4, atol=1e-4)
