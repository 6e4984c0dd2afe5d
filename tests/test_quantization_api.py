"""Tests for tf_bf16.Quantization and ``tf-bf16 quantize``: INT8 + BF16 + FP32 on the trained digits CNN.

Numbers are checked against the converted GraphDef itself (op counts, dtypes, the Casts in front
of each QuantizeV2) and against held-out accuracy; tests/conftest.py turns oneDNN on, which
TensorFlow's quantized ops need.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import tensorflow as tf

from tests import zoo
from tf_bf16 import Model, Quantization, common, report as report_lib
from tf_bf16.data import ArrayDataset
from tf_bf16.errors import ConfigError
from tf_bf16.transforms import graph as g

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits_cnn"
BF16, FP32 = tf.bfloat16.as_datatype_enum, tf.float32.as_datatype_enum
CALIBRATION_SAMPLES = 200
from tf_bf16.capability import detect_cpu_features

CPU = detect_cpu_features()


# ---------------------------------------------------------------------- helpers and fixtures

@pytest.fixture(scope="module")
def fp32(digits) -> Model:
    """The trained digits CNN as a tf_bf16.Model (treat as read-only: several tests share it)."""
    keras_model, _ = digits
    return Model(keras_model)


@pytest.fixture(scope="module")
def calib_loader() -> common.DataLoader:
    """Training images (never the held-out ones) in batches of 50, as a user would give them."""
    x_train, _, y_train, _ = zoo.digits_data()
    return common.DataLoader(ArrayDataset([x_train[:CALIBRATION_SAMPLES]], y_train[:CALIBRATION_SAMPLES]),
                             batch_size=50)


def _quantize(model: Model, calib: Any, conf: Any = None, precisions=None) -> Model:
    converter = Quantization(conf)
    if precisions is not None:
        converter.precisions = precisions
    converter.model = model
    converter.calib_dataloader = calib
    return converter()


def _accuracy(model: Model, data) -> float:
    x_test, y_test = data
    return zoo.accuracy(model.run([x_test])[0], y_test)


def _ops(graph_def) -> collections.Counter:
    return collections.Counter(n.op for n in graph_def.node)


def _quantized_ops(graph_def) -> int:
    return sum(n.op.startswith("Quantized") for n in graph_def.node)


def _conv_names(model: Model) -> List[str]:
    return [n.name for n in model.graph_def.node if n.op == "Conv2D"]


@pytest.fixture(scope="module")
def quantized(fp32, calib_loader) -> Model:
    return _quantize(fp32, calib_loader)


# ---------------------------------------------------------------------- (a) INT8 from code

def test_int8_accuracy_within_one_point_of_fp32(digits, fp32, quantized):
    _, held_out = digits
    assert abs(_accuracy(quantized, held_out) - _accuracy(fp32, held_out)) <= 0.01
    ops = _ops(quantized.graph_def)
    assert not {"Conv2D", "MatMul"} & set(ops)                     # every contraction runs in INT8
    assert ops["QuantizedConv2DWithBiasAndReluAndRequantize"] == 2


def test_report_counts_match_the_quantized_graph(fp32, quantized):
    report, graph = quantized.report, quantized.graph_def
    ops = _ops(graph)
    summary, int8 = report["summary"], report["int8"]
    assert summary["int8_nodes"] > 0 and int8["quantized_ops"] == _quantized_ops(graph) > 0
    assert summary["quantize_nodes"] == int8["quantize"] == ops["QuantizeV2"] >= 1
    assert summary["dequantize_nodes"] == int8["dequantize"] == ops["Dequantize"]
    assert int8["casts"] == summary["casts_after"] == ops["Cast"]
    by_type = int8["by_input_op_type"]
    inputs = _ops(fp32.graph_def)
    assert by_type["Conv2D"] == {"total": inputs["Conv2D"], "int8": 2, "bf16": 0, "fp32": 0, "removed": 0}
    assert by_type["MatMul"]["int8"] == inputs["MatMul"] == 2
    assert all(sum(row[k] for k in ("int8", "bf16", "fp32", "removed")) == row["total"] for row in by_type.values())
    assert int8["replaced_nodes"] == sum(row["int8"] for row in by_type.values())
    assert report["precisions"] == ["int8", "bf16", "fp32"]
    assert report["calibration"] == {"algorithm": "minmax", "sampling_size": 100, "tensors": report["calibration"]
                                     ["tensors"], "ranges": report["calibration"]["tensors"],
                                     "weight_granularity": "per_channel", "weight_max": CPU.int8_weight_max,
                                     "cpu": CPU.model_name}
    assert {"clean_up", "calibration", "convert"} <= set(report["seconds"])


def test_report_text_shows_the_int8_table_and_counts(quantized):
    text = report_lib.format_report(quantized.report)
    int8 = quantized.report["int8"]
    assert "INT8 Statistics" in text
    assert f"QuantizeV2 {int8['quantize']}, Dequantize {int8['dequantize']}" in text
    conv_row = [line.split() for line in text.splitlines() if line.split()[:1] == ["Conv2D"]]
    assert conv_row == [["Conv2D", "2", "2", "0", "0", "0"]]


def test_int8_with_fp32_only_has_no_bf16_and_no_casts(digits, fp32, calib_loader):
    out = _quantize(fp32, calib_loader, precisions=["int8", "fp32"])
    types = {n.attr[a].type for n in out.graph_def.node for a in ("T", "dtype", "DstT") if a in n.attr}
    assert BF16 not in types and _ops(out.graph_def)["Cast"] == 0
    assert out.report["int8"]["by_input_op_type"]["Conv2D"]["int8"] == 2
    assert abs(_accuracy(out, digits[1]) - _accuracy(fp32, digits[1])) <= 0.01


# ---------------------------------------------------------------------- (b) INT8 + BF16 by op_wise

def test_op_wise_bf16_conv_between_int8_parts(digits, fp32, calib_loader):
    conv2 = _conv_names(fp32)[1]
    conf = {"quantization": {"op_wise": {conv2: {"activation": {"dtype": ["bf16"]}, "weight": {"dtype": "bf16"}}}}}
    out = _quantize(fp32, calib_loader, conf)
    nodes = {n.name: n for n in out.graph_def.node}
    conv = nodes[conv2]
    assert conv.op == "Conv2D" and conv.attr["T"].type == BF16
    feeder = nodes[g.node_name(conv.input[0])]
    assert feeder.op == "Dequantize" and feeder.attr["dtype"].type == BF16
    quantizers = [n for n in out.graph_def.node if n.op == "QuantizeV2"]
    after_bf16 = [q for q in quantizers if nodes[g.node_name(q.input[0])].op == "Cast"]
    assert after_bf16, "the INT8 part after the BF16 conv starts with a QuantizeV2 fed by one Cast"
    for quantizer in after_bf16:
        cast = nodes[g.node_name(quantizer.input[0])]
        assert (cast.attr["SrcT"].type, cast.attr["DstT"].type) == (BF16, FP32)
        assert nodes[g.node_name(cast.input[0])].op != "Cast"          # no Cast -> Cast pair
    row = out.report["int8"]["by_input_op_type"]["Conv2D"]
    assert (row["int8"], row["bf16"]) == (1, 1)
    assert out.report["int8"]["dequantize_to_bf16"] >= 1
    assert abs(_accuracy(out, digits[1]) - _accuracy(fp32, digits[1])) <= 0.01


def test_op_wise_fp32_keeps_a_conv_out_of_int8(fp32, calib_loader):
    conv1 = _conv_names(fp32)[0]
    out = _quantize(fp32, calib_loader, {"quantization": {"op_wise": {conv1: {"activation": {"dtype": "fp32"}}}}})
    conv = next(n for n in out.graph_def.node if n.name == conv1)
    assert conv.op == "Conv2D" and conv.attr["T"].type == FP32
    assert out.report["int8"]["by_input_op_type"]["Conv2D"]["int8"] == 1


def test_op_wise_bf16_fp32_keeps_a_conv_out_of_int8_and_lets_it_run_bf16(digits, fp32, calib_loader):
    """[bf16, fp32] means "not INT8", not "FP32": the BF16 stage takes the conv as it would any free one
    (this machine's plan; tests/conftest.py sets FORCE_BF16 where the CPU lacks avx512_bf16)."""
    conv2 = _conv_names(fp32)[1]
    conf = {"quantization": {"op_wise": {conv2: {"activation": {"dtype": ["bf16", "fp32"]}}}}}
    converter = Quantization(conf)
    assert converter.node_allowed == {conv2: frozenset({"bf16", "fp32"})} and converter.node_precisions == {}
    assert converter.plan_for(fp32).allowed(conv2, "Conv2D") == {"bf16", "fp32"}
    out = _quantize(fp32, calib_loader, conf)
    conv = next(n for n in out.graph_def.node if n.name == conv2)
    assert conv.op == "Conv2D" and conv.attr["T"].type == BF16
    row = out.report["int8"]["by_input_op_type"]["Conv2D"]
    assert (row["int8"], row["bf16"], row["fp32"]) == (1, 1, 0)
    assert abs(_accuracy(out, digits[1]) - _accuracy(fp32, digits[1])) <= 0.01


def test_op_type_wise_int8_fp32_keeps_what_int8_skips_in_fp32_not_bf16(zoo_model, zoo_inputs):
    """[int8, fp32] on BatchMatMulV2 in the BERT-like encoder: the projections (constant weights) still go
    INT8, the attention products (two activations: a pattern the INT8 stage skips) stay FP32, where without
    the entry they run BF16."""
    model = zoo_model("bert")
    calib = [(zoo_inputs("bert", batch=4, seed=seed), None) for seed in (11, 12)]
    limit = {"quantization": {"op_type_wise": {"BatchMatMulV2": {"activation": {"dtype": ["int8", "fp32"]}}}}}
    free, limited = _quantize(model, calib), _quantize(model, calib, limit)

    def products(out: Model) -> Dict[str, int]:
        return {n.name: n.attr["T"].type for n in out.graph_def.node if n.op == "BatchMatMulV2"}

    assert products(free) and set(products(free).values()) == {BF16}
    assert products(limited).keys() == products(free).keys() and set(products(limited).values()) == {FP32}
    reasons = {r["name"]: r["reason"] for r in limited.report["fp32_nodes"]}
    assert all("only int8 or fp32" in reasons[name] for name in products(limited))
    rows = [out.report["int8"]["by_input_op_type"]["BatchMatMulV2"] for out in (free, limited)]
    assert rows[1]["int8"] == rows[0]["int8"] > 0 and rows[1]["bf16"] == 0
    x = zoo_inputs("bert", batch=2, seed=5)
    want = model.run(x)[1]
    assert np.abs(limited.run(x)[1] - want).max() < 5e-2


# ---------------------------------------------------------------------- (c) YAML only

def _write_npz(tmp_path: Path, n: int = 120) -> Path:
    x_train, _, y_train, _ = zoo.digits_data()
    path = tmp_path / "calib.npz"
    np.savez(path, x=x_train[:n], y=y_train[:n])
    return path


def test_yaml_only_npz_calibration_and_model_wise_settings(tmp_path, digits, fp32):
    npz = _write_npz(tmp_path)
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"""\
quantization:
  calibration:
    sampling_size: [100, 50]
    dataloader:
      batch_size: 20
      dataset:
        npz: {{path: {npz}, inputs: x, labels: y}}
  model_wise:
    weight: {{granularity: per_tensor, scheme: sym, dtype: int8, algorithm: minmax}}
    activation: {{algorithm: percentile}}
""")
    converter = Quantization(str(conf))
    converter.model = fp32
    out = converter()
    calibration = out.report["calibration"]
    assert (calibration["algorithm"], calibration["sampling_size"], calibration["weight_granularity"]) == \
        ("percentile", 100, "per_tensor")
    assert out.report["int8"]["by_input_op_type"]["Conv2D"]["int8"] == 2
    # per_tensor: one weight range per convolution instead of one per output channel
    mins = [n for n in out.graph_def.node if n.name.endswith("weights_int8/min")]
    assert mins and all(not n.attr["value"].tensor.tensor_shape.dim for n in mins)
    assert abs(_accuracy(out, digits[1]) - _accuracy(fp32, digits[1])) <= 0.01


def test_calibration_stops_at_the_first_sampling_size(fp32):
    seen: List[int] = []

    class Counting:
        """A re-iterable list of batches that records how many it handed out."""

        def __iter__(self):
            x_train = zoo.digits_data()[0]
            for i in range(0, 400, 20):
                seen.append(i)
                yield x_train[i:i + 20], None

    converter = Quantization({"quantization": {"calibration": {"sampling_size": 60}}})
    converter.model, converter.calib_dataloader = fp32, Counting()
    converter()
    assert len(seen) == 3          # 3 batches of 20 reach 60 samples


# ---------------------------------------------------------------------- (d) command line

def _run_cli(*args: str, env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tf_bf16", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_cli_quantize_writes_a_model_that_runs(tmp_path, digits):
    conf, out, report = tmp_path / "conf.yaml", tmp_path / "digits_int8.pb", tmp_path / "report.json"
    conf.write_text("quantization:\n  calibration:\n    sampling_size: 64\n    dataloader:\n      batch_size: 32\n"
                    "      dataset:\n        dummy: {shape: [64, 8, 8, 1], low: 0.0, high: 1.0}\n")
    before = _tree_digest(EXAMPLE)
    # No TF_ENABLE_ONEDNN_OPTS: the command sets it for its own process before TensorFlow starts.
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", FORCE_BF16="1")
    result = _run_cli("quantize", f"--input_model={EXAMPLE}", f"--output_model={out}", f"--config={conf}",
                      f"--report={report}", env=env)
    assert result.returncode == 0, result.stderr
    assert "INT8 Statistics" in result.stdout and f"wrote {out}" in result.stdout
    assert _tree_digest(EXAMPLE) == before                         # the input model is untouched
    data = json.loads(report.read_text())
    written = Model(str(out))
    assert data["summary"]["quantize_nodes"] == _ops(written.graph_def)["QuantizeV2"] >= 1
    assert data["int8"]["by_input_op_type"]["Conv2D"]["int8"] == 2
    source = Model(str(EXAMPLE))
    x_test = digits[1][0]
    agree = np.mean(np.argmax(written.run([x_test])[0], -1) == np.argmax(source.run([x_test])[0], -1))
    assert agree >= 0.95


def test_cli_quantize_with_kernels_writes_a_model_on_int8_kernel_ops(kernel_ops, tmp_path, digits):
    """--kernels: the saved graph holds tf_bf16's INT8 kernel ops and no QuantizeV2, and loads and runs
    through tf_bf16.Model (which loads the kernel library)."""
    conf, out = tmp_path / "conf.yaml", tmp_path / "digits_int8_kernels.pb"
    conf.write_text("quantization:\n  calibration:\n    sampling_size: 64\n    dataloader:\n      batch_size: 32\n"
                    "      dataset:\n        dummy: {shape: [64, 8, 8, 1], low: 0.0, high: 1.0}\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", FORCE_BF16="1")
    result = _run_cli("quantize", f"--input_model={EXAMPLE}", f"--output_model={out}", f"--config={conf}",
                      "--kernels", env=env)
    assert result.returncode == 0, result.stderr
    written = Model(str(out))
    ops = _ops(written.graph_def)
    assert ops["TfBf16QuantizedConv2D"] == 2 and ops["QuantizeV2"] == 0
    x_test = digits[1][0]
    agree = np.mean(np.argmax(written.run([x_test])[0], -1) == np.argmax(Model(str(EXAMPLE)).run([x_test])[0], -1))
    assert agree >= 0.95


def test_cli_quantize_errors(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = tmp_path / "out.pb"
    no_data = tmp_path / "conf.yaml"
    no_data.write_text("quantization:\n  calibration:\n    sampling_size: 10\n")
    result = _run_cli("quantize", f"--input_model={EXAMPLE}", f"--output_model={out}", f"--config={no_data}", env=env)
    lines = [line for line in result.stderr.splitlines() if line.startswith("tf-bf16: error:")]
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr
    assert "'quantization.calibration.dataloader'" in lines[0]
    assert not out.exists()
    usage = _run_cli("quantize", f"--input_model={EXAMPLE}", f"--output_model={out}", env=env)
    assert usage.returncode == 2 and "--config is required" in usage.stderr


def test_cli_sets_onednn_only_for_quantize():
    from tf_bf16 import cli

    assert cli.COMMANDS["quantize"].environment == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    assert cli.command_environment(["--verbose", "quantize", "--input_model=x"]) == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    assert cli.command_environment(["convert", "--input_model=x"]) == {}
    assert cli.command_environment(["--help"]) == {} and cli.command_environment(["nope"]) == {}


# ---------------------------------------------------------------------- (e) errors

def test_no_calibration_data_names_the_key(fp32):
    converter = Quantization()
    converter.model = fp32
    with pytest.raises(ConfigError, match=r"'quantization\.calibration\.dataloader'.*calib_dataloader"):
        converter()


def test_onednn_off_is_refused(fp32, calib_loader):
    converter = Quantization(env={"TF_ENABLE_ONEDNN_OPTS": "0"})
    converter.model, converter.calib_dataloader = fp32, calib_loader
    with pytest.raises(ConfigError, match=r"oneDNN.*TF_ENABLE_ONEDNN_OPTS=0.*TF_ENABLE_ONEDNN_OPTS=1"):
        converter()


@pytest.mark.parametrize("conf, fragment", [
    ({"quantization": {"op_wise": {"conv": {"activation": {"dtype": ["int16"]}}}}},
     "'quantization.op_wise.conv.activation.dtype[0]'"),
    ({"quantization": {"model_wise": {"activation": {"dtype": ["fp32"]}}}}, "'quantization.model_wise'"),
    ({"quantization": {"calibration": {"dataloader": {"dataset": {"npz": {"path": "/no/such.npz"}}}}}},
     "'quantization.calibration.dataloader.dataset.npz.path'"),
])
def test_bad_config_is_refused_naming_the_key(fp32, conf, fragment):
    with pytest.raises(ConfigError) as info:
        converter = Quantization(conf)
        converter.model = fp32
        converter()
    assert fragment in str(info.value)


def test_bad_precisions_in_code_are_refused(fp32, calib_loader):
    converter = Quantization()
    with pytest.raises(ConfigError, match="int8"):
        converter.precisions = ["bf16", "fp32"]
    converter.model, converter.calib_dataloader = fp32, calib_loader
    converter.node_precisions = {"conv": "int4"}
    with pytest.raises(ConfigError, match=r"converter\.node_precisions\['conv'\].*int8, bf16, fp32"):
        converter()


# ---------------------------------------------------------------------- (f) the input is never modified

def test_input_model_is_unchanged(digits, fp32, calib_loader):
    keras_model, held_out = digits
    graph_bytes = fp32.graph_def.SerializeToString(deterministic=True)
    weights = [w.copy() for w in keras_model.get_weights()]
    probabilities = fp32.run([held_out[0]])[0]
    _quantize(fp32, calib_loader)
    direct = _quantize(keras_model, calib_loader)         # a keras.Model given directly
    assert direct.report["int8"]["quantized_ops"] > 0
    assert fp32.graph_def.SerializeToString(deterministic=True) == graph_bytes
    assert all(np.array_equal(a, b) for a, b in zip(weights, keras_model.get_weights()))
    np.testing.assert_array_equal(fp32.run([held_out[0]])[0], probabilities)


# ---------------------------------------------------------------------- accuracy tuning (tuning.tune_quantized)

def test_evaluation_runs_the_int8_tuner(digits, fp32, calib_loader):
    from tf_bf16 import tuning

    if not hasattr(tuning, "tune_quantized"):
        pytest.skip("tuning.tune_quantized is not there yet")
    x_test, y_test = digits[1]
    converter = Quantization({"tuning": {"accuracy_criterion": {"absolute": 0.01}}})
    converter.model, converter.calib_dataloader = fp32, calib_loader
    converter.eval_dataloader = common.DataLoader(ArrayDataset([x_test], y_test), batch_size=150)
    converter.metric = common.TopK(1)
    out = converter()
    assert "tuning" in out.report and out.report["goal_met"] is True
    assert _accuracy(out, digits[1]) >= _accuracy(fp32, digits[1]) - 0.01


def test_int8_fp32_refuses_tuning_that_needs_bf16(fp32, calib_loader, digits):
    """Without bf16 among the precisions, tuning (which gives INT8 ops back to BF16) is an error, not
    a silently BF16 result."""
    converter = Quantization({"use_bf16": False})
    assert converter.precisions == ("int8", "fp32")
    converter.model, converter.calib_dataloader = fp32, calib_loader
    converter.eval_func = lambda model: 1.0
    with pytest.raises(ConfigError, match="accuracy tuning.*exclude bf16"):
        converter()


def test_int8_fp32_with_kernels_runs_tf_bf16s_int8_ops(kernel_ops, fp32, calib_loader, digits):
    """kernels=True without bf16: the quantized ops become tf_bf16's INT8 kernel ops, nothing is BF16."""
    converter = Quantization({"use_bf16": False}, kernels=True)
    converter.model, converter.calib_dataloader = fp32, calib_loader
    out = converter()
    ops = _ops(out.graph_def)
    assert ops["TfBf16QuantizedConv2D"] == 2 and ops["TfBf16QuantizedMatMul"] == 2
    assert not any(n.attr["T"].type == tf.bfloat16.as_datatype_enum for n in out.graph_def.node if "T" in n.attr)
    assert out.report["kernels"]["nodes"] == 4
    assert out.report["op_types"]["TfBf16QuantizedConv2D"]["int8"] == 2          # reported as INT8, not FP32
    assert not [n for n in out.report["fp32_nodes"] if n["op"].startswith("TfBf16")]
    assert out.report["int8"]["quantize"] == 0 and out.report["int8"]["quantized_ops"] >= 4
    assert _accuracy(out, digits[1]) >= _accuracy(fp32, digits[1]) - 0.01
