"""fold_casts: only exact Cast rewrites, and the graph keeps its values."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_bf16.model import Model
from tf_bf16.transforms import graph as g
from tf_bf16.transforms.fold_casts import fold_casts
from tf_bf16.transforms.context import TransformContext  # noqa: E402
from tf_bf16.transforms.plan import PrecisionPlan


def _model(fn, spec):
    return Model(tf.function(fn).get_concrete_function(spec))


def _fold(model):
    plan = PrecisionPlan(inputs=model.input_names, outputs=model.output_names)
    return fold_casts(model.graph_def, TransformContext(plan))


SPEC = tf.TensorSpec([None, 8], tf.float32, name="x")
X = np.random.RandomState(0).randn(4, 8).astype(np.float32)


def test_bf16_fp32_bf16_pair_removed():
    def f(x):
        b = tf.cast(x, tf.bfloat16)
        back = tf.cast(tf.cast(b, tf.float32), tf.bfloat16)   # exact round trip
        return tf.cast(tf.nn.relu(back), tf.float32)

    model = _model(f, SPEC)
    out = _fold(model)
    assert sum(n.op == "Cast" for n in out.node) == 2
    np.testing.assert_array_equal(model.with_graph_def(out).run([X])[0], model.run([X])[0])


def test_lossy_pair_kept():
    def f(x):
        return tf.cast(tf.cast(x, tf.bfloat16), tf.float32) * 3.0   # fp32->bf16->fp32 rounds

    model = _model(f, SPEC)
    out = _fold(model)
    assert sum(n.op == "Cast" for n in out.node) == 2
    np.testing.assert_array_equal(model.with_graph_def(out).run([X])[0], model.run([X])[0])


def test_duplicate_casts_merged_and_const_cast_folded():
    w = tf.constant(np.random.RandomState(1).randn(8, 8).astype(np.float32))

    def f(x):
        a = tf.cast(x, tf.bfloat16)
        b = tf.cast(x, tf.bfloat16)
        wb = tf.cast(w, tf.bfloat16)
        return tf.cast(tf.matmul(a, wb) + tf.matmul(b, wb), tf.float32)

    model = _model(f, SPEC)
    before = sum(n.op == "Cast" for n in model.graph_def.node)
    out = _fold(model)
    casts = [n for n in out.node if n.op == "Cast"]
    assert before >= 4 and len(casts) == 2
    consts = [n for n in out.node if n.op == "Const" and n.attr["dtype"].type == g.BFLOAT16]
    assert consts, "the weight Cast should have become a bfloat16 Const"
    np.testing.assert_array_equal(model.with_graph_def(out).run([X])[0], model.run([X])[0])


def test_bool_to_fp32_to_bf16_becomes_one_cast():
    def f(x):
        mask = tf.cast(tf.cast(x > 0, tf.float32), tf.bfloat16)
        return tf.cast(mask * tf.cast(x, tf.bfloat16), tf.float32)

    model = _model(f, SPEC)
    out = _fold(model)
    mask_casts = [n for n in out.node if n.op == "Cast" and n.attr["SrcT"].type == tf.bool.as_datatype_enum]
    assert len(mask_casts) == 1 and mask_casts[0].attr["DstT"].type == g.BFLOAT16
    np.testing.assert_array_equal(model.with_graph_def(out).run([X])[0], model.run([X])[0])
