"""sink_reshapes: move a MatMul's Reshape behind its bias and activation, so they fuse.

Keras' Dense on a 3-D input (every BERT projection and feed-forward layer) is written
MatMul -> Reshape -> BiasAdd -> activation. TensorFlow's remapper fuses MatMul + BiasAdd
(+ Relu, GELU ...) into one oneDNN ``_FusedMatMul`` only when they are adjacent, so these
MatMuls run alone and their bias and GELU run as separate element-wise kernels. When the
Reshape keeps the last dimension, a per-column bias and an element-wise activation give the
same values before or after it, so this pass reorders the chain to MatMul -> BiasAdd ->
activation -> Reshape; the Reshape takes the last node's name, so every consumer stays valid.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set

from tensorflow.core.framework import graph_pb2, node_def_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.patterns import (BIAS_OPS, StaticShapes, activation_region, is_const, keeps_last_dim,
                                         sole_reader)
# Single-op activations TensorFlow's remapper fuses into a MatMul.
ACTIVATIONS = frozenset({"Relu", "Relu6", "Elu", "LeakyRelu", "Tanh", "Sigmoid"})


def sink_reshapes(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Reorder MatMul -> Reshape -> BiasAdd [-> activation] to MatMul -> BiasAdd [-> activation] -> Reshape."""
    out = g.copy_graph(graph_def)
    index = g.GraphIndex(out)
    protected = context.plan.protected
    shapes = StaticShapes(graph_def)
    taken: Dict[str, object] = dict(index.nodes)   # names in use, including the ones this pass adds
    moved: Dict[str, node_def_pb2.NodeDef] = {}    # last node's old name -> the Reshape that takes it
    dropped: Set[str] = set()
    for node in list(out.node):
        if node.op != "MatMul" or node.name in protected:
            continue
        chain = _chain(node, index, protected, shapes)
        if chain is None:
            continue
        reshape, bias, last = chain
        bias.input[0] = node.name
        new_name = g.unique_name(taken, f"{last.name}/before_reshape")
        taken[new_name] = last
        sunk = node_def_pb2.NodeDef()
        sunk.CopyFrom(reshape)
        sunk.name = last.name
        sunk.input[0] = new_name
        moved[last.name] = sunk
        dropped.add(reshape.name)
    if not moved:
        return graph_def
    nodes: List[node_def_pb2.NodeDef] = []
    for node in out.node:
        if node.name in dropped:
            continue
        sunk = moved.get(node.name)
        if sunk is not None:
            node.name = sunk.input[0]
            nodes.extend([node, sunk])
        else:
            nodes.append(node)
    return g.rebuild(out, nodes)


def _chain(matmul: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset,
           shapes: StaticShapes) -> Optional[tuple]:
    """(Reshape, BiasAdd, last node) of a MatMul whose epilogue can move ahead of its Reshape."""
    reshape = sole_reader(matmul, index, protected)
    if reshape is None or not keeps_last_dim(reshape, matmul, index, shapes):
        return None
    bias = sole_reader(reshape, index, protected)
    if bias is None or bias.op not in BIAS_OPS or bias.attr["data_format"].s not in (b"", b"NHWC") \
            or not is_const(bias.input[1], index) or g.node_name(bias.input[0]) != reshape.name:
        return None
    last = bias
    reader = sole_reader(bias, index, protected)
    if reader is not None and reader.op in ACTIVATIONS:
        last = reader
    else:
        region = activation_region(bias, index, protected, dtype=bias.attr["T"].type)
        if region is not None and region.nodes[0].op != "Cast":
            last = region.nodes[-1]
    if last.name in protected or index.control_consumers(last.name):
        return None
    return reshape, bias, last
