"""Graph patterns several passes match: static shapes, constant inputs, Reshapes that keep the
last dimension, and activations written out in several element-wise nodes (GELU, swish).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Collection, Dict, List, Optional, Sequence

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2

from tf_bf16.transforms import graph as g

BIAS_OPS = frozenset({"BiasAdd", "BiasAddV1"})

# Element-wise ops an activation written out in several nodes is made of (Keras' exact GELU is
# 0.5*x*erfc(-x/sqrt 2), the tanh form uses Pow/Tanh, swish is x*sigmoid(x)). Which function
# such a region computes is decided by evaluating it.
ELEMENTWISE_OPS = frozenset({"Neg", "Mul", "RealDiv", "Div", "Add", "AddV2", "Sub", "Erf", "Erfc", "Tanh",
                             "Sigmoid", "Pow", "Square"})
MAX_REGION_NODES = 12
BF16_MATCH_TOLERANCE = 2.0 ** -8   # relative to 1 + |f(x)|: half a BF16 ulp of the output


class StaticShapes:
    """Static tensor shapes from TensorFlow's shape inference, computed on first use."""

    def __init__(self, graph_def: graph_pb2.GraphDef):
        self._graph_def = graph_def
        self._graph = None

    def of(self, tensor: str) -> Optional[Sequence[Optional[int]]]:
        """The shape of ``tensor`` ("node" or "node:k") as a list (None dims unknown); None if the rank is unknown."""
        if self._graph is None:
            import tensorflow as tf

            self._graph = tf.Graph()
            with self._graph.as_default():
                tf.graph_util.import_graph_def(self._graph_def, name="")
        name, port, _ = g.parse_input(tensor)
        try:
            shape = self._graph.get_operation_by_name(name).outputs[port].shape
        except (KeyError, IndexError):
            return None
        return None if shape.rank is None else shape.as_list()


def grouped_depthwise_filter(filter_node: node_def_pb2.NodeDef, taken: Dict[str, object]) -> node_def_pb2.NodeDef:
    """A depthwise filter Const [kh, kw, C, m] as the grouped filter [kh, kw, 1, C*m] with C groups:
    the same bytes (output channel c*m + j), under a fresh name recorded in ``taken``."""
    dims = [d.size for d in filter_node.attr["value"].tensor.tensor_shape.dim]
    grouped = node_def_pb2.NodeDef()
    grouped.CopyFrom(filter_node)
    grouped.name = g.unique_name(taken, f"{filter_node.name}/grouped")
    taken[grouped.name] = grouped
    shape = grouped.attr["value"].tensor.tensor_shape
    del shape.dim[:]
    for size in (dims[0], dims[1], 1, dims[2] * dims[3]):
        shape.dim.add(size=size)
    return grouped


def residual_partner(add: node_def_pb2.NodeDef, last: str, index: g.GraphIndex, shapes: StaticShapes,
                     excluded: Collection[str] = ()) -> Optional[str]:
    """The other input of a two-input add that reads node ``last`` once, when it is a residual a
    fused kernel can take: the same static shape (no broadcast), not a Const, not in ``excluded``."""
    data = [s for s in add.input if not s.startswith("^")]
    if len(data) != 2:
        return None
    mine = [i for i, s in enumerate(data) if g.node_name(s) == last]
    if len(mine) != 1:
        return None
    other = data[1 - mine[0]]
    if is_const(other, index) or g.node_name(other) in excluded:
        return None
    ours, theirs = shapes.of(g.tensor_name(last)), shapes.of(g.canonical_tensor(other))
    return other if ours is not None and ours == theirs else None


def is_const(spec: str, index: g.GraphIndex) -> bool:
    """Whether the tensor ``spec`` comes from a Const node."""
    producer = index.nodes.get(g.node_name(spec))
    return producer is not None and producer.op == "Const"


def keeps_last_dim(reshape: node_def_pb2.NodeDef, matmul: node_def_pb2.NodeDef, index: g.GraphIndex,
                    shapes: StaticShapes) -> bool:
    """A Reshape of the MatMul's output whose result ends in the same known dimension N.

    Flat order is kept, so with N last on both sides every element keeps its column: a
    per-column bias or an element-wise activation gives the same values before or after.
    """
    if reshape.op != "Reshape" or g.node_name(reshape.input[0]) != matmul.name:
        return False
    produced = shapes.of(g.tensor_name(matmul.name))
    reshaped = shapes.of(g.tensor_name(reshape.name))
    return (produced is not None and reshaped is not None and len(reshaped) >= 1
            and produced[-1] is not None and reshaped[-1] == produced[-1])


# ------------------------------------------------------------------------------------------
# activations written out in several element-wise nodes (GELU, swish)

@dataclasses.dataclass
class Region:
    """Element-wise nodes that together compute ``function`` of one tensor; ``nodes[-1]`` is the result."""

    nodes: List[node_def_pb2.NodeDef]
    function: str


def _reference_functions() -> Dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The kernels' multi-node activations, in float64."""
    from math import erf

    erf_v = np.vectorize(erf)
    return {
        "GeluErf": lambda x: 0.5 * x * (1.0 + erf_v(x / np.sqrt(2.0))),
        "GeluTanh": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3))),
        "Swish": lambda x: x / (1.0 + np.exp(-x)),
    }


def activation_region(start: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset,
                      dtype: int = g.BFLOAT16) -> Optional[Region]:
    """The element-wise region of ``dtype`` nodes that reads only ``start`` (and scalar Consts)
    and ends in one node, when it computes one of the known activations; None otherwise.

    A BF16 region may also be FP32 between a Cast to FP32 of ``start`` and one Cast back to
    BF16 (a GELU with Pow is kept FP32 by the painting): then the Casts belong to the region,
    and a fused kernel, which applies the activation to its FP32 accumulator before its one
    rounding, is more accurate than the nodes it replaces.
    """
    entry, casts = start, []
    readers = data_readers(start, index, protected)
    if readers is None:
        return None
    if dtype == g.BFLOAT16 and len(readers) == 1 and _is_cast(readers[0], g.BFLOAT16, g.FLOAT):
        entry, dtype = readers[0], g.FLOAT
        casts.append(entry)
        if data_readers(entry, index, protected) is None:
            return None
    region = _grow_region(entry, dtype, index, protected)
    if not 2 <= len(region) <= MAX_REGION_NODES:
        return None
    if any(reader.name not in region for reader, _ in index.consumers(entry.name)):
        return None
    sinks = [n for n in region.values()
             if any(r.name not in region for r, _ in index.consumers(n.name)) or not index.consumers(n.name)]
    if len(sinks) != 1 or any(index.control_consumers(n) for n in region if n != sinks[0].name):
        return None
    # The result last; the other nodes in any order (the kernel replaces them all, and
    # evaluating them imports them as a GraphDef, which needs no order).
    ordered = [n for n in region.values() if n is not sinks[0]] + [sinks[0]]
    back: List[node_def_pb2.NodeDef] = []
    if casts:
        back = data_readers(sinks[0], index, protected) or []
        if len(back) != 1 or not _is_cast(back[0], g.FLOAT, g.BFLOAT16) or back[0].name in protected:
            return None
    function = _identify(entry, ordered, index)
    if function is None:
        return None
    return Region(casts + ordered + back, function)


def data_readers(node: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset) -> Optional[List[node_def_pb2.NodeDef]]:
    """The nodes reading ``node``'s one output; None when anything else depends on it."""
    if node.name in protected or index.control_consumers(node.name) or index.output_ports(node.name) != [0]:
        return None
    return [reader for reader, _ in index.consumers(node.name)]


def sole_reader(node: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset) -> Optional[node_def_pb2.NodeDef]:
    """The one node reading ``node`` (data edge on port 0, no control edges, not a graph output), or None."""
    readers = data_readers(node, index, protected)
    return readers[0] if readers is not None and len(readers) == 1 else None


def _is_cast(node: node_def_pb2.NodeDef, src: int, dst: int) -> bool:
    return node.op == "Cast" and node.attr["SrcT"].type == src and node.attr["DstT"].type == dst


def _grow_region(entry: node_def_pb2.NodeDef, dtype: int, index: g.GraphIndex,
                 protected: frozenset) -> Dict[str, node_def_pb2.NodeDef]:
    """Every element-wise node of ``dtype`` computed from ``entry`` and scalar Consts alone."""
    region: Dict[str, node_def_pb2.NodeDef] = {}
    changed = True
    while changed and len(region) <= MAX_REGION_NODES:
        changed = False
        for owner in [entry] + list(region.values()):
            for reader, _ in index.consumers(owner.name):
                if reader.name not in region and _joins_region(reader, entry, dtype, region, index, protected):
                    region[reader.name] = reader
                    changed = True
    return region


def _joins_region(node: node_def_pb2.NodeDef, entry: node_def_pb2.NodeDef, dtype: int,
                  region: Dict[str, node_def_pb2.NodeDef], index: g.GraphIndex, protected: frozenset) -> bool:
    """An element-wise node of ``dtype`` whose data inputs are ``entry``, region nodes or scalar Consts."""
    if node.op not in ELEMENTWISE_OPS or node.name in protected or node.attr["T"].type != dtype:
        return False
    if node.device != entry.device or any(s.startswith("^") for s in node.input):
        return False
    for spec in node.input:
        src, port, _ = g.parse_input(spec)
        if src == entry.name or src in region:
            continue
        producer = index.nodes.get(src)
        if producer is None or producer.op != "Const" or g.const_value(producer).size != 1:
            return False
    return True


def _identify(start: node_def_pb2.NodeDef, ordered: Sequence[node_def_pb2.NodeDef], index: g.GraphIndex) -> Optional[str]:
    """Which reference function the region computes, by running it in FP32 on points in [-6, 6]."""
    import tensorflow as tf

    sub = graph_pb2.GraphDef()
    sub.node.append(g.make_node("Placeholder", "region_input", attrs={"dtype": attr_value_pb2.AttrValue(type=g.FLOAT)}))
    names = {n.name for n in ordered}
    for node in ordered:
        copy = node_def_pb2.NodeDef()
        copy.CopyFrom(node)
        copy.attr["T"].type = g.FLOAT
        for k, spec in enumerate(node.input):
            src = g.node_name(spec)
            if src == start.name:
                copy.input[k] = "region_input"
            elif src not in names:
                const_name = f"region_const_{len(sub.node)}"
                value = g.const_value(index.nodes[src]).astype(np.float32)
                sub.node.append(g.make_const(const_name, value))
                copy.input[k] = const_name
        sub.node.append(copy)
    x = np.concatenate([np.linspace(-6.0, 6.0, 97), [-0.1, 0.05, 1e-3]]).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(sub, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        y = session.run(f"{ordered[-1].name}:0", {"region_input:0": x}).astype(np.float64)
    # The region's Consts are already BF16 (1/sqrt 2 -> 0.70703125), so it matches its function
    # only to BF16 precision: take the closest function within a BF16 rounding step.
    errors = {}
    for name, fn in _reference_functions().items():
        want = fn(x.astype(np.float64))
        errors[name] = float(np.max(np.abs(y - want) / (1.0 + np.abs(want))))
    best = min(errors, key=errors.get)
    return best if errors[best] <= BF16_MATCH_TOLERANCE else None
