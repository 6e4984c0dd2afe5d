"""BF16Convert's painting rules on small hand-built graphs, where each rule can be seen alone."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_bf16 import MixedPrecision
from tf_bf16.errors import UnsupportedHardwareError
from tf_bf16.model import Model
from tf_bf16.plan_builder import build_plan
from tf_bf16.report import node_precision
from tf_bf16.transforms import graph as g
from tf_bf16.transforms import driver
from tf_bf16.transforms.context import TransformContext


def _frozen(fn, *specs) -> Model:
    return Model(tf.function(fn).get_concrete_function(*specs))


def _convert(model: Model, **plan_kw):
    plan = build_plan(model.graph_def, model.input_names, model.output_names, **plan_kw)
    context = TransformContext(plan)
    out = driver.run_transforms(model.graph_def, context, ("bf16_convert", "fold_casts"))
    return out, context


def _prec(graph_def):
    sigs = g.OpSignatures(graph_def)
    return {n.name: node_precision(n, sigs) for n in graph_def.node}


def _ops(graph_def, op):
    return [n for n in graph_def.node if n.op == op]


RNG = np.random.RandomState(0)
W = tf.constant(RNG.randn(16, 16).astype(np.float32))
SPEC = tf.TensorSpec([None, 16], tf.float32, name="x")


def test_paint_is_order_independent():
    model = _frozen(lambda x: tf.matmul(tf.nn.sigmoid(tf.nn.tanh(tf.matmul(x, W))), W) + 1.0, SPEC)
    fwd, _ = _convert(model)
    reversed_gd = g.copy_graph(model.graph_def)
    nodes = list(reversed_gd.node)[::-1]
    del reversed_gd.node[:]
    reversed_gd.node.extend(nodes)
    rev, _ = _convert(model.with_graph_def(reversed_gd))
    assert _prec(fwd) == _prec(rev)
    p = _prec(fwd)
    assert p[_ops(fwd, "Tanh")[0].name] == "bf16" and p[_ops(fwd, "Sigmoid")[0].name] == "bf16"


def test_exp_and_log_stay_fp32_unless_forced():
    def f(x):
        h = tf.matmul(x, W)
        return tf.matmul(tf.math.log(tf.exp(h) + 1.0), W)

    model = _frozen(f, SPEC)
    out, conv = _convert(model)
    p = _prec(out)
    assert p[_ops(out, "Exp")[0].name] == "fp32" and p[_ops(out, "Log")[0].name] == "fp32"
    assert all(p[n.name] == "bf16" for n in _ops(out, "MatMul"))
    assert "deny" in conv.decisions[_ops(out, "Exp")[0].name].reason
    forced, _ = _convert(model, op_type_precisions={"Exp": "bf16", "Log": "bf16"})
    p = _prec(forced)
    assert p[_ops(forced, "Exp")[0].name] == "bf16" and p[_ops(forced, "Log")[0].name] == "bf16"


def test_fused_batch_norm_t_bf16_u_fp32():
    scale = tf.constant(RNG.rand(8).astype(np.float32) + 0.5)
    offset = tf.constant(RNG.rand(8).astype(np.float32))
    k = tf.constant(RNG.randn(3, 3, 4, 8).astype(np.float32))

    def f(x):
        y = tf.nn.conv2d(x, k, 1, "SAME")
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, scale, offset, mean=offset, variance=scale, is_training=False)
        return tf.nn.relu(y) * 2.0

    model = _frozen(f, tf.TensorSpec([None, 8, 8, 4], tf.float32, name="x"))
    out, _ = _convert(model)
    bn = _ops(out, "FusedBatchNormV3")[0]
    assert bn.attr["T"].type == g.BFLOAT16 and bn.attr["U"].type == g.FLOAT
    consts = {n.name: n for n in out.node if n.op == "Const"}
    for i in range(1, 5):
        assert consts[g.node_name(bn.input[i])].attr["dtype"].type == g.FLOAT
    x = RNG.rand(2, 8, 8, 4).astype(np.float32)
    np.testing.assert_allclose(model.with_graph_def(out).run([x])[0], model.run([x])[0], rtol=0.05, atol=0.05)


def test_shared_const_converted_once_fp32_consumer_keeps_original():
    def f(x):
        a = tf.matmul(x, W)              # BF16 consumer of W
        b = tf.exp(tf.reduce_sum(W))     # FP32 (deny path) consumer of W
        return a * b

    model = _frozen(f, SPEC)
    out, conv = _convert(model)
    w_consts = [n for n in out.node if n.op == "Const" and list(n.attr["value"].tensor.tensor_shape.dim)
                and [d.size for d in n.attr["value"].tensor.tensor_shape.dim] == [16, 16]]
    dtypes = sorted(n.attr["dtype"].type for n in w_consts)
    assert dtypes == sorted([g.FLOAT, g.BFLOAT16])
    assert conv.consts_converted >= 1


def test_concat_n_list_and_integer_inputs():
    def f(x):
        a = tf.matmul(x, W)
        c = tf.concat([a, a * 2.0, tf.nn.relu(a)], axis=1)   # N=3 list, int axis
        idx = tf.constant([0, 2, 4], tf.int32)
        return tf.matmul(tf.gather(c, idx, axis=1), tf.constant(RNG.randn(3, 4).astype(np.float32)))

    model = _frozen(f, SPEC)
    out, _ = _convert(model)
    concat = _ops(out, "ConcatV2")[0]
    assert concat.attr["T"].type == g.BFLOAT16 and concat.attr["Tidx"].type == tf.int32.as_datatype_enum
    gather = _ops(out, "GatherV2")[0]
    assert gather.attr["Tparams"].type == g.BFLOAT16 and gather.attr["Tindices"].type == tf.int32.as_datatype_enum
    assert len(_ops(out, "Cast")) == 2
    x = RNG.rand(3, 16).astype(np.float32)
    np.testing.assert_allclose(model.with_graph_def(out).run([x])[0], model.run([x])[0], rtol=0.05, atol=0.1)


def test_control_flow_frame_stays_fp32_and_is_reported():
    def f(x):
        h = tf.matmul(x, W)
        i = tf.constant(0)
        _, y = tf.while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, tf.tanh(y) * 1.5), [i, h])
        return tf.matmul(y, W)

    model = _frozen(f, SPEC)
    assert _ops(model.graph_def, "Enter"), "expected a lowered v1 while loop"
    out, conv = _convert(model)
    tanh = _ops(out, "Tanh")[0]
    assert tanh.attr["T"].type == g.FLOAT
    assert "while-loop" in conv.decisions[tanh.name].reason
    assert all(_prec(out)[n.name] == "bf16" for n in _ops(out, "MatMul"))
    x = RNG.rand(2, 16).astype(np.float32)
    np.testing.assert_allclose(model.with_graph_def(out).run([x])[0], model.run([x])[0], rtol=0.05, atol=0.5)


def test_forced_fp32_node_stops_propagation():
    def f(x):
        return tf.matmul(tf.nn.relu(tf.matmul(x, W) + 1.0), W)

    model = _frozen(f, SPEC)
    add = [n for n in model.graph_def.node if n.op in ("AddV2", "Add")][0].name
    out, conv = _convert(model, node_precisions={add: "fp32"})
    p = _prec(out)
    assert p[add] == "fp32" and all(p[n.name] == "bf16" for n in _ops(out, "MatMul"))
    assert conv.decisions[add].reason == "forced FP32 by config"


def test_allowed_sets_without_bf16_keep_a_node_fp32_and_with_bf16_leave_it_free():
    """{int8, fp32} on a node the INT8 stage did not replace keeps it FP32; {bf16, fp32} is no limit here, and
    beats its op type's forced FP32 as any node entry does."""
    model = _frozen(lambda x: tf.matmul(tf.nn.relu(tf.matmul(x, W)), W), SPEC)
    first, second = (n.name for n in _ops(model.graph_def, "MatMul"))
    out, conv = _convert(model, node_allowed={first: {"int8", "fp32"}, second: {"bf16", "fp32"}},
                         op_type_precisions={"MatMul": "fp32"})
    p = _prec(out)
    assert p[first] == "fp32" and "only int8 or fp32" in conv.decisions[first].reason
    assert p[second] == "bf16"
    # A name the INT8 stage replaced is its product now (a Dequantize there): the set no longer applies.
    context = TransformContext(build_plan(model.graph_def, model.input_names, model.output_names,
                                          node_allowed={first: {"int8", "fp32"}}))
    context.int8_nodes.add(first)
    driver.run_transforms(model.graph_def, context, ("bf16_convert",))
    assert context.decisions[first].precision == "bf16"


def test_hardware_gate_and_target(tmp_path, monkeypatch):
    from tf_bf16 import capability

    # This machine's CPU as an AVX2-only one, whatever CPU the suite runs on.
    monkeypatch.setattr(capability, "detect_cpu_features",
                        lambda path="/proc/cpuinfo": capability.CpuFeatures(model_name="AVX2-only test CPU"))
    model = _frozen(lambda x: tf.matmul(x, W), SPEC)
    plain = MixedPrecision(env={})
    plain.model = model
    with pytest.raises(UnsupportedHardwareError, match="avx512_bf16"):
        plain()
    spr = MixedPrecision(target="spr", env={})
    spr.model = model
    out = spr()
    assert out.report["target"] == "spr"
    assert _ops(out.graph_def, "MatMul")[0].attr["T"].type == g.BFLOAT16
    forced = MixedPrecision(env={"FORCE_BF16": "1"})
    forced.model = model
    assert forced().report["warnings"]


def test_fp32_only_precisions_leave_graph_fp32():
    model = _frozen(lambda x: tf.matmul(x, W), SPEC)
    conv = MixedPrecision({"mixed_precision": {"precisions": "fp32"}})
    conv.model = model
    out = conv()
    assert not any(n.attr["T"].type == g.BFLOAT16 for n in out.graph_def.node if "T" in n.attr)


def test_function_bodies_are_converted_with_fp32_borders():
    w = RNG.randn(16, 16).astype(np.float32)

    @tf.function(autograph=False)
    def inner(x):
        return tf.nn.relu(tf.matmul(x, tf.constant(w))) + 1.0

    def outer(x):
        y = inner(x)
        return tf.cond(tf.reduce_sum(y) > 0, lambda: tf.matmul(y, tf.constant(w)) * 2.0, lambda: y - 1.0)

    concrete = tf.function(outer).get_concrete_function(SPEC)
    assert not concrete.captured_inputs
    model = Model(concrete.graph.as_graph_def(), inputs=["x"], outputs=["Identity"])
    assert model.graph_def.library.function, "expected library functions in an unfrozen graph"
    conv = MixedPrecision()
    conv.model = model
    out = conv()
    bodies = {f.signature.name: f for f in out.graph_def.library.function}
    matmuls = [n for f in bodies.values() for n in f.node_def if n.op == "MatMul"]
    assert len(matmuls) == 2 and all(n.attr["T"].type == g.BFLOAT16 for n in matmuls)
    assert any(r["converted"] and r["bf16_nodes"] for r in out.report["functions"].values())
    x = RNG.rand(3, 16).astype(np.float32)
    np.testing.assert_allclose(out.run([x])[0], model.run([x])[0], rtol=0.05, atol=0.2)


# ---------------------------------------------------------------- where INFER ops may go BF16

def _by_op(graph_def):
    """op type -> precisions of its nodes, in graph order."""
    p = _prec(graph_def)
    out = {}
    for n in graph_def.node:
        out.setdefault(n.op, []).append(p[n.name])
    return out


def test_infer_chain_upstream_of_an_island_stays_fp32():
    """x -> Sub -> Square -> Rsqrt -> MatMul: only the MatMul rounds; the chain computes on FP32 x."""
    def f(x):
        centred = x - 0.7071
        return tf.matmul(tf.math.rsqrt(tf.square(centred) + 1e-3), W)

    model = _frozen(f, SPEC)
    out, conv = _convert(model)
    ops = _by_op(out)
    assert ops["MatMul"] == ["bf16"]
    for op in ("Sub", "Square", "Rsqrt"):
        assert ops[op] == ["fp32"], op
    assert "reads FP32" in conv.decisions[_ops(out, "Rsqrt")[0].name].reason
    assert "no BF16 neighbour" in conv.decisions[_ops(out, "Sub")[0].name].reason
    assert len(_ops(out, "Cast")) == 2   # into the MatMul and out of it


def test_infer_beside_an_island_reads_the_unrounded_input():
    """x feeds a MatMul and, beside it, a Tanh/Sigmoid chain: that chain's output is FP32-exact."""
    def f(x):
        return tf.matmul(x, W), tf.sigmoid(tf.tanh(x) * 3.0) + 0.5

    model = _frozen(f, SPEC)
    out, _ = _convert(model)
    ops = _by_op(out)
    assert ops["MatMul"] == ["bf16"] and ops["Tanh"] == ["fp32"] and ops["Sigmoid"] == ["fp32"]
    x = RNG.uniform(-1, 1, (4, 16)).astype(np.float32)
    ref = model.run([x])
    got = model.with_graph_def(out).run([x])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-6)   # one BF16 rounding would be ~4e-3
    assert np.abs(got[0] - ref[0]).max() > 1e-4             # the MatMul did run in BF16


def test_infer_between_islands_and_one_step_after_goes_bf16():
    """MatMul -> BiasAdd -> Tanh -> MatMul is one island; after the last MatMul only one INFER step
    follows it into BF16 (the BiasAdd), not the Sigmoid -> Square chain behind it."""
    b = tf.constant(RNG.randn(16).astype(np.float32))

    def f(x):
        h = tf.tanh(tf.nn.bias_add(tf.matmul(x, W), b))
        y = tf.nn.bias_add(tf.matmul(h, W), b)
        return tf.square(tf.sigmoid(y)) * 2.0

    model = _frozen(f, SPEC)
    out, _ = _convert(model)
    ops = _by_op(out)
    assert ops["MatMul"] == ["bf16", "bf16"] and ops["Tanh"] == ["bf16"]
    assert ops["BiasAdd"] == ["bf16", "bf16"]
    assert ops["Sigmoid"] == ["fp32"] and ops["Square"] == ["fp32"]
    assert len(_ops(out, "Cast")) == 2


def test_clear_ops_follow_an_island_both_ways():
    """Reshape/Transpose before a MatMul and after it go BF16 with it: still only two Casts."""
    def f(x):
        y = tf.matmul(tf.transpose(tf.reshape(x, [-1, 4, 4]), [0, 2, 1]), tf.reshape(W, [4, 64])[:, :4])
        return tf.matmul(tf.reshape(tf.nn.relu(y), [-1, 16]), W)

    model = _frozen(f, tf.TensorSpec([None, 16], tf.float32, name="x"))
    out, _ = _convert(model)
    p = _prec(out)
    for op in ("Reshape", "Transpose", "Relu", "BatchMatMulV2", "MatMul"):
        assert all(p[n.name] == "bf16" for n in _ops(out, op)), op
    assert len(_ops(out, "Cast")) == 2


@pytest.mark.parametrize("window,expected", [(3, "bf16"), (8, "fp32")])
def test_avg_pool_accumulating_in_bf16_is_limited(window, expected):
    k = tf.constant(RNG.randn(3, 3, 4, 4).astype(np.float32))

    def f(x):
        y = tf.nn.conv2d(x, k, 1, "SAME")
        y = tf.nn.avg_pool2d(y, window, 1, "SAME")
        return tf.nn.conv2d(y, k, 1, "SAME")

    model = _frozen(f, tf.TensorSpec([None, 16, 16, 4], tf.float32, name="x"))
    out, conv = _convert(model)
    pool = _ops(out, "AvgPool")[0]
    assert _prec(out)[pool.name] == expected
    if expected == "fp32":
        assert "accumulates in BF16" in conv.decisions[pool.name].reason and "64 terms" in conv.decisions[pool.name].reason


def test_long_sum_and_mean_stay_bf16_between_islands():
    """TensorFlow's BF16 Sum/Mean accumulate in FP32, so a 4096-term reduction inside an island stays BF16."""
    k = tf.constant(RNG.randn(1, 1, 4, 16).astype(np.float32))

    def f(x):
        y = tf.nn.conv2d(x, k, 1, "SAME")
        return tf.matmul(tf.reduce_mean(y, [1, 2]) + tf.reduce_sum(y, [1, 2]), W)

    model = _frozen(f, tf.TensorSpec([None, 64, 64, 4], tf.float32, name="x"))
    out, _ = _convert(model)
    ops = _by_op(out)
    assert ops["Mean"] == ["bf16"] and ops["Sum"] == ["bf16"]


def test_bf16_sum_and_mean_kernels_accumulate_in_fp32():
    """The fact the rule above relies on, checked on this CPU's executor: 4096 BF16 terms lose
    no more than the output's own rounding (a BF16 accumulator would stall at 256 terms)."""
    x = np.random.default_rng(0).uniform(0.5, 1.5, (8, 4096)).astype(np.float32)
    xb = tf.constant(x, tf.bfloat16)
    exact = tf.cast(xb, tf.float64).numpy()
    with tf.device("/CPU:0"):
        for got, want in ((tf.reduce_sum(xb, 1), exact.sum(1)), (tf.reduce_mean(xb, 1), exact.mean(1))):
            rel = np.abs(tf.cast(got, tf.float64).numpy() - want) / np.abs(want)
            assert rel.max() <= 2.0 ** -8, rel.max()


# ---------------------------------------------------------------- inputs and devices

def _const_input_graph(use: str) -> tf.compat.v1.GraphDef:
    """A graph whose declared input ``input`` is a Const, read as ``use``, fetched at ``fetch``."""
    graph = tf.Graph()
    with graph.as_default():
        a = tf.constant(np.full((2, 16), 0.25, np.float32), name="input")
        x = tf.compat.v1.placeholder(tf.float32, [None, 16], name="x")
        w = tf.constant(RNG.randn(16, 16).astype(np.float32))
        if use == "matmul_lhs":
            y = tf.matmul(a, w)
        elif use == "matmul_rhs":
            y = tf.matmul(x, tf.reshape(a, [16, 2]))
        else:  # bias of a MatMul island
            y = tf.nn.bias_add(tf.matmul(x, w), a[0])
        tf.identity(y, name="fetch")
    return graph.as_graph_def()


@pytest.mark.parametrize("use", ["matmul_lhs", "matmul_rhs", "bias"])
def test_const_declared_as_input_stays_fed(use):
    graph_def = _const_input_graph(use)
    inputs = ["input"] if use == "matmul_lhs" else ["input", "x"]
    model = Model(graph_def, inputs=inputs, outputs=["fetch"])
    converter = MixedPrecision(target="spr", env={})
    converter.model = model
    out = converter()
    nodes = {n.name: n for n in out.graph_def.node}
    assert nodes["input"].op == "Const" and nodes["input"].attr["dtype"].type == g.FLOAT
    feed = np.full((2, 16), -0.5, np.float32)
    feeds = {"input": feed}
    if "x" in inputs:
        feeds["x"] = RNG.rand(2, 16).astype(np.float32)
    ref = model.run(feeds)[0]
    got = out.run(feeds)[0]
    default = out.run({**feeds, "input": np.full((2, 16), 0.25, np.float32)})[0]
    np.testing.assert_allclose(got, ref, rtol=0.02, atol=0.05)
    assert not np.allclose(got, default, atol=1e-3), "feeding the declared input changed nothing"


def test_nodes_on_other_devices_are_left_alone_and_reported():
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 16], name="x")
        w = tf.constant(W.numpy())
        with tf.device("/device:GPU:0"):
            h = tf.nn.relu(tf.matmul(x, w, name="gpu_matmul"), name="gpu_relu")
        with tf.device("/device:CPU:0"):
            y = tf.matmul(h, w, name="cpu_matmul")
        tf.identity(tf.matmul(y, w, name="plain_matmul"), name="out")
    model = Model(graph.as_graph_def(), inputs=["x"], outputs=["out"])
    out, conv = _convert(model)
    p = _prec(out)
    assert p["gpu_matmul"] == "fp32" and p["gpu_relu"] == "fp32"
    assert p["cpu_matmul"] == "bf16" and p["plain_matmul"] == "bf16"
    assert "GPU:0" in conv.decisions["gpu_matmul"].reason and "CPU nodes only" in conv.decisions["gpu_matmul"].reason
    for cast in _ops(out, "Cast"):
        assert "GPU" not in cast.device.upper(), cast
