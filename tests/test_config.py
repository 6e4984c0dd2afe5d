"""Tests for tf_bf16.config: INC-layout YAML/dict loading, defaults, and error messages."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import subprocess
import sys
import textwrap
from typing import Any, Dict

import pytest
from hypothesis import given, settings, strategies as st

from tf_bf16 import config as config_lib
from tf_bf16.config import Config, load_config
from tf_bf16.errors import ConfigError

FULL_YAML = """\
version: 1.0
model:
  name: resnet50
  framework: tensorflow
  inputs: "input_1, input_2"
  outputs: [predictions]
device: cpu
mixed_precision:
  precisions: bf16
  target: SPR
  op_wise:
    dense/MatMul:
      activation: {dtype: [fp32]}
    conv1/Conv2D:
      activation: {dtype: bf16}
    conv2/Conv2D:
      activation: {dtype: [bf16, fp32]}
    embedding/Gather:
      weight: {dtype: fp32}
  op_type_wise:
    Softmax:
      activation: {dtype: [fp32]}
      weight: {dtype: [bf16, fp32]}
quantization:
  approach: post_training_static_quant
  calibration:
    sampling_size: [50, 100]
    dataloader:
      batch_size: 10
      dataset:
        npz: {path: /data/calib.npz}
  model_wise:
    weight: {granularity: per_channel, scheme: sym, dtype: int8, algorithm: minmax}
    activation: {algorithm: [minmax, kl]}
  op_wise:
    conv3/Conv2D:
      activation: {dtype: fp32}
evaluation:
  accuracy:
    metric:
      topk: 1
    dataloader:
      batch_size: 32
      last_batch: discard
      dataset:
        dummy:
          shape: [[100, 224, 224, 3], [100, 4]]
          low: [-1.0, 0]
          high: 1.0
          dtype: [float32, int32]
          label: true
    postprocess:
      transform:
        LabelShift: -1
  performance:
    iteration: 20
    configs:
      cores_per_instance: 4
      num_of_instance: 2
    dataloader:
      dataset:
        tfrecord:
          path: /data/val-*.tfrecord
          features:
            image: {shape: [224, 224, 3], dtype: float32}
            label: {dtype: int64}
          label: label
tuning:
  strategy: {name: basic}
  accuracy_criterion:
    absolute: 0.02
    higher_is_better: false
  objective: performance
  exit_policy:
    timeout: 30
    performance_only: true
  random_seed: 7
  workspace: {path: /tmp/ws}
"""


def _write(tmp_path, text: str, name: str = "conf.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _error(source: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source)
    return str(info.value)


# ------------------------------------------------------------------ loading and defaults

def test_none_gives_all_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.mixed_precision.precisions == ("bf16", "fp32")
    assert cfg.mixed_precision.target is None
    assert cfg.device == "cpu"
    assert cfg.quantization is None
    assert cfg.evaluation.accuracy is None and cfg.evaluation.performance is None
    assert cfg.tuning.accuracy_criterion == config_lib.AccuracyCriterion("relative", 0.01, True)
    assert cfg.tuning.exit_policy == config_lib.ExitPolicy(timeout=0.0, max_trials=100, performance_only=False)
    assert cfg.tuning.random_seed == 1978
    assert cfg.tuning.strategy.name == "sensitivity"
    assert cfg.tuning.objective == "performance"
    assert cfg.node_precisions() == {} and cfg.op_type_precisions() == {}


def test_full_yaml_file_loads_with_defaults_filled(tmp_path):
    cfg = load_config(_write(tmp_path, FULL_YAML))

    assert cfg.version == 1.0
    assert cfg.model == config_lib.ModelConfig("resnet50", "tensorflow", ("input_1", "input_2"), ("predictions",))
    mp = cfg.mixed_precision
    assert mp.precisions == ("bf16", "fp32")
    assert mp.target == "spr"

    quant = cfg.quantization
    assert quant is not None
    assert quant.calibration.sampling_size == (50, 100)
    npz = quant.calibration.dataloader.dataset
    assert isinstance(npz, config_lib.NpzDatasetConfig)
    assert (npz.path, npz.inputs, npz.labels) == ("/data/calib.npz", ("x",), "y")
    assert quant.model_wise.weight.granularity == ("per_channel",)
    assert quant.model_wise.activation.algorithm == ("minmax", "kl")
    assert quant.model_wise.activation.dtype is None
    assert quant.op_wise["conv3/Conv2D"].activation.dtype == ("fp32",)

    acc = cfg.evaluation.accuracy
    assert acc.metric == config_lib.MetricConfig("topk", 1, True)
    loader = acc.dataloader
    assert (loader.batch_size, loader.last_batch, loader.shuffle) == (32, "discard", False)
    dummy = loader.dataset
    assert isinstance(dummy, config_lib.DummyDatasetConfig)
    assert dummy.shape == ((100, 224, 224, 3), (100, 4))
    assert dummy.low == (-1.0, 0.0) and dummy.high == (1.0, 1.0)
    assert dummy.dtype == ("float32", "int32")
    assert dummy.label is True and dummy.label_shape == ()
    assert acc.postprocess == {"transform": {"LabelShift": -1}}

    perf = cfg.evaluation.performance
    assert (perf.iteration, perf.warmup) == (20, 5)
    assert perf.configs == config_lib.PerformanceRunConfig(4, 2, None, None)
    rec = perf.dataloader.dataset
    assert isinstance(rec, config_lib.TFRecordDatasetConfig)
    assert rec.path == ("/data/val-*.tfrecord",)
    assert rec.features["image"] == config_lib.TFRecordFeature((224, 224, 3), "float32")
    assert rec.features["label"] == config_lib.TFRecordFeature((), "int64")
    assert rec.inputs == ("image",) and rec.label == "label"
    assert perf.dataloader.batch_size == 1

    tuning = cfg.tuning
    assert tuning.strategy.name == "sensitivity"  # INC's "basic" is the same tuner
    assert tuning.accuracy_criterion == config_lib.AccuracyCriterion("absolute", 0.02, False)
    assert tuning.exit_policy == config_lib.ExitPolicy(30.0, 100, True)
    assert tuning.random_seed == 7
    assert tuning.workspace == config_lib.WorkspaceConfig("/tmp/ws", None)


def test_pathlike_and_empty_yaml_file(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()
    path = tmp_path / "p.yaml"
    path.write_text("device: cpu\nmixed_precision: {precisions: fp32}\n")
    assert load_config(path).mixed_precision.precisions == ("fp32",)


def test_dict_input_and_config_passthrough():
    cfg = load_config({
        "model": {"inputs": "a, b ,c", "outputs": "out"},
        "mixed_precision": {"precisions": ["fp32", "bf16"]},
        "tuning": {"accuracy_criterion": {"relative": 0.05}, "exit_policy": {"max_trials": 3}},
    })
    assert cfg.model.inputs == ("a", "b", "c") and cfg.model.outputs == ("out",)
    assert cfg.mixed_precision.precisions == ("bf16", "fp32")
    assert cfg.tuning.accuracy_criterion.criterion == "relative"
    assert cfg.tuning.accuracy_criterion.tolerable_loss == 0.05
    assert cfg.tuning.exit_policy.max_trials == 3
    assert cfg.tuning.exit_policy.timeout == 0.0
    assert load_config(cfg) is cfg


def test_null_sections_mean_defaults():
    cfg = load_config({"model": None, "mixed_precision": {"op_wise": None, "precisions": None},
                       "tuning": {"exit_policy": None}})
    assert cfg == Config()


def test_metric_forms():
    def metric(spec: Any) -> config_lib.MetricConfig:
        return load_config({"evaluation": {"accuracy": {"metric": spec}}}).evaluation.accuracy.metric

    assert metric({"Accuracy": {}}) == config_lib.MetricConfig("Accuracy", None, True)
    assert metric({"accuracy": None}).name == "Accuracy"
    assert metric("MSE") == config_lib.MetricConfig("MSE", None, False)
    assert metric({"RMSE": {}, "higher_is_better": True}).higher_is_better is True
    assert metric({"topk": {"k": 5}}).k == 5
    assert metric({"F1": None}).higher_is_better is True
    assert metric({"MAE": {}}).higher_is_better is False


def test_strategy_sensitivity_and_precision_fp32_only():
    cfg = load_config({"tuning": {"strategy": {"name": "sensitivity"}},
                       "mixed_precision": {"precisions": "FP32"}})
    assert cfg.tuning.strategy.name == "sensitivity"
    assert cfg.mixed_precision.precisions == ("fp32",)


# ------------------------------------------------------------------ op-wise resolution

def test_op_wise_and_op_type_wise_resolution(tmp_path):
    cfg = load_config(_write(tmp_path, FULL_YAML))
    # mixed_precision.op_wise and quantization.op_wise (fp32/bf16 entries) both force nodes
    assert cfg.node_precisions() == {"dense/MatMul": "fp32", "conv1/Conv2D": "bf16",
                                     "embedding/Gather": "fp32", "conv3/Conv2D": "fp32"}
    assert cfg.op_type_precisions() == {"Softmax": "fp32"}
    # the entry allowing both is kept in the tree but forces nothing
    assert cfg.mixed_precision.op_wise["conv2/Conv2D"].activation == ("bf16", "fp32")
    assert cfg.mixed_precision.node_precisions() == {k: v for k, v in cfg.node_precisions().items()
                                                     if k != "conv3/Conv2D"}


@pytest.mark.parametrize("entry, expected", [
    ({"activation": {"dtype": ["fp32"]}}, "fp32"),
    ({"activation": {"dtype": "bf16"}}, "bf16"),
    ({"weight": {"dtype": ["fp32"]}}, "fp32"),
    ({"activation": {"dtype": ["bf16", "fp32"]}, "weight": {"dtype": "fp32"}}, "fp32"),
    ({"activation": {"dtype": ["bf16"]}, "weight": {"dtype": ["fp32", "bf16"]}}, "bf16"),
    ({"activation": {"dtype": ["bf16", "fp32"]}}, None),
    ({}, None),
])
def test_dtype_override_resolution(entry: Dict[str, Any], expected: str):
    cfg = load_config({"mixed_precision": {"op_wise": {"n": entry}, "op_type_wise": {"MatMul": entry}}})
    assert cfg.node_precisions().get("n") == expected
    assert cfg.op_type_precisions().get("MatMul") == expected


def test_conflicting_activation_and_weight_dtypes():
    msg = _error({"mixed_precision": {"op_wise": {"n1": {"activation": {"dtype": "fp32"},
                                                         "weight": {"dtype": "bf16"}}}}})
    assert "'mixed_precision.op_wise.n1'" in msg and "conflict" in msg


def test_bf16_override_needs_bf16_precision():
    msg = _error({"mixed_precision": {"precisions": "fp32",
                                      "op_type_wise": {"MatMul": {"activation": {"dtype": ["bf16"]}}}}})
    assert "'mixed_precision.op_type_wise.MatMul.activation.dtype'" in msg
    assert "'bf16'" in msg and "fp32" in msg


# ------------------------------------------------------------------ INC aliases

def test_graph_optimization_alias():
    cfg = load_config({"graph_optimization": {"precisions": "fp32"}})
    assert cfg.mixed_precision.precisions == ("fp32",)
    same = load_config({"graph_optimization": {"precisions": ["bf16"]},
                        "mixed_precision": {"precisions": ["bf16", "fp32"]}})
    assert same.mixed_precision.precisions == ("bf16", "fp32")


def test_graph_optimization_conflict():
    msg = _error({"graph_optimization": {"precisions": "fp32"}, "mixed_precision": {"precisions": "bf16"}})
    assert "'mixed_precision.precisions'" in msg and "'graph_optimization.precisions'" in msg


def test_use_bf16():
    assert load_config({"use_bf16": False}).mixed_precision.precisions == ("fp32",)
    assert load_config({"use_bf16": True}).mixed_precision.precisions == ("bf16", "fp32")
    msg = _error({"use_bf16": False, "mixed_precision": {"precisions": "bf16"}})
    assert "'use_bf16'" in msg
    assert "'use_bf16'" in _error({"use_bf16": "yes please"})


# ------------------------------------------------------------------ unknown keys

@pytest.mark.parametrize("source, key, allowed", [
    ({"tunning": {}}, "tunning", "evaluation, graph_optimization, mixed_precision, model"),
    ({"mixed_precision": {"precisons": "bf16"}}, "mixed_precision.precisons",
     "op_type_wise, op_wise, precisions, target"),
    ({"tuning": {"exit_policy": {"timeot": 1}}}, "tuning.exit_policy.timeot",
     "max_trials, performance_only, timeout"),
    ({"evaluation": {"accuracy": {"dataloader": {"dataset": {"dummy": {"shape": [1], "shap": [2]}}}}}},
     "evaluation.accuracy.dataloader.dataset.dummy.shap", "dtype, high, label, label_shape, low, shape"),
    ({"evaluation": {"accuracy": {"dataloader": {"dataset": {"imagenet": {}}}}}},
     "evaluation.accuracy.dataloader.dataset.imagenet", "dummy, npz, tfrecord"),
    ({"mixed_precision": {"op_wise": {"conv/Conv2D": {"activations": {"dtype": "fp32"}}}}},
     "mixed_precision.op_wise.conv/Conv2D.activations", "activation, weight"),
    ({"mixed_precision": {"op_type_wise": {"MatMul": {"weight": {"dtypes": "fp32"}}}}},
     "mixed_precision.op_type_wise.MatMul.weight.dtypes", "dtype"),
    ({"quantization": {"model_wise": {"weight": {"bits": 8}}}}, "quantization.model_wise.weight.bits",
     "algorithm, dtype, granularity, scheme"),
    ({"model": {"nmae": "x"}}, "model.nmae", "framework, inputs, name, outputs"),
])
def test_unknown_keys_at_every_depth(source: Dict[str, Any], key: str, allowed: str):
    msg = _error(source)
    assert msg.startswith(f"unknown config key '{key}'; allowed keys: ")
    assert allowed in msg


def test_unknown_key_exact_message():
    assert _error({"mixed_precision": {"precisons": "bf16"}}) == (
        "unknown config key 'mixed_precision.precisons'; "
        "allowed keys: op_type_wise, op_wise, precisions, target")


_TOP_LEVEL_KEYS = {f.name for f in dataclasses.fields(Config)} | {"use_bf16", "graph_optimization"}


@settings(max_examples=200, deadline=None)
@given(key=st.text(min_size=1, max_size=30).filter(lambda k: k not in _TOP_LEVEL_KEYS),
       value=st.one_of(st.none(), st.integers(), st.text(), st.dictionaries(st.text(), st.integers())))
def test_any_unknown_top_level_key_is_named(key: str, value: Any):
    with pytest.raises(ConfigError) as info:
        load_config({"device": "cpu", key: value})
    assert f"unknown config key '{key}'" in str(info.value)


# ------------------------------------------------------------------ bad values

def _dummy_loader(**dummy: Any) -> Dict[str, Any]:
    spec = {"shape": [4, 3], **dummy}
    return {"evaluation": {"accuracy": {"dataloader": {"dataset": {"dummy": spec}}}}}


@pytest.mark.parametrize("source, fragments", [
    ({"mixed_precision": {"precisions": "fp64"}},
     ["'mixed_precision.precisions'", "'fp64'", "allowed values: bf16, fp32"]),
    ({"mixed_precision": {"precisions": ["bf16", "fp64"]}},
     ["'mixed_precision.precisions[1]'", "'fp64'", "bf16, fp32"]),
    ({"mixed_precision": {"precisions": []}}, ["'mixed_precision.precisions'", "empty"]),
    ({"mixed_precision": {"target": "xyz"}},
     ["'mixed_precision.target'", "'xyz'", "allowed values: spr, cpx, avx512_bf16"]),
    ({"tuning": {"accuracy_criterion": {"relative": 0.01, "absolute": 0.1}}},
     ["config key 'tuning.accuracy_criterion': give exactly one of 'relative' or 'absolute', not both"]),
    ({"tuning": {"accuracy_criterion": {"relative": 1.0}}},
     ["'tuning.accuracy_criterion.relative'", ">= 0 and < 1", "1.0"]),
    ({"tuning": {"accuracy_criterion": {"absolute": -0.5}}},
     ["'tuning.accuracy_criterion.absolute'", ">= 0", "-0.5"]),
    ({"evaluation": {"accuracy": {"metric": {"BLEU": {}}}}},
     ["'evaluation.accuracy.metric'", "'BLEU'", "Accuracy, F1, MAE, MSE, RMSE, topk"]),
    ({"evaluation": {"accuracy": {"metric": {"MSE": {}, "topk": 1}}}},
     ["'evaluation.accuracy.metric'", "exactly one metric"]),
    ({"evaluation": {"accuracy": {"metric": {"topk": 0}}}}, ["'evaluation.accuracy.metric.topk'", ">= 1"]),
    ({"evaluation": {"accuracy": {"metric": {"higher_is_better": True}}}},
     ["'evaluation.accuracy.metric'", "got none"]),
    ({"tuning": {"exit_policy": {"timeout": -1}}}, ["'tuning.exit_policy.timeout'", ">= 0", "-1"]),
    ({"tuning": {"exit_policy": {"timeout": "5"}}},
     ["'tuning.exit_policy.timeout'", "'5' (str)", "number"]),
    ({"tuning": {"exit_policy": {"max_trials": True}}},
     ["'tuning.exit_policy.max_trials'", "True (bool)", "integer >= 1"]),
    ({"tuning": {"exit_policy": {"max_trials": 2.0}}}, ["'tuning.exit_policy.max_trials'", "2.0 (float)"]),
    ({"tuning": {"exit_policy": {"performance_only": 1}}},
     ["'tuning.exit_policy.performance_only'", "true or false"]),
    ({"tuning": {"random_seed": -3}}, ["'tuning.random_seed'", "-3"]),
    ({"tuning": {"strategy": {"name": "bayesian"}}}, ["'tuning.strategy.name'", "sensitivity, basic"]),
    ({"tuning": {"objective": "accuracy"}}, ["'tuning.objective'", "performance"]),
    ({"device": "gpu"}, ["'device'", "'gpu'", "allowed values: cpu"]),
    ({"model": {"framework": "pytorch"}}, ["'model.framework'", "tensorflow, tensorflow_itex, keras"]),
    ({"model": {"inputs": 3}}, ["'model.inputs'", "string or a list of strings"]),
    ({"evaluation": {"accuracy": {"dataloader": {"batch_size": 0}}}},
     ["'evaluation.accuracy.dataloader.batch_size'", ">= 1", "0 (int)"]),
    ({"evaluation": {"accuracy": {"dataloader": {"last_batch": "keep"}}}},
     ["'evaluation.accuracy.dataloader.last_batch'", "rollover, discard"]),
    (_dummy_loader(shape=[[2, 3], [2]], dtype=["float32", "float8"]),
     ["'evaluation.accuracy.dataloader.dataset.dummy.dtype[1]'", "'float8'", "float32"]),
    (_dummy_loader(dtype=["float32", "int32"]),
     ["'evaluation.accuracy.dataloader.dataset.dummy.dtype'", "list of 1"]),
    (_dummy_loader(shape=[4, 0]), ["'evaluation.accuracy.dataloader.dataset.dummy.shape[1]'", ">= 1"]),
    (_dummy_loader(low=2, high=1), ["'evaluation.accuracy.dataloader.dataset.dummy.low'", "exceeds"]),
    (_dummy_loader(shape=None), ["'evaluation.accuracy.dataloader.dataset.dummy.shape'", "required"]),
    ({"evaluation": {"accuracy": {"dataloader": {"dataset": {"npz": {"path": "a"}, "dummy": {"shape": [1]}}}}}},
     ["'evaluation.accuracy.dataloader.dataset'", "exactly one dataset kind", "dummy, npz"]),
    ({"evaluation": {"performance": {"dataloader": {"dataset": {"tfrecord": {
        "path": "f", "features": {"x": {"dtype": "float32"}}, "inputs": ["y"]}}}}}},
     ["'evaluation.performance.dataloader.dataset.tfrecord.inputs[0]'", "'y'", "allowed values: x"]),
    ({"evaluation": {"performance": {"dataloader": {"dataset": {"tfrecord": {
        "path": "f", "features": {"x": {"dtype": "float16"}}}}}}}},
     ["'evaluation.performance.dataloader.dataset.tfrecord.features.x.dtype'", "float32, int64, string"]),
    ({"evaluation": {"performance": {"iteration": 0}}}, ["'evaluation.performance.iteration'", "or -1"]),
    ({"evaluation": {"performance": {"configs": {"num_of_instance": 0}}}},
     ["'evaluation.performance.configs.num_of_instance'"]),
    ({"quantization": {"approach": "dynamic"}}, ["'quantization.approach'", "post_training_static_quant"]),
    ({"quantization": {"calibration": {"sampling_size": [10, -1]}}},
     ["'quantization.calibration.sampling_size[1]'", ">= 1"]),
    ({"quantization": {"model_wise": {"weight": {"granularity": "per_row"}}}},
     ["'quantization.model_wise.weight.granularity'", "per_channel, per_tensor"]),
    ({"version": "1.0"}, ["'version'", "'1.0' (str)"]),
    ({"mixed_precision": [1, 2]}, ["'mixed_precision'", "expected a mapping"]),
])
def test_bad_values_name_key_value_and_allowed(source: Dict[str, Any], fragments):
    msg = _error(source)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_yaml_exponent_gotcha_is_explained(tmp_path):
    msg = _error(_write(tmp_path, "tuning:\n  accuracy_criterion:\n    relative: 1e-2\n"))
    assert "'tuning.accuracy_criterion.relative'" in msg and "1.0e-2" in msg
    assert "conf.yaml" in msg  # errors in a file name the file


def test_bad_source_type():
    assert "YAML file path" in _error(42)


def test_errors_are_one_line_with_a_short_preview_of_the_value():
    msg = _error({"tuning": {"exit_policy": {"timeout": ["x" * 50] * 20}}})
    assert msg.startswith("config key 'tuning.exit_policy.timeout': expected a finite number >= 0; got [")
    assert "..." in msg and len(msg) < 200 and "\n" not in msg
    assert "validation error" not in msg and "pydantic" not in msg


@pytest.mark.parametrize("source, key", [
    (_dummy_loader(shape=[[2, 3], [2]], dtype="float8"), "evaluation.accuracy.dataloader.dataset.dummy.dtype"),
    ({"quantization": {"calibration": {"sampling_size": 0}}}, "quantization.calibration.sampling_size"),
    ({"mixed_precision": {"op_wise": {"n": {"weight": {"dtype": "fp16"}}}}},
     "mixed_precision.op_wise.n.weight.dtype"),
    ({"evaluation": {"accuracy": {"metric": {"topk": {"k": "5"}}}}}, "evaluation.accuracy.metric.topk.k"),
])
def test_a_single_value_for_a_list_is_reported_at_its_key(source: Dict[str, Any], key: str):
    assert _error(source).startswith(f"config key '{key}': ")


def test_per_input_values_broadcast_and_lists_need_one_per_shape():
    spec = load_config(_dummy_loader(shape=[[2, 3], [2]], low=-1, dtype="int32")).evaluation.accuracy
    dummy = spec.dataloader.dataset
    assert (dummy.low, dummy.high, dummy.dtype) == ((-1.0, -1.0), (1.0, 1.0), ("int32", "int32"))
    assert "list of 2" in _error(_dummy_loader(shape=[[2, 3], [2]], low=[0.5]))


def test_constants_have_one_home():
    from tf_bf16 import capability, common, metrics
    from tf_bf16.transforms import plan

    assert config_lib.PRECISIONS is plan.PRECISIONS and config_lib.FP32 is plan.FP32
    assert config_lib.TARGETS is capability.TARGETS and config_lib.LAST_BATCH is common.LAST_BATCH
    assert config_lib.METRICS is metrics.METRICS
    for name, cls in metrics.METRICS.items():
        spec = {name: 1 if name == "topk" else {}}
        metric = load_config({"evaluation": {"accuracy": {"metric": spec}}}).evaluation.accuracy.metric
        assert metric.higher_is_better is cls.higher_is_better


def test_importing_the_config_does_not_load_tensorflow():
    code = "import sys, tf_bf16.config; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------ YAML files

def test_missing_yaml_file_names_path(tmp_path):
    missing = str(tmp_path / "nope" / "conf.yaml")
    msg = _error(missing)
    assert missing in msg and "does not exist" in msg


def test_directory_is_not_a_config(tmp_path):
    assert "is a directory" in _error(str(tmp_path))


def test_malformed_yaml_names_path_and_line(tmp_path):
    path = _write(tmp_path, "model:\n  name: x\ntuning:\n  exit_policy: [1, 2\n  random_seed: 3\n", "bad.yaml")
    msg = _error(path)
    assert path in msg
    assert "line 5" in msg and "invalid YAML" in msg


def test_malformed_yaml_indentation(tmp_path):
    path = _write(tmp_path, "model:\n  name: x\n   framework: tensorflow\n", "indent.yaml")
    msg = _error(path)
    assert path in msg and "line 3" in msg


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = _write(tmp_path, "tuning:\n  random_seed: 1\n  random_seed: 2\n", "dup.yaml")
    msg = _error(path)
    assert path in msg and "duplicate key 'random_seed'" in msg and "line 3" in msg


def test_yaml_top_level_must_be_mapping(tmp_path):
    path = _write(tmp_path, "- a\n- b\n", "list.yaml")
    msg = _error(path)
    assert path in msg and "mapping" in msg


# ------------------------------------------------------------------ immutability, round trip

def test_config_is_immutable(tmp_path):
    cfg = load_config(_write(tmp_path, FULL_YAML))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tuning.random_seed = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.mixed_precision.op_wise["x"] = config_lib.DtypeOverride()  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.evaluation.accuracy.postprocess["transform"]["LabelShift"] = 0  # type: ignore[index]


def test_to_dict_round_trip_pickle_and_hash(tmp_path):
    cfg = load_config(_write(tmp_path, FULL_YAML))
    plain = cfg.to_dict()
    assert plain["tuning"]["accuracy_criterion"] == {"absolute": 0.02, "higher_is_better": False}
    assert plain["evaluation"]["accuracy"]["metric"] == {"topk": 1, "higher_is_better": True}
    assert "dummy" in plain["evaluation"]["accuracy"]["dataloader"]["dataset"]
    assert load_config(plain) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert copy.deepcopy(cfg) == cfg
    assert hash(cfg) == hash(load_config(plain))


# ---------------------------------------------------------------- quantization dtype overrides

def _graph_a_converter(conf: Dict[str, Any]):
    from tf_bf16 import MixedPrecision
    from tf_bf16.model import Model
    from tests import zoo

    converter = MixedPrecision(conf, target="spr", env={})
    converter.model = Model(zoo.three_conv_graph(), inputs=["input"], outputs=["final"])
    return converter


def _t(model, name: str) -> str:
    from tf_bf16.transforms import graph as g

    node = next(n for n in model.graph_def.node if n.name == name)
    return "bf16" if node.attr["T"].type == g.BFLOAT16 else "fp32"


def test_quantization_op_wise_fp32_keeps_that_node_fp32_as_in_neural_compressor():
    keep = {"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}}
    out = _graph_a_converter({"quantization": {"op_wise": {"conv3": keep}}})()
    assert _t(out, "conv3") == "fp32" and _t(out, "conv1") == "bf16" and _t(out, "conv2") == "bf16"
    reasons = {r["name"]: r["reason"] for r in out.report["fp32_nodes"]}
    assert "forced FP32 by config" in reasons["conv3"]
    plain = _graph_a_converter({})()
    assert _t(plain, "conv3") == "bf16"   # the override, not the graph, kept it FP32


def test_quantization_op_wise_bf16_forces_a_deny_op_and_model_wise_fp32_disables_bf16():
    out = _graph_a_converter({"quantization": {"op_wise": {"log1": {"activation": {"dtype": ["bf16"]}}}}})()
    assert _t(out, "log1") == "bf16"
    fp32 = _graph_a_converter({"quantization": {"model_wise": {"activation": {"dtype": ["fp32"]}}}})
    assert fp32.precisions == ("fp32",)
    assert all(_t(fp32(), n) == "fp32" for n in ("conv1", "conv2", "conv3"))


@pytest.mark.parametrize("conf,key", [
    ({"quantization": {"op_wise": {"conv3": {"activation": {"dtype": ["int8"]}}}}},
     "quantization.op_wise.conv3.activation.dtype"),
    ({"quantization": {"model_wise": {"weight": {"dtype": ["uint8", "fp32"]}}}}, "quantization.model_wise.weight.dtype"),
    ({"quantization": {"optype_wise": {"Conv2D": {"weight": {"dtype": "int8"}}}}},
     "quantization.op_type_wise.Conv2D.weight.dtype"),
])
def test_mixed_precision_refuses_int8_dtypes_and_points_to_quantization(conf, key):
    """MixedPrecision has no INT8 stage: an int8/uint8 dtype is an error naming the key, the allowed
    values and where INT8 is done, never silently dropped (a list like [uint8, fp32] would otherwise
    turn BF16 off for the whole model)."""
    from tf_bf16 import MixedPrecision

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        MixedPrecision(conf)
    assert "Quantization" in str(info.value) and "bf16, fp32" in str(info.value)


def test_quantization_and_mixed_precision_op_wise_must_agree():
    from tf_bf16 import MixedPrecision

    conf = {"mixed_precision": {"op_wise": {"conv3": {"activation": {"dtype": ["bf16"]}}}},
            "quantization": {"op_wise": {"conv3": {"activation": {"dtype": ["fp32"]}}}}}
    with pytest.raises(ConfigError, match=r"mixed_precision\.op_wise\.conv3.*quantization\.op_wise\.conv3"):
        MixedPrecision(conf)
    agree = dict(conf, mixed_precision={"op_wise": {"conv3": {"activation": {"dtype": ["fp32"]}}}})
    assert MixedPrecision(agree).node_precisions == {"conv3": "fp32"}


# ---------------------------------------------------------------- quantization section as Quantization reads it

@pytest.mark.parametrize("entry, expected, allowed", [
    ({"activation": {"dtype": ["int8"]}}, "int8", None),
    ({"weight": {"dtype": "uint8"}}, "int8", None),                                   # uint8 is INT8 too
    ({"activation": {"dtype": ["bf16"]}}, "bf16", None),
    ({"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}}, "fp32", None),
    ({"activation": {"dtype": ["int8", "bf16", "fp32"]}}, None, None),                 # the tuner chooses
    ({"activation": {"dtype": ["int8", "bf16"]}}, None, None),       # fp32 is the last resort anyway: free
    ({"activation": {"dtype": ["uint8", "fp32"]}, "weight": {"dtype": ["int8", "bf16"]}}, "int8", None),  # in common
    ({"activation": {"dtype": ["bf16", "fp32"]}}, None, {"bf16", "fp32"}),            # not INT8, else free
    ({"activation": {"dtype": ["int8", "fp32"]}}, None, {"int8", "fp32"}),            # never BF16
    ({"activation": {"dtype": ["uint8", "bf16", "fp32"]}, "weight": {"dtype": ["int8", "fp32"]}}, None,
     {"int8", "fp32"}),
    ({"activation": {"granularity": "per_tensor"}}, None, None),
    ({}, None, None),
])
def test_quantization_dtype_resolution_with_the_int8_stage(entry: Dict[str, Any], expected: str, allowed):
    """One precision forces a node; a list of several is the set it may take, fp32 added (the fallback);
    the sets that limit nothing are left out, and a name is in one of the two mappings at most."""
    cfg = load_config({"quantization": {"op_wise": {"n": entry}, "optype_wise": {"MatMul": entry}}})
    assert cfg.node_precisions(int8=True).get("n") == expected
    assert cfg.op_type_precisions(int8=True).get("MatMul") == expected
    assert cfg.node_allowed(int8=True).get("n") == (frozenset(allowed) if allowed else None)
    assert cfg.op_type_allowed(int8=True).get("MatMul") == (frozenset(allowed) if allowed else None)


def test_float_dtype_lists_limit_nothing_without_the_int8_stage():
    """For MixedPrecision [bf16, fp32] is every precision it has; in mixed_precision it says nothing about INT8
    either, since that section cannot name int8 (a config shared by both converters keeps the node in INT8)."""
    both = {"activation": {"dtype": ["bf16", "fp32"]}}
    cfg = load_config({"quantization": {"op_wise": {"q": both}}, "mixed_precision": {"op_wise": {"m": both}}})
    assert cfg.node_allowed() == {} and cfg.node_precisions() == {}
    assert cfg.node_allowed(int8=True) == {"q": frozenset({"bf16", "fp32"})} and cfg.node_precisions(int8=True) == {}


@pytest.mark.parametrize("mixed, quant, forced, allowed", [
    (["bf16"], ["bf16", "fp32"], "bf16", None),
    (["fp32"], ["int8", "fp32"], "fp32", None),
    (["bf16", "fp32"], ["int8", "fp32"], None, {"int8", "fp32"}),
])
def test_mixed_precision_and_quantization_entries_narrow_each_other(mixed, quant, forced, allowed):
    cfg = load_config({"mixed_precision": {"op_type_wise": {"Conv2D": {"activation": {"dtype": mixed}}}},
                       "quantization": {"op_type_wise": {"Conv2D": {"activation": {"dtype": quant}}}}})
    assert cfg.op_type_precisions(int8=True).get("Conv2D") == forced
    assert cfg.op_type_allowed(int8=True).get("Conv2D") == (frozenset(allowed) if allowed else None)


def test_entries_that_allow_no_common_precision_name_both_keys():
    cfg = load_config({"mixed_precision": {"op_wise": {"conv3": {"activation": {"dtype": ["bf16"]}}}},
                       "quantization": {"op_wise": {"conv3": {"activation": {"dtype": ["int8", "fp32"]}}}}})
    with pytest.raises(ConfigError, match=r"^config keys 'mixed_precision\.op_wise\.conv3' \(bf16\) and "
                                          r"'quantization\.op_wise\.conv3' \(int8, fp32\) disagree"):
        cfg.node_allowed(int8=True)


@pytest.mark.parametrize("conf, expected", [
    ({}, ("int8", "bf16", "fp32")),
    ({"quantization": {"model_wise": {"weight": {"dtype": "int8"}}}}, ("int8", "bf16", "fp32")),
    ({"quantization": {"model_wise": {"activation": {"dtype": ["uint8", "fp32"]}}}}, ("int8", "fp32")),
    ({"quantization": {"model_wise": {"activation": {"dtype": ["int8", "bf16"]}}}}, ("int8", "bf16", "fp32")),
    ({"use_bf16": False, "quantization": {}}, ("int8", "fp32")),
    ({"mixed_precision": {"precisions": "fp32"}}, ("int8", "fp32")),
])
def test_quantization_precisions(conf: Dict[str, Any], expected):
    assert load_config(conf).quantization_precisions() == expected


@pytest.mark.parametrize("dtypes", [["fp32"], ["bf16", "fp32"]])
def test_quantization_model_wise_without_int8_is_refused(dtypes):
    cfg = load_config({"quantization": {"model_wise": {"activation": {"dtype": dtypes}}}})
    with pytest.raises(ConfigError, match=r"'quantization\.model_wise'.*quantize nothing.*MixedPrecision"):
        cfg.quantization_precisions()


def test_quantization_op_type_wise_alias_round_trip_and_both_refused():
    entry = {"activation": {"dtype": ["fp32"]}}
    cfg = load_config({"quantization": {"optype_wise": {"MatMul": entry}}})
    assert cfg == load_config({"quantization": {"op_type_wise": {"MatMul": entry}}})
    assert load_config(cfg.to_dict()) == cfg
    assert cfg.op_type_precisions() == cfg.op_type_precisions(int8=True) == {"MatMul": "fp32"}   # both converters
    msg = _error({"quantization": {"optype_wise": {"MatMul": entry}, "op_type_wise": {"MatMul": entry}}})
    assert "'quantization.optype_wise'" in msg and "op_type_wise" in msg
    assert "'quantization.optype_wise.MatMul.activation.dtype[0]'" in _error(
        {"quantization": {"optype_wise": {"MatMul": {"activation": {"dtype": ["int4"]}}}}})


@pytest.mark.parametrize("conf, fragments", [
    ({"quantization": {"op_wise": {"conv": {"activation": {"dtype": ["int4"]}}}}},
     ["'quantization.op_wise.conv.activation.dtype[0]'", "'int4'", "int8, uint8, bf16, fp32"]),
    ({"quantization": {"op_wise": {"conv": {"activation": {"dtype": ["int8"]}, "weight": {"dtype": ["fp32"]}}}}},
     ["'quantization.op_wise.conv'", "conflict", "activation: int8; weight: fp32"]),
    ({"quantization": {"model_wise": {"weight": {"algorithm": "kl"}}}},
     ["'quantization.model_wise.weight.algorithm'", "'kl'", "allowed values: minmax"]),
    ({"quantization": {"model_wise": {"activation": {"algorithm": "mse"}}}},
     ["'quantization.model_wise.activation.algorithm'", "'mse'", "minmax, kl, percentile"]),
])
def test_quantization_errors_name_the_key(conf: Dict[str, Any], fragments):
    msg = _error(conf)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_quantization_calibration_settings_and_their_defaults():
    from tf_bf16 import calibration

    assert set(config_lib.ACTIVATION_ALGORITHMS) == set(calibration.ALGORITHMS)
    default = config_lib.QuantizationConfig()
    assert (default.sampling_size(), default.activation_algorithm(), default.weight_granularity()) == \
        (100, "minmax", "per_channel")
    quant = load_config({"quantization": {"calibration": {"sampling_size": [20, 50]}, "model_wise": {
        "activation": {"algorithm": ["KL", "minmax"]}, "weight": {"granularity": "per_tensor"}}}}).quantization
    assert (quant.sampling_size(), quant.activation_algorithm(), quant.weight_granularity()) == (20, "kl", "per_tensor")
    assert load_config({"quantization": {"model_wise": {"activation": {"algorithm": "percentile"}}}}) \
        .quantization.activation_algorithm() == "percentile"


def test_quantization_unapplied_keys():
    quant = load_config({"quantization": {
        "model_wise": {"weight": {"scheme": "asym", "granularity": "per_channel"},
                       "activation": {"scheme": "asym", "granularity": "per_channel"}},
        "op_wise": {"conv": {"weight": {"granularity": "per_tensor", "dtype": "int8"}}}}}).quantization
    assert quant.unapplied_keys() == ["quantization.model_wise.weight.scheme",
                                      "quantization.model_wise.activation.granularity",
                                      "quantization.op_wise.conv.weight.granularity"]
    assert load_config({"quantization": {"model_wise": {
        "weight": {"granularity": "per_channel", "scheme": "sym", "dtype": "int8", "algorithm": "minmax"}}}}) \
        .quantization.unapplied_keys() == []
