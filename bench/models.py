"""Model benchmark: FP32 vs TensorFlow's AMP vs tf_bf16 (vs Neural Compressor, where installed).

For each model and batch size every variant runs in its own session with a fixed thread count;
after warm-up the variants are timed interleaved (A B C, then C B A, ...) so drift hits all of
them alike, and one JSON line per variant gives the median, p10/p90, the ratio to FP32 from the
same run, Cast count, BF16 share, node count, conversion time and max relative error vs FP32.

    python -m bench.models --models=resnet50,mobilenetv2,bert_base --batches=1 --threads=1 --runs=10
"""

from __future__ import annotations

import gc
import time
from typing import Any, Dict, List, Sequence

import numpy as np
from absl import app, flags, logging

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet50", "mobilenetv2", "bert_base"], "Models: resnet50, mobilenetv2, bert_base.")
flags.DEFINE_list("batches", ["1"], "Batch sizes (the SPR recipe uses 1,32).")
flags.DEFINE_integer("threads", 1, "intra_op_parallelism_threads; inter-op is always 1.")
flags.DEFINE_integer("runs", 10, "Timed runs per variant (median reported).", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed runs per variant and batch before timing.", lower_bound=1)
flags.DEFINE_integer("bert_layers", 4, "Encoder layers of the BERT-base-like model (hidden 768, 12 heads, "
                     "intermediate 3072, sequence 128).")
flags.DEFINE_integer("bert_vocab", 30522, "Vocabulary (embedding rows) of the BERT-base-like model.")
flags.DEFINE_bool("trained_like", True, "Give biases and BatchNorm/LayerNorm weights seeded random values, so "
                  "Grappler cannot delete them as x+0 / x*1 (see bench.models_zoo.make_trained_like).")
flags.DEFINE_list("variants", ["fp32", "tf_amp", "tf_bf16", "tf_bf16_kernels", "inc", "openvino_f32", "openvino_bf16"],
                  "Variants: fp32, fp32_cleaned, tf_amp, tf_amp_runtime, tf_bf16, tf_bf16_kernels, inc, openvino_f32, "
                  "openvino_bf16 (tf_bf16_kernels, inc and openvino_* are skipped where the kernel library, "
                  "neural-compressor-tf or openvino is missing). fp32 is always run.")
flags.DEFINE_string("out", None, "Also write the JSON lines to this file (truncated first).")
flags.DEFINE_string("trace_out", None, "If set, also write per-op-type step-stats splits (bench.op_profile) "
                    "of every variant for the batches in --trace_batches to this file.")
flags.DEFINE_list("trace_batches", ["1"], "Batch sizes to trace when --trace_out is set.")
flags.DEFINE_integer("trace_runs", 3, "Traced runs averaged per variant.")


def time_interleaved(variants: Sequence[Any], feeds: Sequence[np.ndarray], threads: int, runs: int,
                     warmup: int) -> Dict[str, Any]:
    """Warm every variant up, then time them interleaved; returns run times and first outputs.

    Returns ``{"times": {name: [ms, ...]}, "outputs": {name: [arrays]}}``.
    """
    outputs: Dict[str, List[np.ndarray]] = {}
    for v in variants:
        config = common.session_config(threads, amp_runtime=v.amp_runtime)
        outputs[v.name] = v.model.run(feeds, session_config=config)  # first run builds the session
        for _ in range(warmup - 1):
            v.model.run(feeds)
    times: Dict[str, List[float]] = {v.name: [] for v in variants}
    gc.collect()
    gc.disable()
    try:
        for rep in range(runs):
            for v in (variants if rep % 2 == 0 else list(reversed(variants))):
                start = time.perf_counter()
                v.model.run(feeds)
                times[v.name].append((time.perf_counter() - start) * 1e3)
    finally:
        gc.enable()
    return {"times": times, "outputs": outputs}


def records_for(host: common.HostInfo, model_name: str, batch: int, threads: int, variants: Sequence[Any],
                measured: Dict[str, Any], trained_like: bool = True) -> List[Dict[str, Any]]:
    """One JSON record per variant, with ratios to the FP32 median of the same run."""
    stats = {name: common.percentiles(t) for name, t in measured["times"].items()}
    fp32_ms = stats["fp32"]["median_ms"]
    reference = measured["outputs"]["fp32"]
    records = []
    for v in variants:
        record = {**host.fields(), "kind": "model", "model": model_name, "batch": batch, "threads": threads,
                  "trained_like": trained_like,
                  "variant": v.name, "runs": len(measured["times"][v.name]), **stats[v.name],
                  "ratio_vs_fp32": round(fp32_ms / stats[v.name]["median_ms"], 4),
                  **v.counts(),
                  "convert_seconds": None if v.convert_seconds is None else round(v.convert_seconds, 3),
                  "max_rel_err": float(f"{common.max_rel_err(reference, measured['outputs'][v.name]):.3g}")}
        record.update(v.extra)
        records.append(record)
    return records


def build_variants(model: Any, names: Sequence[str]) -> List[Any]:
    """fp32 first, then the requested variants that can be built here (optional ones only where installed)."""
    from bench import variants as variants_lib

    wanted = ["fp32"] + [n for n in names if n != "fp32"]
    built = []
    for name in wanted:
        if name in variants_lib.OPTIONAL:
            ok, why = variants_lib.OPTIONAL[name]()
            if not ok:
                logging.info("skipping variant %s: %s", name, why)
                continue
        start = time.perf_counter()
        built.append(variants_lib.make(name, model))
        logging.info("built variant %s in %.1fs", name, time.perf_counter() - start)
    return built


def main(argv: Sequence[str]) -> None:
    """Build, convert and time every model; print one JSON line per model, batch and variant."""
    del argv
    common.configure_env()
    import keras

    from bench import models_zoo, op_profile
    import tf_bf16

    from bench.variants import VARIANTS

    unknown = [n for n in FLAGS.variants if n not in VARIANTS]
    if unknown:
        raise app.UsageError(f"unknown variant(s) {unknown}")
    batches = [int(b) for b in FLAGS.batches]
    trace_batches = {int(b) for b in FLAGS.trace_batches}
    host = common.host_info()
    if host.note:
        logging.warning("%s", host.note)
    trace = common.JsonLines(FLAGS.trace_out, echo=False) if FLAGS.trace_out else None
    with common.JsonLines(FLAGS.out) as out:
        for name in FLAGS.models:
            start = time.perf_counter()
            keras_model = models_zoo.build(name, FLAGS.bert_layers, FLAGS.bert_vocab, FLAGS.trained_like)
            model = tf_bf16.Model(keras_model)
            logging.info("%s: built and frozen in %.1fs (%d nodes)", name, time.perf_counter() - start,
                         len(model.graph_def.node))
            variants = build_variants(model, FLAGS.variants)
            for batch in batches:
                feeds = models_zoo.sample_inputs(keras_model, batch)
                measured = time_interleaved(variants, feeds, FLAGS.threads, FLAGS.runs, FLAGS.warmup)
                for record in records_for(host, name, batch, FLAGS.threads, variants, measured, FLAGS.trained_like):
                    out.emit(record)
                if trace is not None and batch in trace_batches:
                    for record in op_profile.profile_records(host, name, batch, FLAGS.threads, variants, feeds,
                                                             FLAGS.trace_runs):
                        trace.emit(record)
            for v in variants:
                v.model.close()
            del keras_model, model, variants
            keras.backend.clear_session()
            gc.collect()
    if trace is not None:
        trace.close()


if __name__ == "__main__":
    app.run(main)
