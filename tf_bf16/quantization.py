"""`Quantization`: the INT8 + BF16 + FP32 converter (Neural Compressor's experimental API shape).

``converter = Quantization(conf)``; set ``model``, calibration data (``calib_dataloader``, or
the YAML's ``quantization.calibration.dataloader``) and optionally an evaluation dataloader +
metric or ``eval_func``; ``converter()`` returns a ``tf_bf16.Model`` whose ``report`` says which
nodes run in INT8, BF16 and FP32.

The flow: a precision plan from the config, generic clean-up, calibration of the tensors the
INT8 stage needs (their ranges over the first ``sampling_size`` samples), then the INT8
stage, BF16 painting and cast folding (``pipeline.convert_cleaned``); with evaluation set,
``tuning.tune_quantized`` moves nodes to higher precisions until the accuracy criterion holds.
The quantized ops run only through oneDNN (TensorFlow registers them as placeholders its oneDNN
layout pass replaces), so a process with oneDNN off is refused up front.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, FrozenSet, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from absl import logging
from tensorflow.core.framework.graph_pb2 import GraphDef

from tf_bf16 import calibration, common
from tf_bf16 import capability as cap_lib
from tf_bf16 import config as config_lib
from tf_bf16 import data as data_lib
from tf_bf16 import pipeline, report as report_lib
from tf_bf16.errors import ConfigError
from tf_bf16.mixed_precision import has_evaluation, load_converter_model, require_kernels
from tf_bf16.model import Model
from tf_bf16.plan_builder import build_plan
from tf_bf16.transforms.plan import ALL_PRECISIONS, BF16, FP32, INT8, PrecisionPlan, QuantizationSpec
from tf_bf16.transforms.quantize import calibration_tensors

ConfigSource = Union[None, str, os.PathLike, Mapping[str, Any], config_lib.Config]
CALIBRATION_KEY = "quantization.calibration.dataloader"


class Quantization:
    """Quantize a model to INT8 where it can, BF16/FP32 elsewhere, following a config.

    ``target`` and ``env`` mean what they mean for ``MixedPrecision``; ``kernels`` also turns the
    quantized ops into tf_bf16's INT8 kernel ops (``transforms/int8_kernels.py``); ``env``
    (default ``os.environ``) is also where ``TF_ENABLE_ONEDNN_OPTS`` is read. The input model
    is never modified.
    """

    def __init__(self, conf: ConfigSource = None, target: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None, kernels: bool = False):
        self.conf = config_lib.load_config(conf)
        self.kernels = kernels
        self._precisions = self.conf.quantization_precisions()
        self.target = target if target is not None else self.conf.mixed_precision.target
        self.env = env
        self.model: Any = None
        self.calib_dataloader: Any = None
        self.eval_dataloader: Any = None
        self.metric: Any = None
        self.eval_func: Optional[Callable[[Model], float]] = None
        self.node_precisions: Dict[str, str] = dict(self.conf.node_precisions(int8=True))
        self.op_type_precisions: Dict[str, str] = dict(self.conf.op_type_precisions(int8=True))
        # Entries that allow a set of precisions ({bf16, fp32}: not INT8; {int8, fp32}: not BF16).
        self.node_allowed: Dict[str, FrozenSet[str]] = dict(self.conf.node_allowed(int8=True))
        self.op_type_allowed: Dict[str, FrozenSet[str]] = dict(self.conf.op_type_allowed(int8=True))
        unapplied = self.settings.unapplied_keys()
        if unapplied:
            logging.warning("tf_bf16: not applied (the INT8 stage chooses these itself; see the README): %s",
                            ", ".join(unapplied))

    @property
    def settings(self) -> config_lib.QuantizationConfig:
        """The config's ``quantization`` section (its defaults when the config has none)."""
        return self.conf.quantization or config_lib.QuantizationConfig()

    @property
    def precisions(self):
        return self._precisions

    @precisions.setter
    def precisions(self, value: Union[str, Sequence[str]]) -> None:
        items = [value] if isinstance(value, str) else list(value)
        bad = [p for p in items if p not in ALL_PRECISIONS]
        if bad or INT8 not in items:
            raise ConfigError(f"precisions: {bad or value!r} not allowed; allowed values: {', '.join(ALL_PRECISIONS)}, "
                              f"and Quantization needs int8 among them")
        self._precisions = tuple(p for p in ALL_PRECISIONS if p in set(items) | {FP32})

    # ------------------------------------------------------------------ run

    def __call__(self) -> Model:
        """Calibrate and convert ``self.model``; tune for accuracy when evaluation components are set."""
        env = os.environ if self.env is None else self.env
        _require_onednn(env)
        self._check_settings()
        loader = self._calibration_loader()
        model = self._load_model()
        extra = self._capability(env)
        if self.kernels:
            extra["kernels"] = {"requires": require_kernels()}
        cleaned, plan, result, facts = self._quantize(model, loader)
        extra.update(facts)
        if self.kernels:
            extra["kernels"]["nodes"] = result.kernel_nodes
        report = report_lib.build_report(model.graph_def, result.graph_def, result.fp32_reasons, extra,
                                         int8_nodes=result.int8_nodes)
        optimized = model.with_graph_def(result.graph_def, report)
        if self._has_evaluation():
            from tf_bf16 import evaluation, tuning
            spec = evaluation.build_evaluation(self.conf, self.eval_func, self.eval_dataloader, self.metric)
            optimized = tuning.tune_quantized(spec, model, cleaned, plan, result, base_report=report,
                                              kernels=self.kernels)
        report_lib.log_report(optimized.report)
        return optimized

    fit = __call__

    def plan_for(self, model: Model) -> PrecisionPlan:
        """The precision plan (no ranges yet) for ``model`` from the config and this TensorFlow's kernels."""
        return build_plan(model.graph_def, model.input_names, model.output_names,
                          node_precisions=self.node_precisions, op_type_precisions=self.op_type_precisions,
                          node_allowed=self.node_allowed, op_type_allowed=self.op_type_allowed)

    # ------------------------------------------------------------------ steps

    def _check_settings(self) -> None:
        """ConfigError for a forced precision that is not one, or for bf16 (forced, fused kernels or accuracy
        tuning, which gives INT8 ops back to BF16) while the precisions exclude it."""
        for what, mapping in (("node_precisions", self.node_precisions),
                              ("op_type_precisions", self.op_type_precisions)):
            for name, precision in mapping.items():
                if precision not in ALL_PRECISIONS:
                    raise ConfigError(f"converter.{what}[{config_lib.preview(name)}]: {config_lib.preview(precision)} "
                                      f"not allowed; allowed values: {', '.join(ALL_PRECISIONS)}")
                if precision == BF16 and BF16 not in self._precisions:
                    raise ConfigError(f"converter.{what}[{config_lib.preview(name)}] forces bf16, but the precisions "
                                      f"({', '.join(self._precisions)}) exclude it; make them agree")
        if BF16 not in self._precisions and self._has_evaluation():
            raise ConfigError(f"accuracy tuning gives INT8 ops back to BF16, and the precisions "
                              f"({', '.join(self._precisions)}) exclude bf16; allow bf16 or drop the evaluation "
                              f"settings")

    def _calibration_loader(self) -> Any:
        """The calibration data: ``calib_dataloader`` from code, else the YAML's; ConfigError when neither."""
        loader_conf = self.settings.calibration.dataloader
        seed = self.conf.tuning.random_seed
        loader = self.calib_dataloader
        if loader is not None:
            if not isinstance(loader, (common.DataLoader, list, tuple)) and common.is_map_dataset(loader):
                # a dataset of samples: batch it as the YAML dataloader says (batch_size 1 without one)
                return data_lib.create_dataloader(loader_conf or config_lib.DataLoaderConfig(), seed, CALIBRATION_KEY,
                                                  dataset=loader)
            return loader
        if loader_conf is not None and loader_conf.dataset is not None:
            return data_lib.create_dataloader(loader_conf, seed, CALIBRATION_KEY)
        raise ConfigError(f"config key '{CALIBRATION_KEY}': no calibration data; set converter.calib_dataloader or "
                          f"give {CALIBRATION_KEY}.dataset (dummy, npz or tfrecord)")

    def _load_model(self) -> Model:
        return load_converter_model(self.model, self.conf)

    def _capability(self, env: Mapping[str, str]) -> Dict[str, Any]:
        """Target facts for the report; with bf16 among the precisions, the BF16 hardware gate too."""
        capability = cap_lib.resolve_capability(self.target, env=env)
        warnings = []
        if BF16 in self._precisions:
            warnings = cap_lib.check_bf16(capability, force=cap_lib.force_requested(env))
        for w in warnings:
            logging.warning("tf_bf16: %s", w)
        return {"target": self.target or "this machine", "cpu": capability.cpu.model_name,
                "tf_version": capability.tf_version, "warnings": warnings}

    def _quantize(self, model: Model, loader: Any) -> Tuple[GraphDef, PrecisionPlan, pipeline.ConversionResult,
                                                              Dict[str, Any]]:
        """Clean up, calibrate, convert: (cleaned graph, plan with ranges, result, report facts with timings)."""
        start = time.perf_counter()
        plan = self.plan_for(model)
        cleaned = pipeline.clean_up(model.graph_def, plan)
        cleaned_at = time.perf_counter()
        plan, calibration_info = self._calibrated(plan, cleaned, model, loader)
        calibrated_at = time.perf_counter()
        result = self._convert(cleaned, plan)
        seconds = {"clean_up": cleaned_at - start, "calibration": calibrated_at - cleaned_at, **result.seconds}
        facts = self._extra(model, result, calibration_info, seconds, time.perf_counter() - start)
        return cleaned, plan, result, facts

    def _calibrated(self, plan: PrecisionPlan, cleaned: GraphDef, model: Model,
                    loader: Any) -> Tuple[PrecisionPlan, Dict[str, Any]]:
        """``plan`` with the calibrated ranges of the tensors the INT8 stage needs, and what was done."""
        settings = self.settings
        tensors = calibration_tensors(cleaned, plan)
        if not tensors:
            logging.warning("tf_bf16: nothing in this model can be quantized (no Conv2D, MatMul or depthwise "
                            "convolution with constant weights that the plan leaves to INT8)")
        sampling_size, algorithm = settings.sampling_size(), settings.activation_algorithm()
        ranges = calibration.calibrate(cleaned, model.input_names, tensors, _feeds(loader, model.input_names),
                                       sampling_size, algorithm)
        cpu = cap_lib.resolve_capability(self.target, env=os.environ if self.env is None else self.env).cpu
        spec = QuantizationSpec(ranges, weight_granularity=settings.weight_granularity(),
                                weight_max=cpu.int8_weight_max)
        info = {"algorithm": algorithm, "sampling_size": sampling_size, "tensors": len(tensors),
                "ranges": len(ranges), "weight_granularity": spec.weight_granularity,
                "weight_max": spec.weight_max, "cpu": cpu.model_name}
        return dataclasses.replace(plan, quantization=spec), info

    def _convert(self, cleaned: GraphDef, plan: PrecisionPlan) -> pipeline.ConversionResult:
        """The stages after clean-up; without bf16 among the precisions, no BF16 stage (INT8 + FP32)."""
        return pipeline.convert_cleaned(cleaned, plan, self.kernels, bf16=BF16 in self._precisions)

    def _extra(self, model: Model, result: pipeline.ConversionResult, calibration_info: Dict[str, Any],
               seconds: Mapping[str, float], elapsed: float) -> Dict[str, Any]:
        """The report's fields beyond the graph counts: precisions, calibration, timings."""
        extra = {
            "precisions": list(self._precisions),
            "calibration": calibration_info,
            "consts_converted": result.consts_converted,
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
            "nodes_per_second": round(len(model.graph_def.node) / max(elapsed, 1e-9), 1),
        }
        if result.functions:
            extra["functions"] = {name: dataclasses.asdict(r) for name, r in result.functions.items()}
        return extra

    def _has_evaluation(self) -> bool:
        return has_evaluation(self.conf, self.eval_func, self.eval_dataloader)


def _require_onednn(env: Mapping[str, str]) -> None:
    """ConfigError unless oneDNN is on: TensorFlow runs the quantized ops only through it."""
    if not cap_lib.onednn_enabled(env):
        shown = env.get("TF_ENABLE_ONEDNN_OPTS")
        state = f"TF_ENABLE_ONEDNN_OPTS={shown}" if shown is not None else "TensorFlow's default for this CPU"
        raise ConfigError(f"INT8 graphs run through oneDNN, which is off here ({state}); set TF_ENABLE_ONEDNN_OPTS=1 "
                          f"before TensorFlow is imported ('tf-bf16 quantize' sets it when unset)")


def _feeds(loader: Any, input_names: Sequence[str]) -> Iterator[Dict[str, np.ndarray]]:
    """``{input name: batch}`` for each batch of ``loader``, read lazily (calibration stops at its sample count)."""
    for inputs, _ in common.batches(loader):
        yield common.model_feeds(inputs, input_names)
