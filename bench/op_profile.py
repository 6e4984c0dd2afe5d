"""Where the run time goes: per-op-type time from RunMetadata step stats (FULL_TRACE).

``trace_variant`` runs a graph in its own session with ``RunOptions(trace_level=FULL_TRACE,
output_partition_graphs=True)`` and sums each executed node's time (``all_end_rel_micros``)
per op type and dtype, as TensorFlow actually ran it: after Grappler, so fused ops such as
``_FusedConv2D``/``_FusedMatMul`` (remapper) and the ``_Mkl*`` oneDNN ops appear as executed.

CLI: ``python -m bench.op_profile --models=resnet50,bert_base --batch=1 --threads=1``.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from typing import Any, Dict, List, Sequence

import numpy as np
from absl import app, flags

from bench import common

# Op types by what they do; contractions are found by name (Conv, MatMul, Einsum) instead.
CAST_OPS = frozenset({"Cast", "_MklCast"})
NORM_REDUCE_OPS = frozenset({"Softmax", "_MklSoftmax", "Mean", "Sum", "Max", "Min", "Prod", "FusedBatchNorm",
                             "FusedBatchNormV2", "FusedBatchNormV3", "_FusedBatchNormEx", "_MklLayerNorm",
                             "_MklFusedBatchNorm", "_MklFusedBatchNormV3", "LogSoftmax"})
ELEMENTWISE_OPS = frozenset({"Add", "AddV2", "AddN", "Sub", "Mul", "RealDiv", "Div", "BiasAdd", "Relu", "Relu6",
                             "Elu", "LeakyRelu", "Tanh", "Sigmoid", "Erf", "Rsqrt", "Sqrt", "Square",
                             "SquaredDifference", "Maximum", "Minimum", "Neg", "Exp", "Pow", "Reciprocal",
                             "_MklSwish", "_FusedAddV2", "_MklFusedMish", "Gelu", "_MklGelu", "Softplus",
                             "_MklAdd", "_MklAddV2", "_MklMul", "_MklSub", "_MklSquaredDifference",
                             "_MklMaximum", "Select", "SelectV2"})
MOVE_OPS = frozenset({"Reshape", "Transpose", "ConcatV2", "Concat", "Pad", "PadV2", "GatherV2", "Gather",
                      "StridedSlice", "Slice", "Pack", "Unpack", "Split", "SplitV", "Shape", "ExpandDims",
                      "Squeeze", "Identity", "Tile", "Fill", "Range", "_MklTranspose", "_MklConjugateTranspose",
                      "BroadcastTo", "OneHot"})
CATEGORIES = ("contraction", "cast", "elementwise", "norm_reduce", "pool", "data_movement", "other")
_DTYPE_ATTRS = ("T", "DstT", "dtype")
_SHORT = {"DT_FLOAT": "fp32", "DT_BFLOAT16": "bf16", "DT_INT32": "i32", "DT_INT64": "i64", "DT_BOOL": "bool"}


def category(op: str) -> str:
    """The category of an executed op type (see ``CATEGORIES``)."""
    if op in CAST_OPS:
        return "cast"
    if "Conv" in op or "MatMul" in op or "Einsum" in op:
        return "contraction"
    if "Pool" in op:
        return "pool"
    if op in NORM_REDUCE_OPS:
        return "norm_reduce"
    if op in ELEMENTWISE_OPS:
        return "elementwise"
    if op in MOVE_OPS:
        return "data_movement"
    return "other"


def _dtype_of(node: Any) -> str:
    """Short name of a node's main dtype attribute ('fp32', 'bf16', ...; '' when none)."""
    from tensorflow.core.framework import types_pb2

    if node.op == "Cast":
        src = types_pb2.DataType.Name(node.attr["SrcT"].type)
        dst = types_pb2.DataType.Name(node.attr["DstT"].type)
        return f"{_SHORT.get(src, src)}->{_SHORT.get(dst, dst)}"
    for attr in _DTYPE_ATTRS:
        if attr in node.attr and node.attr[attr].type:
            name = types_pb2.DataType.Name(node.attr[attr].type)
            return _SHORT.get(name, name)
    return ""


@dataclasses.dataclass
class OpSplit:
    """Per-run averages from traced runs of one graph."""

    step_ms: float                       # median wall time of the traced runs (tracing adds overhead)
    op_ms: float                         # summed node time per run
    by_op: Dict[str, Dict[str, float]]   # "op[dtype]" -> {"ms", "count"} per run
    by_category: Dict[str, float]        # category -> ms per run
    executed_casts: int                  # Cast nodes executed per run
    fused: Dict[str, int]                # executed op types starting with "_" (fused / oneDNN) -> node count

    def record(self, top: int = 15) -> Dict[str, Any]:
        """The JSON fields: totals, category split with shares, top op types, fused op counts."""
        total = self.op_ms or 1.0
        cats = {c: {"ms": round(self.by_category.get(c, 0.0), 3),
                    "share": round(self.by_category.get(c, 0.0) / total, 4)} for c in CATEGORIES}
        ranked = sorted(self.by_op.items(), key=lambda kv: -kv[1]["ms"])[:top]
        return {"step_ms_traced": round(self.step_ms, 3), "op_ms": round(self.op_ms, 3), "categories": cats,
                "top_ops": [{"op": k, "ms": round(v["ms"], 3), "count": v["count"]} for k, v in ranked],
                "executed_casts": self.executed_casts, "fused_ops": dict(sorted(self.fused.items()))}


def trace_variant(graph_def: Any, input_names: Sequence[str], output_names: Sequence[str],
                  feeds: Sequence[np.ndarray], config: Any, runs: int = 5, warmup: int = 2) -> OpSplit:
    """Run ``graph_def`` ``warmup`` times, then ``runs`` traced times; average the step stats."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    fetches = [_tensor(n) for n in output_names]
    feed_dict = {_tensor(n): v for n, v in zip(input_names, feeds)}
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE, output_partition_graphs=True)
    by_op: Dict[str, Dict[str, float]] = collections.defaultdict(lambda: {"ms": 0.0, "count": 0})
    walls: List[float] = []
    node_info: Dict[str, Any] = {}
    fused_labels: Dict[str, str] = {}
    with tf.compat.v1.Session(graph=graph, config=config) as sess:
        for _ in range(warmup):
            sess.run(fetches, feed_dict)
        for _ in range(runs):
            meta = tf.compat.v1.RunMetadata()
            start = time.perf_counter()
            sess.run(fetches, feed_dict, options=options, run_metadata=meta)
            walls.append((time.perf_counter() - start) * 1e3)
            if not node_info:
                node_info = {n.name: (n.op, _dtype_of(n)) for g in meta.partition_graphs for n in g.node}
                fused_labels = {n.name: _fusion_label(n) for g in meta.partition_graphs for n in g.node
                                if n.op.startswith("_") and category(n.op) != "other"}
            for dev in meta.step_stats.dev_stats:
                for ns in dev.node_stats:
                    op, dtype = node_info.get(ns.node_name, (_label_op(ns.timeline_label, ns.node_name), ""))
                    key = f"{op}[{dtype}]" if dtype else op
                    by_op[key]["ms"] += ns.all_end_rel_micros / 1e3
                    by_op[key]["count"] += 1
    per_run = {k: {"ms": v["ms"] / runs, "count": int(v["count"] // runs)} for k, v in by_op.items()}
    cats: Dict[str, float] = collections.defaultdict(float)
    for key, value in per_run.items():
        cats[category(key.split("[")[0])] += value["ms"]
    fused = collections.Counter(label for label in fused_labels.values())
    casts = sum(v["count"] for k, v in per_run.items() if k.split("[")[0] in CAST_OPS)
    return OpSplit(statistics.median(walls), sum(v["ms"] for v in per_run.values()), dict(per_run), dict(cats),
                   casts, dict(fused))


def _fusion_label(node: Any) -> str:
    """A fused op with what it fused and its dtype: ``_MklNativeFusedMatMul[BiasAdd,GeluExact](bf16)``."""
    parts = [s.decode() for s in node.attr["fused_ops"].list.s] if "fused_ops" in node.attr else []
    dtype = _dtype_of(node)
    return node.op + (f"[{','.join(parts)}]" if parts else "") + (f"({dtype})" if dtype else "")


def _label_op(label: str, name: str) -> str:
    """Op type from a step-stats timeline label ``"name = Op(inputs)"``; the node name if absent."""
    if " = " in label:
        return label.split(" = ", 1)[1].split("(", 1)[0]
    return name


def _tensor(name: str) -> str:
    """A tensor name with an explicit port."""
    return name if ":" in name else f"{name}:0"


# ------------------------------------------------------------------------------ CLI

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags of the standalone CLI."""
    flags.DEFINE_list("models", ["resnet50", "bert_base"], "Models to profile (bench.models_zoo.MODELS).")
    flags.DEFINE_list("variants", ["fp32", "tf_amp", "tf_bf16"], "Variants to profile (bench.variants.VARIANTS).")
    flags.DEFINE_integer("batch", 1, "Batch size.")
    flags.DEFINE_integer("threads", 1, "intra_op_parallelism_threads (inter-op is 1).")
    flags.DEFINE_integer("runs", 5, "Traced runs averaged per variant.")
    flags.DEFINE_integer("bert_layers", 4, "Encoder layers of the BERT-base-like model.")
    flags.DEFINE_integer("bert_vocab", 30522, "Vocabulary of the BERT-base-like model.")
    flags.DEFINE_bool("trained_like", True, "Randomise constant-initialised weights (see bench.models_zoo).")
    flags.DEFINE_string("out", None, "Also write the JSON lines to this file.")


def profile_records(host: common.HostInfo, model_name: str, batch: int, threads: int,
                    variants: Sequence[Any], feeds: Sequence[np.ndarray], runs: int) -> List[Dict[str, Any]]:
    """One JSON record per variant with its per-op-type split (shared with ``bench.models --trace``)."""
    records = []
    for v in variants:
        if not hasattr(v.model, "graph_def"):
            continue   # not a TensorFlow graph (OpenVINO): no step stats to split
        config = common.session_config(threads, amp_runtime=v.amp_runtime)
        split = trace_variant(v.model.graph_def, v.model.input_names, v.model.output_names, feeds, config, runs)
        records.append({**host.fields(), "kind": "op_profile", "model": model_name, "batch": batch,
                        "threads": threads, "variant": v.name, "traced_runs": runs, **split.record()})
    return records


def main(argv: Sequence[str]) -> None:
    """Profile every requested model and variant; print one JSON line each."""
    del argv
    common.configure_env()
    import keras

    from bench import models_zoo, variants as variants_lib
    import tf_bf16

    host = common.host_info()
    with common.JsonLines(FLAGS.out) as out:
        for name in FLAGS.models:
            keras_model = models_zoo.build(name, FLAGS.bert_layers, FLAGS.bert_vocab, FLAGS.trained_like)
            feeds = models_zoo.sample_inputs(keras_model, FLAGS.batch)
            model = tf_bf16.Model(keras_model)
            built = [variants_lib.make(v, model) for v in FLAGS.variants]
            for record in profile_records(host, name, FLAGS.batch, FLAGS.threads, built, feeds, FLAGS.runs):
                out.emit(record)
            keras.backend.clear_session()


if __name__ == "__main__":
    define_flags()
    app.run(main)
