"""The conversion report: per-op-type precision counts, Casts, and every node kept FP32 with why.

Counts are taken from the output graph itself (nodes, not type attributes; every Cast
counted), so the numbers can be checked against the saved model. ``op_types`` counts the
output graph's nodes, where an INT8 stage shows as its own ops (``QuantizedConv2D...``,
``QuantizeV2``, ``Dequantize``). A quantized conversion (``build_report(..., int8_nodes=...)``)
adds ``int8``: the input model's float compute nodes per op type by the precision they ended
in (INT8 when the INT8 stage replaced them: a contraction with its fused bias, residual add
and ReLU, and the pools, reshapes and concats chained between quantized ops; BF16/FP32 when
they are in the output with that type; ``removed`` when clean-up folded them away), and the
QuantizeV2, Dequantize and Cast counts, so "Conv2D: 20 of 20 INT8" reads as the user means it.
"""

from __future__ import annotations

import collections
from typing import Any, Collection, Dict, List, Mapping, Optional

from absl import logging
from tensorflow.core.framework import graph_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.op_classes import QUANTIZE_OPS, is_int8_op

NOT_COMPUTE = ("Const", "Cast", "Placeholder", "Identity")   # nodes that only hold, move or retype values


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


def count_quantize_ops(graph_def: graph_pb2.GraphDef) -> Dict[str, int]:
    """QuantizeV2 and Dequantize nodes of a graph, Dequantizes to bfloat16 apart, and the other quantized ops."""
    ops = collections.Counter(n.op for n in graph_def.node)
    return {
        "quantize": ops["QuantizeV2"],
        "dequantize": ops["Dequantize"],
        "dequantize_to_bf16": sum(n.op == "Dequantize" and n.attr["dtype"].type == g.BFLOAT16 for n in graph_def.node),
        "quantized_ops": sum(count for op, count in ops.items() if is_int8_op(op) and op not in QUANTIZE_OPS),
    }


def _input_precisions(before: graph_pb2.GraphDef, after: graph_pb2.GraphDef,
                      int8_nodes: Collection[str]) -> Dict[str, Dict[str, int]]:
    """Per op type of ``before``'s float compute nodes: how many ended INT8, BF16, FP32 or removed."""
    before_sigs, after_sigs = g.OpSignatures(before), g.OpSignatures(after)
    by_name = {n.name: n for n in after.node}
    rows: Dict[str, Dict[str, int]] = collections.defaultdict(
        lambda: {"total": 0, "int8": 0, "bf16": 0, "fp32": 0, "removed": 0})
    for node in before.node:
        if node.op in NOT_COMPUTE or node_precision(node, before_sigs) is None:
            continue
        row = rows[node.op]
        row["total"] += 1
        if node.name in int8_nodes:
            row["int8"] += 1
        elif node.name in by_name:
            row[node_precision(by_name[node.name], after_sigs) or "fp32"] += 1
        else:
            row["removed"] += 1
    return {op: dict(row) for op, row in sorted(rows.items())}


def int8_section(before: graph_pb2.GraphDef, after: graph_pb2.GraphDef, int8_nodes: Collection[str]) -> Dict[str, Any]:
    """The report's ``int8`` part: input nodes by the precision they ended in, and the INT8 ops' counts."""
    counts = count_quantize_ops(after)
    return {"by_input_op_type": _input_precisions(before, after, frozenset(int8_nodes)),
            "replaced_nodes": len(int8_nodes), **counts, "casts": count_casts(after)["total"]}


def build_report(before: graph_pb2.GraphDef, after: graph_pb2.GraphDef,
                 fp32_reasons: Mapping[str, str], extra: Optional[Mapping[str, Any]] = None,
                 int8_nodes: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """The report dict: summary, per-op-type counts and the FP32-kept nodes of ``after``.

    ``int8_nodes`` (the float nodes an INT8 stage replaced) adds the ``int8`` section.
    """
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
            if node.op not in NOT_COMPUTE:
                compute[precision] += 1
        if precision == "fp32" and node.name in fp32_reasons:
            fp32_nodes.append({"name": node.name, "op": node.op, "reason": fp32_reasons[node.name]})
    casts_before, casts_after = count_casts(before), count_casts(after)
    quantize_ops = count_quantize_ops(after)
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
        "quantize_nodes": quantize_ops["quantize"],
        "dequantize_nodes": quantize_ops["dequantize"],
    }
    report = {"summary": summary, "op_types": {k: dict(v) for k, v in sorted(op_types.items())},
              "fp32_nodes": fp32_nodes}
    if int8_nodes is not None:
        report["int8"] = int8_section(before, after, int8_nodes)
    report.update(extra or {})
    return report


def _op_width(rows: Mapping[str, Any]) -> int:
    """The op-type column's width: 28, or wider for long names (QuantizedConv2DWithBiasAndReluAndRequantize)."""
    return max([28] + [len(op) + 2 for op in rows])


def format_report(report: Mapping[str, Any], max_fp32_rows: int = 50) -> str:
    """A 'Mixed Precision Statistics' table, the INT8 table of a quantized conversion, the FP32-kept nodes."""
    w = _op_width(report["op_types"])
    lines = ["Mixed Precision Statistics",
             f"{'Op Type':<{w}}{'Total':>7}{'BF16':>7}{'FP32':>7}{'INT8':>7}"]
    for op, row in report["op_types"].items():
        lines.append(f"{op:<{w}}{row['total']:>7}{row['bf16']:>7}{row['fp32']:>7}{row['int8']:>7}")
    s = report["summary"]
    lines.append(f"nodes {s['nodes_before']} -> {s['nodes_after']}; BF16 share of compute nodes "
                 f"{s['bf16_share']:.1%}; Casts {s['casts_after']} (added {s['casts_added']}: "
                 f"{s['casts_to_bf16']} to bf16, {s['casts_to_fp32']} to fp32)")
    if "int8" in report:
        lines += _int8_lines(report["int8"])
    rows = report.get("fp32_nodes", [])
    if rows:
        lines.append(f"Nodes kept FP32 ({len(rows)}):")
        for row in rows[:max_fp32_rows]:
            lines.append(f"  {row['name']} ({row['op']}): {row['reason']}")
        if len(rows) > max_fp32_rows:
            lines.append(f"  ... {len(rows) - max_fp32_rows} more in report['fp32_nodes']")
    return "\n".join(lines)


def _int8_lines(section: Mapping[str, Any]) -> List[str]:
    """The INT8 table (input nodes by the precision they ended in) and the quantize/dequantize/Cast line."""
    w = _op_width(section["by_input_op_type"])
    lines = ["INT8 Statistics (input model's float nodes by the precision they ended in)",
             f"{'Input Op Type':<{w}}{'Total':>7}{'INT8':>7}{'BF16':>7}{'FP32':>7}{'Removed':>9}"]
    for op, row in section["by_input_op_type"].items():
        lines.append(f"{op:<{w}}{row['total']:>7}{row['int8']:>7}{row['bf16']:>7}{row['fp32']:>7}{row['removed']:>9}")
    lines.append(f"INT8: {section['quantized_ops']} quantized ops replace {section['replaced_nodes']} float nodes; "
                 f"QuantizeV2 {section['quantize']}, Dequantize {section['dequantize']} "
                 f"({section['dequantize_to_bf16']} to bf16), Cast {section['casts']}")
    return lines


def log_report(report: Mapping[str, Any]) -> None:
    """Print the report table through absl logging."""
    for line in format_report(report).splitlines():
        logging.info(line)
