"""fuse_kernels: put tf_bf16's fused oneDNN ops in place of BF16 contractions and their epilogues.

A BF16 Conv2D, DepthwiseConv2dNative, MatMul or BatchMatMul(V2), with the BiasAdd, residual
Add and activation that follow it when each is the sole reader of the one before, becomes one
``TfBf16Conv2D`` / ``TfBf16MatMul`` node (``tf_bf16.kernels``) that keeps the last node's
name, so every consumer stays valid. The fused kernel rounds once to BF16 for the whole
pattern and reorders constant weights once. Nodes that are FP32, off the CPU, protected graph
inputs/outputs, NCHW, or whose residual shape cannot be proven equal to the output's are left
as they are. The output graph needs the kernel library loaded to run (``import
tf_bf16.kernels``); run this pass last.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import TransformContext

CONV_OP = "TfBf16Conv2D"
MATMUL_OP = "TfBf16MatMul"
# Contraction op -> the kernel op that replaces it.
CONTRACTIONS = {"Conv2D": CONV_OP, "DepthwiseConv2dNative": CONV_OP, "MatMul": MATMUL_OP,
                "BatchMatMul": MATMUL_OP, "BatchMatMulV2": MATMUL_OP}
BIAS_OPS = frozenset({"BiasAdd", "BiasAddV1"})
ADD_OPS = frozenset({"Add", "AddV2"})
# Activation op -> its name in the kernels' ``fused_ops`` attr.
ACTIVATIONS = {"Relu": "Relu", "Relu6": "Relu6", "Sigmoid": "Sigmoid"}
# Element-wise ops an activation written out in several nodes is made of (Keras' exact GELU is
# 0.5*x*erfc(-x/sqrt 2), tf.nn.gelu's 0.5*x*(1+erf(x/sqrt 2)), the tanh form uses Pow/Tanh,
# swish is x*sigmoid(x)). Which function such a region computes is decided by evaluating it.
ELEMENTWISE_OPS = frozenset({"Neg", "Mul", "RealDiv", "Div", "Add", "AddV2", "Sub", "Erf", "Erfc", "Tanh",
                             "Sigmoid", "Pow", "Square"})
MAX_REGION_NODES = 12
BF16_MATCH_TOLERANCE = 2.0 ** -8   # relative to 1 + |f(x)|: half a BF16 ulp of the output


@dataclasses.dataclass
class _Chain:
    """One contraction and the epilogue nodes fused into it."""

    nodes: List[node_def_pb2.NodeDef]
    fused_ops: List[str] = dataclasses.field(default_factory=list)
    args: List[str] = dataclasses.field(default_factory=list)
    reshape: Optional[node_def_pb2.NodeDef] = None   # a MatMul's Reshape the epilogue is moved across


def fuse_kernels(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Rewrite BF16 contraction chains into tf_bf16's fused kernel ops; counts them in
    ``context.kernel_nodes``."""
    out = g.copy_graph(graph_def)
    index = g.GraphIndex(out)
    protected = context.plan.protected
    shapes = _StaticShapes(graph_def)
    claimed: Set[str] = set()   # nodes already in a chain: two chains never share a node
    removed: Set[str] = set()
    replacements: Dict[str, List[node_def_pb2.NodeDef]] = {}
    new_consts: List[node_def_pb2.NodeDef] = []
    for node in list(out.node):
        if node.name in claimed or not _is_candidate(node, protected, shapes):
            continue
        weights = _filter_input(node, index, new_consts)
        if weights is None:
            continue
        chain = _grow(node, index, protected | claimed, shapes)
        claimed.update(n.name for n in chain.nodes)
        removed.update(n.name for n in chain.nodes[:-1])
        replacements[chain.nodes[-1].name] = _kernel_nodes(chain, weights, shapes)
    nodes: List[node_def_pb2.NodeDef] = []
    for n in out.node:
        if n.name in replacements:
            nodes.extend(replacements[n.name])
        elif n.name not in removed:
            nodes.append(n)
    context.kernel_nodes += len(replacements)
    return g.rebuild(out, nodes + new_consts)


def _is_candidate(node: node_def_pb2.NodeDef, protected: frozenset, shapes: "_StaticShapes") -> bool:
    """A BF16 CPU contraction the kernels implement (NHWC convs; matmuls without batch broadcast)."""
    if node.op not in CONTRACTIONS or node.name in protected or node.attr["T"].type != g.BFLOAT16:
        return False
    if not _on_cpu(node.device):
        return False
    if node.op in ("Conv2D", "DepthwiseConv2dNative"):
        return node.attr["data_format"].s in (b"", b"NHWC")
    if node.op == "MatMul":
        return True
    a, b = (shapes.of(g.canonical_tensor(s)) for s in node.input[:2])
    # The kernel takes equal batch dims, or a rank-2 (shared) right-hand side.
    return a is not None and b is not None and len(a) >= 3 and (len(b) == 2 or a[:-2] == b[:-2])


def _on_cpu(device: str) -> bool:
    return not device or "CPU" in device.upper().rsplit("/", 1)[-1]


def _filter_input(node: node_def_pb2.NodeDef, index: g.GraphIndex,
                  new_consts: List[node_def_pb2.NodeDef]) -> Optional[Tuple[str, bool]]:
    """The kernel's weight input and whether it is a Const: the node's own, or a grouped-layout
    copy for depthwise; None when the node cannot be rewritten.

    A depthwise filter [kh, kw, C, m] is the grouped filter [kh, kw, 1, C*m] with C groups
    (same bytes, output channel c*m + j); only a constant filter can be re-shaped offline.
    """
    if node.op != "DepthwiseConv2dNative":
        return node.input[1], _is_const(node.input[1], index)
    src = g.node_name(node.input[1])
    producer = index.nodes.get(src)
    if producer is None or producer.op != "Const":
        return None
    dims = [d.size for d in producer.attr["value"].tensor.tensor_shape.dim]
    if len(dims) != 4:
        return None
    grouped = node_def_pb2.NodeDef()
    grouped.CopyFrom(producer)
    taken = dict(index.nodes, **{n.name: n for n in new_consts})
    grouped.name = g.unique_name(taken, f"{src}/grouped")
    shape = grouped.attr["value"].tensor.tensor_shape
    del shape.dim[:]
    for size in (dims[0], dims[1], 1, dims[2] * dims[3]):
        shape.dim.add(size=size)
    new_consts.append(grouped)
    return grouped.name, True


def _sole_reader(node: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset) -> Optional[node_def_pb2.NodeDef]:
    """The one node that reads ``node``'s output (through a data edge on port 0, nothing else)."""
    if node.name in protected or index.control_consumers(node.name):
        return None
    readers = index.consumers(node.name)
    if len(readers) != 1 or index.output_ports(node.name) != [0]:
        return None
    reader, _ = readers[0]
    if reader.name in protected or reader.attr["T"].type != g.BFLOAT16 or reader.device != node.device:
        return None
    return reader


def _grow(node: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset, shapes: "_StaticShapes") -> _Chain:
    """``node`` plus, in this order, a BiasAdd, a residual Add and an activation it can absorb.

    ``protected`` holds the graph's inputs and outputs and the nodes other chains took: none
    of them joins this chain.
    """
    chain = _Chain([node])
    reader = _sole_reader(node, index, protected)
    if reader is not None and node.op == "MatMul" and _keeps_last_dim(reader, node, index, shapes):
        # Keras' Dense on a 3-D input: MatMul -> Reshape -> BiasAdd -> activation. Per-column
        # epilogues commute with a Reshape that keeps the last dimension.
        chain.nodes.append(reader)
        chain.reshape = reader
        reader = _sole_reader(reader, index, protected)
    bias = _bias_input(reader, chain, index, shapes) if reader is not None else None
    if bias is not None:
        chain.nodes.append(reader)
        chain.fused_ops.append("BiasAdd")
        chain.args.append(bias)
        reader = _sole_reader(reader, index, protected)
    if reader is not None and reader.op in ADD_OPS and chain.reshape is None:
        other = _residual_input(reader, chain, index, shapes)
        if other is not None:
            chain.nodes.append(reader)
            chain.fused_ops.append("Add")
            chain.args.append(other)
            reader = _sole_reader(reader, index, protected)
    if reader is not None and reader.op in ACTIVATIONS:
        chain.nodes.append(reader)
        chain.fused_ops.append(ACTIVATIONS[reader.op])
    else:
        region = activation_region(chain.nodes[-1], index, protected)
        if region is not None:
            chain.nodes.extend(region.nodes)
            chain.fused_ops.append(region.function)
    if chain.nodes[-1] is chain.reshape:   # nothing fused behind the Reshape: leave it alone
        chain.nodes.pop()
        chain.reshape = None
    return chain


def _bias_input(node: node_def_pb2.NodeDef, chain: _Chain, index: g.GraphIndex, shapes: "_StaticShapes") -> Optional[str]:
    """The bias a BiasAdd, or an Add of a constant vector along the last dimension, applies to the chain."""
    last = chain.nodes[-1].name
    data = [s for s in node.input if not s.startswith("^")]
    if node.op in BIAS_OPS:
        ok = g.node_name(data[0]) == last and node.attr["data_format"].s in (b"", b"NHWC") and _is_const(data[1], index)
        return data[1] if ok else None
    if node.op not in ADD_OPS or len(data) != 2 or [g.node_name(x) for x in data].count(last) != 1:
        return None
    other = data[1] if g.node_name(data[0]) == last else data[0]
    if not _is_const(other, index):
        return None
    dims = [d.size for d in index.nodes[g.node_name(other)].attr["value"].tensor.tensor_shape.dim]
    produced = shapes.of(g.tensor_name(last))
    return other if produced and len(dims) == 1 and dims[0] == produced[-1] else None


def _keeps_last_dim(reshape: node_def_pb2.NodeDef, matmul: node_def_pb2.NodeDef, index: g.GraphIndex,
                    shapes: "_StaticShapes") -> bool:
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


def _is_const(spec: str, index: g.GraphIndex) -> bool:
    producer = index.nodes.get(g.node_name(spec))
    return producer is not None and producer.op == "Const"


def _residual_input(add: node_def_pb2.NodeDef, chain: _Chain, index: g.GraphIndex,
                    shapes: "_StaticShapes") -> Optional[str]:
    """The Add's other input when it is a same-shape residual (no broadcast, not a Const)."""
    last = chain.nodes[-1].name
    data = [s for s in add.input if not s.startswith("^")]
    if len(data) != 2:
        return None
    mine = [i for i, s in enumerate(data) if g.node_name(s) == last]
    if len(mine) != 1:
        return None
    other = data[1 - mine[0]]
    if _is_const(other, index) or g.node_name(other) in {n.name for n in chain.nodes}:
        return None
    ours, theirs = shapes.of(g.tensor_name(last)), shapes.of(g.canonical_tensor(other))
    return other if ours is not None and ours == theirs else None


def _kernel_nodes(chain: _Chain, weights: Tuple[str, bool], shapes: "_StaticShapes") -> List[node_def_pb2.NodeDef]:
    """The fused kernel node for ``chain``, named after its last node; with a Reshape moved
    behind the epilogue, the kernel node takes the MatMul's name and the Reshape the last name."""
    base, last = chain.nodes[0], chain.nodes[-1]
    filter_input, constant = weights
    attrs = {"T": attr_value_pb2.AttrValue(type=g.BFLOAT16),
             "num_args": attr_value_pb2.AttrValue(i=len(chain.args)),
             "fused_ops": attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(
                 s=[op.encode() for op in chain.fused_ops])),
             "weights_constant": attr_value_pb2.AttrValue(b=constant)}
    if CONTRACTIONS[base.op] == CONV_OP:
        for key in ("strides", "padding", "dilations"):
            attrs[key] = base.attr[key]
        if "explicit_paddings" in base.attr:
            attrs["explicit_paddings"] = base.attr["explicit_paddings"]
        attrs["groups"] = attr_value_pb2.AttrValue(i=_groups(base, shapes))
    else:
        transpose = ("transpose_a", "transpose_b") if base.op == "MatMul" else ("adj_x", "adj_y")
        attrs["transpose_a"] = attr_value_pb2.AttrValue(b=base.attr[transpose[0]].b)
        attrs["transpose_b"] = attr_value_pb2.AttrValue(b=base.attr[transpose[1]].b)
    controls: List[str] = []
    for node in chain.nodes:
        controls.extend(s for s in node.input if s.startswith("^") and s not in controls)
    inputs = [base.input[0], filter_input] + chain.args + controls
    if chain.reshape is None:
        return [g.make_node(CONTRACTIONS[base.op], last.name, inputs, attrs, device=base.device)]
    kernel = g.make_node(CONTRACTIONS[base.op], base.name, inputs, attrs, device=base.device)
    reshape = node_def_pb2.NodeDef()
    reshape.CopyFrom(chain.reshape)
    reshape.name = last.name
    reshape.input[0] = base.name
    return [kernel, reshape]


def _groups(conv: node_def_pb2.NodeDef, shapes: "_StaticShapes") -> int:
    """Depthwise: one group per input channel; Conv2D: input channels / filter input channels."""
    src = shapes.of(g.canonical_tensor(conv.input[0]))
    channels = src[-1] if src else None
    if conv.op == "DepthwiseConv2dNative":
        filt = shapes.of(g.canonical_tensor(conv.input[1]))
        return int(filt[2]) if filt else int(channels or 1)
    filt = shapes.of(g.canonical_tensor(conv.input[1]))
    if channels and filt and filt[2] and channels != filt[2]:
        return int(channels // filt[2])
    return 1


class _StaticShapes:
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


def activation_region(start: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset) -> Optional[Region]:
    """The element-wise region that reads only ``start`` (and scalar Consts) and ends in one node,
    when it computes one of the kernels' activations; None otherwise.

    The region is BF16, or FP32 between a Cast to FP32 of ``start`` and one Cast back to BF16
    (a GELU with Pow is kept FP32 by the painting): then the Casts belong to the region, and
    the fused kernel, which applies the activation to its FP32 accumulator before its one
    rounding, is more accurate than the nodes it replaces.
    """
    entry, dtype, casts = start, g.BFLOAT16, []
    readers = _data_readers(start, index, protected)
    if readers is None:
        return None
    if len(readers) == 1 and _is_cast(readers[0], g.BFLOAT16, g.FLOAT):
        entry, dtype = readers[0], g.FLOAT
        casts.append(entry)
        if _data_readers(entry, index, protected) is None:
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
    ordered = [n for n in index.topological_order() if n.name in region]
    if dtype == g.FLOAT:
        back = _data_readers(sinks[0], index, protected)
        if back is None or len(back) != 1 or not _is_cast(back[0], g.FLOAT, g.BFLOAT16) or back[0].name in protected:
            return None
    function = _identify(entry, ordered, index)
    if function is None:
        return None
    return Region(casts + ordered + (back if dtype == g.FLOAT else []), function)


def _data_readers(node: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset) -> Optional[List[node_def_pb2.NodeDef]]:
    """The nodes reading ``node``'s one output; None when anything else depends on it."""
    if node.name in protected or index.control_consumers(node.name) or index.output_ports(node.name) != [0]:
        return None
    return [reader for reader, _ in index.consumers(node.name)]


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
