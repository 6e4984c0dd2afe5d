"""Hostile and unusual model files (issue 12, hardening): each is accepted or refused the right way.

Per case: the Python error class and message, and the command line run as a user would (exit
code, one ``tf-bf16: error:`` line, no traceback), the input file byte-identical afterwards,
and nothing left in the output folder (no output, no temp).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import saved_model_pb2

from tests.test_cli import REPO, assert_one_error_line, cli_stderr_lines, run_cli
from tf_bf16 import model_io
from tf_bf16.errors import GraphError, MalformedGraphError, ModelLoadError, ModelSaveError, TfBf16Error
from tf_bf16.model import Model

F32 = tf.float32.as_datatype_enum
RNG = np.random.default_rng(12)
W1 = RNG.normal(size=(16, 32)).astype(np.float32)
B1 = RNG.normal(size=32).astype(np.float32)
W2 = RNG.normal(size=(32, 8)).astype(np.float32)


# ----------------------------------------------------------------------------- hand-built graphs

def placeholder(name: str) -> tf.compat.v1.NodeDef:
    node = tf.compat.v1.NodeDef(name=name, op="Placeholder")
    node.attr["dtype"].CopyFrom(tf.compat.v1.AttrValue(type=F32))
    return node


def const(name: str, value: np.ndarray) -> tf.compat.v1.NodeDef:
    node = tf.compat.v1.NodeDef(name=name, op="Const")
    node.attr["dtype"].CopyFrom(tf.compat.v1.AttrValue(type=F32))
    node.attr["value"].CopyFrom(tf.compat.v1.AttrValue(tensor=tf.make_tensor_proto(value)))
    return node


def op(name: str, kind: str, inputs: List[str]) -> tf.compat.v1.NodeDef:
    node = tf.compat.v1.NodeDef(name=name, op=kind, input=inputs)
    node.attr["T"].CopyFrom(tf.compat.v1.AttrValue(type=F32))
    return node


def hand_built_mlp() -> tf.compat.v1.GraphDef:
    """x[?,16] -> MatMul -> BiasAdd -> Relu -> MatMul -> out, built node by node with no ``versions``."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.node.extend([
        placeholder("x"), const("w1", W1), op("mm1", "MatMul", ["x", "w1"]), const("b1", B1),
        op("add1", "BiasAdd", ["mm1", "b1"]), op("relu", "Relu", ["add1"]), const("w2", W2),
        op("mm2", "MatMul", ["relu", "w2"]), op("out", "Identity", ["mm2"]),
    ])
    return graph_def


def mlp_fp32(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W1 + B1, 0.0) @ W2


def cyclic_graph() -> tf.compat.v1.GraphDef:
    """a = x + d, b = relu(a), c = relu(b), d = relu(c): a data cycle of four nodes, no while loop."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.node.extend([placeholder("x"), op("a", "AddV2", ["x", "d"]), op("b", "Relu", ["a"]),
                           op("c", "Relu", ["b"]), op("d", "Relu", ["c"]), op("out", "Identity", ["x"])])
    return graph_def


def dangling_graph() -> tf.compat.v1.GraphDef:
    graph_def = tf.compat.v1.GraphDef()
    graph_def.node.extend([placeholder("x"), op("sum", "AddV2", ["x", "ghost:1"]), op("out", "Identity", ["sum"])])
    return graph_def


def duplicate_graph() -> tf.compat.v1.GraphDef:
    graph_def = tf.compat.v1.GraphDef()
    graph_def.node.extend([placeholder("x"), op("twin", "Relu", ["x"]), op("twin", "Identity", ["x"])])
    return graph_def


def write(path: Path, graph_def: graph_pb2.GraphDef) -> Path:
    path.write_bytes(graph_def.SerializeToString())
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert_cli(source: Path, output: Path) -> subprocess.CompletedProcess:
    return run_cli("convert", f"--input_model={source}", f"--output_model={output}", "--target=spr")


def assert_refused_cleanly(source: Path, tmp_path: Path, *fragments: str) -> None:
    """The CLI refuses ``source`` in one line naming it and ``fragments``, touching nothing."""
    before = digest(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = assert_one_error_line(convert_cli(source, out_dir / "converted.pb"), 1, str(source), *fragments)
    assert "rerun with --verbose" not in line, f"reached the generic handler: {line}"
    assert digest(source) == before
    assert os.listdir(out_dir) == []


# ----------------------------------------------------------------------------- item 2: no versions record

def test_hand_built_graph_without_versions_loads_and_runs(tmp_path: Path) -> None:
    """TensorFlow imports a GraphDef without ``versions``; so does tf_bf16, and it runs like TF."""
    path = write(tmp_path / "hand.pb", hand_built_mlp())
    model = Model(str(path))
    assert model.input_names == ["x"] and model.output_names == ["out"]
    x = RNG.normal(size=(5, 16)).astype(np.float32)
    np.testing.assert_allclose(model.run([x])[0], mlp_fp32(x), rtol=1e-5, atol=1e-4)


def test_hand_built_graph_converts_through_the_cli(tmp_path: Path) -> None:
    """`convert` of a versionless hand-built .pb writes a versioned BF16 graph that matches FP32."""
    source = write(tmp_path / "hand.pb", hand_built_mlp())
    before = digest(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "hand_bf16.pb"
    result = convert_cli(source, output)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert any("no 'versions' record" in line for line in cli_stderr_lines(result.stderr)), result.stderr
    assert digest(source) == before
    assert os.listdir(out_dir) == ["hand_bf16.pb"]

    written = graph_pb2.GraphDef.FromString(output.read_bytes())
    assert written.versions.producer == tf.version.GRAPH_DEF_VERSION
    by_name = {n.name: n for n in written.node}
    assert by_name["mm1"].attr["T"].type == tf.bfloat16.as_datatype_enum, "the MatMul was not converted"
    with tf.Graph().as_default():
        tf.graph_util.import_graph_def(written, name="")  # stock TensorFlow takes it back
    x = RNG.normal(size=(7, 16)).astype(np.float32)
    expected = mlp_fp32(x)
    actual = Model(str(output)).run({"x": x})[0]
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    scale = float(np.max(np.abs(expected)))
    assert float(np.max(np.abs(actual - expected))) <= 0.03 * scale, "BF16 output too far from FP32"


def test_hand_built_graph_saved_as_saved_model_gets_a_versions_record(tmp_path: Path) -> None:
    """A SavedModel written from a versionless graph carries one in its MetaGraph and loads back."""
    model = Model(write(tmp_path / "hand.pb", hand_built_mlp()))
    target = tmp_path / "hand_savedmodel"
    model.save(str(target))
    saved = saved_model_pb2.SavedModel.FromString((target / "saved_model.pb").read_bytes())
    assert saved.meta_graphs[0].graph_def.versions.producer == tf.version.GRAPH_DEF_VERSION
    x = RNG.normal(size=(3, 16)).astype(np.float32)
    np.testing.assert_allclose(Model(str(target)).run([x])[0], mlp_fp32(x), rtol=1e-5, atol=1e-4)
    assert sorted(os.listdir(tmp_path)) == ["hand.pb", "hand_savedmodel"]


def test_versions_stamp_stays_below_a_removed_op(tmp_path: Path) -> None:
    """TopK was removed at GraphDef version 7: a stamped producer must stay below it for TF to load it."""
    graph_def = tf.compat.v1.GraphDef()
    top_k = tf.compat.v1.NodeDef(name="top", op="TopK", input=["x"])
    top_k.attr["k"].CopyFrom(tf.compat.v1.AttrValue(i=2))
    top_k.attr["T"].CopyFrom(tf.compat.v1.AttrValue(type=F32))
    graph_def.node.extend([placeholder("x"), top_k])
    path = tmp_path / "old_op.pb"
    model_io.write_frozen(graph_def, str(path))
    written = graph_pb2.GraphDef.FromString(path.read_bytes())
    assert written.versions.producer == 6
    with tf.Graph().as_default():
        tf.graph_util.import_graph_def(written, name="")
    assert not graph_def.HasField("versions"), "the caller's GraphDef was modified"


def test_file_cut_inside_a_node_is_still_refused(tmp_path: Path) -> None:
    """A real truncation (half a node) does not parse: a clear one-line refusal."""
    data = hand_built_mlp().SerializeToString()
    source = tmp_path / "cut.pb"
    source.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated") as info:
        Model(str(source))
    assert str(source) in str(info.value)
    assert_refused_cleanly(source, tmp_path, "corrupt or truncated")


# ----------------------------------------------------------------------------- item 3: broken structure

BROKEN = {
    "cycle": (cyclic_graph, ["cycle outside any while loop", "a -> b -> c -> d -> a", "4 node(s)"]),
    "dangling": (dangling_graph, ["node 'sum' reads 'ghost:1'", "not in the graph", "truncated or incomplete"]),
    "duplicate": (duplicate_graph, ["duplicate node name 'twin'"]),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_graph_is_a_graph_error_naming_the_nodes(kind: str, tmp_path: Path) -> None:
    build, fragments = BROKEN[kind]
    source = write(tmp_path / f"{kind}.pb", build())
    for model_source in (str(source), build()):
        with pytest.raises(GraphError) as info:
            Model(model_source)
        error = info.value
        assert isinstance(error, MalformedGraphError) and isinstance(error, ModelLoadError)
        assert isinstance(error, TfBf16Error) and isinstance(error, ValueError)
        for fragment in fragments:
            assert fragment in str(error), (fragment, str(error))
    assert str(source) in str(pytest.raises(GraphError, Model, str(source)).value)


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_graph_is_one_clean_cli_error(kind: str, tmp_path: Path) -> None:
    build, fragments = BROKEN[kind]
    assert_refused_cleanly(write(tmp_path / f"{kind}.pb", build()), tmp_path, *fragments)


# ----------------------------------------------------------------------------- item 4: stale temps

def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make_temp(parent: Path, name: str, age_s: float = 0.0, as_dir: bool = True) -> Path:
    """A leftover temp ``parent/name`` holding a file, last written ``age_s`` seconds ago."""
    path = parent / name
    if as_dir:
        path.mkdir()
        (path / "saved_model.pb").write_bytes(b"partial")
        inner = [path / "saved_model.pb"]
    else:
        path.write_bytes(b"partial")
        inner = []
    stamp = time.time() - age_s
    for item in inner + [path]:
        os.utime(item, (stamp, stamp))
    return path


@pytest.mark.parametrize("output_name", ["model_dir", "model.pb"])
def test_save_removes_stale_temps_and_keeps_live_ones(output_name: str, tmp_path: Path) -> None:
    host, me, gone = socket.gethostname(), os.getpid(), dead_pid()
    old = model_io.STALE_AFTER_S + 60
    as_dir = not output_name.endswith(".pb")
    stale = [
        make_temp(tmp_path, f".{output_name}.tmp-{host}-{gone}-0badc0de", as_dir=as_dir),   # writer killed
        make_temp(tmp_path, f".{output_name}.tmp-{host}-{me}-5ca1ab1e", old, as_dir),       # idle for hours
        make_temp(tmp_path, f".{output_name}.tmp-elsewhere-{gone}-facade00", old, as_dir),  # other host, idle
        make_temp(tmp_path, f".{output_name}.tmp-0123abcd", old, as_dir),                   # older naming, idle
        make_temp(tmp_path, f".{output_name}.old-{host}-{gone}-feedf00d"),                  # swap interrupted
    ]
    kept = [
        make_temp(tmp_path, f".{output_name}.tmp-{host}-{me}-c0ffee00", as_dir=as_dir),  # a live writer's
        make_temp(tmp_path, f".{output_name}.tmp-elsewhere-{gone}-beefcafe", as_dir=as_dir),  # other host, fresh
        make_temp(tmp_path, f".other_{output_name}.tmp-{host}-{gone}-0badc0de"),  # another output's
        make_temp(tmp_path, f".{output_name}.tmp-notes", old),                     # not a temp's name
    ]
    Model(hand_built_mlp()).save(str(tmp_path / output_name))
    for path in stale:
        assert not path.exists(), f"stale {path.name} was not removed"
    for path in kept:
        assert path.exists(), f"{path.name} was removed"
    assert sorted(os.listdir(tmp_path)) == sorted([output_name] + [p.name for p in kept])


def test_cli_save_cleans_up_after_a_killed_save(tmp_path: Path) -> None:
    """A save killed with SIGKILL leaves only a hidden temp; the next save to that path removes it."""
    source = write(tmp_path / "hand.pb", hand_built_mlp())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "converted"
    script = ("import sys, time\n"
              "from tf_bf16 import model_io\n"
              "def write(tmp):\n"
              "    import os; os.mkdir(tmp); open(os.path.join(tmp, 'saved_model.pb'), 'wb').write(b'half')\n"
              "    print(tmp, flush=True); time.sleep(600)\n"
              "model_io.write_atomically(sys.argv[1], write)\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    writer = subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        leftover = Path(writer.stdout.readline().strip())
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert leftover.parent == out_dir and leftover.name.startswith(".converted.tmp-") and leftover.is_dir()
    assert os.listdir(out_dir) == [leftover.name], "the killed save left something at the output path"
    live = make_temp(out_dir, f".converted.tmp-{socket.gethostname()}-{os.getpid()}-c0ffee00")
    before = digest(source)

    result = convert_cli(source, target)
    assert result.returncode == 0, result.stderr
    assert not leftover.exists(), "the killed save's temp survived the next save"
    assert live.exists(), "a live writer's temp was removed"
    assert sorted(os.listdir(out_dir)) == sorted(["converted", live.name])
    assert (target / "saved_model.pb").exists()
    assert digest(source) == before


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_interrupted_write_leaves_no_temp(failure: Callable[[], BaseException], tmp_path: Path) -> None:
    def write(tmp: str) -> None:
        os.mkdir(tmp)
        (Path(tmp) / "saved_model.pb").write_bytes(b"half")
        raise failure()

    target = tmp_path / "model_dir"
    expected = KeyboardInterrupt if failure is KeyboardInterrupt else ModelSaveError
    with pytest.raises(expected):
        model_io.write_atomically(str(target), write)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- item 5: fake Keras files

@pytest.mark.parametrize("name, fragment", [("x.keras", "not a Keras archive (.keras files are zip archives"),
                                            ("x.h5", "not an HDF5 file")])
def test_text_file_named_like_a_keras_model(name: str, fragment: str, tmp_path: Path) -> None:
    source = tmp_path / name
    source.write_text("this is a text file, not a model\n")
    with pytest.raises(ModelLoadError) as info:
        Model(str(source))
    assert fragment in str(info.value) and str(source) in str(info.value)
    assert "not found" not in str(info.value).lower()
    if name.endswith(".keras"):
        assert_refused_cleanly(source, tmp_path, fragment)
