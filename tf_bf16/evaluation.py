"""How a model is scored during tuning, what passes, and when the search stops.

``build_evaluation(conf, eval_func, eval_dataloader, metric)`` turns the config and the
evaluation pieces a user set in code into one ``EvaluationSpec``: an ``Evaluator`` (an
``eval_func``, or a metric over a dataloader's batches), the accuracy ``Criterion`` and the
exit policy. The tuner takes only that spec, never the converter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from tf_bf16 import common, config as config_lib, data as data_lib, metrics as metrics_lib
from tf_bf16.errors import ConfigError, EvaluationError
from tf_bf16.model import Model

SENSITIVITY_SAMPLES = 256      # at most this many samples feed the two sensitivity runs
SENSITIVITY_BATCHES = 8        # ... from at most this many batches
SYNTHETIC_BATCH = 8            # batch size of random inputs when no data is available


_preview = config_lib.preview  # repr cut to 80 characters, built lazily: one helper for every error message


# --------------------------------------------------------------------------------------
# criterion
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Criterion:
    """``relative`` or ``absolute`` tolerable loss against the FP32 baseline, in the metric's direction."""

    kind: str = "relative"
    tolerable_loss: float = 0.01
    higher_is_better: bool = True

    def __post_init__(self):
        if self.kind not in ("relative", "absolute"):
            raise ValueError(f"criterion kind must be relative or absolute, got {self.kind!r}")
        if not (self.tolerable_loss >= 0 and math.isfinite(self.tolerable_loss)):
            raise ValueError(f"tolerable loss must be a finite number >= 0, got {self.tolerable_loss!r}")

    def target(self, baseline: float) -> float:
        """The worst accuracy that still passes (relative loss is taken of |baseline|)."""
        margin = self.tolerable_loss * (abs(baseline) if self.kind == "relative" else 1.0)
        return baseline - margin if self.higher_is_better else baseline + margin

    def passes(self, value: float, baseline: float) -> bool:
        """Whether ``value`` meets the target (reaching it exactly passes; NaN never does)."""
        if value is None or not math.isfinite(value):
            return False
        target = self.target(baseline)
        return value >= target if self.higher_is_better else value <= target

    def loss(self, value: float, baseline: float) -> float:
        """How much worse than the baseline ``value`` is (negative when better)."""
        return baseline - value if self.higher_is_better else value - baseline

    def better(self, a: float, b: float) -> bool:
        """Whether accuracy ``a`` is strictly better than ``b``."""
        if not math.isfinite(a):
            return False
        if not math.isfinite(b):
            return True
        return a > b if self.higher_is_better else a < b

    def to_dict(self, baseline: Optional[float] = None) -> Dict[str, Any]:
        out = {"kind": self.kind, "tolerable_loss": self.tolerable_loss, "higher_is_better": self.higher_is_better}
        if baseline is not None:
            out["target"] = self.target(baseline)
        return out


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------

class Evaluator:
    """Scores a Model: ``eval_func(model)``, or a metric over the batches of a dataloader."""

    def __init__(self, eval_func: Optional[Callable[[Model], float]] = None, dataloader: Any = None,
                 metric: Any = None):
        if eval_func is None and (dataloader is None or metric is None):
            raise ConfigError("an Evaluator needs eval_func, or a dataloader and a metric")
        self.eval_func = eval_func
        self.dataloader = dataloader
        self.metric = metric

    @property
    def higher_is_better(self) -> Optional[bool]:
        """The metric's own direction when it declares one (None for eval_func)."""
        if self.eval_func is not None or self.metric is None:
            return None
        value = getattr(self.metric, "higher_is_better", None)
        return None if value is None else bool(value)

    def __call__(self, model: Model) -> float:
        if self.eval_func is not None:
            value = self.eval_func(model)
        else:
            self.metric.reset()
            for inputs, labels in common.batches(self.dataloader):
                outputs = model.run(common.model_feeds(inputs, model.input_names))
                self.metric.update(outputs[0] if len(outputs) == 1 else outputs, labels)
            value = self.metric.result()
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise EvaluationError(f"the evaluation returned {_preview(value)}; it must return one number") from e

    def sample_feeds(self, input_names: Sequence[str], max_samples: int = SENSITIVITY_SAMPLES,
                     max_batches: int = SENSITIVITY_BATCHES) -> List[Dict[str, np.ndarray]]:
        """The first batches of the dataloader as feeds (empty when there is no dataloader)."""
        return _first_feeds(self.dataloader, input_names, max_samples, max_batches)


def _first_feeds(loader: Any, input_names: Sequence[str], max_samples: int, max_batches: int) -> List[Dict[str, np.ndarray]]:
    feeds: List[Dict[str, np.ndarray]] = []
    if loader is None:
        return feeds
    seen = 0
    for inputs, _ in common.batches(loader):
        feed = common.model_feeds(inputs, input_names)
        feeds.append(feed)
        seen += len(next(iter(feed.values())))
        if seen >= max_samples or len(feeds) >= max_batches:
            break
    return feeds


def synthetic_feeds(model: Model, seed: int) -> List[Dict[str, np.ndarray]]:
    """Random inputs from the model's signature (floats in [0, 1), integers 0); [] if a shape is unknown."""
    by_node = {spec.name: spec for spec in model.signature.inputs.values()}
    rng = np.random.default_rng(seed)
    feed = {}
    for name in model.input_names:
        spec = by_node.get(name)
        if spec is None or spec.shape is None or any(d is None for d in spec.shape[1:]):
            return []
        shape = (SYNTHETIC_BATCH,) + tuple(int(d) for d in spec.shape[1:])
        try:
            dtype = np.dtype(np.float32 if spec.dtype == "bfloat16" else spec.dtype)
        except TypeError:
            return []
        if np.issubdtype(dtype, np.floating):
            feed[name] = rng.random(shape).astype(dtype)
        elif np.issubdtype(dtype, np.number) or dtype == np.bool_:
            feed[name] = np.zeros(shape, dtype)
        else:   # strings and other kinds: no safe random value
            return []
    return [feed]


def build_evaluator(conf: config_lib.Config, eval_func: Optional[Callable[[Model], float]] = None,
                    eval_dataloader: Any = None, metric: Any = None) -> Evaluator:
    """The evaluation: ``eval_func``, or a dataloader + metric from code or else from the config."""
    accuracy = conf.evaluation.accuracy
    loader_conf = accuracy.dataloader if accuracy is not None else None
    key = "evaluation.accuracy"
    seed = conf.tuning.random_seed
    loader = eval_dataloader
    if loader is not None and not isinstance(loader, common.DataLoader) and common.is_map_dataset(loader) \
            and not isinstance(loader, (list, tuple)):
        spec = loader_conf or config_lib.DataLoaderConfig()
        loader = data_lib.create_dataloader(spec, seed, key + ".dataloader", dataset=loader)
    if loader is None and loader_conf is not None and loader_conf.dataset is not None:
        loader = data_lib.create_dataloader(loader_conf, seed, key + ".dataloader")
    if loader is not None and _one_shot(loader):
        raise ConfigError("converter.eval_dataloader is a one-shot iterator (a generator?); tuning evaluates it "
                        "many times, so give something re-iterable: a common.DataLoader, a list of batches "
                        "or a tf.data.Dataset")
    if eval_func is not None:
        if not callable(eval_func):
            raise ConfigError(f"converter.eval_func must be callable (model -> float), got {_preview(eval_func)}")
        return Evaluator(eval_func=eval_func, dataloader=loader)
    if loader is None:
        raise ConfigError(f"config key '{key}.dataloader': no evaluation data; set converter.eval_dataloader "
                          f"or give evaluation.accuracy.dataloader.dataset (or set converter.eval_func)")
    return Evaluator(dataloader=loader, metric=resolve_metric(metric, accuracy.metric if accuracy is not None else None))


def _one_shot(loader: Any) -> bool:
    """True for an iterator (``iter(x) is x``), also when wrapped by a DataLoader: it can be read only once."""
    inner = loader.dataset if isinstance(loader, common.DataLoader) and loader.batched else loader
    try:
        return iter(inner) is inner
    except TypeError:
        return False


def resolve_metric(metric: Any, metric_conf: Optional[config_lib.MetricConfig]) -> Any:
    """A metric object from code (object, class, name or ``{name: params}``) or else from the YAML config."""
    key = "evaluation.accuracy.metric"
    if metric is None:
        if metric_conf is None:
            raise ConfigError(f"config key '{key}': a metric is required with a dataloader "
                              f"(e.g. {{topk: 1}}), or set converter.metric or converter.eval_func")
        return metrics_lib.create_metric(metric_conf)
    if isinstance(metric, type):
        metric = metric()
    if isinstance(metric, (str, Mapping)):
        return metrics_lib.create_metric(config_lib.parse_metric(metric))
    if not metrics_lib.is_metric(metric):
        raise ConfigError(f"converter.metric must have update(preds, labels), reset() and result(); "
                          f"got {_preview(metric)}")
    return metric


def resolve_criterion(conf: config_lib.Config, evaluator: Evaluator) -> Criterion:
    """The config's criterion; lower-is-better when the config or the metric says so."""
    crit = conf.tuning.accuracy_criterion
    higher = crit.higher_is_better
    if evaluator.higher_is_better is False:
        higher = False
    return Criterion(crit.criterion, crit.tolerable_loss, higher)


@dataclasses.dataclass(frozen=True)
class EvaluationSpec:
    """Everything the tuner needs: how to score a model, the criterion, and the exit policy.

    ``evaluator`` and ``criterion`` are None when ``performance_only`` (no evaluation at all).
    """

    evaluator: Optional[Evaluator]
    criterion: Optional[Criterion]
    max_trials: int
    timeout: float
    performance_only: bool
    random_seed: int


def build_evaluation(conf: config_lib.Config, eval_func: Optional[Callable[[Model], float]] = None,
                     eval_dataloader: Any = None, metric: Any = None) -> EvaluationSpec:
    """The evaluation spec from the config plus what the user set in code (code wins)."""
    policy = conf.tuning.exit_policy
    evaluator = criterion = None
    if not policy.performance_only:
        evaluator = build_evaluator(conf, eval_func, eval_dataloader, metric)
        criterion = resolve_criterion(conf, evaluator)
    return EvaluationSpec(evaluator, criterion, policy.max_trials, policy.timeout, policy.performance_only,
                          conf.tuning.random_seed)
