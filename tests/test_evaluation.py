"""Tests for tf_bf16/evaluation.py: the evaluation spec tuning gets, and clear errors for bad evaluation set-ups."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_bf16 import config, evaluation
from tf_bf16.errors import ConfigError, EvaluationError, TfBf16Error
from tf_bf16.model import Model

BATCHES = [(np.full((2, 3), i, np.float32), np.array([0, 1])) for i in range(3)]


@pytest.fixture(scope="module")
def model() -> Model:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
        tf.nn.softmax(tf.concat([x, -x], axis=1)[:, :2], name="probs")
    return Model(graph.as_graph_def(), inputs=["x"], outputs=["probs"])


def test_spec_carries_config_criterion_and_exit_policy(model):
    conf = config.load_config({"tuning": {"accuracy_criterion": {"absolute": 0.05},
                                          "exit_policy": {"max_trials": 7, "timeout": 30}, "random_seed": 5},
                               "evaluation": {"accuracy": {"metric": {"topk": 1}}}})
    spec = evaluation.build_evaluation(conf, eval_dataloader=BATCHES)
    assert (spec.max_trials, spec.timeout, spec.random_seed, spec.performance_only) == (7, 30.0, 5, False)
    assert spec.criterion == evaluation.Criterion("absolute", 0.05, True)
    assert spec.evaluator(model) == pytest.approx(0.5)   # every row predicts class 0; labels alternate 0, 1


def test_metric_in_code_beats_the_config_and_sets_direction(model):
    conf = config.load_config({"evaluation": {"accuracy": {"metric": {"topk": 1}}}})
    spec = evaluation.build_evaluation(conf, eval_dataloader=BATCHES, metric={"MSE": {}})
    assert spec.criterion.higher_is_better is False
    assert spec.evaluator.metric.__class__.__name__ == "MSE"


def test_performance_only_needs_no_evaluation():
    conf = config.load_config({"tuning": {"exit_policy": {"performance_only": True}}})
    spec = evaluation.build_evaluation(conf)
    assert spec.performance_only and spec.evaluator is None and spec.criterion is None


@pytest.mark.parametrize("kwargs,fragment", [
    ({"eval_func": 3}, "eval_func must be callable"),
    ({"eval_dataloader": (b for b in BATCHES), "metric": "Accuracy"}, "one-shot iterator"),
    ({"eval_dataloader": BATCHES, "metric": object()}, "update(preds, labels)"),
    ({"eval_dataloader": BATCHES, "metric": {"top7": {}}}, "evaluation.accuracy.metric"),
    ({"eval_dataloader": BATCHES}, "evaluation.accuracy.metric"),
    ({}, "evaluation.accuracy.dataloader"),
])
def test_misconfiguration_is_a_config_error(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        evaluation.build_evaluation(config.load_config(), **kwargs)
    assert fragment in str(info.value) and len(str(info.value)) < 400


def test_an_evaluation_that_returns_no_number_is_an_evaluation_error(model):
    spec = evaluation.build_evaluation(config.load_config(), eval_func=lambda m: {"accuracy": list(range(1000))})
    with pytest.raises(EvaluationError, match="must return one number") as info:
        spec.evaluator(model)
    assert isinstance(info.value, TfBf16Error) and len(str(info.value)) < 200   # the value is cut short


def test_synthetic_feeds_follow_the_signature(model):
    (feed,) = evaluation.synthetic_feeds(model, seed=0)
    assert feed["x"].shape == (evaluation.SYNTHETIC_BATCH, 3) and feed["x"].dtype == np.float32
