"""Tests for tf_bf16/calibration.py: range observers over fetched tensors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_bf16 import calibration
from tf_bf16.errors import ConfigError, EvaluationError


def _graph():
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 64], name="x")
        tf.nn.relu(x, name="relu")
        tf.multiply(x, 2.0, name="double")
    return graph.as_graph_def()


def _feeds(batches, rng=None, outlier=None):
    rng = rng or np.random.default_rng(0)
    for i in range(batches):
        x = rng.standard_normal((16, 64)).astype(np.float32)
        if outlier is not None and i == 0:
            x[0, 0] = outlier
        yield {"x": x}


def test_minmax_sees_the_extremes_of_every_fetched_tensor():
    data = list(_feeds(3))
    ranges = calibration.calibrate(_graph(), ["x"], ["x", "relu", "double"], data, 48, "minmax")
    stacked = np.concatenate([d["x"] for d in data])
    assert ranges["x"] == pytest.approx((stacked.min(), stacked.max()))
    assert ranges["relu"] == pytest.approx((0.0, stacked.max()))
    assert ranges["double"] == pytest.approx((2 * stacked.min(), 2 * stacked.max()))


def test_sampling_size_stops_early():
    seen = []

    def feeds():
        for feed in _feeds(10):
            seen.append(1)
            yield feed

    calibration.calibrate(_graph(), ["x"], ["x"], feeds(), 32, "minmax")
    assert len(seen) == 2          # 2 batches of 16 samples


@pytest.mark.parametrize("algorithm", ["percentile", "kl"])
def test_robust_observers_clip_a_rare_outlier(algorithm):
    data = list(_feeds(16, outlier=80.0))       # 16k values: the 99.99th percentile excludes one
    minmax = calibration.calibrate(_graph(), ["x"], ["x"], data, 256, "minmax")["x"]
    robust = calibration.calibrate(_graph(), ["x"], ["x"], data, 256, algorithm)["x"]
    assert minmax[1] == pytest.approx(80.0)
    assert 2.0 < robust[1] < 20.0            # the bulk of N(0, 1) kept, the outlier clipped
    assert robust[0] < -2.0


def test_kl_keeps_the_whole_range_of_a_uniform_tensor():
    rng = np.random.default_rng(1)
    data = [{"x": rng.uniform(-1, 1, (64, 64)).astype(np.float32)} for _ in range(4)]
    low, high = calibration.calibrate(_graph(), ["x"], ["x"], data, 256, "kl")["x"]
    assert high > 0.9 and low < -0.9


def test_bad_algorithm_and_empty_data_are_named():
    with pytest.raises(ConfigError, match="unknown calibration algorithm 'entropy'"):
        calibration.calibrate(_graph(), ["x"], ["x"], _feeds(1), 16, "entropy")
    with pytest.raises(EvaluationError, match="no batches"):
        calibration.calibrate(_graph(), ["x"], ["x"], iter(()), 16, "minmax")
