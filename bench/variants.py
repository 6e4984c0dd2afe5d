"""The model variants the benchmarks compare, each a ``tf_bf16.Model`` plus how it was made.

* ``fp32``: the frozen graph as loaded.
* ``fp32_cleaned``: tf_bf16's FP32 clean-up alone (``pipeline.clean_up``: strip, identities,
  constants, BatchNorm folding), to separate what clean-up gains from what BF16 gains.
* ``tf_amp``: TensorFlow's own Grappler ``auto_mixed_precision_onednn_bfloat16`` pass applied
  offline (``tf_bf16.tf_amp.tf_amp_bf16``), run as a plain graph.
* ``tf_amp_runtime``: the FP32 graph run with that pass switched on in the session config
  (what a user gets from TensorFlow alone); its counts are not known offline.
* ``tf_bf16``: ``build_plan`` + ``pipeline.convert_graph`` (what ``MixedPrecision()`` does
  without tuning data; called directly so the benchmark host needs no PyYAML).
* ``tf_bf16_int8``: the three stages (INT8 generation calibrated with minmax on
  ``INT8_CALIBRATION_BATCHES`` random batches of ``INT8_CALIBRATION_BATCH`` samples, then BF16,
  then cast folding): what ``Quantization()`` does without tuning data. Its convert seconds
  include calibration. Needs oneDNN on (the bench turns it on).
* ``tf_bf16_int8_kernels``: ``tf_bf16_int8`` with ``kernels=True``: the quantized ops become
  tf_bf16's INT8 kernel ops (QuantizeV2/Dequantize folded in), only where the library is built.
* ``tf_bf16_kernels``: ``tf_bf16`` with ``kernels=True`` (tf_bf16's fused oneDNN ops), only where
  the kernel library is built (``python -m tf_bf16.kernels.build``).
* ``inc``: Intel Neural Compressor 3.x (``neural-compressor-tf``) BF16 rewrite, only where it
  is installed: its pre-optimization, then its ``BF16Convert`` on every node of the op types its
  own capability table lists as BF16 for this TensorFlow version.
* ``inc_int8``: Neural Compressor 3.x INT8 for stock TensorFlow (``quantize_model`` with
  ``StaticQuantConfig()``), calibrated on the same random batches, only where it is installed.
* ``openvino_f32`` / ``openvino_bf16``: OpenVINO (PyPI ``openvino``, a benchmark-only extra)
  reading the same frozen FP32 GraphDef, compiled for the CPU with ``INFERENCE_PRECISION_HINT``
  f32 / bf16 and the session's intra-op thread count; only where ``openvino`` imports.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

VARIANTS = ("fp32", "fp32_cleaned", "tf_amp", "tf_amp_runtime", "tf_bf16", "tf_bf16_int8", "tf_bf16_int8_kernels",
            "tf_bf16_kernels", "inc", "inc_int8", "openvino_f32", "openvino_bf16")
INT8_CALIBRATION_BATCHES, INT8_CALIBRATION_BATCH = 2, 4


@dataclasses.dataclass
class Variant:
    """One runnable variant: its model, whether the session turns TF's AMP on, and its counts."""

    name: str
    model: Any                      # tf_bf16.Model
    summary: Optional[Dict[str, Any]]
    convert_seconds: Optional[float]
    amp_runtime: bool = False
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def counts(self) -> Dict[str, Any]:
        """casts, bf16_share and nodes of the graph this variant runs (None when unknown)."""
        s = self.summary or {}
        return {"casts": s.get("casts_after"), "bf16_share": s.get("bf16_share"), "nodes": s.get("nodes_after")}


def _summary(before: Any, after: Any) -> Dict[str, Any]:
    """tf_bf16's report summary (Casts, BF16 share, nodes) of ``after``."""
    from tf_bf16.report import build_report

    return build_report(before, after, {})["summary"]


def fp32(model: Any) -> Variant:
    """The FP32 baseline."""
    return Variant("fp32", model, _summary(model.graph_def, model.graph_def), None)


def fp32_cleaned(model: Any) -> Variant:
    """tf_bf16's generic FP32 clean-up only (no BF16)."""
    from tf_bf16 import pipeline
    from tf_bf16.plan_builder import build_plan

    start = time.perf_counter()
    graph_def = pipeline.clean_up(model.graph_def, build_plan(model.graph_def, model.input_names, model.output_names))
    seconds = time.perf_counter() - start
    return Variant("fp32_cleaned", model.with_graph_def(graph_def), _summary(model.graph_def, graph_def), seconds)


def tf_amp(model: Any) -> Variant:
    """TensorFlow's AMP pass applied offline (constant folding on, as the runtime pass gets it)."""
    from tf_bf16.tf_amp import tf_amp_bf16

    start = time.perf_counter()
    graph_def = tf_amp_bf16(model.graph_def, model.output_names, constant_folding=True)
    seconds = time.perf_counter() - start
    return Variant("tf_amp", model.with_graph_def(graph_def), _summary(model.graph_def, graph_def), seconds)


def tf_amp_runtime(model: Any) -> Variant:
    """The FP32 graph with TensorFlow's AMP pass on in the session."""
    return Variant("tf_amp_runtime", model.with_graph_def(model.graph_def), None, None, amp_runtime=True)


def tf_bf16(model: Any, kernels: bool = False) -> Variant:
    """tf_bf16's pipeline with the default plan for this TensorFlow's kernels."""
    from tf_bf16 import pipeline
    from tf_bf16.plan_builder import build_plan

    start = time.perf_counter()
    plan = build_plan(model.graph_def, model.input_names, model.output_names)
    result = pipeline.convert_graph(model.graph_def, plan, kernels=kernels)
    seconds = time.perf_counter() - start
    stages = {k: round(v, 3) for k, v in result.seconds.items()}
    extra = {"convert_stages": stages, **({"kernel_nodes": result.kernel_nodes} if kernels else {})}
    return Variant("tf_bf16_kernels" if kernels else "tf_bf16", model.with_graph_def(result.graph_def),
                   _summary(model.graph_def, result.graph_def), seconds, extra=extra)


def _calibration_feeds(model: Any) -> Any:
    """``INT8_CALIBRATION_BATCHES`` seeded random batches ({input name: array}) for INT8 calibration."""
    from bench.common import tests_module

    zoo = tests_module("zoo")
    return [dict(zip(model.input_names, zoo.sample_inputs(model, batch=INT8_CALIBRATION_BATCH, seed=100 + i)))
            for i in range(INT8_CALIBRATION_BATCHES)]


def tf_bf16_int8(model: Any, kernels: bool = False) -> Variant:
    """Clean-up, minmax calibration on random inputs, then INT8 + BF16 + cast folding (+ the kernel rewrite)."""
    from tf_bf16 import calibration, pipeline
    from tf_bf16.capability import detect_cpu_features
    from tf_bf16.plan_builder import build_plan
    from tf_bf16.transforms.plan import QuantizationSpec
    from tf_bf16.transforms.quantize import calibration_tensors

    feeds = _calibration_feeds(model)
    start = time.perf_counter()
    plan = build_plan(model.graph_def, model.input_names, model.output_names)
    cleaned = pipeline.clean_up(model.graph_def, plan)
    t_clean = time.perf_counter()
    ranges = calibration.calibrate(cleaned, model.input_names, calibration_tensors(cleaned, plan), feeds,
                                   INT8_CALIBRATION_BATCHES * INT8_CALIBRATION_BATCH)
    t_calib = time.perf_counter()
    spec = QuantizationSpec(ranges, weight_max=detect_cpu_features().int8_weight_max)
    result = pipeline.convert_cleaned(cleaned, dataclasses.replace(plan, quantization=spec), kernels=kernels)
    seconds = time.perf_counter() - start
    ops = [n.op for n in result.graph_def.node]
    extra = {"convert_stages": {"clean_up": round(t_clean - start, 3), "calibration": round(t_calib - t_clean, 3),
                                "convert": round(seconds - (t_calib - start), 3)},
             "int8_nodes": len(result.int8_nodes), "quantize_v2": ops.count("QuantizeV2"),
             "dequantize": ops.count("Dequantize"), **({"kernel_nodes": result.kernel_nodes} if kernels else {})}
    return Variant("tf_bf16_int8_kernels" if kernels else "tf_bf16_int8", model.with_graph_def(result.graph_def),
                   _summary(model.graph_def, result.graph_def), seconds, extra=extra)


def kernels_available() -> Tuple[bool, str]:
    """Whether tf_bf16's kernel library loads here, and why not."""
    from tf_bf16 import kernels

    if kernels.load_kernels() is None:
        return False, f"{kernels.library_path()} is not built or does not load"
    return True, ""


def openvino_available() -> Tuple[bool, str]:
    """Whether OpenVINO imports, and its version or why not."""
    try:
        openvino = importlib.import_module("openvino")
        return True, str(openvino.__version__)
    except Exception as exc:  # noqa: BLE001 - any import failure just means "no OpenVINO column"
        return False, f"{type(exc).__name__}: {exc}"


class OpenVinoModel:
    """A frozen GraphDef compiled by OpenVINO, run like ``tf_bf16.Model`` (feeds in input order).

    Compiled on the first ``run``, with the thread count of the session config the benchmark
    passes there, so it runs under the same thread budget as the TensorFlow variants.
    """

    def __init__(self, model: Any, precision: str):
        self.model = model
        self.precision = precision
        self._compiled = None

    def _compile(self, threads: int) -> Any:
        import tempfile

        import openvino as ov

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pb")
            with open(path, "wb") as f:
                f.write(self.model.graph_def.SerializeToString())
            converted = ov.convert_model(path, input=[f"{name}:0" for name in self.model.input_names],
                                         output=[name if ":" in name else f"{name}:0" for name in self.model.output_names])
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        return ov.Core().compile_model(converted, "CPU", config)

    def run(self, feeds: Any, session_config: Any = None) -> Any:
        if self._compiled is None:
            threads = getattr(session_config, "intra_op_parallelism_threads", 0) if session_config else 0
            self._compiled = self._compile(int(threads))
        result = self._compiled(list(feeds))
        return [result[i] for i in range(len(self.model.output_names))]

    def close(self) -> None:
        """Drop the compiled model."""
        self._compiled = None


def openvino(model: Any, precision: str) -> Variant:
    """OpenVINO on the FP32 frozen graph with the given inference precision hint (f32 or bf16)."""
    _, version = openvino_available()
    return Variant(f"openvino_{precision}", OpenVinoModel(model, precision), None, None,
                   extra={"openvino_version": version})


def inc_available() -> Tuple[bool, str]:
    """Whether Intel Neural Compressor 3.x for TensorFlow can be imported, and its version or why not."""
    try:
        importlib.import_module("neural_compressor.tensorflow")
        from importlib import metadata
        return True, metadata.version("neural-compressor-tf")
    except Exception as exc:  # noqa: BLE001 - any import failure just means "no INC column"
        return False, f"{type(exc).__name__}: {exc}"


def inc(model: Any) -> Variant:
    """Neural Compressor 3.x's BF16 rewrite (pre-optimization + BF16Convert on its BF16 op types)."""
    from neural_compressor.tensorflow.algorithms.static_quant import tensorflow as inc_tf
    from neural_compressor.tensorflow.quantization.utils.graph_rewriter.bf16.bf16_convert import BF16Convert
    from neural_compressor.tensorflow.quantization.utils.graph_rewriter.generic.pre_optimize import PreOptimization
    from neural_compressor.tensorflow.utils import Model as IncModel

    logging.getLogger("neural_compressor").setLevel(logging.WARNING)  # its per-pass INFO lines (stderr)

    _, version = inc_available()
    start = time.perf_counter()
    wrapped = IncModel(model.graph_def)
    wrapped.input_tensor_names = list(model.input_names)
    wrapped.output_tensor_names = [name.split(":")[0] for name in model.output_names]
    optimized = PreOptimization(wrapped, new_api=False, device="cpu").get_optimized_model()
    table = os.path.join(os.path.dirname(inc_tf.__file__), "tensorflow.yaml")
    op_types = set(inc_tf.TensorflowQuery(local_config_file=table).get_op_types_by_precision("bf16"))
    names = [n.name for n in optimized.graph_def.node if n.op in op_types]
    graph_def = BF16Convert(optimized.graph_def, [], names).do_transformation()
    seconds = time.perf_counter() - start
    return Variant("inc", model.with_graph_def(graph_def), _summary(model.graph_def, graph_def), seconds,
                   extra={"inc_version": version, "inc_bf16_op_types": sorted(op_types)})


class _IncCalibration:
    """Neural Compressor's calibration dataloader protocol: ``batch_size`` and (inputs, label) pairs."""

    def __init__(self, feeds: Any, input_names: Any):
        self.feeds = [[feed[name] for name in input_names] for feed in feeds]
        self.batch_size = len(self.feeds[0][0])

    def __iter__(self):
        for inputs in self.feeds:
            yield (inputs[0] if len(inputs) == 1 else inputs), 0


def inc_int8(model: Any) -> Variant:
    """Neural Compressor 3.x INT8 (``quantize_model(graph, StaticQuantConfig(), calib)``), calibrated on the
    same random batches as ``tf_bf16_int8``."""
    from neural_compressor.tensorflow import StaticQuantConfig, quantize_model
    from neural_compressor.tensorflow.utils import Model as IncModel

    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    _, version = inc_available()
    wrapped = IncModel(model.graph_def)
    wrapped.input_tensor_names = list(model.input_names)
    wrapped.output_tensor_names = [name.split(":")[0] for name in model.output_names]
    start = time.perf_counter()
    quantized = quantize_model(wrapped, StaticQuantConfig(), _IncCalibration(_calibration_feeds(model), model.input_names),
                               calib_iteration=INT8_CALIBRATION_BATCHES)
    seconds = time.perf_counter() - start
    graph_def = quantized.graph_def
    ops = [n.op for n in graph_def.node]
    return Variant("inc_int8", model.with_graph_def(graph_def), _summary(model.graph_def, graph_def), seconds,
                   extra={"inc_version": version, "quantize_v2": ops.count("QuantizeV2"),
                          "dequantize": ops.count("Dequantize")})


BUILDERS: Mapping[str, Callable[[Any], Variant]] = {
    "fp32": fp32, "fp32_cleaned": fp32_cleaned, "tf_amp": tf_amp, "tf_amp_runtime": tf_amp_runtime, "tf_bf16": tf_bf16,
    "tf_bf16_int8": tf_bf16_int8, "tf_bf16_int8_kernels": lambda model: tf_bf16_int8(model, kernels=True),
    "tf_bf16_kernels": lambda model: tf_bf16(model, kernels=True), "inc": inc, "inc_int8": inc_int8,
    "openvino_f32": lambda model: openvino(model, "f32"), "openvino_bf16": lambda model: openvino(model, "bf16")}
# Variants that need an optional package: name -> check returning (available, version or reason).
OPTIONAL: Mapping[str, Callable[[], Tuple[bool, str]]] = {
    "inc": inc_available, "inc_int8": inc_available, "tf_bf16_kernels": kernels_available,
    "tf_bf16_int8_kernels": kernels_available,
    "openvino_f32": openvino_available, "openvino_bf16": openvino_available}


def make(name: str, model: Any) -> Variant:
    """Build variant ``name`` of the FP32 ``model``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return BUILDERS[name](model)
