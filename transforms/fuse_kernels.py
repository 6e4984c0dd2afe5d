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
from typing import Dict, List, Optional, Set, Tuple

from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.patterns import (BIAS_OPS, StaticShapes, activation_region, grouped_depthwise_filter,
                                         is_const, keeps_last_dim, residual_partner, sole_reader)

CONV_OP = "TfBf16Conv2D"
MATMUL_OP = "TfBf16MatMul"
# Contraction op -> the kernel op that replaces it.
CONTRACTIONS = {"Conv2D": CONV_OP, "DepthwiseConv2dNative": CONV_OP, "MatMul": MATMUL_OP,
                "BatchMatMul": MATMUL_OP, "BatchMatMulV2": MATMUL_OP}
ADD_OPS = frozenset({"Add", "AddV2", "AddN"})   # AddN: the two-input residual residual_addn writes
# Activation op -> its name in the kernels' ``fused_ops`` attr.
ACTIVATIONS = {"Relu": "Relu", "Relu6": "Relu6", "Sigmoid": "Sigmoid"}


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
    shapes = StaticShapes(graph_def)
    claimed: Set[str] = set()   # nodes already in a chain: two chains never share a node
    removed: Set[str] = set()
    replacements: Dict[str, List[node_def_pb2.NodeDef]] = {}
    new_consts: List[node_def_pb2.NodeDef] = []
    taken: Dict[str, object] = dict(index.nodes)   # node names in use, including the Consts this pass adds
    for node in list(out.node):
        if node.name in claimed or not _is_candidate(node, protected, shapes):
            continue
        weights = _filter_input(node, index, new_consts, taken)
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


def _is_candidate(node: node_def_pb2.NodeDef, protected: frozenset, shapes: "StaticShapes") -> bool:
    """A BF16 CPU contraction the kernels implement (NHWC convs; matmuls without batch broadcast)."""
    if node.op not in CONTRACTIONS or node.name in protected or node.attr["T"].type != g.BFLOAT16:
        return False
    if not g.on_cpu(node.device):
        return False
    if node.op in ("Conv2D", "DepthwiseConv2dNative"):
        return node.attr["data_format"].s in (b"", b"NHWC")
    if node.op == "MatMul":
        return True
    a, b = (shapes.of(g.canonical_tensor(s)) for s in node.input[:2])
    # The kernel takes equal batch dims, or a rank-2 (shared) right-hand side.
    return a is not None and b is not None and len(a) >= 3 and (len(b) == 2 or a[:-2] == b[:-2])


def _filter_input(node: node_def_pb2.NodeDef, index: g.GraphIndex, new_consts: List[node_def_pb2.NodeDef],
                  taken: Dict[str, object]) -> Optional[Tuple[str, bool]]:
    """The kernel's weight input and whether it is a Const: the node's own, or a grouped-layout
    copy for depthwise; None when the node cannot be rewritten.

    A depthwise filter [kh, kw, C, m] is the grouped filter [kh, kw, 1, C*m] with C groups
    (same bytes, output channel c*m + j); only a constant filter can be re-shaped offline.
    """
    if node.op != "DepthwiseConv2dNative":
        return node.input[1], is_const(node.input[1], index)
    src = g.node_name(node.input[1])
    producer = index.nodes.get(src)
    if producer is None or producer.op != "Const":
        return None
    dims = [d.size for d in producer.attr["value"].tensor.tensor_shape.dim]
    if len(dims) != 4:
        return None
    grouped = grouped_depthwise_filter(producer, taken)
    new_consts.append(grouped)
    return grouped.name, True


def _sole_reader(node: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset) -> Optional[node_def_pb2.NodeDef]:
    """The one BF16 node on the same device that reads ``node``'s output (through a data edge on
    port 0, nothing else), when neither is protected or taken by another chain."""
    reader = sole_reader(node, index, protected)
    if reader is None or reader.name in protected or reader.attr["T"].type != g.BFLOAT16 or reader.device != node.device:
        return None
    return reader


def _grow(node: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset, shapes: "StaticShapes") -> _Chain:
    """``node`` plus, in this order, a BiasAdd, a residual Add and an activation it can absorb.

    ``protected`` holds the graph's inputs and outputs and the nodes other chains took: none
    of them joins this chain.
    """
    chain = _Chain([node])
    reader = _sole_reader(node, index, protected)
    if reader is not None and node.op == "MatMul" and keeps_last_dim(reader, node, index, shapes):
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
        other = residual_partner(reader, chain.nodes[-1].name, index, shapes, {n.name for n in chain.nodes})
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


def _bias_input(node: node_def_pb2.NodeDef, chain: _Chain, index: g.GraphIndex, shapes: "StaticShapes") -> Optional[str]:
    """The bias a BiasAdd, or an Add of a constant vector along the last dimension, applies to the chain."""
    last = chain.nodes[-1].name
    data = [s for s in node.input if not s.startswith("^")]
    if node.op in BIAS_OPS:
        ok = g.node_name(data[0]) == last and node.attr["data_format"].s in (b"", b"NHWC") and is_const(data[1], index)
        return data[1] if ok else None
    if node.op not in ADD_OPS or len(data) != 2 or [g.node_name(x) for x in data].count(last) != 1:
        return None
    other = data[1] if g.node_name(data[0]) == last else data[0]
    if not is_const(other, index):
        return None
    dims = [d.size for d in index.nodes[g.node_name(other)].attr["value"].tensor.tensor_shape.dim]
    produced = shapes.of(g.tensor_name(last))
    return other if produced and len(dims) == 1 and dims[0] == produced[-1] else None


def _kernel_nodes(chain: _Chain, weights: Tuple[str, bool], shapes: "StaticShapes") -> List[node_def_pb2.NodeDef]:
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


def _groups(conv: node_def_pb2.NodeDef, shapes: "StaticShapes") -> int:
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
