"""Evaluation metrics for accuracy-aware tuning: topk, Accuracy, MSE, RMSE, MAE, F1.

Every metric streams: ``update(preds, labels)`` once per batch, ``result()`` at the end,
``reset()`` before the next evaluation, so a dataset never has to fit in memory. ``preds``
is what ``Model.run`` returned (one array, or a list with one array per model output);
built-in metrics read a single output. A user metric is any object with the same three
methods, or a class wrapped as ``Metric(MyMetric, "name")`` (Neural Compressor's spelling).
"""

from __future__ import annotations

import math
import types
from typing import Any, Dict, Mapping, Optional, Type

import numpy as np

from tf_bf16.errors import ConfigError, InputError


def _single_output(preds: Any, metric: str) -> np.ndarray:
    """The one prediction array a built-in metric scores (a one-item list is unwrapped)."""
    if isinstance(preds, (list, tuple)):
        if len(preds) != 1:
            raise InputError(f"metric {metric} scores one model output, got {len(preds)}; set the "
                             f"model outputs (config model.outputs) or use a custom metric")
        preds = preds[0]
    return np.asarray(preds)


def _labels(labels: Any, metric: str) -> np.ndarray:
    if labels is None:
        raise InputError(f"metric {metric} needs labels, but the dataloader yields none")
    if isinstance(labels, (list, tuple)) and len(labels) == 1 and not np.isscalar(labels[0]):
        labels = labels[0]
    return np.asarray(labels)


def _class_ids(values: np.ndarray, batch: int) -> np.ndarray:
    """Integer class ids from ids, (N, 1) ids, one-hot rows or per-class scores (argmax)."""
    values = values.reshape(batch, -1) if values.size != batch else values.reshape(batch)
    if values.ndim == 2:
        return np.argmax(values, axis=1)
    if np.issubdtype(values.dtype, np.floating) and np.any(values != np.round(values)):
        return (values >= 0.5).astype(np.int64)  # binary probabilities
    return values.astype(np.int64)


class Metric:
    """Base class of metrics; ``Metric(MyMetric, name, **kwargs)`` wraps a user metric class.

    Subclasses implement ``update``, ``reset`` and ``result``; ``higher_is_better`` tells the
    tuner which way the accuracy criterion points.
    """

    higher_is_better: bool = True

    def __init__(self, metric_cls: Optional[Type[Any]] = None, name: Optional[str] = None, **kwargs: Any):
        self.name = name or (metric_cls.__name__ if metric_cls is not None else type(self).__name__)
        self._delegate = metric_cls(**kwargs) if metric_cls is not None else None
        if self._delegate is not None:
            for method in ("update", "reset", "result"):
                if not callable(getattr(self._delegate, method, None)):
                    raise InputError(f"metric class {metric_cls.__name__} has no {method}() method; a metric "
                                    f"needs update(preds, labels), reset() and result()")
            self.higher_is_better = bool(getattr(self._delegate, "higher_is_better", True))

    def update(self, preds: Any, labels: Any) -> None:
        """Add one batch of predictions and labels."""
        if self._delegate is None:
            raise NotImplementedError(f"{type(self).__name__}.update")
        self._delegate.update(preds, labels)

    def reset(self) -> None:
        """Forget every batch seen so far."""
        if self._delegate is None:
            raise NotImplementedError(f"{type(self).__name__}.reset")
        self._delegate.reset()

    def result(self) -> float:
        """The metric over every batch since the last reset."""
        if self._delegate is None:
            raise NotImplementedError(f"{type(self).__name__}.result")
        return float(self._delegate.result())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class TopK(Metric):
    """Share of samples whose label is among the ``k`` highest-scored classes."""

    def __init__(self, k: int = 1):
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InputError(f"topk: k must be an integer >= 1, got {k!r}")
        self.k = k
        self.name = f"top{k}"
        self.reset()

    def reset(self) -> None:
        self._correct = 0
        self._total = 0

    def update(self, preds: Any, labels: Any) -> None:
        scores = _single_output(preds, "topk")
        batch = scores.shape[0] if scores.ndim else 1
        scores = scores.reshape(batch, -1)
        labels = _class_ids(_labels(labels, "topk"), batch)
        k = min(self.k, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        self._correct += int(np.sum(np.any(top == labels[:, None], axis=1)))
        self._total += batch

    def result(self) -> float:
        if not self._total:
            raise InputError("topk: result() before any update()")
        return self._correct / self._total


class Accuracy(Metric):
    """Classification accuracy: multi-class (scores or ids), binary probabilities, multi-label (exact match)."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._correct = 0
        self._total = 0

    def update(self, preds: Any, labels: Any) -> None:
        preds = _single_output(preds, "Accuracy")
        labels = _labels(labels, "Accuracy")
        batch = preds.shape[0] if preds.ndim else 1
        if preds.size == labels.size and preds.size != batch and not _one_hot(labels.reshape(batch, -1)):
            # multi-label: a sample is right when every label matches (threshold 0.5)
            hits = _binarize(preds.reshape(batch, -1)) == labels.reshape(batch, -1).astype(np.int64)
            correct = np.all(hits, axis=1)
        else:
            correct = _class_ids(preds, batch) == _class_ids(labels, batch)
        self._correct += int(np.sum(correct))
        self._total += batch

    def result(self) -> float:
        if not self._total:
            raise InputError("Accuracy: result() before any update()")
        return self._correct / self._total


def _one_hot(rows: np.ndarray) -> bool:
    return rows.shape[1] > 1 and bool(np.all((rows == 0) | (rows == 1))) and bool(np.all(rows.sum(axis=1) == 1))


def _binarize(values: np.ndarray) -> np.ndarray:
    if np.issubdtype(values.dtype, np.floating):
        return (values >= 0.5).astype(np.int64)
    return values.astype(np.int64)


class _ErrorMetric(Metric):
    """Streaming element-wise error between predictions and labels of the same size."""

    higher_is_better = False
    _label = "error"

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._sum = 0.0
        self._count = 0

    def _term(self, diff: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def update(self, preds: Any, labels: Any) -> None:
        preds = _single_output(preds, self._label).astype(np.float64)
        labels = _labels(labels, self._label).astype(np.float64)
        if preds.size != labels.size:
            raise InputError(f"{self._label}: predictions have {preds.size} values but labels {labels.size}")
        diff = preds.reshape(-1) - labels.reshape(-1)
        self._sum += float(np.sum(self._term(diff)))
        self._count += diff.size

    def _mean(self) -> float:
        if not self._count:
            raise InputError(f"{self._label}: result() before any update()")
        return self._sum / self._count


class MSE(_ErrorMetric):
    """Mean squared error (lower is better)."""

    _label = "MSE"

    def _term(self, diff: np.ndarray) -> np.ndarray:
        return diff * diff

    def result(self) -> float:
        return self._mean()


class RMSE(MSE):
    """Root mean squared error (lower is better)."""

    _label = "RMSE"

    def result(self) -> float:
        return math.sqrt(self._mean())


class MAE(_ErrorMetric):
    """Mean absolute error (lower is better)."""

    _label = "MAE"

    def _term(self, diff: np.ndarray) -> np.ndarray:
        return np.abs(diff)

    def result(self) -> float:
        return self._mean()


class F1(Metric):
    """Classification F1: ``average`` "macro" (default), "micro" or "binary" (class ``pos_label``)."""

    AVERAGES = ("macro", "micro", "binary")

    def __init__(self, average: str = "macro", pos_label: int = 1):
        super().__init__()
        if average not in self.AVERAGES:
            raise InputError(f"F1: average must be one of {', '.join(self.AVERAGES)}, got {average!r}")
        self.average = average
        self.pos_label = pos_label
        self.reset()

    def reset(self) -> None:
        self._tp: Dict[int, int] = {}
        self._fp: Dict[int, int] = {}
        self._fn: Dict[int, int] = {}
        self._seen = 0

    def update(self, preds: Any, labels: Any) -> None:
        preds = _single_output(preds, "F1")
        batch = preds.shape[0] if preds.ndim else 1
        predicted = _class_ids(preds, batch)
        truth = _class_ids(_labels(labels, "F1"), batch)
        for cls in np.union1d(predicted, truth).tolist():
            p, t = predicted == cls, truth == cls
            self._tp[cls] = self._tp.get(cls, 0) + int(np.sum(p & t))
            self._fp[cls] = self._fp.get(cls, 0) + int(np.sum(p & ~t))
            self._fn[cls] = self._fn.get(cls, 0) + int(np.sum(~p & t))
        self._seen += batch

    @staticmethod
    def _f1(tp: int, fp: int, fn: int) -> float:
        denominator = 2 * tp + fp + fn
        return 2 * tp / denominator if denominator else 0.0

    def result(self) -> float:
        if not self._seen:
            raise InputError("F1: result() before any update()")
        if self.average == "binary":
            c = self.pos_label
            return self._f1(self._tp.get(c, 0), self._fp.get(c, 0), self._fn.get(c, 0))
        if self.average == "micro":
            return self._f1(sum(self._tp.values()), sum(self._fp.values()), sum(self._fn.values()))
        classes = sorted(self._tp)
        return float(np.mean([self._f1(self._tp[c], self._fp[c], self._fn[c]) for c in classes]))


# Canonical (Neural Compressor) metric name -> class: the config's allowed metric names, and each
# class's ``higher_is_better`` is the direction the config assumes unless the YAML says otherwise.
METRICS: Mapping[str, Type[Metric]] = types.MappingProxyType({
    "topk": TopK, "Accuracy": Accuracy, "MSE": MSE, "RMSE": RMSE, "MAE": MAE, "F1": F1})


def create_metric(config: Any) -> Metric:
    """A built-in metric from a validated ``config.MetricConfig`` (name, k, higher_is_better)."""
    cls = METRICS.get(config.name)
    if cls is None:
        raise ConfigError(f"config key 'evaluation.accuracy.metric': unknown metric {config.name!r}; "
                          f"allowed metrics: {', '.join(METRICS)}")
    metric = cls(k=config.k or 1) if cls is TopK else cls()
    metric.higher_is_better = bool(config.higher_is_better)
    return metric


def is_metric(obj: Any) -> bool:
    """True for any object with callable ``update``, ``reset`` and ``result``."""
    return all(callable(getattr(obj, m, None)) for m in ("update", "reset", "result"))
