"""The conversion report: per-op-type precision counts, Casts, and every node kept FP32 with why.

Counts are taken from the output graph itself (nodes, not type attributes; every Cast
counted), so the numbers can be checked against the saved model.
"""

from __future__ import annotations

import collections
from typing import Any, Dict, List, Mapping, Optional

from absl import logging
from tensorflow.core.framework import graph_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.op_classes import is_int8_op


def node_precision(node, sigs: g.OpSignatures) -> Optional[str]:
    """'bf16', 'int8' or 'fp32' for a node by its type attributes; None for non-float nodes."""
    if node.op == "Const":
        types = [node.attr["dtype"].type]
    else:
        types = [g.slot_dtype(node, s) for s in sigs.type_attrs(node)]
    if is_int8_op(node.op):
        return "int8"
    if g.BFLOAT16 in types:
        return "bf16"
    if g.FLOAT in types:
        return "fp32"
    return None


def count_casts(graph_def: graph_pb2.GraphDef) -> Dict[str, int]:
    """Cast nodes in a graph, in total and by direction between float32 and bfloat16."""
    out = {"total": 0, "to_bf16": 0, "to_fp32": 0}
    for node in graph_def.node:
        if node.op != "Cast":
            continue
        out["total"] += 1
        src, dst = node.attr["SrcT"].type, node.attr["DstT"].type
        if dst == g.BFLOAT16:
            out["to_bf16"] += 1
        elif dst == g.FLOAT and src == g.BFLOAT16:
            out["to_fp32"] += 1
    return out


def build_report(before: graph_pb2.GraphDef, after: graph_pb2.GraphDef,
                 fp32_reasons: Mapping[str, str], extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The report dict: summary, per-op-type counts and the FP32-kept nodes of ``after``."""
    sigs = g.OpSignatures(after)
    op_types: Dict[str, Dict[str, int]] = collections.defaultdict(
        lambda: {"total": 0, "bf16": 0, "fp32": 0, "int8": 0})
    compute = collections.Counter()
    fp32_nodes: List[Dict[str, str]] = []
    for node in after.node:
        row = op_types[node.op]
        row["total"] += 1
        precision = node_precision(node, sigs)
        if precision:
            row[precision] += 1
            if node.op not in ("Const", "Cast", "Placeholder", "Identity"):
                compute[precision] += 1
        if precision == "fp32" and node.name in fp32_reasons:
            fp32_nodes.append({"name": node.name, "op": node.op, "reason": fp32_reasons[node.name]})
    casts_before, casts_after = count_casts(before), count_casts(after)
    float_compute = compute["bf16"] + compute["fp32"] + compute["int8"]
    summary = {
        "nodes_before": len(before.node),
        "nodes_after": len(after.node),
        "bf16_nodes": compute["bf16"],
        "fp32_nodes": compute["fp32"],
        "int8_nodes": compute["int8"],
        "bf16_share": round(compute["bf16"] / float_compute, 4) if float_compute else 0.0,
        "casts_before": casts_before["total"],
        "casts_after": casts_after["total"],
        "casts_added": casts_after["total"] - casts_before["total"],
        "casts_to_bf16": casts_after["to_bf16"],
        "casts_to_fp32": casts_after["to_fp32"],
    }
    report = {"summary": summary, "op_types": {k: dict(v) for k, v in sorted(op_types.items())},
              "fp32_nodes": fp32_nodes}
    report.update(extra or {})
    return report


def format_report(report: Mapping[str, Any], max_fp32_rows: int = 50) -> str:
    """A 'Mixed Precision Statistics' table plus the FP32-kept nodes, as text."""
    lines = ["Mixed Precision Statistics",
             f"{'Op Type':<28}{'Total':>7}{'BF16':>7}{'FP32':>7}{'INT8':>7}"]
    for op, row in report["op_types"].items():
        lines.append(f"{op:<28}{row['total']:>7}{row['bf16']:>7}{row['fp32']:>7}{row['int8']:>7}")
    s = report["summary"]
    lines.append(f"nodes {s['nodes_before']} -> {s['nodes_after']}; BF16 share of compute nodes "
                 f"{s['bf16_share']:.1%}; Casts {s['casts_after']} (added {s['casts_added']}: "
                 f"{s['casts_to_bf16']} to bf16, {s['casts_to_fp32']} to fp32)")
    rows = report.get("fp32_nodes", [])
    if rows:
        lines.append(f"Nodes kept FP32 ({len(rows)}):")
        for row in rows[:max_fp32_rows]:
            lines.append(f"  {row['name']} ({row['op']}): {row['reason']}")
        if len(rows) > max_fp32_rows:
            lines.append(f"  ... {len(rows) - max_fp32_rows} more in report['fp32_nodes']")
    return "\n".join(lines)


def log_report(report: Mapping[str, Any]) -> None:
    """Print the report table through absl logging."""
    for line in format_report(report).splitlines():
        logging.info(line)
