"""Large models (issue 12): weights beyond protobuf's 2 GiB limit stay variables, and a .pb is refused.

Most tests lower ``model_io.MAX_PROTO_BYTES`` so a 1 MB model takes the large-model path; one
test builds a real 2.25 GiB SavedModel (skipped without enough free memory and disk) and
converts it through the command line, checking the output and the converter's peak memory.
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import tensorflow as tf

from tests import large_models
from tests.test_cli import REPO, assert_one_error_line, run_cli
from tf_bf16 import model_io, variables as variables_lib
from tf_bf16.errors import ModelSaveError, ModelTooLargeError, TfBf16Error
from tf_bf16.mixed_precision import MixedPrecision
from tf_bf16.model import Model

SMALL_LIMIT = 1024            # bytes: every model below counts as too large to freeze
BF16_TOLERANCE = 0.03         # max |bf16 - fp32| relative to max |fp32|
BIG_RAM = 12 * 1024 ** 3      # MemAvailable the real >2 GiB test needs (FP32 build + conversion + check)
BIG_DISK = 8 * 1024 ** 3      # 2.25 GiB source + 1.1 GiB output, with room to spare
# The CLI with the limit lowered in its own process (the constant cannot be patched from here),
# once TensorFlow has been imported quietly as the CLI does it.
LOWERED_LIMIT_CLI = [sys.executable, "-c", f"""
import contextlib, sys
from tf_bf16 import cli

@contextlib.contextmanager
def process(verbose):
    with cli.cli_process(verbose):
        from tf_bf16 import model_io
        model_io.MAX_PROTO_BYTES = {SMALL_LIMIT}
        yield

sys.exit(cli.dispatch(sys.argv[1:], process=process))
"""]


def tree_digest(path: Path) -> str:
    """SHA-256 over every file name and content under ``path``."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            h.update(str(full.relative_to(path)).encode())
            h.update(full.read_bytes())
    return h.hexdigest()


def assert_bf16_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape and actual.dtype == np.float32
    scale = float(np.max(np.abs(expected)))
    assert float(np.max(np.abs(actual - expected))) <= BF16_TOLERANCE * scale, "BF16 output too far from FP32"


def checkpoint_dtypes(saved_model: Path) -> Dict[str, str]:
    reader = tf.train.load_checkpoint(variables_lib.checkpoint_prefix(str(saved_model)))
    return {k: v.name for k, v in reader.get_variable_to_dtype_map().items()}


def run_signature(saved_model: Path, x: np.ndarray) -> np.ndarray:
    """The ``serving_default`` output ``y`` of a SavedModel loaded with ``tf.saved_model.load``."""
    loaded = tf.saved_model.load(str(saved_model))
    y = loaded.signatures["serving_default"](x=tf.constant(x))["y"].numpy()
    del loaded
    gc.collect()
    return y


@pytest.fixture(scope="module")
def small_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1.25 MB MLP SavedModel with its FP32 reference (treat as read-only)."""
    path = tmp_path_factory.mktemp("large_models") / "mlp"
    large_models.build_mlp(str(path), large_models.SMALL)
    return path


@pytest.fixture
def lowered_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_io, "MAX_PROTO_BYTES", SMALL_LIMIT)


# ----------------------------------------------------------------------------- fast: the limit lowered

def test_over_the_limit_the_weights_stay_variables(small_mlp: Path, lowered_limit: None) -> None:
    """Loading keeps each weight a VarHandleOp (values left in the checkpoint) and still runs as FP32."""
    model = Model(str(small_mlp))
    assert model.variables is not None
    assert sorted(s.node for s in model.variables.specs) == ["b1", "w1", "w2", "w3"]
    assert model.variables.nbytes == large_models.SMALL.weight_bytes
    ops = {n.name: n.op for n in model.graph_def.node}
    assert all(ops[s.node] == "VarHandleOp" for s in model.variables.specs)
    x, y = large_models.load_reference(str(small_mlp))
    np.testing.assert_allclose(model.run([x])[0], y, rtol=1e-5, atol=1e-5)


def test_under_the_limit_the_model_is_frozen_as_before(small_mlp: Path) -> None:
    model = Model(str(small_mlp))
    assert model.variables is None
    assert not any(n.op in ("VarHandleOp", "ReadVariableOp") for n in model.graph_def.node)


def test_a_large_checkpoint_with_small_signature_weights_is_frozen(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The signature's own weights decide, not the checkpoint (which may hold unused or optimizer state)."""
    module = tf.Module()
    module.used = tf.Variable(tf.ones([4, 4]))
    module.unused = tf.Variable(tf.zeros([64, 64]))
    module.serve = tf.function(lambda x: {"y": tf.matmul(x, module.used)},
                               input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    # Between the used weights (64 B) plus the graph and everything in the checkpoint (16 KiB + graph).
    graph_bytes = (tmp_path / "sm" / "saved_model.pb").stat().st_size
    monkeypatch.setattr(model_io, "MAX_PROTO_BYTES", graph_bytes + 1024)
    model = Model(str(tmp_path / "sm"))
    assert model.variables is None
    np.testing.assert_allclose(model.run([np.ones((2, 4), np.float32)])[0], np.full((2, 4), 4.0))


def test_converted_model_saves_bf16_variables(small_mlp: Path, tmp_path: Path, lowered_limit: None) -> None:
    """SavedModel out: FP32 weights read only by BF16 ops are BF16 variables, and the output matches FP32."""
    before = tree_digest(small_mlp)
    converter = MixedPrecision()
    converter.model = str(small_mlp)
    optimized = converter()
    x, y = large_models.load_reference(str(small_mlp))
    assert_bf16_close(optimized.run([x])[0], y)          # before saving: FP32 variables + Casts

    target = tmp_path / "mlp_bf16"
    optimized.save(str(target))
    assert sorted(os.listdir(tmp_path)) == ["mlp_bf16"], "a temp or shard directory was left behind"
    assert all(name.startswith("variables.") for name in os.listdir(target / "variables")), "shards left behind"
    dtypes = checkpoint_dtypes(target)
    assert dtypes == {"w1": "bfloat16", "b1": "bfloat16", "w2": "bfloat16", "w3": "bfloat16"}
    assert optimized.report["variables"] == {"count": 4, "bf16": 4, "bytes": large_models.SMALL.weight_bytes // 2,
                                             "source_bytes": large_models.SMALL.weight_bytes}
    assert_bf16_close(run_signature(target, x), y)       # stock tf.saved_model.load runs the signature
    again = Model(str(target))                           # and tf_bf16 reads its own output back
    assert again.variables is not None and all(s.dtype == "bfloat16" for s in again.variables.specs)
    assert_bf16_close(again.run({"x": x})[0], y)
    assert tree_digest(small_mlp) == before, "the input model was modified"


def test_keras_export_keeps_its_variables(tmp_path: Path, lowered_limit: None) -> None:
    """A Keras ``model.export`` SavedModel (object graph of a Keras model) takes the same path."""
    import keras

    inputs = keras.Input((32,))
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    outputs = keras.layers.Dense(10)(keras.layers.LayerNormalization()(hidden))
    keras_model = keras.Model(inputs, outputs)
    keras_model.export(str(tmp_path / "keras_sm"), verbose=False)
    x = np.random.default_rng(3).normal(size=(4, 32)).astype(np.float32)
    expected = keras_model(x).numpy()

    converter = MixedPrecision()
    converter.model = str(tmp_path / "keras_sm")
    optimized = converter()
    assert optimized.variables is not None and len(optimized.variables.specs) == 6
    optimized.save(str(tmp_path / "keras_bf16"))
    assert "bfloat16" in checkpoint_dtypes(tmp_path / "keras_bf16").values()
    loaded = tf.saved_model.load(str(tmp_path / "keras_bf16"))
    signature = loaded.signatures["serving_default"]
    (key,) = signature.structured_input_signature[1]
    (actual,) = signature(**{key: tf.constant(x)}).values()
    assert_bf16_close(actual.numpy(), expected)


def test_only_variables_read_solely_by_bf16_casts_become_bf16() -> None:
    """``fold_read_casts``: v feeds only a Cast to BF16 and folds; u is also read by an FP32 Relu and stays."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.bfloat16, [None, 4], name="x")
        handles = {n: tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[4, 4], shared_name=n, name=n) for n in "uv"}
        reads = {n: tf.raw_ops.ReadVariableOp(resource=h, dtype=tf.float32, name=f"read_{n}")
                 for n, h in handles.items()}
        mixed = tf.matmul(x, tf.cast(reads["u"], tf.bfloat16, name="cast_u"), name="mm_u")
        folded = tf.matmul(x, tf.cast(reads["v"], tf.bfloat16, name="cast_v"), name="mm_v")
        tf.identity(tf.cast(mixed + folded, tf.float32) + tf.nn.relu(reads["u"]), name="out")
    specs = tuple(variables_lib.VariableSpec(n, n, "float32", (4, 4)) for n in "uv")
    variables = variables_lib.Variables("unused", specs)

    graph_def, written = variables_lib.fold_read_casts(graph.as_graph_def(), variables, keep=["x", "out"])
    nodes = {n.name: n for n in graph_def.node}
    assert {s.node: s.dtype for s in written.specs} == {"u": "float32", "v": "bfloat16"}
    assert "cast_v" not in nodes and list(nodes["mm_v"].input) == ["x", "read_v"]
    assert nodes["v"].attr["dtype"].type == nodes["read_v"].attr["dtype"].type == tf.bfloat16.as_datatype_enum
    assert "cast_u" in nodes and nodes["u"].attr["dtype"].type == tf.float32.as_datatype_enum
    with tf.Graph().as_default():
        tf.graph_util.import_graph_def(graph_def, name="")   # still a valid graph

    _, untouched = variables_lib.fold_read_casts(graph.as_graph_def(), variables, keep=["read_v"])
    assert {s.dtype for s in untouched.specs} == {"float32"}, "a kept node was folded away"


@pytest.mark.parametrize("name", ["out.pb", "out.pbtxt"])
def test_pb_output_of_a_large_model_is_refused(small_mlp: Path, tmp_path: Path, lowered_limit: None,
                                               name: str) -> None:
    """One GraphDef cannot hold the weights: a clear error that says to write a SavedModel, nothing written."""
    model = Model(str(small_mlp))
    target = tmp_path / name
    with pytest.raises(ModelTooLargeError) as early:
        model.check_save_path(str(target))   # what a caller can ask before converting
    with pytest.raises(ModelTooLargeError) as info:
        model.save(str(target))
    assert str(early.value) == str(info.value)
    error = info.value
    assert isinstance(error, ModelSaveError) and isinstance(error, TfBf16Error)
    for fragment in (str(target), "protobuf", "1 KiB limit", "SavedModel directory", "out_savedmodel"):
        assert fragment in str(error), (fragment, str(error))
    assert os.listdir(tmp_path) == []


def test_cli_refuses_a_pb_and_writes_a_savedmodel(small_mlp: Path, tmp_path: Path) -> None:
    """The command line, with the limit lowered in its process: one error line for .pb, a SavedModel otherwise."""
    before = tree_digest(small_mlp)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    refused = run_cli("convert", f"--input_model={small_mlp}", f"--output_model={out_dir / 'mlp.pb'}",
                      "--target=spr", executable=LOWERED_LIMIT_CLI)
    line = assert_one_error_line(refused, 1, "mlp.pb", "protobuf", "write a SavedModel directory instead")
    assert "rerun with --verbose" not in line
    assert os.listdir(out_dir) == []

    done = run_cli("convert", f"--input_model={small_mlp}", f"--output_model={out_dir / 'mlp_bf16'}",
                   "--target=spr", executable=LOWERED_LIMIT_CLI)
    assert done.returncode == 0, done.stderr
    assert os.listdir(out_dir) == ["mlp_bf16"]
    x, y = large_models.load_reference(str(small_mlp))
    assert_bf16_close(run_signature(out_dir / "mlp_bf16", x), y)
    assert tree_digest(small_mlp) == before


# ----------------------------------------------------------------------------- slow: real 2.25 GiB of weights

def _big_test_skip_reason(tmp: Path) -> str:
    free_disk = shutil.disk_usage(tmp).free
    if large_models.mem_available_bytes() < BIG_RAM:
        return f"needs {BIG_RAM >> 30} GiB of available memory (MemAvailable)"
    if free_disk < BIG_DISK:
        return f"needs {BIG_DISK >> 30} GiB of free disk in {tmp}"
    return ""


def test_weights_over_2_gib_convert_savedmodel_to_savedmodel(tmp_path: Path) -> None:
    """A real 2.25 GiB SavedModel: .pb refused cleanly, SavedModel written with BF16 weights in < 3x memory."""
    reason = _big_test_skip_reason(tmp_path)
    if reason:
        pytest.skip(reason)
    dims = large_models.MlpDims()
    assert dims.weight_bytes > model_io.MAX_PROTO_BYTES
    try:
        _convert_big_model(tmp_path, dims)
    finally:  # 3.4 GiB: do not leave it to pytest's rotation of old temp directories
        shutil.rmtree(tmp_path, ignore_errors=True)


def _convert_big_model(tmp_path: Path, dims: large_models.MlpDims) -> None:
    source = tmp_path / "big"
    large_models.build_in_subprocess(str(source), dims)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    refused = large_models.run_measured(large_models.cli_command(
        "convert", f"--input_model={source}", f"--output_model={out_dir / 'big.pb'}", "--target=spr"), env=env,
        cwd=str(REPO))
    assert refused.returncode == 1, refused.stderr
    lines: List[str] = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tf-bf16: error: "), refused.stderr
    assert "2 GiB limit" in lines[0] and "write a SavedModel directory instead" in lines[0], lines[0]
    assert os.listdir(out_dir) == []

    target = out_dir / "big_bf16"
    done = large_models.run_measured(large_models.cli_command(
        "convert", f"--input_model={source}", f"--output_model={target}", "--target=spr"), env=env, cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    assert os.listdir(out_dir) == ["big_bf16"]
    ratio = done.peak_rss_bytes / dims.weight_bytes
    assert ratio < 3.0, f"conversion peak RSS {done.peak_rss_bytes} is {ratio:.2f}x the weights"
    assert set(checkpoint_dtypes(target).values()) == {"bfloat16"}
    x, y = large_models.load_reference(str(source))
    assert_bf16_close(run_signature(target, x), y)
