"""transpose_matmul: fold Transposes of the two innermost dimensions into MatMul/BatchMatMul's adjoint attrs.

TensorFlow lowers Keras' attention einsums into BatchMatMulV2 with Transposes around them:
in a BERT-like layer the attention scores are computed as ``BMM(K, Q^T)`` and then transposed,
which moves the largest tensor of the layer ([batch, heads, seq, seq]) once more. A matmul
reads either operand transposed for free (``adj_x``/``adj_y``, ``transpose_a``/``transpose_b``),
so three rewrites apply, each exact:

* ``Transpose(BMM(a, b), swap last two)`` -> ``BMM(b, a)`` with the adjoints swapped and
  flipped, because (AB)^T = B^T A^T;
* a Transpose that only swaps the last two dimensions of an operand -> the operand itself
  with that adjoint flipped;
* an adjoint operand produced by a Transpose that moves the last dimension (e.g. [0,2,3,1])
  -> the Transpose composed with the swap (e.g. [0,2,1,3]), which keeps rows contiguous, and
  no adjoint.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.patterns import data_readers

# op -> (adjoint attr of operand 0, of operand 1); BatchMatMulV3 also types each operand.
ADJOINT_ATTRS = {
    "MatMul": ("transpose_a", "transpose_b"),
    "BatchMatMul": ("adj_x", "adj_y"),
    "BatchMatMulV2": ("adj_x", "adj_y"),
    "BatchMatMulV3": ("adj_x", "adj_y"),
}
OPERAND_TYPE_ATTRS = ("Ta", "Tb")   # BatchMatMulV3 only


def transpose_matmul(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Remove Transposes of the innermost two dimensions around matmuls (see the module docstring)."""
    protected = frozenset(context.plan.protected)
    out = _swap_transposed_products(graph_def, protected)
    return _fold_operand_transposes(out, protected)


def _swap_transposed_products(graph_def: graph_pb2.GraphDef, protected: frozenset) -> graph_pb2.GraphDef:
    """Transpose(matmul(a, b), swap) -> matmul(b, a) with adjoints swapped and flipped, named as the Transpose."""
    out = g.copy_graph(graph_def)
    index = g.GraphIndex(out)
    dropped = set()
    for node in out.node:
        if node.op != "Transpose" or not _is_swap(_perm(node, index)):
            continue
        product = index.nodes.get(g.node_name(node.input[0]))
        if product is None or product.op not in ADJOINT_ATTRS or g.parse_input(node.input[0])[1] != 0:
            continue
        if data_readers(product, index, protected) != [node] or product.device != node.device:
            continue
        if product.op == "MatMul" and len(_perm(node, index)) != 2:
            continue
        controls = [s for s in list(product.input) + list(node.input) if s.startswith("^")]
        a, b = [s for s in product.input if not s.startswith("^")]
        swapped = node_def_pb2.NodeDef(name=node.name, op=product.op, device=node.device)
        swapped.input.extend([b, a] + sorted(set(controls)))
        for key, value in product.attr.items():
            swapped.attr[key].CopyFrom(value)
        first, second = ADJOINT_ATTRS[product.op]
        swapped.attr[first].b = not product.attr[second].b
        swapped.attr[second].b = not product.attr[first].b
        if product.op == "BatchMatMulV3":
            ta, tb = OPERAND_TYPE_ATTRS
            swapped.attr[ta].type, swapped.attr[tb].type = product.attr[tb].type, product.attr[ta].type
        node.CopyFrom(swapped)
        dropped.add(product.name)
    if not dropped:
        return out
    return g.rebuild(out, [n for n in out.node if n.name not in dropped])


def _fold_operand_transposes(graph_def: graph_pb2.GraphDef, protected: frozenset) -> graph_pb2.GraphDef:
    """Operand Transposes that swap the last two dims -> adjoint flags; adjoint of a last-dim-moving
    Transpose -> a row-preserving Transpose without the flag."""
    out = g.copy_graph(graph_def)
    index = g.GraphIndex(out)
    added: List[node_def_pb2.NodeDef] = []
    taken = dict(index.nodes)
    changed = False
    for node in list(out.node):
        if node.op not in ADJOINT_ATTRS:
            continue
        for slot, attr in enumerate(ADJOINT_ATTRS[node.op]):
            transpose = _operand_transpose(node, slot, index)
            if transpose is None:
                continue
            perm = _perm(transpose, index)
            if _is_swap(perm):
                node.input[slot] = transpose.input[0]
                node.attr[attr].b = not node.attr[attr].b
                changed = True
            elif node.attr[attr].b and perm[-1] != len(perm) - 1 and perm[-2] == len(perm) - 1:
                composed = list(perm[:-2]) + [perm[-1], perm[-2]]
                replacement = _transpose(transpose, composed, taken)
                added.extend(replacement)
                node.input[slot] = replacement[-1].name
                node.attr[attr].b = False
                changed = True
    if not changed:
        return graph_def
    return g.rebuild(out, list(out.node) + added)


def _operand_transpose(node: node_def_pb2.NodeDef, slot: int, index: g.GraphIndex) -> Optional[node_def_pb2.NodeDef]:
    """The Transpose (with a constant perm, on the same device) feeding data input ``slot``, or None."""
    data = [s for s in node.input if not s.startswith("^")]
    if slot >= len(data) or g.parse_input(data[slot])[1] != 0:
        return None
    producer = index.nodes.get(g.node_name(data[slot]))
    if producer is None or producer.op != "Transpose" or producer.device != node.device:
        return None
    if any(s.startswith("^") for s in producer.input) or _perm(producer, index) is None:
        return None
    return producer


def _transpose(like: node_def_pb2.NodeDef, perm: List[int], taken: dict) -> Tuple[node_def_pb2.NodeDef, ...]:
    """A new Transpose of ``like``'s input by ``perm`` (and its perm Const), with fresh names."""
    perm_const = g.make_const(g.unique_name(taken, f"{like.name}/rows_perm"), np.array(perm, np.int32),
                              device=like.device)
    taken[perm_const.name] = perm_const
    node = g.make_node("Transpose", g.unique_name(taken, f"{like.name}/rows"), [like.input[0], perm_const.name],
                       device=like.device)
    node.attr["T"].CopyFrom(like.attr["T"])
    node.attr["Tperm"].type = perm_const.attr["dtype"].type
    taken[node.name] = node
    return perm_const, node


def _perm(transpose: node_def_pb2.NodeDef, index: g.GraphIndex) -> Optional[List[int]]:
    """A Transpose's permutation when it is a Const, else None."""
    if len(transpose.input) < 2:
        return None
    const = index.nodes.get(g.node_name(transpose.input[1]))
    if const is None or const.op != "Const":
        return None
    return [int(v) for v in np.asarray(g.const_value(const)).reshape(-1)]


def _is_swap(perm: Optional[List[int]]) -> bool:
    """Whether ``perm`` keeps every dimension but swaps the last two."""
    if perm is None or len(perm) < 2:
        return False
    n = len(perm)
    return perm == list(range(n - 2)) + [n - 1, n - 2]
