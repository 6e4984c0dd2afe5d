"""Tests for tf_bf16/report.py: precision of a node, Cast counts and the report of a real conversion.

The report's numbers are checked against the converted GraphDef as TensorFlow itself types it
(the dtypes of each imported op's tensors), not against the report's own helpers.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Dict, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

from tests import zoo  # noqa: E402
from tf_bf16 import MixedPrecision, Model  # noqa: E402
from tf_bf16 import report as report_lib  # noqa: E402
from tf_bf16.transforms import graph as g  # noqa: E402

# Nodes the summary does not count as compute (they only hold, move or retype values).
NOT_COMPUTE = ("Const", "Cast", "Placeholder", "Identity")
FORCED = "conv2"


def _tf_precisions(graph_def: graph_pb2.GraphDef) -> Dict[str, Optional[str]]:
    """Per node, from TensorFlow's own tensor dtypes: 'bf16' if any tensor is bfloat16, else 'fp32' if any is float32."""
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    out = {}
    for op in graph.get_operations():
        dtypes = {t.dtype for t in list(op.inputs) + list(op.outputs)}
        out[op.name] = "bf16" if tf.bfloat16 in dtypes else "fp32" if tf.float32 in dtypes else None
    return out


def _convert(conf=None) -> Model:
    converter = MixedPrecision(conf, env={"FORCE_BF16": "1"})
    converter.model = Model(zoo.three_conv_graph(), inputs=["input"], outputs=["final"])
    return converter()


@pytest.fixture(scope="module")
def converted() -> Model:
    """The three-conv graph (conv, bias, relu x2, a Log deny op, conv) converted to BF16."""
    return _convert()


@pytest.fixture(scope="module")
def forced() -> Model:
    """The same graph with one conv forced FP32 through the config's op_wise section."""
    return _convert({"mixed_precision": {"op_wise": {FORCED: {"activation": {"dtype": ["fp32"]}}}}})


def test_node_precision_by_type_attributes():
    """bf16/fp32 follow a node's float type attrs (Consts by dtype), quantize ops are int8, integer nodes None."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 2], name="x")
        i = tf.compat.v1.placeholder(tf.int32, [2], name="i")
        lo, hi = tf.constant(0.0, name="lo"), tf.constant(1.0, name="hi")
        q = tf.raw_ops.QuantizeV2(input=x, min_range=lo, max_range=hi, T=tf.qint8, name="quant")
        tf.raw_ops.Dequantize(input=q.output, min_range=q.output_min, max_range=q.output_max, name="dequant")
        tf.add(i, i, name="iadd")
        tf.constant([1, 2], name="iconst")
        tf.cast(i, tf.float32, name="icast")
        b = tf.constant([[1.0, 2.0], [3.0, 4.0]], dtype=tf.bfloat16, name="bconst")
        tf.matmul(tf.cast(x, tf.bfloat16, name="to_bf16"), b, name="bmm")
    gd = graph.as_graph_def()
    sigs = g.OpSignatures(gd)
    got = {n.name: report_lib.node_precision(n, sigs) for n in gd.node}
    assert got == {"x": "fp32", "i": None, "lo": "fp32", "hi": "fp32", "quant": "int8", "dequant": "int8",
                   "iadd": None, "iconst": None, "icast": "fp32", "bconst": "bf16", "to_bf16": "bf16", "bmm": "bf16"}


def test_node_precision_agrees_with_tensorflow_dtypes(converted):
    """On a converted graph every node's precision equals what TensorFlow's tensor dtypes say."""
    gd = converted.graph_def
    sigs = g.OpSignatures(gd)
    assert {n.name: report_lib.node_precision(n, sigs) for n in gd.node} == _tf_precisions(gd)


def test_count_casts_by_direction():
    """Every Cast is counted; only float32->bfloat16 and bfloat16->float32 ones count as a direction."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        i = tf.compat.v1.placeholder(tf.int32, [2], name="i")
        down = tf.cast(x, tf.bfloat16, name="down")
        tf.cast(x + 1.0, tf.bfloat16, name="down2")
        tf.cast(down, tf.float32, name="up")
        tf.cast(i, tf.float32, name="int_to_float")
        tf.cast(x, tf.int32, name="float_to_int")
        tf.cast(x, tf.float16, name="to_half")
    assert report_lib.count_casts(graph.as_graph_def()) == {"total": 6, "to_bf16": 2, "to_fp32": 1}
    assert report_lib.count_casts(graph_pb2.GraphDef()) == {"total": 0, "to_bf16": 0, "to_fp32": 0}


def test_summary_matches_the_converted_graph(converted):
    """Node, Cast and bf16/fp32 compute counts in the summary equal counts taken from the output graph."""
    before, after = zoo.three_conv_graph(), converted.graph_def
    summary = converted.report["summary"]
    casts = [n for n in after.node if n.op == "Cast"]
    directions = collections.Counter((n.attr["SrcT"].type, n.attr["DstT"].type) for n in casts)
    precisions = _tf_precisions(after)
    compute = collections.Counter(precisions[n.name] for n in after.node if n.op not in NOT_COMPUTE)
    assert summary["nodes_before"] == len(before.node)
    assert summary["nodes_after"] == len(after.node)
    assert summary["casts_before"] == sum(n.op == "Cast" for n in before.node) == 0
    assert summary["casts_after"] == len(casts) == summary["casts_added"]
    assert summary["casts_to_bf16"] == directions[(g.FLOAT, g.BFLOAT16)]
    assert summary["casts_to_fp32"] == directions[(g.BFLOAT16, g.FLOAT)]
    assert summary["casts_to_bf16"] + summary["casts_to_fp32"] == len(casts)
    assert summary["bf16_nodes"] == compute["bf16"] > 0
    assert summary["fp32_nodes"] == compute["fp32"] > 0
    assert summary["int8_nodes"] == 0
    assert summary["bf16_share"] == pytest.approx(compute["bf16"] / (compute["bf16"] + compute["fp32"]), abs=1e-4)


def test_op_type_rows_match_the_converted_graph(converted):
    """Each op type's total/bf16/fp32 counts equal those of the output graph as TensorFlow types it."""
    after = converted.graph_def
    precisions = _tf_precisions(after)
    expected: Dict[str, Dict[str, int]] = {}
    for node in after.node:
        row = expected.setdefault(node.op, {"total": 0, "bf16": 0, "fp32": 0, "int8": 0})
        row["total"] += 1
        if precisions[node.name]:
            row[precisions[node.name]] += 1
    assert converted.report["op_types"] == expected
    assert expected["Conv2D"] == {"total": 3, "bf16": 3, "fp32": 0, "int8": 0}
    assert expected["Log"]["fp32"] == 1


def test_fp32_rows_carry_reasons(converted):
    """Every FP32 compute node is listed once with a non-empty reason; no BF16 node is listed."""
    after = converted.graph_def
    precisions = _tf_precisions(after)
    ops = {n.name: n.op for n in after.node}
    rows = converted.report["fp32_nodes"]
    listed = [row["name"] for row in rows]
    assert len(listed) == len(set(listed))
    for row in rows:
        assert precisions[row["name"]] == "fp32" and row["op"] == ops[row["name"]]
        assert isinstance(row["reason"], str) and row["reason"]
    fp32_compute = {n.name for n in after.node if n.op not in ("Const", "Cast", "Placeholder")
                    and precisions[n.name] == "fp32"}
    assert fp32_compute <= set(listed)
    reasons = {row["name"]: row["reason"] for row in rows}
    assert "Log" in reasons["log1"]  # the deny-listed op says which op it is


def test_forced_node_reported_with_its_reason(converted, forced):
    """A conv forced FP32 by config shows up FP32 in the counts and names the config as its reason."""
    assert FORCED not in {row["name"] for row in converted.report["fp32_nodes"]}
    reasons = {row["name"]: row["reason"] for row in forced.report["fp32_nodes"]}
    assert "forced" in reasons[FORCED]
    conv = forced.report["op_types"]["Conv2D"]
    assert (conv["bf16"], conv["fp32"]) == (2, 1)
    assert forced.report["summary"]["bf16_nodes"] < converted.report["summary"]["bf16_nodes"]
    x = np.random.RandomState(0).rand(1, 4, 4, 3).astype(np.float32)
    assert forced.run([x])[0].dtype == np.float32


def test_build_report_on_an_fp32_graph():
    """Unconverted: no BF16, no Casts; reasons only for FP32 nodes in the graph are listed; extra keys are merged."""
    gd = zoo.three_conv_graph()
    reasons = {"log1": "deny", "relu": "why not", "ghost": "not in the graph"}
    report = report_lib.build_report(gd, gd, reasons, {"precisions": ["fp32"]})
    summary = report["summary"]
    assert summary["nodes_before"] == summary["nodes_after"] == len(gd.node)
    assert summary["bf16_nodes"] == 0 and summary["bf16_share"] == 0.0
    assert summary["casts_after"] == summary["casts_added"] == 0
    assert summary["fp32_nodes"] == sum(n.op not in NOT_COMPUTE for n in gd.node)
    assert [(r["name"], r["reason"]) for r in report["fp32_nodes"]] == [("relu", "why not"), ("log1", "deny")]
    assert report["precisions"] == ["fp32"]


def test_build_report_ignores_reasons_for_bf16_nodes(converted):
    """A reason given for a node that ended up BF16 does not list it as FP32."""
    after = converted.graph_def
    report = report_lib.build_report(zoo.three_conv_graph(), after, {"conv1": "stale", "log1": "deny"})
    assert [r["name"] for r in report["fp32_nodes"]] == ["log1"]


def test_build_report_on_an_empty_graph():
    """An empty graph gives zero counts and a 0.0 BF16 share, not a division error."""
    report = report_lib.build_report(graph_pb2.GraphDef(), graph_pb2.GraphDef(), {})
    assert report["summary"]["bf16_share"] == 0.0 and report["op_types"] == {} and report["fp32_nodes"] == []


def _fp32_row_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("  ") and "): " in line]


def test_format_report_table_and_rows(forced):
    """The text has the title, one row per op type with its counts, the Cast summary and every FP32 row."""
    report = forced.report
    text = report_lib.format_report(report)
    lines = text.splitlines()
    assert lines[0] == "Mixed Precision Statistics"
    for op, row in report["op_types"].items():
        matching = [line.split() for line in lines if line.split()[:1] == [op]]
        assert matching == [[op, str(row["total"]), str(row["bf16"]), str(row["fp32"]), str(row["int8"])]]
    assert f"Casts {report['summary']['casts_after']}" in text
    rows = report["fp32_nodes"]
    assert f"Nodes kept FP32 ({len(rows)}):" in text
    assert len(_fp32_row_lines(text)) == len(rows)
    assert all(f"{r['name']} ({r['op']}): {r['reason']}" in text for r in rows)
    assert "more in report" not in text


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_format_report_truncates_fp32_rows(forced, limit):
    """With max_fp32_rows below the row count, only that many rows print plus a '... N more' line."""
    rows = forced.report["fp32_nodes"]
    assert len(rows) > limit
    text = report_lib.format_report(forced.report, max_fp32_rows=limit)
    printed = _fp32_row_lines(text)
    assert printed == [f"  {r['name']} ({r['op']}): {r['reason']}" for r in rows[:limit]]
    assert text.splitlines()[-1] == f"  ... {len(rows) - limit} more in report['fp32_nodes']"
    assert f"Nodes kept FP32 ({len(rows)}):" in text


def test_format_report_without_fp32_rows():
    """A report with no FP32-kept nodes prints no FP32 section."""
    gd = zoo.three_conv_graph()
    text = report_lib.format_report(report_lib.build_report(gd, gd, {}))
    assert "Nodes kept FP32" not in text and _fp32_row_lines(text) == []


def test_log_report_logs_each_line(converted, caplog):
    """log_report sends every line of the formatted report to absl logging at INFO."""
    with caplog.at_level(logging.INFO, logger="absl"):
        report_lib.log_report(converted.report)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert logged == report_lib.format_report(converted.report).splitlines()


# ---------------------------------------------------------------------- INT8 counts

def test_count_quantize_ops():
    """QuantizeV2, Dequantize (to bf16 apart) and the other quantized ops are counted from the graph."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 4, 4, 1], name="x")
        lo, hi = tf.constant(0.0, name="lo"), tf.constant(1.0, name="hi")
        q = tf.raw_ops.QuantizeV2(input=x, min_range=lo, max_range=hi, T=tf.quint8, name="quant")
        pooled = tf.raw_ops.QuantizedMaxPool(input=q.output, min_input=q.output_min, max_input=q.output_max,
                                             ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID", name="pool")
        tf.raw_ops.Dequantize(input=pooled.output, min_range=pooled.min_output, max_range=pooled.max_output,
                              dtype=tf.bfloat16, name="to_bf16")
        tf.raw_ops.Dequantize(input=q.output, min_range=q.output_min, max_range=q.output_max, name="to_fp32")
    counts = report_lib.count_quantize_ops(graph.as_graph_def())
    assert counts == {"quantize": 1, "dequantize": 2, "dequantize_to_bf16": 1, "quantized_ops": 1}
    summary = report_lib.build_report(graph.as_graph_def(), graph.as_graph_def(), {})["summary"]
    assert (summary["quantize_nodes"], summary["dequantize_nodes"]) == (1, 2)


def test_int8_section_counts_input_nodes_by_the_precision_they_ended_in(converted):
    """Replaced nodes count INT8, the others by their precision in the output, removed ones as removed."""
    before, after = zoo.three_conv_graph(), converted.graph_def
    extra = tf.Graph()
    with extra.as_default():   # a float node that is not in the output at all (as clean-up folds BatchNorm)
        tf.raw_ops.Mul(x=tf.constant(1.0, name="a"), y=tf.constant(2.0, name="b"), name="folded_mul")
    before.node.extend(n for n in extra.as_graph_def().node if n.op == "Mul")
    replaced = {"conv1", "conv1_bias_add", "relu"}
    report = report_lib.build_report(before, after, {}, int8_nodes=replaced)
    rows = report["int8"]["by_input_op_type"]
    precisions = _tf_precisions(after)
    bf16_convs = sum(precisions[n.name] == "bf16" for n in after.node if n.op == "Conv2D" and n.name not in replaced)
    assert rows["Conv2D"] == {"total": 3, "int8": 1, "bf16": bf16_convs, "fp32": 2 - bf16_convs, "removed": 0}
    assert rows["Log"] == {"total": 1, "int8": 0, "bf16": 0, "fp32": 1, "removed": 0}
    assert rows["Mul"] == {"total": 1, "int8": 0, "bf16": 0, "fp32": 0, "removed": 1}
    assert "Identity" not in rows and "Const" not in rows and "Placeholder" not in rows   # not compute nodes
    assert report["int8"]["replaced_nodes"] == 3
    assert report["int8"]["casts"] == report["summary"]["casts_after"]
    lines = report_lib.format_report(report).splitlines()
    int8_table = lines[next(i for i, line in enumerate(lines) if line.startswith("INT8 Statistics")):]
    assert [line.split() for line in int8_table if line.split()[:1] == ["Conv2D"]] == \
        [["Conv2D", "3", "1", str(bf16_convs), str(2 - bf16_convs), "0"]]
    assert any("QuantizeV2 0, Dequantize 0 (0 to bf16)" in line for line in int8_table)
    assert "int8" not in converted.report          # a BF16-only conversion has no INT8 section
    assert "INT8 Statistics" not in report_lib.format_report(converted.report)
