"""The summarize tool: what a model contains (ops, dtypes, inputs, outputs) as a dict and as text.

``tf-bf16 inspect``, the examples and the tests share it, so the numbers a user reads are
the numbers the tests check. ``summarize`` is pure (no printing); ``format_summary`` only
formats what ``summarize`` returned (or the same dict read back from JSON).
"""

from __future__ import annotations

import collections
from typing import Any, Dict, List, Mapping, Optional, Sequence

from tensorflow.core.framework import node_def_pb2, types_pb2

from tf_bf16.capability import KernelRegistry
from tf_bf16.transforms import graph as graph_lib

NO_DTYPE = "-"
# Type attrs that say what a node computes in, in order of preference.
DTYPE_ATTRS = ("T", "dtype")


def node_dtype(node: node_def_pb2.NodeDef) -> str:
    """The dtype a node works in, from its T/dtype attr (``float32->bfloat16`` for a Cast)."""
    attrs = node.attr
    if "SrcT" in attrs and "DstT" in attrs:
        return f"{graph_lib.dtype_name(attrs['SrcT'].type)}->{graph_lib.dtype_name(attrs['DstT'].type)}"
    for key in DTYPE_ATTRS:
        if key not in attrs:
            continue
        value = attrs[key]
        if value.WhichOneof("value") == "type":
            return graph_lib.dtype_name(value.type)
        if value.WhichOneof("value") == "list" and value.list.type:
            return ",".join(sorted({graph_lib.dtype_name(t) for t in value.list.type}))
    return NO_DTYPE


def _is_float32(node: node_def_pb2.NodeDef) -> bool:
    """True when any type attr of the node is float32, i.e. a converter could retype it."""
    for value in node.attr.values():
        kind = value.WhichOneof("value")
        if (kind == "type" and value.type == types_pb2.DT_FLOAT) or (
                kind == "list" and types_pb2.DT_FLOAT in value.list.type):
            return True
    return False


def _shape_list(shape: Optional[Sequence[Optional[int]]]) -> Optional[List[Optional[int]]]:
    return None if shape is None else [None if d is None else int(d) for d in shape]


def _tensor_entries(names: Sequence[str], specs: Mapping[str, Any], index: graph_lib.GraphIndex,
                    sigs: graph_lib.OpSignatures) -> List[Dict[str, Any]]:
    """Name, signature key, dtype and shape of each tensor; the signature wins over node attrs."""
    by_tensor = {graph_lib.canonical_tensor(spec.name): (key, spec) for key, spec in specs.items()}
    entries = []
    for name in names:
        key, spec = by_tensor.get(graph_lib.canonical_tensor(name), (None, None))
        if spec is not None:
            dtype, shape = str(spec.dtype), _shape_list(spec.shape)
        else:
            dtype, shape = _graph_dtype(name, index, sigs), None
        entries.append({"name": name, "key": key, "dtype": dtype, "shape": shape})
    return entries


def _graph_dtype(name: str, index: graph_lib.GraphIndex, sigs: graph_lib.OpSignatures) -> str:
    """Dtype of a tensor from its producer's OpDef output slot (fallback when no signature)."""
    node_name, port, _ = graph_lib.parse_input(name)
    if node_name not in index:
        return NO_DTYPE
    node = index[node_name]
    slots = sigs.output_slots(node)
    if not slots or port >= len(slots):
        return node_dtype(node)
    return graph_lib.dtype_name(graph_lib.slot_dtype(node, slots[port]))


def summarize(model: Any) -> Dict[str, Any]:
    """Inventory of a ``tf_bf16.Model``: node count, per-op counts and dtypes, BF16 kernels, I/O.

    The result is JSON-serializable; ``ops`` is ordered by count (descending), then name.
    """
    graph_def = model.graph_def
    index = graph_lib.GraphIndex(graph_def)
    sigs = graph_lib.OpSignatures(graph_def)
    registry = KernelRegistry()

    counts: Dict[str, int] = collections.Counter()
    op_dtypes: Dict[str, Dict[str, int]] = collections.defaultdict(collections.Counter)
    float_nodes: Dict[str, int] = collections.Counter()
    for node in graph_def.node:
        counts[node.op] += 1
        op_dtypes[node.op][node_dtype(node)] += 1
        if _is_float32(node):
            float_nodes[node.op] += 1

    ops: Dict[str, Dict[str, Any]] = {}
    candidates = 0
    for op in sorted(counts, key=lambda o: (-counts[o], o)):
        bf16 = None
        if float_nodes[op]:
            bf16 = bool(registry.bf16_attrs(op) & registry.float_attrs(op))
            candidates += float_nodes[op] if bf16 else 0
        dtypes = dict(sorted(op_dtypes[op].items(), key=lambda kv: (-kv[1], kv[0])))
        ops[op] = {"count": counts[op], "dtypes": dtypes, "bf16_kernel": bf16}

    totals: Dict[str, int] = collections.Counter()
    for per_op in op_dtypes.values():
        totals.update(per_op)
    signature = getattr(model, "signature", None)
    return {
        "signature": getattr(signature, "key", None),
        "node_count": len(graph_def.node),
        "inputs": _tensor_entries(model.input_names, getattr(signature, "inputs", {}) or {}, index, sigs),
        "outputs": _tensor_entries(model.output_names, getattr(signature, "outputs", {}) or {}, index, sigs),
        "ops": ops,
        "dtypes": dict(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))),
        "bf16_candidates": candidates,
    }


# --------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------

def _format_shape(shape: Optional[Sequence[Optional[int]]]) -> str:
    if shape is None:
        return "<unknown rank>"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> List[str]:
    """Left-aligned columns (numbers right-aligned), trailing spaces stripped."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if cell.isdigit() else cell.ljust(w) for cell, w in zip(row, widths)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _tensor_rows(entries: Sequence[Mapping[str, Any]]) -> List[List[str]]:
    return [[e["name"], e["dtype"], _format_shape(e["shape"]),
             f"(signature key {e['key']})" if e.get("key") else ""] for e in entries]


def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable text of a ``summarize`` dict (optionally with a ``source`` entry)."""
    lines = []
    if summary.get("source"):
        lines.append(f"model: {summary['source']}")
    if summary.get("signature"):
        lines.append(f"signature: {summary['signature']}")
    lines.append(f"nodes: {summary['node_count']}")
    for title in ("inputs", "outputs"):
        entries = summary[title]
        lines.append(f"{title} ({len(entries)}):")
        if entries:
            lines.extend(_table(_tensor_rows(entries)))
    lines.append(f"ops ({len(summary['ops'])} types):")
    rows = [["op", "count", "bf16 kernel", "dtypes"]]
    for op, info in summary["ops"].items():
        bf16 = {True: "yes", False: "no", None: "-"}[info["bf16_kernel"]]
        dtypes = ", ".join(f"{d} x{n}" for d, n in info["dtypes"].items())
        rows.append([op, str(info["count"]), bf16, dtypes])
    lines.extend(_table(rows))
    lines.append("dtypes: " + ", ".join(f"{d} {n}" for d, n in summary["dtypes"].items()))
    lines.append(f"bf16: {summary['bf16_candidates']} of {summary['node_count']} nodes are float32 "
                 "ops with a BF16 CPU kernel in this TensorFlow")
    return "\n".join(lines)
