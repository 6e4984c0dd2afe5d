"""Helpers every benchmark shares: environment, host facts, session configs, statistics, JSON output.

TensorFlow is imported lazily inside functions, so ``configure_env`` can run first (oneDNN and
TensorFlow's AMP pass need ``TF_ENABLE_ONEDNN_OPTS=1`` before TensorFlow is imported).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from typing import Any, Dict, IO, Mapping, Optional, Sequence

import numpy as np

EIGEN_NOTE = ("BF16 runs through TensorFlow's Eigen fallback on this CPU; expect it slower than FP32")

# Environment every benchmark needs; values already set by the caller win.
_ENV_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "1"}


def configure_env() -> None:
    """Set the TensorFlow environment defaults; call before TensorFlow is imported."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "tensorflow" in sys.modules and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "1":
        raise RuntimeError("TensorFlow was imported before TF_ENABLE_ONEDNN_OPTS=1 was set")


def repo_root() -> str:
    """The repository root (the folder above ``bench/``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tests_module(name: str) -> Any:
    """``tests.<name>`` (the shared model and graph builders), importable from a checkout that is not installed."""
    import importlib

    root = repo_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"tests.{name}")


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """What a measurement ran on; ``note`` warns when BF16 has no hardware support."""

    date: str
    cpu: str
    avx512_bf16: bool
    amx_bf16: bool
    tf_version: str
    note: Optional[str]

    def fields(self) -> Dict[str, Any]:
        """The host fields every JSON line carries (``note`` only when set)."""
        out = {"date": self.date, "cpu": self.cpu, "avx512_bf16": self.avx512_bf16,
               "amx_bf16": self.amx_bf16, "tf_version": self.tf_version}
        if self.note:
            out["note"] = self.note
        return out


def host_info() -> HostInfo:
    """CPU model and BF16 flags (from /proc/cpuinfo via tf_bf16.capability) and TensorFlow's version."""
    import tensorflow as tf
    from tf_bf16.capability import detect_cpu_features

    cpu = detect_cpu_features()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    note = None if cpu.avx512_bf16 or cpu.amx_bf16 else EIGEN_NOTE
    return HostInfo(now, cpu.model_name, cpu.avx512_bf16, cpu.amx_bf16, tf.__version__, note)


def cpu_slug(cpu: str) -> str:
    """A file-name-safe short form of a CPU model name ("AMD EPYC" -> "amd-epyc")."""
    keep = "".join(c.lower() if c.isalnum() else "-" for c in cpu)
    return "-".join(part for part in keep.split("-") if part) or "unknown-cpu"


def session_config(threads: int, amp_runtime: bool = False) -> Any:
    """ConfigProto with ``threads`` intra-op threads and one inter-op thread.

    ``amp_runtime`` also turns on TensorFlow's Grappler ``auto_mixed_precision_onednn_bfloat16``
    pass inside the session (what a user of a frozen graph gets from TF alone).
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import rewriter_config_pb2

    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1)
    if amp_runtime:
        config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = (
            rewriter_config_pb2.RewriterConfig.ON)
    return config


def percentiles(times_ms: Sequence[float]) -> Dict[str, float]:
    """Median, 10th and 90th percentile of run times in milliseconds, rounded to 0.01 ms."""
    arr = np.asarray(times_ms, dtype=np.float64)
    return {"median_ms": round(float(np.median(arr)), 3), "p10_ms": round(float(np.percentile(arr, 10)), 3),
            "p90_ms": round(float(np.percentile(arr, 90)), 3)}


def max_rel_err(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Max over outputs of max|y - y_ref| / max|y_ref| (0 for identical outputs)."""
    worst = 0.0
    for ref, out in zip(reference, outputs):
        ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
        err = float(np.max(np.abs(out64 - ref64))) if ref64.size else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


class JsonLines:
    """Prints each record as one JSON line to stdout (unless ``echo`` is False) and to ``path`` if given.

    The file is truncated when opened and flushed after every line, so a run cut short keeps
    what it measured.
    """

    def __init__(self, path: Optional[str] = None, echo: bool = True):
        """Open ``path`` (truncating it) when given."""
        self._echo = echo
        self._file: Optional[IO[str]] = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "w", encoding="utf-8")

    def emit(self, record: Mapping[str, Any]) -> None:
        """Write one record."""
        line = json.dumps(record, sort_keys=False, allow_nan=False)
        if self._echo:
            print(line, flush=True)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        """Close the file, if any."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "JsonLines":
        """Use as a context manager that closes the file."""
        return self

    def __exit__(self, *exc: Any) -> None:
        """Close the file."""
        self.close()
