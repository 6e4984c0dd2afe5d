"""`MixedPrecision`: the converter users call (Neural Compressor's experimental API shape).

``converter = MixedPrecision(conf)``; set ``precisions``, ``model`` and optionally an
evaluation dataloader + metric or ``eval_func``; ``converter()`` returns a ``tf_bf16.Model``
whose ``report`` says what ran in which precision and why.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from absl import logging

from tf_bf16 import capability as cap_lib
from tf_bf16 import config as config_lib
from tf_bf16 import pipeline, report as report_lib
from tf_bf16.errors import ConfigError
from tf_bf16.model import Model
from tf_bf16.plan_builder import build_plan
from tf_bf16.transforms.plan import BF16, FP32, PRECISIONS, PrecisionPlan

ConfigSource = Union[None, str, os.PathLike, Mapping[str, Any]]


class MixedPrecision:
    """Convert a model to BF16+FP32 (optionally accuracy-tuned) following a config.

    ``target`` names the deployment CPU (``"spr"``, ``"cpx"``, ``"avx512_bf16"``) when it
    differs from this machine; ``env`` defaults to ``os.environ`` and is where ``FORCE_BF16``
    is read (the passes themselves never read the environment). ``kernels=True`` replaces BF16
    contractions and their epilogues by tf_bf16's fused oneDNN ops; the result then needs
    ``import tf_bf16.kernels`` (``tf_bf16.Model`` does it itself) wherever it runs.
    """

    def __init__(self, conf: ConfigSource = None, target: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None, kernels: bool = False):
        self.conf = config_lib.load_config(conf)
        self.kernels = kernels
        self._precisions = tuple(self.conf.effective_precisions())
        self.target = target if target is not None else self.conf.mixed_precision.target
        self.env = env
        self.model: Any = None
        self.eval_dataloader: Any = None
        self.metric: Any = None
        self.eval_func: Optional[Callable[[Model], float]] = None
        self.node_precisions: Dict[str, str] = dict(self.conf.node_precisions())
        self.op_type_precisions: Dict[str, str] = dict(self.conf.op_type_precisions())
        quantization = self.conf.quantization
        if quantization is not None and quantization.calibration.dataloader is not None:
            logging.warning("tf_bf16: MixedPrecision uses only the fp32/bf16 dtype overrides of the "
                            "'quantization' section; its calibration data is for the INT8 stage and is not read")

    @property
    def precisions(self):
        return self._precisions

    @precisions.setter
    def precisions(self, value: Union[str, Sequence[str]]) -> None:
        items = [value] if isinstance(value, str) else list(value)
        bad = [p for p in items if p not in PRECISIONS]
        if bad or not items:
            raise ConfigError(f"precisions: {bad or value!r} not allowed; allowed values: {', '.join(PRECISIONS)}")
        self._precisions = tuple(dict.fromkeys(items + [FP32]))

    # ------------------------------------------------------------------ run

    def _load_model(self) -> Model:
        return load_converter_model(self.model, self.conf)

    def _capability_warnings(self) -> Dict[str, Any]:
        env = os.environ if self.env is None else self.env
        capability = cap_lib.resolve_capability(self.target, env=env)
        warnings = cap_lib.check_bf16(capability, force=cap_lib.force_requested(env))
        for w in warnings:
            logging.warning("tf_bf16: %s", w)
        return {"target": self.target or "this machine", "cpu": capability.cpu.model_name,
                "tf_version": capability.tf_version, "warnings": warnings}

    def plan_for(self, model: Model) -> PrecisionPlan:
        """The precision plan for ``model`` from the config and this TensorFlow's kernels."""
        return build_plan(model.graph_def, model.input_names, model.output_names,
                          node_precisions=self.node_precisions, op_type_precisions=self.op_type_precisions)

    def __call__(self) -> Model:
        """Convert ``self.model``; tune for accuracy when evaluation components are set."""
        model = self._load_model()
        start = time.perf_counter()
        if BF16 not in self._precisions:
            plan = self.plan_for(model)
            cleaned = pipeline.clean_up(model.graph_def, plan)
            report = report_lib.build_report(model.graph_def, cleaned, {}, {"precisions": list(self._precisions)})
            report_lib.log_report(report)
            return model.with_graph_def(cleaned, report)
        extra = self._capability_warnings()
        requires = require_kernels() if self.kernels else None
        plan = self.plan_for(model)
        result = pipeline.convert_graph(model.graph_def, plan, self.kernels)
        if requires:
            extra["kernels"] = {"nodes": result.kernel_nodes, "requires": requires}
        elapsed = time.perf_counter() - start
        extra.update({
            "precisions": list(self._precisions),
            "consts_converted": result.consts_converted,
            "seconds": {k: round(v, 4) for k, v in result.seconds.items()},
            "nodes_per_second": round(len(model.graph_def.node) / max(elapsed, 1e-9), 1),
        })
        if result.functions:
            extra["functions"] = {name: dataclasses.asdict(r) for name, r in result.functions.items()}
        report = report_lib.build_report(model.graph_def, result.graph_def, result.fp32_reasons, extra)
        optimized = model.with_graph_def(result.graph_def, report)
        if self._has_evaluation():
            from tf_bf16 import evaluation, tuning
            spec = evaluation.build_evaluation(self.conf, self.eval_func, self.eval_dataloader, self.metric)
            optimized = tuning.tune(spec, model, plan, result, base_report=report, kernels=self.kernels)
        report_lib.log_report(optimized.report)
        return optimized

    fit = __call__

    def _has_evaluation(self) -> bool:
        return has_evaluation(self.conf, self.eval_func, self.eval_dataloader)


def load_converter_model(source: Any, conf: config_lib.Config) -> Model:
    """A converter's ``model``: a ``tf_bf16.Model`` as given, else loaded with the config's inputs/outputs."""
    if source is None:
        raise ConfigError("converter.model is not set: give a SavedModel dir, .pb, Keras model, "
                          "GraphDef, tf.Graph or ConcreteFunction")
    if isinstance(source, Model):
        return source
    return Model(source, inputs=conf.model.inputs or None, outputs=conf.model.outputs or None)


def has_evaluation(conf: config_lib.Config, eval_func: Any, eval_dataloader: Any) -> bool:
    """Whether a converter tunes: an eval_func, or evaluation data from code or the YAML config.

    A dataloader without a metric (in code or YAML) is an error raised by the tuner, not
    a silent skip.
    """
    if eval_func is not None or eval_dataloader is not None:
        return True
    accuracy = conf.evaluation.accuracy
    return accuracy is not None and accuracy.dataloader is not None and accuracy.dataloader.dataset is not None


def require_kernels() -> str:
    """Load tf_bf16's kernel library (the converted graph uses its ops); ConfigError saying why not."""
    from tf_bf16 import kernels

    if kernels.load_kernels() is None:
        raise ConfigError(f"kernels=True needs tf_bf16's kernel library, which is not built or does not load "
                          f"({kernels.library_path()}); build it with 'python -m tf_bf16.kernels.build'")
    return "import tf_bf16.kernels before running this graph (tf_bf16.Model loads it itself)"
