"""Calibration: run the FP32 graph on sample batches and observe the range of each tensor the
INT8 stage will quantize.

The tensors are fetched directly from one session (``quantize.calibration_tensors`` names
them), so nothing is parsed from logs. Observers: ``minmax`` (the extremes seen), ``percentile``
(|x| clipped at its 99.99th percentile over all samples seen: robust to rare outliers) and
``kl`` (TensorRT's entropy calibration: the clipping threshold whose quantized histogram, 128
levels or 256 for a tensor that never goes negative, is closest in KL divergence to the FP32
histogram of |x|).
"""

from __future__ import annotations

import time
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from tf_bf16.errors import ConfigError, EvaluationError
from tf_bf16.transforms import graph as g

ALGORITHMS = ("minmax", "percentile", "kl")
PERCENTILE = 99.99
KL_BINS = 2048
KL_LEVELS = 128      # INT8 magnitudes of a signed tensor: the quantized histogram KL compares with
KL_LEVELS_UNSIGNED = 256   # UINT8 levels of a tensor that never goes negative
KL_STRIDE = 16       # candidate thresholds every 16 bins: 121 candidates, same choice within a few %


class _MinMax:
    def __init__(self) -> None:
        self.low, self.high = np.inf, -np.inf

    def update(self, values: np.ndarray) -> None:
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))

    def result(self) -> Tuple[float, float]:
        return self.low, self.high


class _AbsHistogram:
    """Histogram of |x| over [0, the largest |x| seen], widened by merging bin pairs; plus min/max."""

    def __init__(self) -> None:
        self.minmax = _MinMax()
        self.edge = 0.0
        self.counts = np.zeros(KL_BINS, np.float64)

    def update(self, values: np.ndarray) -> None:
        self.minmax.update(values)
        magnitude = np.abs(values.astype(np.float32, copy=False)).ravel()
        top = float(magnitude.max()) if magnitude.size else 0.0
        if top <= 0.0:
            return
        if self.edge == 0.0:
            self.edge = top
        while top > self.edge:
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(axis=1), np.zeros(KL_BINS // 2)])
            self.edge *= 2.0
        self.counts += np.histogram(magnitude, bins=KL_BINS, range=(0.0, self.edge))[0]

    def clipped(self, threshold_bins: int) -> Tuple[float, float]:
        """min/max clipped to +-(the upper edge of bin ``threshold_bins``)."""
        low, high = self.minmax.result()
        if self.edge == 0.0:
            return low, high
        threshold = threshold_bins * self.edge / KL_BINS
        return max(low, -threshold), min(high, threshold)


class _Percentile(_AbsHistogram):
    """Clip |x| at the ``percentile`` of all values seen (rare outliers do not set the range)."""

    def __init__(self, percentile: float = PERCENTILE) -> None:
        super().__init__()
        self.percentile = percentile

    def result(self) -> Tuple[float, float]:
        total = self.counts.sum()
        if total <= 0:
            return self.minmax.result()
        bins = int(np.searchsorted(np.cumsum(self.counts), total * self.percentile / 100.0)) + 1
        return self.clipped(min(bins, KL_BINS))


class _Entropy(_AbsHistogram):
    """Clip |x| where the INT8 histogram is closest in KL divergence to the FP32 one."""

    def result(self) -> Tuple[float, float]:
        low, _ = self.minmax.result()
        if self.edge == 0.0:
            return self.minmax.result()
        levels = KL_LEVELS_UNSIGNED if low >= 0.0 else KL_LEVELS
        return self.clipped(_kl_threshold(self.counts, levels))


def _kl_threshold(counts: np.ndarray, levels: int = KL_LEVELS) -> int:
    """The bin count (threshold) whose clipped, ``levels``-level quantized histogram best matches ``counts``."""
    best, best_kl = len(counts), np.inf
    if counts.sum() <= 0:
        return best
    for i in range(levels, len(counts) + 1, KL_STRIDE):
        reference = counts[:i].copy()
        reference[-1] += counts[i:].sum()          # outliers clip into the last bin
        # Merge the first i bins into KL_LEVELS groups; spread each group's mass evenly over its
        # non-empty bins (what dequantizing the clipped INT8 histogram gives back).
        starts = np.linspace(0, i, levels + 1).astype(int)[:-1]
        mass = np.add.reduceat(counts[:i], starts)
        nonzero = counts[:i] > 0
        filled = np.add.reduceat(nonzero.astype(np.float64), starts)
        per_bin = np.divide(mass, filled, out=np.zeros_like(mass), where=filled > 0)
        candidate = np.repeat(per_bin, np.diff(np.append(starts, i))) * nonzero
        p = reference / reference.sum()
        q = candidate / max(candidate.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return best


def _observer(algorithm: str):
    if algorithm == "minmax":
        return _MinMax()
    if algorithm == "percentile":
        return _Percentile()
    if algorithm == "kl":
        return _Entropy()
    raise ConfigError(f"unknown calibration algorithm {algorithm!r}; allowed: {', '.join(ALGORITHMS)}")


def calibrate(graph_def, input_names: Sequence[str], tensors: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]],
              sampling_size: int, algorithm: str = "minmax",
              algorithms: Optional[Mapping[str, str]] = None) -> Dict[str, Tuple[float, float]]:
    """Tensor -> (min, max) over the first ``sampling_size`` samples of ``feeds``.

    ``feeds`` yields ``{input name: batch}``; ``algorithms`` may override ``algorithm`` per
    tensor. Progress is logged about every 10 seconds for long calibrations.
    """
    import tensorflow as tf

    if not tensors:
        return {}
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    fetches = [graph.get_tensor_by_name(g.tf_tensor_name(t)) for t in tensors]
    observers = {t: _observer((algorithms or {}).get(t, algorithm)) for t in tensors}
    seen, batches, last_log, start = 0, 0, time.perf_counter(), time.perf_counter()
    with tf.compat.v1.Session(graph=graph) as session:
        for feed in feeds:
            feed_dict = {graph.get_tensor_by_name(g.tf_tensor_name(n)): feed[n] for n in input_names}
            values = session.run(fetches, feed_dict)
            for name, value in zip(tensors, values):
                if value.size:
                    observers[name].update(np.asarray(value))
            batches += 1
            seen += len(next(iter(feed.values())))
            if time.perf_counter() - last_log > 10.0:
                logging.info("tf_bf16: calibration %d/%d samples (%d batches, %.0f s)", min(seen, sampling_size),
                             sampling_size, batches, time.perf_counter() - start)
                last_log = time.perf_counter()
            if seen >= sampling_size:
                break
    if batches == 0:
        raise EvaluationError("the calibration dataloader yielded no batches")
    logging.info("tf_bf16: calibrated %d tensors on %d samples (%s) in %.1f s", len(tensors), seen, algorithm,
                 time.perf_counter() - start)
    return {name: observer.result() for name, observer in observers.items()
            if np.isfinite(observer.result()[0])}
