"""Tests for tf_bf16.metrics: built-in metrics against scikit-learn / numpy, streaming, user metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn import metrics as skm

from tf_bf16 import common, config as config_lib, metrics
from tf_bf16.errors import ConfigError, InputError


def _stream(metric, preds, labels, batch):
    """Feed ``preds``/``labels`` in batches of ``batch`` and return the result."""
    metric.reset()
    for start in range(0, len(labels), batch):
        metric.update(preds[start:start + batch], labels[start:start + batch])
    return metric.result()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), classes=st.integers(3, 7), k=st.integers(1, 4), batch=st.integers(1, 17),
       seed=st.integers(0, 2**16))
def test_topk_matches_sklearn_in_any_batching(n, classes, k, batch, seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, classes)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    k = min(k, classes - 1)
    expected = skm.top_k_accuracy_score(labels, scores, k=k, labels=np.arange(classes))
    assert _stream(metrics.TopK(k), scores, labels, batch) == pytest.approx(expected)


def test_topk_label_forms_agree():
    rng = np.random.default_rng(0)
    scores = rng.random((50, 5))
    labels = rng.integers(0, 5, 50)
    ids = _stream(metrics.TopK(2), scores, labels, 8)
    column = _stream(metrics.TopK(2), scores, labels[:, None], 8)
    one_hot = _stream(metrics.TopK(2), scores, np.eye(5)[labels], 8)
    assert ids == column == one_hot
    assert 0.0 < ids < 1.0
    assert _stream(metrics.TopK(5), scores, labels, 8) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        metrics.TopK(0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 50), classes=st.integers(2, 6), batch=st.integers(1, 13), seed=st.integers(0, 2**16))
def test_accuracy_matches_sklearn(n, classes, batch, seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, classes))
    labels = rng.integers(0, classes, n)
    expected = skm.accuracy_score(labels, scores.argmax(1))
    assert _stream(metrics.Accuracy(), scores, labels, batch) == pytest.approx(expected)
    # one-hot labels and integer predictions give the same number
    assert _stream(metrics.Accuracy(), scores.argmax(1), np.eye(classes)[labels], batch) == pytest.approx(expected)


def test_accuracy_binary_and_multilabel():
    rng = np.random.default_rng(1)
    probs = rng.random(40)
    truth = rng.integers(0, 2, 40)
    assert _stream(metrics.Accuracy(), probs, truth, 7) == pytest.approx(skm.accuracy_score(truth, probs >= 0.5))
    multi_probs = rng.random((40, 3))
    multi_truth = rng.integers(0, 2, (40, 3))
    multi_truth[0] = [1, 1, 0]  # not one-hot, so the labels read as multi-label
    expected = skm.accuracy_score(multi_truth, (multi_probs >= 0.5).astype(int))  # exact-match accuracy
    assert _stream(metrics.Accuracy(), multi_probs, multi_truth, 9) == pytest.approx(expected)


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(7,), (5, 3), (4, 2, 2)]), batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_error_metrics_match_numpy(shape, batch, seed):
    rng = np.random.default_rng(seed)
    preds = rng.normal(size=shape).astype(np.float32)
    labels = rng.normal(size=shape)
    diff = preds.astype(np.float64) - labels
    assert _stream(metrics.MSE(), preds, labels, batch) == pytest.approx(np.mean(diff ** 2))
    assert _stream(metrics.RMSE(), preds, labels, batch) == pytest.approx(math.sqrt(np.mean(diff ** 2)))
    assert _stream(metrics.MAE(), preds, labels, batch) == pytest.approx(np.mean(np.abs(diff)))


def test_error_metrics_size_mismatch_and_direction():
    with pytest.raises(ValueError, match="3 values but labels 2"):
        metrics.MSE().update(np.zeros(3), np.zeros(2))
    assert not metrics.MSE.higher_is_better and not metrics.MAE.higher_is_better
    assert metrics.TopK.higher_is_better and metrics.F1.higher_is_better


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), classes=st.integers(2, 5), batch=st.integers(1, 11),
       average=st.sampled_from(["macro", "micro"]), seed=st.integers(0, 2**16))
def test_f1_matches_sklearn(n, classes, batch, average, seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, classes))
    labels = rng.integers(0, classes, n)
    expected = skm.f1_score(labels, scores.argmax(1), average=average, zero_division=0)
    assert _stream(metrics.F1(average), scores, labels, batch) == pytest.approx(expected)


def test_f1_binary():
    rng = np.random.default_rng(3)
    probs = rng.random(30)
    truth = rng.integers(0, 2, 30)
    expected = skm.f1_score(truth, probs >= 0.5)
    assert _stream(metrics.F1("binary"), probs, truth, 4) == pytest.approx(expected)
    with pytest.raises(ValueError, match="average must be"):
        metrics.F1("samples")


def test_reset_forgets_and_result_before_update_is_an_error():
    metric = metrics.TopK(1)
    metric.update(np.eye(3), np.array([0, 1, 2]))
    assert metric.result() == 1.0
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.result()
    metric.update(np.eye(3), np.array([1, 1, 1]))
    assert metric.result() == pytest.approx(1 / 3)


def test_multi_output_predictions_and_missing_labels():
    metric = metrics.Accuracy()
    metric.update([np.eye(2)], np.array([0, 1]))  # a one-output list is unwrapped
    assert metric.result() == 1.0
    with pytest.raises(ValueError, match="scores one model output, got 2"):
        metric.update([np.eye(2), np.eye(2)], np.array([0, 1]))
    with pytest.raises(ValueError, match="needs labels"):
        metric.update(np.eye(2), None)


class _CountPositives:
    """A user metric class: share of positive predictions (no base class)."""

    higher_is_better = False

    def __init__(self, threshold: float = 0.0):
        self.threshold = threshold
        self.reset()

    def update(self, preds, labels):
        self.hits += int(np.sum(np.asarray(preds) > self.threshold))
        self.total += np.asarray(preds).size

    def reset(self):
        self.hits, self.total = 0, 0

    def result(self):
        return self.hits / self.total


def test_user_metric_class_wrapped_like_neural_compressor():
    wrapped = common.Metric(_CountPositives, "positives", threshold=0.5)
    assert wrapped.name == "positives" and wrapped.higher_is_better is False
    wrapped.update(np.array([0.1, 0.7, 0.9, 0.2]), None)
    assert wrapped.result() == 0.5
    wrapped.reset()
    wrapped.update(np.array([0.9]), None)
    assert wrapped.result() == 1.0
    with pytest.raises(InputError, match="no result"):
        common.Metric(type("Broken", (), {"update": lambda s, p, l: None, "reset": lambda s: None}))
    with pytest.raises(NotImplementedError):
        common.Metric().result()


@pytest.mark.parametrize("spec,cls,higher", [
    ({"topk": 5}, metrics.TopK, True), ("Accuracy", metrics.Accuracy, True), ({"mse": {}}, metrics.MSE, False),
    ({"RMSE": None}, metrics.RMSE, False), ({"MAE": {}}, metrics.MAE, False), ({"F1": {}}, metrics.F1, True),
    ({"topk": 1, "higher_is_better": False}, metrics.TopK, False),
])
def test_create_metric_from_config(spec, cls, higher):
    conf = config_lib.load_config({"evaluation": {"accuracy": {"metric": spec}}})
    metric = metrics.create_metric(conf.evaluation.accuracy.metric)
    assert type(metric) is cls and metric.higher_is_better is higher
    if cls is metrics.TopK:
        assert metric.k == spec.get("topk")


def test_unknown_metric_names_the_key():
    with pytest.raises(ConfigError, match=r"evaluation\.accuracy\.metric.*unknown metric 'top1'"):
        config_lib.load_config({"evaluation": {"accuracy": {"metric": {"top1": {}}}}})
