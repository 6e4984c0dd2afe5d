"""Cast folding, the third stage: leave only the Casts a mixed-precision graph really needs.

Three exact rewrites, repeated until none applies:
* a Cast of a Cast whose first step loses nothing (bf16->fp32->bf16, bool/int8->fp32->bf16)
  becomes one Cast, or nothing when it converts back to the original dtype;
* Casts of the same tensor to the same dtype are merged into one;
* a Cast of a Const becomes a Const of the target dtype (unless the Const is a declared
  graph input, which callers feed);
* a Cast to bfloat16 of a float ``Dequantize`` becomes a ``Dequantize`` straight to bfloat16
  (INT8 values dequantize to BF16 with one rounding either way).
Nodes left without consumers by these rewrites are removed. Graph inputs and outputs keep
their names and dtypes.
"""

from __future__ import annotations

from typing import Dict, Set, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2, types_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import TransformContext

# (from, to) conversions that are exact for every value, so a following Cast may start
# from the original dtype instead.
_EXACT_WIDENING = {
    (types_pb2.DT_BFLOAT16, types_pb2.DT_FLOAT), (types_pb2.DT_HALF, types_pb2.DT_FLOAT),
    (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE), (types_pb2.DT_BFLOAT16, types_pb2.DT_DOUBLE),
}
for _small in (types_pb2.DT_BOOL, types_pb2.DT_INT8, types_pb2.DT_UINT8, types_pb2.DT_INT16, types_pb2.DT_UINT16):
    _EXACT_WIDENING.add((_small, types_pb2.DT_FLOAT))
    _EXACT_WIDENING.add((_small, types_pb2.DT_DOUBLE))
_EXACT_WIDENING = frozenset(_EXACT_WIDENING)


def fold_casts(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Apply the exact Cast rewrites until the graph stops changing."""
    plan = context.plan
    out = g.copy_graph(graph_def)
    protected = plan.protected
    while True:
        changed = _fold_cast_chains(out, protected)
        changed |= _merge_duplicate_casts(out, protected)
        changed |= _fold_const_casts(out, protected)
        changed |= _fold_dequantize_casts(out, protected)
        if not changed:
            break
        out = _drop_dead(out, protected, plan.outputs)
    return out


def _cast_types(node) -> Tuple[int, int]:
    return node.attr["SrcT"].type, node.attr["DstT"].type


def _rewire(graph_def: graph_pb2.GraphDef, replace: Dict[str, str]) -> None:
    """Point every data input that reads a key of ``replace`` (port 0) at its value."""
    if not replace:
        return
    for node in graph_def.node:
        for i, spec in enumerate(node.input):
            if spec in replace:
                node.input[i] = replace[spec]
            elif spec.endswith(":0") and spec[:-2] in replace:
                node.input[i] = replace[spec[:-2]]


def _casts_of(graph_def: graph_pb2.GraphDef, protected, producer_op: str):
    """(Cast, producer) pairs where an unprotected Cast reads output 0 of a ``producer_op`` node."""
    nodes = {n.name: n for n in graph_def.node}
    for node in list(graph_def.node):
        if node.op != "Cast" or node.name in protected or not node.input:
            continue
        src, port, _ = g.parse_input(node.input[0])
        producer = nodes.get(src)
        if producer is not None and producer.op == producer_op and port == 0:
            yield node, producer


def _fold_cast_chains(graph_def: graph_pb2.GraphDef, protected) -> bool:
    replace: Dict[str, str] = {}
    changed = False
    for node, first in _casts_of(graph_def, protected, "Cast"):
        a, b = _cast_types(first)
        b2, c = _cast_types(node)
        if b != b2 or (a, b) not in _EXACT_WIDENING:
            continue
        if a == c:
            # x -> wider -> x: the pair is the identity; consumers read x directly.
            replace[node.name] = first.input[0]
        else:
            node.input[0] = first.input[0]
            node.attr["SrcT"].type = a
        changed = True
    _rewire(graph_def, replace)
    return changed or bool(replace)


def _merge_duplicate_casts(graph_def: graph_pb2.GraphDef, protected) -> bool:
    keep: Dict[Tuple[str, int, int, bool, str], str] = {}
    replace: Dict[str, str] = {}
    for node in graph_def.node:
        if node.op != "Cast" or node.name in protected or not node.input:
            continue
        ctrl = ",".join(sorted(s for s in node.input[1:] if s.startswith("^")))
        key = (g.canonical_tensor(node.input[0]), *_cast_types(node), node.attr["Truncate"].b, ctrl)
        if key in keep:
            replace[node.name] = keep[key]
        else:
            keep[key] = node.name
    _rewire(graph_def, replace)
    return bool(replace)


def _fold_const_casts(graph_def: graph_pb2.GraphDef, protected) -> bool:
    """Turn Const->Cast into a Const of the Cast's dtype, named like the Cast."""
    from tensorflow.python.framework import dtypes

    changed = False
    for node, const in _casts_of(graph_def, protected, "Const"):
        # A Const declared as a graph input is fed at run time: its Cast must stay.
        if const.name in protected or any(s.startswith("^") for s in node.input[1:]):
            continue
        dst = node.attr["DstT"].type
        value = g.const_value(const)
        if dst == types_pb2.DT_BFLOAT16:
            folded = g.make_const(node.name, value.astype(np.float32), g.BFLOAT16, device=node.device)
        else:
            np_dtype = dtypes.as_dtype(dst).as_numpy_dtype
            folded = g.make_const(node.name, value.astype(np_dtype), dst, device=node.device)
        node.op = "Const"
        del node.input[:]
        node.attr.clear()
        node.attr["dtype"].CopyFrom(folded.attr["dtype"])
        node.attr["value"].CopyFrom(folded.attr["value"])
        changed = True
    return changed


def _fold_dequantize_casts(graph_def: graph_pb2.GraphDef, protected) -> bool:
    """Turn Dequantize(dtype=float)->Cast(bf16) into Dequantize(dtype=bf16), named like the Cast."""
    changed = False
    for node, dequantize in _casts_of(graph_def, protected, "Dequantize"):
        if _cast_types(node) != (types_pb2.DT_FLOAT, types_pb2.DT_BFLOAT16) or \
                dequantize.attr["dtype"].type != types_pb2.DT_FLOAT:
            continue
        controls = [s for s in node.input[1:] if s.startswith("^")]
        node.op = "Dequantize"
        del node.input[:]
        node.input.extend(list(dequantize.input) + controls)
        node.attr.clear()
        for key, value in dequantize.attr.items():
            node.attr[key].CopyFrom(value)
        node.attr["dtype"].type = types_pb2.DT_BFLOAT16
        changed = True
    return changed


def _drop_dead(graph_def: graph_pb2.GraphDef, protected, outputs) -> graph_pb2.GraphDef:
    """Remove nodes that nothing reads any more and that are not inputs or outputs."""
    index = g.GraphIndex(graph_def)
    live: Set[str] = g.reachable_from(index, list(outputs)) if outputs else set(index.nodes)
    live |= set(protected)
    return g.rebuild(graph_def, (n for n in graph_def.node if n.name in live))
