"""Tests for transforms/graph.py: name parsing, GraphIndex, dtype slots and node builders on real graphs."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import attr_value_pb2, graph_pb2, types_pb2  # noqa: E402

from tests.zoo import run_graph  # noqa: E402
from tf_bf16.errors import GraphError  # noqa: E402
from tf_bf16.model import Model  # noqa: E402
from tf_bf16.transforms import graph as g  # noqa: E402

F32 = attr_value_pb2.AttrValue(type=types_pb2.DT_FLOAT)


def _split_graph() -> graph_pb2.GraphDef:
    """x -> Split -> (relu on port 0, identity+neg on port 1) -> out, with control edges and a dead const."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        first, second = tf.split(x, 2, axis=1, name="split")
        left = tf.nn.relu(first, name="left")
        right = tf.negative(tf.identity(second, name="right_id"), name="right")
        with tf.control_dependencies([left]):
            gate = tf.no_op(name="gate")
        with tf.control_dependencies([gate]):
            tf.add(left, right, name="out")
        tf.constant(1.0, name="unused")
    return graph.as_graph_def()


def _slot_graph() -> graph_pb2.GraphDef:
    """Ops whose dtype slots differ: plain T, Src/Dst, number_attr list, list(type), fixed bool."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 2], name="x")
        i = tf.compat.v1.placeholder(tf.int32, [2], name="i")
        tf.raw_ops.MatMul(a=x, b=x, name="mm")
        tf.raw_ops.Cast(x=x, DstT=tf.bfloat16, name="cast")
        tf.raw_ops.ConcatV2(values=[x, x, x], axis=tf.constant(0, name="axis"), name="concat")
        tf.raw_ops.IdentityN(input=[x, i], name="idn")
        tf.raw_ops.SelectV2(condition=x > 0.0, t=x, e=x, name="sel")
        tf.raw_ops.Shape(input=x, out_type=tf.int32, name="shape")
    return graph.as_graph_def()


def _imported(graph_def: graph_pb2.GraphDef) -> tf.Graph:
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    return graph


def _node(graph_def: graph_pb2.GraphDef, name: str):
    return next(n for n in graph_def.node if n.name == name)


def _keys(slots) -> list:
    return [s.key for s in slots]


# --------------------------------------------------------------------------------------
# input strings
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("conv", ("conv", 0, False)),
    ("scope/split:1", ("scope/split", 1, False)),
    ("split:10", ("split", 10, False)),
    ("^scope/gate", ("scope/gate", -1, True)),
    ("odd:name", ("odd:name", 0, False)),     # a non-numeric suffix is part of the name
    ("a:b:3", ("a:b", 3, False)),
])
def test_parse_input_forms(spec, expected):
    """parse_input splits node, port and control flag for every input form."""
    assert g.parse_input(spec) == expected
    assert g.node_name(spec) == expected[0]


def test_parse_input_agrees_with_tensorflow_on_a_real_graph():
    """Every NodeDef input parses to the producer, port and edge kind TensorFlow itself wires."""
    gd = _split_graph()
    graph = _imported(gd)
    for node in gd.node:
        op = graph.get_operation_by_name(node.name)
        data = [g.parse_input(s) for s in node.input if not g.parse_input(s)[2]]
        control = [g.parse_input(s)[0] for s in node.input if g.parse_input(s)[2]]
        assert [(name, port) for name, port, _ in data] == [(t.op.name, t.value_index) for t in op.inputs]
        assert sorted(control) == sorted(c.name for c in op.control_inputs)


def test_tensor_name_and_canonical_tensor():
    """Port 0 is written bare, other ports with a suffix, and control edges keep their caret."""
    assert g.tensor_name("x") == g.tensor_name("x", 0) == "x"
    assert g.tensor_name("split", 1) == "split:1"
    assert g.canonical_tensor("x:0") == g.canonical_tensor("x") == "x"
    assert g.canonical_tensor("split:1") == "split:1"
    assert g.canonical_tensor("^gate") == "^gate"
    for spec in ("x", "x:0", "split:1", "a:b:2"):
        name, port, _ = g.parse_input(spec)
        assert g.canonical_tensor(spec) == g.tensor_name(name, port)


# --------------------------------------------------------------------------------------
# GraphIndex
# --------------------------------------------------------------------------------------

def test_index_lookup_and_in_place_edits():
    """Nodes are found by name, unknown names are absent, and edits through the index reach the GraphDef."""
    gd = _split_graph()
    index = g.GraphIndex(gd)
    assert "left" in index and "nope" not in index
    assert index["left"].op == "Relu"
    assert set(index.nodes) == {n.name for n in gd.node}
    index["left"].device = "/device:CPU:0"
    assert _node(gd, "left").device == "/device:CPU:0"


def test_index_refuses_duplicate_names():
    """Two nodes with one name make the index raise (TensorFlow would refuse the graph too)."""
    gd = _split_graph()
    gd.node.add().CopyFrom(_node(gd, "left"))
    with pytest.raises(ValueError, match="left"):
        g.GraphIndex(gd)


def test_index_consumers_per_port_and_control():
    """Data consumers are kept per output port; control consumers separately."""
    index = g.GraphIndex(_split_graph())
    names = lambda pairs: sorted((node.name, i) for node, i in pairs)  # noqa: E731
    assert names(index.consumers("split", 0)) == [("left", 0)]
    assert names(index.consumers("split", 1)) == [("right_id", 0)]
    assert names(index.consumers("split")) == [("left", 0), ("right_id", 0)]
    assert index.consumers("split", 2) == []
    assert index.output_ports("split") == [0, 1]
    assert names(index.consumers("left")) == [("out", 0)]
    assert [n.name for n in index.control_consumers("left")] == ["gate"]
    assert [n.name for n in index.control_consumers("gate")] == ["out"]
    assert index.consumers("gate") == [] and index.output_ports("gate") == []


def test_index_has_consumers_counts_control_edges():
    """A node read only through a control edge has consumers; outputs and dead nodes have none."""
    index = g.GraphIndex(_split_graph())
    assert index.has_consumers("gate")
    assert index.has_consumers("x")
    assert not index.has_consumers("out")
    assert not index.has_consumers("unused")


def test_index_producer_and_data_inputs():
    """producer() resolves a data input to (node, port); a control input is refused."""
    gd = _split_graph()
    index = g.GraphIndex(gd)
    out = index["out"]
    assert index.data_inputs(out) == ["left", "right"]
    node, port = index.producer(index["right_id"], 0)
    assert (node.name, port) == ("split", 1)
    node, port = index.producer(out, 0)
    assert (node.name, port) == ("left", 0)
    control_index = list(out.input).index("^gate")
    with pytest.raises(ValueError):
        index.producer(out, control_index)


def test_topological_order_on_reversed_graph():
    """Producers (data and control) come before consumers even when the GraphDef lists them backwards."""
    gd = _split_graph()
    backwards = graph_pb2.GraphDef(node=list(reversed(gd.node)))
    order = [n.name for n in g.GraphIndex(backwards).topological_order()]
    assert sorted(order) == sorted(n.name for n in gd.node)
    position = {name: k for k, name in enumerate(order)}
    for node in gd.node:
        for spec in node.input:
            assert position[g.node_name(spec)] < position[node.name], (spec, node.name)


def test_topological_order_of_a_v1_while_loop():
    """A frozen (v1) while loop is ordered: every edge but NextIteration -> Merge goes forward."""
    def f(x):
        _, y = tf.while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y * 2.0), [tf.constant(0), x])
        return y

    gd = Model(tf.function(f).get_concrete_function(tf.TensorSpec([2], tf.float32, name="x"))).graph_def
    index = g.GraphIndex(gd)
    assert any(n.op == "NextIteration" for n in gd.node), "expected a lowered v1 loop"
    order = [n.name for n in index.topological_order()]
    assert len(order) == len(set(order)) == len(gd.node)
    position = {name: k for k, name in enumerate(order)}
    for node in gd.node:
        for spec in node.input:
            src = g.node_name(spec)
            if index[src].op == "NextIteration" and node.op == "Merge":
                continue  # the loop's back edge
            assert position[src] < position[node.name], (src, node.name)


def test_topological_order_rejects_a_cycle():
    """A data cycle outside a while loop cannot be ordered: a GraphError naming the cycle in data-flow order."""
    nodes = [
        g.make_node("Placeholder", "x", attrs={"dtype": F32}),
        g.make_node("AddV2", "a", ["x", "b"], {"T": F32}),
        g.make_node("Identity", "b", ["a"], {"T": F32}),
        g.make_node("Identity", "after", ["b"], {"T": F32}),
        g.make_node("Identity", "out", ["x"], {"T": F32}),
    ]
    with pytest.raises(GraphError, match=r"cycle outside any while loop: a -> b -> a \(3 node"):
        g.GraphIndex(graph_pb2.GraphDef(node=nodes)).topological_order()


def test_topological_order_rejects_dangling_inputs():
    """An input naming a node that is not in the graph is a GraphError naming both, never skipped."""
    nodes = [
        g.make_node("Placeholder", "x", attrs={"dtype": F32}),
        g.make_node("AddV2", "sum", ["x", "ghost:1"], {"T": F32}),
        g.make_node("Identity", "out", ["sum", "^gone"], {"T": F32}),
    ]
    index = g.GraphIndex(graph_pb2.GraphDef(node=nodes))
    assert index.dangling_inputs() == [("sum", "ghost:1"), ("out", "^gone")]
    with pytest.raises(GraphError, match=r"node 'sum' reads 'ghost:1', node 'out' reads '\^gone'"):
        index.topological_order()


def test_dangling_message_counts_what_it_leaves_out():
    pairs = [(f"n{k}", f"missing{k}") for k in range(8)]
    message = g.dangling_message(pairs)
    assert "node 'n4' reads 'missing4'" in message and "n5" not in message and "and 3 more" in message


def test_reachable_from_follows_data_and_control_edges():
    """Everything an output depends on is reachable (control edges included); dead nodes are not."""
    index = g.GraphIndex(_split_graph())
    upstream_of_left = {"left", "split", "split/split_dim", "x"}
    assert g.reachable_from(index, ["out:0"]) == upstream_of_left | {"out", "right", "right_id", "gate"}
    assert g.reachable_from(index, ["^gate"]) == upstream_of_left | {"gate"}
    assert g.reachable_from(index, ["left", "unused"]) == upstream_of_left | {"unused"}
    assert g.reachable_from(index, ["not_in_graph"]) == set()


# --------------------------------------------------------------------------------------
# dtype slots
# --------------------------------------------------------------------------------------

def test_slots_match_tensorflow_dtypes_for_every_node():
    """For every node, one input/output slot per tensor, each resolving to the dtype TensorFlow infers."""
    for gd in (_slot_graph(), _split_graph()):
        graph = _imported(gd)
        sigs = g.OpSignatures(gd)
        for node in gd.node:
            op = graph.get_operation_by_name(node.name)
            ins, outs = sigs.input_slots(node), sigs.output_slots(node)
            assert [g.slot_dtype(node, s) for s in ins] == [t.dtype.as_datatype_enum for t in op.inputs], node.name
            assert [g.slot_dtype(node, s) for s in outs] == [t.dtype.as_datatype_enum for t in op.outputs], node.name


def test_slot_kinds():
    """Slots name the governing attr: shared T, Src/Dst, a per-element list(type), or a fixed dtype."""
    gd = _slot_graph()
    sigs = g.OpSignatures(gd)
    node = lambda name: _node(gd, name)  # noqa: E731
    assert _keys(sigs.input_slots(node("mm"))) == ["T", "T"]
    assert _keys(sigs.output_slots(node("mm"))) == ["T"]
    assert _keys(sigs.input_slots(node("cast"))) == ["SrcT"]
    assert _keys(sigs.output_slots(node("cast"))) == ["DstT"]
    assert _keys(sigs.input_slots(node("concat"))) == ["T", "T", "T", "Tidx"]
    assert _keys(sigs.input_slots(node("idn"))) == ["T[0]", "T[1]"]
    cond = sigs.input_slots(node("sel"))[0]
    assert cond.attr is None and cond.key == "fixed" and cond.fixed == types_pb2.DT_BOOL
    assert _keys(sigs.output_slots(node("shape"))) == ["out_type"]


def test_type_attrs_list_each_paintable_vertex():
    """type_attrs lists every type attribute once, and each list(type) element separately."""
    gd = _slot_graph()
    sigs = g.OpSignatures(gd)
    assert sorted(_keys(sigs.type_attrs(_node(gd, "cast")))) == ["DstT", "SrcT"]
    assert _keys(sigs.type_attrs(_node(gd, "mm"))) == ["T"]
    assert sorted(_keys(sigs.type_attrs(_node(gd, "concat")))) == ["T", "Tidx"]
    assert _keys(sigs.type_attrs(_node(gd, "idn"))) == ["T[0]", "T[1]"]


def test_slot_dtype_of_missing_attr_or_index_is_invalid():
    """An unset attr or a list index past the end reads as DT_INVALID."""
    gd = _slot_graph()
    assert g.slot_dtype(_node(gd, "mm"), g.TypeSlot("NoSuchAttr")) == types_pb2.DT_INVALID
    assert g.slot_dtype(_node(gd, "idn"), g.TypeSlot("T", 5)) == types_pb2.DT_INVALID


def test_set_slot_dtype_rewrites_only_its_attr():
    """Retyping a slot changes its attr (one list element only); a fixed slot cannot change."""
    gd = _slot_graph()
    sigs = g.OpSignatures(gd)
    mm, idn, sel = _node(gd, "mm"), _node(gd, "idn"), _node(gd, "sel")
    g.set_slot_dtype(mm, sigs.input_slots(mm)[0], g.BFLOAT16)
    assert [g.slot_dtype(mm, s) for s in sigs.output_slots(mm)] == [g.BFLOAT16]
    g.set_slot_dtype(idn, g.TypeSlot("T", 0), g.BFLOAT16)
    assert list(idn.attr["T"].list.type) == [g.BFLOAT16, types_pb2.DT_INT32]
    with pytest.raises(ValueError):
        g.set_slot_dtype(sel, sigs.input_slots(sel)[0], g.BFLOAT16)


def test_unknown_op_has_no_slots():
    """An op TensorFlow does not know resolves to None slots, no type attrs and no allowed types."""
    sigs = g.OpSignatures()
    node = g.make_node("NoSuchCustomOp", "custom", ["x"], {"T": F32})
    assert sigs.op_def("NoSuchCustomOp") is None
    assert sigs.input_slots(node) is None and sigs.output_slots(node) is None
    assert sigs.type_attrs(node) == []
    allowed = sigs.allowed_types("NoSuchCustomOp", "T")
    assert allowed is not None and not allowed


def test_allowed_types_from_op_def():
    """allowed_types reports the OpDef's list, or None for an attr that takes any type."""
    sigs = g.OpSignatures()
    conv = sigs.allowed_types("Conv2D", "T")
    assert g.FLOAT in conv and g.BFLOAT16 in conv and types_pb2.DT_STRING not in conv
    assert sigs.allowed_types("Identity", "T") is None


def test_library_function_resolves_from_its_signature():
    """A node calling a graph-library function by name gets slots from the function's signature and runs."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        tf.identity(tf.function(lambda a: a * 2.0)(x), name="out")
    gd = graph.as_graph_def()
    fname = gd.library.function[0].signature.name
    sigs = g.OpSignatures(gd)
    assert sigs.is_function(fname) and not sigs.is_function("MatMul")
    assert not g.OpSignatures().is_function(fname)
    call = g.make_node(fname, "call", ["x"])
    assert [g.slot_dtype(call, s) for s in sigs.input_slots(call)] == [g.FLOAT]
    assert [g.slot_dtype(call, s) for s in sigs.output_slots(call)] == [g.FLOAT]
    gd.node.append(call)
    np.testing.assert_array_equal(run_graph(gd, "call:0", {"x:0": np.array([1.0, -3.0], np.float32)}), [2.0, -6.0])


# --------------------------------------------------------------------------------------
# node builders and graph copies
# --------------------------------------------------------------------------------------

def test_make_const_values_run_in_tensorflow():
    """make_const builds Consts TensorFlow evaluates to the given values (bfloat16 rounded like tf.cast)."""
    values = np.random.RandomState(0).randn(3, 5).astype(np.float32)
    ints = np.arange(6, dtype=np.int32).reshape(2, 3)
    gd = graph_pb2.GraphDef(node=[
        g.make_const("f", values),
        g.make_const("i", ints),
        g.make_const("b", values, dtype=g.BFLOAT16, device="/device:CPU:0"),
    ])
    assert _node(gd, "f").attr["dtype"].type == g.FLOAT
    assert _node(gd, "i").attr["dtype"].type == types_pb2.DT_INT32
    assert _node(gd, "b").attr["dtype"].type == g.BFLOAT16 and _node(gd, "b").device == "/device:CPU:0"
    np.testing.assert_array_equal(g.const_value(_node(gd, "f")), values)
    f, i, b = run_graph(gd, ["f:0", "i:0", "b:0"], {})
    np.testing.assert_array_equal(f, values)
    np.testing.assert_array_equal(i, ints)
    assert b.dtype == tf.bfloat16.as_numpy_dtype
    np.testing.assert_array_equal(b, tf.cast(values, tf.bfloat16).numpy())


def test_bf16_const_from_rounds_like_tf_cast():
    """A bfloat16 copy of a float Const (dense, splat or scalar) keeps its shape and rounds like tf.cast."""
    values = np.random.RandomState(1).randn(4, 8).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        tf.constant(values, name="dense")
        tf.constant(1.1, shape=[2, 3], name="splat")
        tf.constant(-2.7, name="scalar")
    src = graph.as_graph_def()
    assert len(_node(src, "splat").attr["value"].tensor.float_val) == 1  # TensorFlow stored it as a splat
    out = graph_pb2.GraphDef(node=[g.bf16_const_from(n, n.name + "_bf16") for n in src.node])
    for node in out.node:
        assert node.op == "Const" and node.attr["dtype"].type == g.BFLOAT16
    results = run_graph(out, ["dense_bf16:0", "splat_bf16:0", "scalar_bf16:0"], {})
    expected = [values, np.full((2, 3), 1.1, np.float32), np.float32(-2.7)]
    for got, want in zip(results, expected):
        assert got.dtype == tf.bfloat16.as_numpy_dtype and got.shape == np.shape(want)
        np.testing.assert_array_equal(got, tf.cast(want, tf.bfloat16).numpy())


def test_make_cast_and_make_node_build_runnable_nodes():
    """make_cast and make_node give nodes TensorFlow accepts and runs with the requested semantics."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.placeholder(tf.float32, [3], name="x")
    gd = graph.as_graph_def()
    gd.node.extend([
        g.make_cast("x_bf16", "x", g.FLOAT, g.BFLOAT16),
        g.make_node("AddV2", "twice", ["x_bf16", "x_bf16"], {"T": attr_value_pb2.AttrValue(type=g.BFLOAT16)},
                    device="/device:CPU:0"),
        g.make_cast("back", "twice", g.BFLOAT16, g.FLOAT),
    ])
    assert list(_node(gd, "twice").input) == ["x_bf16", "x_bf16"]
    assert _node(gd, "twice").device == "/device:CPU:0"
    x = np.array([1.0, 1.00390625, -3.3], np.float32)
    cast, back = run_graph(gd, ["x_bf16:0", "back:0"], {"x:0": x})
    assert cast.dtype == tf.bfloat16.as_numpy_dtype and back.dtype == np.float32
    rounded = tf.cast(x, tf.bfloat16).numpy()
    np.testing.assert_array_equal(cast, rounded)
    np.testing.assert_array_equal(back, (rounded + rounded).astype(np.float32))


def test_unique_name_avoids_existing_names():
    """unique_name returns the base when free, else the first free numbered variant."""
    index = g.GraphIndex(_split_graph())
    assert g.unique_name(index.nodes, "fresh") == "fresh"
    assert g.unique_name(index.nodes, "left") == "left_1"
    assert g.unique_name({"left": 0, "left_1": 0, "left_2": 0}, "left") == "left_3"


def test_dtype_name():
    """dtype_name gives TensorFlow's short names and never raises on an unknown enum."""
    assert g.dtype_name(g.FLOAT) == "float32"
    assert g.dtype_name(g.BFLOAT16) == "bfloat16"
    assert g.dtype_name(types_pb2.DT_INT32) == tf.int32.name
    assert "9999" in g.dtype_name(9999)


def test_copy_graph_is_deep():
    """Editing a copy leaves the original GraphDef untouched."""
    gd = _split_graph()
    before = gd.SerializeToString(deterministic=True)
    copy = g.copy_graph(gd)
    assert copy.SerializeToString(deterministic=True) == before
    _node(copy, "left").op = "Relu6"
    del copy.node[0]
    assert gd.SerializeToString(deterministic=True) == before


def test_rebuild_keeps_versions_and_library():
    """rebuild swaps the nodes but keeps the GraphDef's versions and function library."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        tf.identity(tf.function(lambda a: a + 1.0)(x), name="out")
    gd = graph.as_graph_def()
    assert gd.library.function and gd.versions.producer
    out = g.rebuild(gd, [n for n in gd.node if n.name != "out"])
    assert [n.name for n in out.node] == [n.name for n in gd.node if n.name != "out"]
    assert out.versions == gd.versions and out.library == gd.library
    assert len(gd.node) == len(out.node) + 1  # the source is not modified


# --------------------------------------------------------------------------------------
# looking through identities
# --------------------------------------------------------------------------------------

def _identity_chain_graph() -> graph_pb2.GraphDef:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 4], name="x")
        _, second = tf.split(x, 2, axis=1, name="split")
        ident = tf.identity(second, name="ident")
        stop = tf.stop_gradient(ident, name="stop")
        tf.raw_ops.Snapshot(input=stop, name="snap")
        tf.negative(ident, name="neg")
        tf.square(stop, name="sq")
        tf.nn.relu(second, name="relu")
    return graph.as_graph_def()


def test_skip_identity_walks_back_to_the_real_tensor():
    """skip_identity follows Identity/StopGradient/Snapshot to the producing port, up to max_depth hops."""
    index = g.GraphIndex(_identity_chain_graph())
    assert g.skip_identity(index, "snap") == "split:1"
    assert g.skip_identity(index, "snap:0") == "split:1"
    assert g.skip_identity(index, "snap", max_depth=1) == "stop"
    assert g.skip_identity(index, "neg") == "neg"
    assert g.skip_identity(index, "x:0") == "x"


def test_consumers_through_identity_skips_pass_through_nodes():
    """The real readers of a tensor are found behind Identity-like nodes; the identities themselves are not."""
    index = g.GraphIndex(_identity_chain_graph())
    names = sorted(n.name for n in g.consumers_through_identity(index, "split", 1))
    assert names == ["neg", "relu", "sq"]  # "snap" is an Identity-like leaf with no readers
    assert g.consumers_through_identity(index, "split", 0) == []
