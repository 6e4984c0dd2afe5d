"""Model I/O: every source kind loads, runs and saves back with its signature intact.

Real models throughout: keras.applications CNNs and a BERT-like encoder for the
SavedModel round trips, small Keras and hand-built graphs for the cheaper cases.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Sequence, Tuple

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2

from tests import zoo
from tf_bf16.errors import InputError, ModelLoadError, ModelSaveError, TfBf16Error
from tf_bf16.model import Model

ROUNDTRIP_NAMES = ["resnet50", "mobilenetv2", "efficientnetb0", "bert"]
TOL = 1e-5
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0 - 0.5


# ----------------------------------------------------------------------------- helpers

def keras_outputs(model: keras.Model, feeds: Sequence[np.ndarray]) -> List[np.ndarray]:
    """The Keras model's outputs on ``feeds``; dict outputs in sorted-key (signature) order."""
    result = model(feeds[0] if len(feeds) == 1 else list(feeds), training=False)
    if isinstance(result, dict):
        return [np.asarray(result[k]) for k in sorted(result)]
    if isinstance(result, (list, tuple)):
        return [np.asarray(r) for r in result]
    return [np.asarray(result)]


def assert_close(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], what: str, tol: float = TOL) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{what}: output {i} has shape {a.shape}, expected {e.shape}"
        assert a.dtype == e.dtype, f"{what}: output {i} has dtype {a.dtype}, expected {e.dtype}"
        diff = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))) if a.size else 0.0
        assert diff <= tol, f"{what}: output {i} differs by {diff:g} (> {tol:g})"


def spec_of(value: Any) -> Tuple[str, Any]:
    """(dtype, shape list) of a TensorSpec or a symbolic Tensor."""
    shape = tf.TensorShape(value.shape)
    return value.dtype.name, (None if shape.rank is None else shape.as_list())


def signature_specs(fn: Any) -> Tuple[Dict[str, Tuple[str, Any]], Dict[str, Tuple[str, Any]]]:
    """A loaded signature's inputs and outputs as key -> (dtype, shape); outputs may be Tensors or specs."""
    args, kwargs = fn.structured_input_signature
    assert not args, f"signature functions take keyword arguments only, got positional {args}"
    inputs = {key: spec_of(spec) for key, spec in kwargs.items()}
    for key, spec in kwargs.items():
        assert spec.name == key, f"input spec {spec} is not named after its key {key!r}"
    outputs = fn.structured_outputs
    assert isinstance(outputs, dict), f"signature outputs are {type(outputs).__name__}, expected a dict"
    return inputs, {key: spec_of(value) for key, value in outputs.items()}


def dir_digest(path: str) -> str:
    """Hash of every entry name and file content under ``path``."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(dirs):
            digest.update(b"D" + os.path.relpath(os.path.join(root, name), path).encode())
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(b"F" + os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def nodes_by_name(graph_def: graph_pb2.GraphDef) -> Dict[str, node_def_pb2.NodeDef]:
    return {node.name: node for node in graph_def.node}


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build_graph() -> tf.Graph:
    """TF1-style graph: x[?,4] @ W + y[?,3] -> relu -> h; out1 = 2h, out2 = sum(h); plus an unused Const."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        y = tf.compat.v1.placeholder(tf.float32, [None, 3], name="y")
        mm = tf.matmul(x, tf.constant(W, name="w"), name="mm")
        h = tf.nn.relu(tf.add(mm, y, name="add"), name="h")
        tf.identity(h * 2.0, name="out1")
        tf.reduce_sum(h, axis=1, name="out2")
        tf.constant([1.0, 2.0], name="unused_const")
    return graph


def graph_feeds(seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)


def graph_expected(x: np.ndarray, y: np.ndarray) -> Dict[str, np.ndarray]:
    mm = x @ W
    h = np.maximum(mm + y, 0.0)
    return {"mm": mm, "h": h, "out1": h * 2.0, "out2": h.sum(axis=1)}


def small_bert() -> keras.Model:
    """A 1-layer BERT-like encoder: same layers (custom position embedding included), tiny sizes."""
    return zoo.bert_like(num_layers=1, seq_len=16, hidden=32, heads=2, intermediate=64, vocab=100)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def bert_small() -> keras.Model:
    return small_bert()


@pytest.fixture(scope="module")
def bert_small_saved_model(bert_small: keras.Model, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("bert_small") / "saved_model")
    bert_small.export(path, verbose=False)
    return path


@pytest.fixture(scope="module")
def cnn() -> keras.Model:
    """The (untrained) digits CNN: Conv/BatchNorm/ReLU/pool/Dense."""
    return zoo.digits_cnn_model()


@pytest.fixture(scope="module")
def cnn_frozen_pb(cnn: keras.Model, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real frozen GraphDef written by ``Model.save`` (read-only for the tests)."""
    path = str(tmp_path_factory.mktemp("cnn_pb") / "cnn.pb")
    Model(cnn).save(path)
    return path


# ----------------------------------------------------------------------------- zoo round trips

@pytest.mark.parametrize("name", ROUNDTRIP_NAMES)
def test_keras_savedmodel_pb_and_savedmodel_roundtrip(name: str, zoo_keras: Any, zoo_saved_model: Any,
                                                      tmp_path: Any) -> None:
    """Keras -> export -> Model -> .pb and SavedModel -> Model: same outputs, same signatures."""
    keras_model = zoo_keras(name)
    source = zoo_saved_model(name)
    before = dir_digest(source)
    feeds = zoo.sample_inputs(keras_model, batch=2, seed=1)
    expected = keras_outputs(keras_model, feeds)

    model = Model(source)
    assert model.source_path == source
    assert_close(model.run(feeds), expected, f"{name}: Model(SavedModel)")

    pb_path, sm_path = str(tmp_path / f"{name}.pb"), str(tmp_path / f"{name}_savedmodel")
    model.save(pb_path)
    model.save(sm_path)
    assert dir_digest(source) == before, "saving modified the source SavedModel"
    assert sorted(os.listdir(tmp_path)) == sorted([f"{name}.pb", f"{name}_savedmodel"]), "temp files left behind"

    from_pb = Model(pb_path)
    assert from_pb.graph_def == model.graph_def, "the .pb round trip changed the graph"
    assert from_pb.input_names == model.input_names
    assert from_pb.output_names == model.output_names
    assert_close(from_pb.run(feeds), expected, f"{name}: Model(.pb)")
    from_sm = Model(sm_path)
    assert nodes_by_name(from_sm.graph_def) == nodes_by_name(model.graph_def), \
        "the SavedModel round trip changed the graph"
    assert from_sm.input_names == model.input_names
    assert from_sm.output_names == model.output_names
    assert from_sm.signature == model.signature
    assert_close(from_sm.run(feeds), expected, f"{name}: Model(saved SavedModel)")

    src_sigs = tf.saved_model.load(source).signatures
    out_sigs = tf.saved_model.load(sm_path).signatures
    assert sorted(out_sigs.keys()) == sorted(src_sigs.keys())
    for key in src_sigs.keys():
        src_in, src_out = signature_specs(src_sigs[key])
        out_in, out_out = signature_specs(out_sigs[key])
        assert out_in == src_in, f"{name}: signature {key!r} inputs changed"
        assert out_out == src_out, f"{name}: signature {key!r} outputs changed"

    (input_key,) = signature_specs(src_sigs["serving_default"])[0]
    expected_by_key = dict(zip(model.signature.outputs, expected))
    result = out_sigs["serving_default"](**{input_key: tf.constant(feeds[0])})
    assert sorted(result) == sorted(expected_by_key)
    for out_key, value in result.items():
        assert_close([value.numpy()], [expected_by_key[out_key]], f"{name}: serving_default[{out_key!r}]")
    model.close()
    from_pb.close()
    from_sm.close()


def test_zoo_model_fixture_matches_keras(zoo_model: Any, zoo_keras: Any) -> None:
    """``Model(keras_model)`` (the zoo_model fixture) runs like the Keras model and is cached."""
    model = zoo_model("bert")
    assert zoo_model("bert") is model
    assert model.input_names == ["input_ids"]
    assert list(model.signature.inputs) == ["input_ids"]
    assert model.signature.inputs["input_ids"].dtype == "int32"
    assert model.signature.inputs["input_ids"].shape == (None, zoo.BERT_SEQ_LEN)
    feeds = zoo.sample_inputs("bert")
    assert_close(model.run(feeds), keras_outputs(zoo_keras("bert"), feeds), "Model(keras bert)")


def test_trained_digits_cnn_keeps_its_accuracy(digits: Any, tmp_path: Any) -> None:
    """A trained model (BatchNorm statistics included) predicts the same through Model and a saved .pb."""
    keras_model, (x_test, y_test) = digits
    keras_acc = zoo.accuracy(keras_outputs(keras_model, [x_test])[0], y_test)
    assert keras_acc > 0.9
    model = Model(keras_model)
    (probs,) = model.run([x_test])
    assert zoo.accuracy(probs, y_test) == keras_acc
    path = str(tmp_path / "digits.pb")
    model.save(path)
    assert_close(Model(path).run([x_test]), [probs], "Model(digits .pb)", tol=0.0)


def test_multi_input_dict_output_savedmodel_roundtrip(tmp_path: Any) -> None:
    """Named inputs and dict outputs whose sorted order differs from declaration order survive save."""
    keras.utils.set_random_seed(0)
    zeta = keras.Input((4,), name="zeta")
    alpha = keras.Input((3,), name="alpha")
    joined = keras.layers.Concatenate()([zeta, alpha])
    source_model = keras.Model([zeta, alpha], {"z_out": keras.layers.Dense(2)(joined),
                                               "a_out": keras.layers.Dense(5, activation="relu")(joined)})
    rng = np.random.default_rng(0)
    values = {"zeta": rng.random((3, 4), dtype=np.float32), "alpha": rng.random((3, 3), dtype=np.float32)}
    reference = {k: np.asarray(v) for k, v in source_model([values["zeta"], values["alpha"]]).items()}
    source = str(tmp_path / "source")
    source_model.export(source, verbose=False)

    model = Model(source)
    assert sorted(model.input_names) == ["alpha", "zeta"]
    assert list(model.signature.outputs) == ["a_out", "z_out"]
    assert model.signature.outputs["a_out"].shape == (None, 5)
    outputs = model.run(values)
    assert_close(outputs, [reference["a_out"], reference["z_out"]], "Model.run dict feeds")
    assert_close(model.run([values[n] for n in model.input_names]), outputs, "Model.run list feeds")

    out = str(tmp_path / "out")
    model.save(out)
    src_sigs, out_sigs = tf.saved_model.load(source).signatures, tf.saved_model.load(out).signatures
    assert sorted(out_sigs.keys()) == sorted(src_sigs.keys())
    for key in src_sigs.keys():
        assert signature_specs(out_sigs[key]) == signature_specs(src_sigs[key])
        result = out_sigs[key](**{k: tf.constant(v) for k, v in values.items()})
        for out_key in ("a_out", "z_out"):
            assert_close([result[out_key].numpy()], [reference[out_key]], f"{key}[{out_key}]")
    assert_close(Model(out).run(values), outputs, "Model(saved SavedModel)")


# ----------------------------------------------------------------------------- other sources

def test_keras_file(bert_small: keras.Model, tmp_path: Any) -> None:
    """A ``.keras`` file (custom layer included) loads, keeps its input name and runs like Keras."""
    path = str(tmp_path / "bert_small.keras")
    bert_small.save(path)
    model = Model(path)
    assert model.source_path == path
    assert model.input_names == ["input_ids"]
    feeds = zoo.sample_inputs(bert_small, batch=3)
    assert feeds[0].dtype == np.int32 and feeds[0].max() < 100
    assert_close(model.run(feeds), keras_outputs(bert_small, feeds), "Model(.keras)")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras' own legacy HDF5 writer
def test_h5_file(cnn: keras.Model, tmp_path: Any) -> None:
    path = str(tmp_path / "cnn.h5")
    cnn.save(path)
    feeds = zoo.sample_inputs(cnn, batch=4)
    assert_close(Model(path).run(feeds), keras_outputs(cnn, feeds), "Model(.h5)")


def test_keras_object(cnn: keras.Model) -> None:
    model = Model(cnn)
    assert model.input_names == ["image"]
    assert model.source_path is None
    info = model.signature.inputs["image"]
    assert (info.dtype, info.shape) == ("float32", (None, 8, 8, 1))
    assert [n.op for n in model.graph_def.node if n.op in ("VarHandleOp", "ReadVariableOp")] == []
    feeds = zoo.sample_inputs(cnn, batch=4)
    assert_close(model.run(feeds), keras_outputs(cnn, feeds), "Model(keras.Model)")


def test_concrete_function_and_tf_function(cnn: keras.Model) -> None:
    feeds = zoo.sample_inputs(cnn, batch=3, seed=5)
    expected = keras_outputs(cnn, feeds)
    spec = tf.TensorSpec([None, 8, 8, 1], tf.float32, name="pixels")
    concrete = tf.function(lambda x: cnn(x, training=False)).get_concrete_function(spec)
    model = Model(concrete)
    assert model.input_names == ["pixels"]
    assert list(model.signature.inputs) == ["pixels"]
    assert_close(model.run({"pixels": feeds[0]}), expected, "Model(ConcreteFunction)")

    traced = tf.function(lambda x: cnn(x, training=False), input_signature=[spec])
    assert_close(Model(traced).run(feeds), expected, "Model(tf.function)")
    with pytest.raises(ModelLoadError, match="input_signature"):
        Model(tf.function(lambda x: cnn(x, training=False)))


@pytest.mark.parametrize("as_graph_def", [False, True], ids=["tf.Graph", "GraphDef"])
def test_bare_graph_infers_inputs_and_outputs(as_graph_def: bool) -> None:
    graph = build_graph()
    source = graph.as_graph_def() if as_graph_def else graph
    before = source.SerializeToString() if as_graph_def else None
    model = Model(source)
    assert model.input_names == ["x", "y"]
    assert model.output_names == ["out1", "out2"]
    assert set(model.signature.inputs) == {"x", "y"}
    assert model.signature.outputs["out2"].shape == (None,)
    x, y = graph_feeds()
    expected = graph_expected(x, y)
    assert_close(model.run({"x": x, "y": y}), [expected["out1"], expected["out2"]], "Model(bare graph)")
    if as_graph_def:
        assert source.SerializeToString() == before, "Model() modified the caller's GraphDef"


def test_inputs_outputs_overrides() -> None:
    graph_def = build_graph().as_graph_def()
    x, y = graph_feeds(1)
    expected = graph_expected(x, y)

    only_mm = Model(graph_def, inputs=["x"], outputs=["mm:0"])
    assert only_mm.input_names == ["x"] and only_mm.output_names == ["mm"]
    assert_close(only_mm.run([x]), [expected["mm"]], "outputs=['mm:0']")

    # Feed an intermediate tensor: h is overridden, so x and y are not needed.
    from_h = Model(graph_def, inputs=["h:0"], outputs=["out2", "out1"])
    assert from_h.input_names == ["h"]
    assert_close(from_h.run({"h": expected["h"]}), [expected["out2"], expected["out1"]], "inputs=['h']")

    with pytest.raises(ModelLoadError, match="nope"):
        Model(graph_def, outputs=["nope"])
    with pytest.raises(ModelLoadError, match="missing_input"):
        Model(graph_def, inputs=["missing_input"])


def test_overrides_on_saved_model_replace_signature(bert_small: keras.Model, bert_small_saved_model: str,
                                                    tmp_path: Any) -> None:
    """``outputs=`` picks an inner tensor (the first residual Add); the signature is rebuilt for it."""
    source = Model(bert_small_saved_model)
    assert source.signature.aliases == ("serve",)
    (residual,) = [n.name for n in source.graph_def.node
                   if n.op == "AddV2" and "layer_0_attention_residual" in n.name]
    model = Model(bert_small_saved_model, outputs=[residual])
    assert model.output_names == [residual]
    assert model.signature.key == "serving_default"
    assert [s.name for s in model.signature.outputs.values()] == [residual]
    assert model.signature.aliases == ()
    feeds = zoo.sample_inputs(bert_small)
    (value,) = model.run(feeds)
    inner = keras.Model(bert_small.input, bert_small.get_layer("layer_0_attention_residual").output)
    assert_close([value], keras_outputs(inner, feeds), "outputs=[residual Add]")
    out = str(tmp_path / "override")
    model.save(out)
    sigs = tf.saved_model.load(out).signatures
    assert list(sigs.keys()) == ["serving_default"]
    assert_close(Model(out).run(feeds), [value], "saved override model")


def test_pbtxt_roundtrip(cnn: keras.Model, tmp_path: Any) -> None:
    model = Model(cnn)
    path = str(tmp_path / "cnn.pbtxt")
    model.save(path)
    with open(path, encoding="utf-8") as f:
        assert f.read(6) == "node {"
    reloaded = Model(path)
    assert reloaded.input_names == model.input_names
    assert reloaded.output_names == model.output_names
    feeds = zoo.sample_inputs(cnn, batch=2)
    assert_close(reloaded.run(feeds), keras_outputs(cnn, feeds), "Model(.pbtxt)")
    again = str(tmp_path / "again.pbtxt")
    reloaded.save(again)
    assert Model(again).graph_def == reloaded.graph_def


def test_run_dict_and_list_feeds() -> None:
    model = Model(build_graph())
    x, y = graph_feeds(2)
    expected = graph_expected(x, y)
    by_list = model.run([x, y])
    by_dict = model.run({"y": y, "x": x})  # dict order does not matter
    assert_close(by_list, [expected["out1"], expected["out2"]], "list feeds")
    assert_close(by_dict, by_list, "dict feeds", tol=0.0)
    assert_close(model([x, y]), by_list, "__call__", tol=0.0)
    with pytest.raises(InputError, match="zzz"):
        model.run({"x": x, "y": y, "zzz": y})
    with pytest.raises(InputError, match="y"):
        model.run({"x": x})
    with pytest.raises(ValueError, match="expected 2"):
        model.run([x])


# ----------------------------------------------------------------------------- errors

def assert_names_path(exc: BaseException, path: str) -> None:
    assert isinstance(exc, TfBf16Error)
    assert path in str(exc), f"error message {str(exc)!r} does not name {path}"


def test_corrupt_pb(tmp_path: Any) -> None:
    path = str(tmp_path / "corrupt.pb")
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError) as info:
        Model(path)
    assert_names_path(info.value, path)


def test_empty_pb(tmp_path: Any) -> None:
    path = str(tmp_path / "empty.pb")
    open(path, "wb").close()
    with pytest.raises(ModelLoadError, match="empty") as info:
        Model(path)
    assert_names_path(info.value, path)


def test_truncated_pb_half(cnn_frozen_pb: str, tmp_path: Any) -> None:
    with open(cnn_frozen_pb, "rb") as f:
        data = f.read()
    path = str(tmp_path / "half.pb")
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        Model(path)
    assert_names_path(info.value, path)


def field_ends(data: bytes) -> List[Tuple[int, int]]:
    """(field number, end offset) of each top-level field in a serialized GraphDef."""

    def varint(pos: int) -> Tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    ends, pos = [], 0
    while pos < len(data):
        key, pos = varint(pos)
        assert key & 7 == 2, "GraphDef's top-level fields (node, library, versions) are all messages"
        length, pos = varint(pos)
        pos += length
        ends.append((key >> 3, pos))
    assert pos == len(data)
    return ends


def write_bytes(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_truncated_pb_mid_node(cnn_frozen_pb: str, tmp_path: Any) -> None:
    """A file cut inside a node (or inside ``versions``) does not parse and is refused, naming the path."""
    with open(cnn_frozen_pb, "rb") as f:
        data = f.read()
    ends = field_ends(data)
    starts = [0] + [end for _, end in ends[:-1]]
    n = len(ends)
    for k in sorted({0, n // 3, n // 2, n - 2, n - 1}):  # n - 1 is the versions record
        cut = (starts[k] + ends[k][1]) // 2
        path = write_bytes(str(tmp_path / f"cut_in_field_{k}.pb"), data[:cut])
        with pytest.raises(ModelLoadError, match="corrupt or truncated") as info:
            Model(path)
        assert_names_path(info.value, path)


def test_truncated_pb_at_a_node_boundary_with_dangling_inputs(cnn_frozen_pb: str, tmp_path: Any) -> None:
    """A boundary cut that leaves consumers without their producers is refused, naming them.

    TensorFlow accepts nodes in any order; written consumers-first, every cut drops producers.
    """
    from tf_bf16.errors import GraphError
    from tf_bf16.transforms.graph import node_name

    with open(cnn_frozen_pb, "rb") as f:
        graph_def = graph_pb2.GraphDef.FromString(f.read())
    backwards = graph_pb2.GraphDef(node=list(reversed(graph_def.node)), versions=graph_def.versions)
    data = backwards.SerializeToString()
    node_ends = [end for field, end in field_ends(data) if field == 1]
    for k in sorted({1, len(node_ends) // 2, len(node_ends) - 1}):
        kept = graph_pb2.GraphDef.FromString(data[:node_ends[k - 1]])
        path = write_bytes(str(tmp_path / f"after_node_{k}.pb"), data[:node_ends[k - 1]])
        with pytest.raises(GraphError, match="truncated or incomplete") as info:
            Model(path)
        assert isinstance(info.value, ModelLoadError)
        assert_names_path(info.value, path)
        names = {n.name for n in kept.node}
        first = next(n.name for n in kept.node if any(node_name(spec) not in names for spec in n.input))
        assert f"node {first!r} reads" in str(info.value), str(info.value)


def test_pb_cut_before_versions_loads_with_a_warning(cnn_frozen_pb: str, tmp_path: Any, caplog: Any) -> None:
    """Without ``versions`` a complete graph is what a hand-built GraphDef looks like: it loads, with a warning."""
    with open(cnn_frozen_pb, "rb") as f:
        data = f.read()
    before_versions = max(end for field, end in field_ends(data) if field != 4)
    path = write_bytes(str(tmp_path / "no_versions.pb"), data[:before_versions])
    with caplog.at_level("WARNING"):
        model = Model(path)
    assert model.graph_def.node == Model(cnn_frozen_pb).graph_def.node
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(path in w and "no 'versions' record" in w and "truncated" in w for w in warnings), warnings


def test_missing_path(tmp_path: Any) -> None:
    path = str(tmp_path / "does_not_exist")
    with pytest.raises(ModelLoadError, match="no such file") as info:
        Model(path)
    assert_names_path(info.value, path)


def test_empty_directory(tmp_path: Any) -> None:
    path = str(tmp_path / "empty_dir")
    os.mkdir(path)
    with pytest.raises(ModelLoadError, match="empty") as info:
        Model(path)
    assert_names_path(info.value, path)


def test_directory_without_saved_model_pb(tmp_path: Any) -> None:
    path = str(tmp_path / "not_a_saved_model")
    os.makedirs(os.path.join(path, "variables"))
    with open(os.path.join(path, "README"), "w") as f:
        f.write("not a model")
    with pytest.raises(ModelLoadError, match="saved_model.pb") as info:
        Model(path)
    assert_names_path(info.value, path)


def test_corrupt_saved_model_pb(tmp_path: Any) -> None:
    path = str(tmp_path / "corrupt_saved_model")
    os.makedirs(os.path.join(path, "variables"))
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError) as info:
        Model(path)
    assert_names_path(info.value, path)


def test_unknown_signature_key(bert_small_saved_model: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        Model(bert_small_saved_model, signature="no_such_signature")
    assert_names_path(info.value, bert_small_saved_model)
    message = str(info.value)
    assert "no_such_signature" in message
    for key in tf.saved_model.load(bert_small_saved_model).signatures.keys():
        assert key in message, f"available signature {key!r} not listed in {message!r}"


def test_corrupt_keras_file(tmp_path: Any) -> None:
    path = str(tmp_path / "broken.keras")
    with open(path, "wb") as f:
        f.write(b"this is not a zip archive")
    with pytest.raises(ModelLoadError) as info:
        Model(path)
    assert_names_path(info.value, path)


def graph_with_unknown_op() -> graph_pb2.GraphDef:
    graph_def = build_graph().as_graph_def()
    node = node_def_pb2.NodeDef(name="mystery", op="NoSuchOp", input=["out1"])
    node.attr["T"].type = tf.float32.as_datatype_enum
    graph_def.node.append(node)
    return graph_def


def test_unknown_op_in_graph_def() -> None:
    with pytest.raises(ModelLoadError, match="NoSuchOp"):
        Model(graph_with_unknown_op())


def test_unknown_op_in_pb_file(tmp_path: Any) -> None:
    path = str(tmp_path / "unknown_op.pb")
    with open(path, "wb") as f:
        f.write(graph_with_unknown_op().SerializeToString())
    with pytest.raises(ModelLoadError, match="NoSuchOp") as info:
        Model(path)
    assert_names_path(info.value, path)


def test_unsupported_source_type() -> None:
    with pytest.raises(ModelLoadError, match="unsupported model source"):
        Model(12345)


# ----------------------------------------------------------------------------- atomic writes

def test_saving_never_modifies_source_saved_model(bert_small: keras.Model, bert_small_saved_model: str,
                                                  tmp_path: Any) -> None:
    before = dir_digest(bert_small_saved_model)
    model = Model(bert_small_saved_model)
    for name in ("a.pb", "b.pbtxt", "c_savedmodel"):
        model.save(str(tmp_path / name))
    feeds = zoo.sample_inputs(bert_small)
    assert_close(model.run(feeds), keras_outputs(bert_small, feeds), "Model(SavedModel) after saves")
    assert dir_digest(bert_small_saved_model) == before
    assert sorted(os.listdir(tmp_path)) == ["a.pb", "b.pbtxt", "c_savedmodel"]


def test_save_to_source_is_refused(bert_small_saved_model: str, cnn_frozen_pb: str, tmp_path: Any) -> None:
    before = dir_digest(bert_small_saved_model)
    model = Model(bert_small_saved_model)
    link = str(tmp_path / "link_to_source")
    os.symlink(bert_small_saved_model, link)
    targets = [bert_small_saved_model, bert_small_saved_model + os.sep, link,
               os.path.join(bert_small_saved_model, "inside.pb"),
               os.path.relpath(bert_small_saved_model)]
    for target in targets:
        with pytest.raises(ModelSaveError, match="input model"):
            model.save(target)
    converted = model.with_graph_def(model.graph_def)
    with pytest.raises(ModelSaveError):
        converted.save(bert_small_saved_model)
    assert dir_digest(bert_small_saved_model) == before

    pb_before = file_digest(cnn_frozen_pb)
    with pytest.raises(ModelSaveError):
        Model(cnn_frozen_pb).save(cnn_frozen_pb)
    assert file_digest(cnn_frozen_pb) == pb_before


@pytest.mark.parametrize("name", ["out.pb", "out.pbtxt", "out_savedmodel"])
def test_failed_save_to_missing_parent_leaves_nothing(cnn: keras.Model, tmp_path: Any, name: str) -> None:
    model = Model(cnn)
    target = str(tmp_path / "missing_parent" / name)
    with pytest.raises(ModelSaveError) as info:
        model.save(target)
    assert target in str(info.value)
    assert os.listdir(tmp_path) == []


def broken(model: Model) -> Model:
    """The same model with its output node reading a tensor that does not exist."""
    graph_def = graph_pb2.GraphDef()
    graph_def.CopyFrom(model.graph_def)
    out = model.output_names[0]
    for node in graph_def.node:
        if node.name == out:
            node.input[0] = "no_such_tensor"
    return model.with_graph_def(graph_def)


def test_failed_savedmodel_write_leaves_destination_untouched(cnn: keras.Model, tmp_path: Any) -> None:
    model = Model(cnn)
    fresh = str(tmp_path / "fresh")
    with pytest.raises(ModelSaveError) as info:
        broken(model).save(fresh)
    assert fresh in str(info.value)
    assert os.listdir(tmp_path) == [], "a failed save left files behind"

    existing = str(tmp_path / "existing")
    model.save(existing)
    before = dir_digest(existing)
    with pytest.raises(ModelSaveError):
        broken(model).save(existing)
    assert dir_digest(existing) == before
    assert os.listdir(tmp_path) == ["existing"]

    model.save(existing)  # a successful overwrite leaves no backup behind
    assert os.listdir(tmp_path) == ["existing"]
    feeds = zoo.sample_inputs(cnn)
    assert_close(Model(existing).run(feeds), keras_outputs(cnn, feeds), "overwritten SavedModel")


def test_save_refuses_to_replace_unrelated_directory(cnn: keras.Model, tmp_path: Any) -> None:
    target = tmp_path / "user_data"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ModelSaveError, match="not a SavedModel"):
        Model(cnn).save(str(target))
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["user_data"]


def test_weights_over_the_protobuf_limit_keep_variables_and_refuse_a_pb(tmp_path, monkeypatch):
    """A SavedModel whose weights exceed what one frozen GraphDef can hold keeps them as variables
    and refuses a .pb output; an in-memory Keras model that large is refused with a clear error.

    The real limit is 2 GiB; the test lowers it so a small model stands in for a huge one.
    """
    from tf_bf16 import model_io
    from tf_bf16.errors import ModelTooLargeError, UnsupportedModelError

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64)])
    path = str(tmp_path / "sm")
    model.export(path, verbose=False)
    monkeypatch.setattr(model_io, "MAX_PROTO_BYTES", 1024)
    loaded = Model(path)
    assert loaded.variables is not None
    with pytest.raises(ModelTooLargeError, match="write a SavedModel directory instead"):
        loaded.check_save_path(str(tmp_path / "x.pb"))
    with pytest.raises(UnsupportedModelError, match="2 GiB"):
        Model(model)