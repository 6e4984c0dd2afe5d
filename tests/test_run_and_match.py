"""Converted models *run* and match FP32: control flow (v1 frames, v2 If/While bodies), string
inputs, lookup tables, several signatures, Keras LSTM/GRU (issue 12, item 8).

Each test converts through the public API (``MixedPrecision``) or the CLI, runs the result (with
``tf_bf16.Model`` and, for SavedModels, with plain ``tf.saved_model.load``) on inputs that take
every branch and several loop counts, and compares with the unconverted model: float outputs
within BF16 tolerance, integer and string outputs exactly. Each also checks that something
really became BF16 where the design says it should, and that what stays FP32 is reported.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Dict, Iterator, List, Sequence

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, types_pb2

from tests.test_cli import run_cli
from tf_bf16 import MixedPrecision, Model
from tf_bf16.errors import UnsupportedModelError

BF16 = types_pb2.DT_BFLOAT16
REL_TOL = 2e-2      # relative L2 error of a float output
MAX_TOL = 5e-2      # largest element error, relative to the output's largest magnitude
RNG = np.random.RandomState(12)
W1 = (RNG.randn(16, 16) * 0.3).astype(np.float32)
W2 = (RNG.randn(16, 16) * 0.3).astype(np.float32)
W3 = (RNG.randn(16, 4) * 0.3).astype(np.float32)
X = RNG.rand(4, 16).astype(np.float32)


# ----------------------------------------------------------------------------- helpers

def assert_matches(got: Any, ref: Any, what: str) -> None:
    """Float outputs within BF16 tolerance, everything else (ints, strings) exactly."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype}, expected {ref.dtype}"
    if not np.issubdtype(ref.dtype, np.floating):
        np.testing.assert_array_equal(got, ref, err_msg=what)
        return
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    scale = float(np.max(np.abs(ref)))
    assert scale > 1e-3, f"{what}: reference has no meaningful magnitude ({scale:g}); pick other inputs"
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    worst = float(np.max(np.abs(got - ref))) / scale
    assert rel < REL_TOL and worst < MAX_TOL, f"{what}: relative error {rel:.3g}, worst element {worst:.3g}"


def is_bf16(node: Any) -> bool:
    """Whether a NodeDef computes on or holds bfloat16 (any type attr)."""
    return any(v.type == BF16 or BF16 in v.list.type for v in node.attr.values())


def bf16_ops(graph_def: graph_pb2.GraphDef, functions: bool = False) -> List[str]:
    """Op types of the BF16 nodes of the graph (and, with ``functions``, of its library bodies)."""
    nodes = list(graph_def.node)
    if functions:
        nodes += [n for f in graph_def.library.function for n in f.node_def]
    return sorted(n.op for n in nodes if is_bf16(n) and n.op not in ("Cast", "Const"))


def ops(graph_def: graph_pb2.GraphDef) -> set:
    return {n.op for n in graph_def.node}


def fp32_reasons(model: Model) -> Dict[str, str]:
    return {entry["name"]: entry["reason"] for entry in model.report["fp32_nodes"]}


def convert(source: Any) -> Model:
    converter = MixedPrecision()
    converter.precisions = "bf16"
    converter.model = source
    return converter()


def serve(path: str, key: str = "serving_default", **feeds: Any) -> Dict[str, np.ndarray]:
    """Run signature ``key`` of the SavedModel at ``path`` with plain TensorFlow."""
    fn = tf.saved_model.load(path).signatures[key]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feeds.items()}).items()}


def assert_all_match(got: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], what: str) -> None:
    assert sorted(got) == sorted(ref), f"{what}: outputs {sorted(got)}, expected {sorted(ref)}"
    for k in ref:
        assert_matches(got[k], ref[k], f"{what} [{k}]")


@contextlib.contextmanager
def control_flow_v1() -> Iterator[None]:
    """Build with TF1 control flow (Switch/Merge, Enter/Exit frames); restore the setting after."""
    was_v2 = tf.compat.v1.control_flow_v2_enabled()
    tf.compat.v1.disable_control_flow_v2()
    try:
        yield
    finally:
        if was_v2:
            tf.compat.v1.enable_control_flow_v2()


# ----------------------------------------------------------------------------- control flow v1

def _v1_graph() -> graph_pb2.GraphDef:
    """relu(x@W1) -> cond(pred: @W2 | *2-1) -> while i<n: tanh(z@W2) -> @W3 + 0.5, in TF1 control flow."""
    with control_flow_v1():
        graph = tf.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [None, 16], name="x")
            pred = tf.compat.v1.placeholder(tf.bool, [], name="pred")
            n = tf.compat.v1.placeholder(tf.int32, [], name="n")
            h = tf.nn.relu(tf.matmul(x, W1, name="pre_matmul") + 0.1)
            y = tf.compat.v1.cond(pred, lambda: tf.matmul(h, W2), lambda: h * 2.0 - 1.0, name="cond")
            _, z = tf.compat.v1.while_loop(lambda i, z: i < n, lambda i, z: (i + 1, tf.tanh(tf.matmul(z, W2))),
                                           [tf.constant(0), y], name="loop")
            tf.identity(tf.matmul(z, W3, name="post_matmul") + 0.5, name="out")
    return graph.as_graph_def()


def test_v1_cond_and_while_frames_run_and_match(tmp_path):
    graph_def = _v1_graph()
    assert {"Switch", "Merge", "Enter", "Exit", "NextIteration", "LoopCond"} <= ops(graph_def)
    assert not ops(graph_def) & {"If", "StatelessIf", "While", "StatelessWhile"}
    model = Model(graph_def, inputs=["x", "pred", "n"], outputs=["out"])
    converted = convert(model)
    nodes = {n.name: n for n in converted.graph_def.node}
    # Outside the frames the contractions go BF16; inside they stay FP32 and the report says why.
    assert is_bf16(nodes["pre_matmul"]) and is_bf16(nodes["post_matmul"])
    reasons = fp32_reasons(converted)
    assert not is_bf16(nodes["cond/MatMul"]) and "cond branch" in reasons["cond/MatMul"]
    assert not is_bf16(nodes["loop/MatMul"]) and "while-loop frame" in reasons["loop/MatMul"]
    assert {"Switch", "Merge", "Enter", "Exit", "NextIteration"} <= ops(converted.graph_def)

    results = {}
    for pred in (True, False):
        for n in (0, 1, 3):
            feeds = [X, np.bool_(pred), np.int32(n)]
            ref, = model.run(feeds)
            got, = converted.run(feeds)
            assert_matches(got, ref, f"pred={pred} n={n}")
            assert not np.array_equal(got, ref), "the converted graph did not run anything in BF16"
            results[pred, n] = ref
    assert not np.allclose(results[True, 0], results[False, 0]), "both branches give the same result"
    assert not np.allclose(results[True, 0], results[True, 3]), "the loop count changes nothing"

    # The SavedModel written from it runs in plain TensorFlow, frames and all.
    out_dir = str(tmp_path / "v1_bf16")
    converted.save(out_dir)
    for pred, n in ((False, 2), (True, 1)):
        got = serve(out_dir, x=X, pred=np.bool_(pred), n=np.int32(n))
        ref, = model.run([X, np.bool_(pred), np.int32(n)])
        assert_matches(got["out"], ref, f"SavedModel pred={pred} n={n}")


# ----------------------------------------------------------------------------- control flow v2

def _v2_function(x, n):
    y = tf.cond(tf.reduce_sum(x) > 0, lambda: tf.nn.relu(tf.matmul(x, W1)), lambda: tf.matmul(x, W1) * -2.0)
    _, z = tf.while_loop(lambda i, z: i < n, lambda i, z: (i + 1, tf.tanh(tf.matmul(z, W2))), [tf.constant(0), y])
    return tf.matmul(z, W3)


def test_v2_if_and_while_bodies_go_bf16_and_match(tmp_path):
    """An unfrozen tf.function graph keeps StatelessIf/StatelessWhile: their bodies are converted."""
    concrete = tf.function(_v2_function).get_concrete_function(
        tf.TensorSpec([None, 16], tf.float32, name="x"), tf.TensorSpec([], tf.int32, name="n"))
    graph_def = concrete.graph.as_graph_def()
    assert {"StatelessIf", "StatelessWhile"} <= ops(graph_def)
    assert not ops(graph_def) & {"Switch", "Enter"}
    model = Model(graph_def, inputs=["x", "n"], outputs=["Identity"])
    converted = convert(model)

    before = {f.signature.name: f for f in graph_def.library.function}
    after = {f.signature.name: f for f in converted.graph_def.library.function}
    assert set(after) == set(before)
    with_matmul = [name for name, f in before.items() if any(n.op == "MatMul" for n in f.node_def)]
    assert len(with_matmul) == 3, with_matmul   # both cond branches and the loop body
    report = converted.report["functions"]
    for name in with_matmul:
        assert after[name].signature == before[name].signature, f"{name}: FP32 borders changed"
        matmuls = [n for n in after[name].node_def if n.op == "MatMul"]
        assert matmuls and all(is_bf16(n) for n in matmuls), f"{name}: MatMul not BF16"
        assert report[name]["converted"] and report[name]["bf16_nodes"] >= 1
        assert report[name]["casts"] >= 2
    assert "MatMul" in bf16_ops(converted.graph_def)   # the outer z @ W3 as well

    results = {}
    for sign in (1.0, -1.0):   # the predicate is sum(x) > 0: both branches
        for n in (0, 1, 4):
            feeds = [sign * X, np.int32(n)]
            ref, = model.run(feeds)
            got, = converted.run(feeds)
            assert_matches(got, ref, f"sign={sign} n={n}")
            assert not np.array_equal(got, ref), "the converted bodies did not run anything in BF16"
            results[sign, n] = ref
    assert not np.allclose(results[1.0, 0], -results[-1.0, 0]), "both branches computed the same thing"
    assert not np.allclose(results[1.0, 0], results[1.0, 4])

    # The function library survives the SavedModel writer; plain TensorFlow runs it.
    out_dir = str(tmp_path / "v2_bf16")
    converted.save(out_dir)
    for sign, n in ((-1.0, 3), (1.0, 2)):
        got = serve(out_dir, x=sign * X, n=np.int32(n))
        ref, = model.run([sign * X, np.int32(n)])
        (key,) = got
        assert_matches(got[key], ref, f"SavedModel sign={sign} n={n}")


class _ControlFlowModule(tf.Module):
    """tf.cond + tf.while_loop over variables, saved as a TF2 SavedModel."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = tf.Variable(W1), tf.Variable(W2), tf.Variable(W3)

    @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="x"),
                                  tf.TensorSpec([], tf.int32, name="n")])
    def __call__(self, x, n):
        h = tf.matmul(x, self.w1)
        y = tf.cond(tf.reduce_sum(x) > 0, lambda: tf.nn.relu(tf.matmul(h, self.w2)), lambda: h * -2.0)
        _, z = tf.while_loop(lambda i, z: i < n, lambda i, z: (i + 1, tf.tanh(tf.matmul(z, self.w2))),
                             [tf.constant(0), y])
        return {"out": tf.matmul(z, self.w3) + 0.25}


def test_v2_control_flow_saved_model_through_cli(tmp_path):
    """A TF2 SavedModel with tf.cond/tf.while_loop: freezing lowers them to v1 frames (which stay
    FP32, reported); the contractions outside convert, and the CLI's SavedModel runs and matches."""
    module = _ControlFlowModule()
    src = str(tmp_path / "cf_v2")
    tf.saved_model.save(module, src, signatures=module.__call__)
    loaded = Model(src)
    assert {"Switch", "Enter"} <= ops(loaded.graph_def)   # lowered by freezing: no If/While left
    assert not ops(loaded.graph_def) & {"If", "StatelessIf", "While", "StatelessWhile"}

    out_dir, report_path = tmp_path / "cf_v2_bf16", tmp_path / "report.json"
    result = run_cli("convert", f"--input_model={src}", f"--output_model={out_dir}", f"--report={report_path}")
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["op_types"]["MatMul"]["total"] == 4 and report["op_types"]["MatMul"]["bf16"] == 2
    framed = [e for e in report["fp32_nodes"] if e["op"] == "MatMul"]
    assert len(framed) == 2 and {("cond branch" in e["reason"]) for e in framed} == {True, False}

    reference = tf.saved_model.load(src).signatures["serving_default"]
    for sign in (1.0, -1.0):
        for n in (0, 3):
            ref = {k: v.numpy() for k, v in reference(x=tf.constant(sign * X), n=tf.constant(n)).items()}
            got = serve(str(out_dir), x=sign * X, n=np.int32(n))
            assert_all_match(got, ref, f"CLI SavedModel sign={sign} n={n}")
            assert not np.array_equal(got["out"], ref["out"])


# ----------------------------------------------------------------------------- string inputs

VOCAB, DIM = 64, 16


class _TextModule(tf.Module):
    """Strings -> lower/split/hash to ids -> embedding mean -> Dense; also returns token counts."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(5)
        self.embedding = tf.Variable(rng.randn(VOCAB, DIM).astype(np.float32))
        self.kernel = tf.Variable((rng.randn(DIM, 8) * 0.3).astype(np.float32))
        self.bias = tf.Variable(rng.randn(8).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def __call__(self, text):
        tokens = tf.strings.split(tf.strings.lower(text))
        ids = tf.strings.to_hash_bucket_fast(tokens, VOCAB)
        vectors = tf.reduce_mean(tf.gather(self.embedding, ids), axis=1)
        return {"logits": tf.matmul(vectors, self.kernel) + self.bias, "n_tokens": tokens.row_lengths(),
                "first": tokens[:, :1].to_tensor(default_value="")}


TEXT = np.array([b"The cat sat on the mat", b"A DOG ran", b"x", b"bird bird bird fish"], dtype=object)


def test_string_input_saved_model_runs_and_matches(tmp_path):
    module = _TextModule()
    src = str(tmp_path / "text")
    tf.saved_model.save(module, src, signatures=module.__call__)
    converted = convert(src)
    assert converted.signature.inputs["text"].dtype == "string"
    assert "MatMul" in bf16_ops(converted.graph_def)
    assert {"StringSplitV2", "StringToHashBucketFast", "StringLower"} <= ops(converted.graph_def)

    out_dir = str(tmp_path / "text_bf16")
    converted.save(out_dir)
    ref = serve(src, text=TEXT)
    got = serve(out_dir, text=TEXT)
    assert_all_match(got, ref, "string model")
    assert list(got["n_tokens"]) == [6, 3, 1, 4] and got["first"][1, 0] == b"a"
    assert not np.array_equal(got["logits"], ref["logits"])
    # tf_bf16's own runner takes the strings too, in signature key order.
    by_model = dict(zip(converted.signature.outputs, converted.run([TEXT])))
    assert_all_match(by_model, ref, "string model via Model.run")


# ----------------------------------------------------------------------------- lookup tables

KEYS = ["cat", "dog", "bird", "fish"]
WORDS = np.array([[b"cat", b"dog", b"emu"], [b"fish", b"bird", b"cat"], [b"", b"dog", b"dog"]], dtype=object)


class _TableModule(tf.Module):
    """A StaticHashTable (KeyValueTensorInitializer) maps words to ids; ids index an embedding."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(6)
        init = tf.lookup.KeyValueTensorInitializer(tf.constant(KEYS), tf.constant([3, 1, 4, 0], tf.int64))
        self.table = tf.lookup.StaticHashTable(init, default_value=-1)
        self.embedding = tf.Variable(rng.randn(5 + 1, DIM).astype(np.float32))
        self.kernel = tf.Variable((rng.randn(DIM, 4) * 0.3).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.string, name="words")])
    def __call__(self, words):
        ids = self.table.lookup(words)
        vectors = tf.reduce_sum(tf.gather(self.embedding, ids + 1), axis=1)
        return {"ids": ids, "scores": tf.matmul(vectors, self.kernel), "size": self.table.size()}


@pytest.fixture(scope="module")
def table_saved_model(tmp_path_factory) -> str:
    module = _TableModule()
    path = str(tmp_path_factory.mktemp("tables") / "table")
    tf.saved_model.save(module, path, signatures=module.__call__)
    return path


def test_lookup_table_saved_model_initializes_and_matches(table_saved_model, tmp_path):
    ref = serve(table_saved_model, words=WORDS)
    assert ref["ids"].tolist() == [[3, 1, -1], [0, 4, 3], [-1, 1, 1]]

    # Loading alone used to leave the table as an unfed resource Placeholder that no run could feed.
    source = Model(table_saved_model)
    assert "HashTableV2" in ops(source.graph_def) and "InitializeTableV2" in ops(source.graph_def)
    assert_all_match(dict(zip(source.signature.outputs, source.run([WORDS]))), ref, "loaded, unconverted")

    converted = convert(table_saved_model)
    assert "MatMul" in bf16_ops(converted.graph_def)
    assert {"HashTableV2", "InitializeTableV2", "LookupTableFindV2", "LookupTableSizeV2"} <= ops(converted.graph_def)
    for batch in (WORDS, WORDS[:1], WORDS):   # repeated runs re-check the filled table and still agree
        got = dict(zip(converted.signature.outputs, converted.run([batch])))
        assert_all_match(got, serve(table_saved_model, words=batch), f"Model.run batch={len(batch)}")

    out_dir, pb = str(tmp_path / "table_bf16"), str(tmp_path / "table_bf16.pb")
    converted.save(out_dir)
    converted.save(pb)
    got = serve(out_dir, words=WORDS)   # plain TensorFlow: no init op to run by hand
    assert_all_match(got, ref, "SavedModel")
    assert not np.array_equal(got["scores"], ref["scores"])
    frozen = Model(pb, inputs=["words"], outputs=converted.output_names)
    assert_all_match(dict(zip(converted.signature.outputs, frozen.run([WORDS]))), ref, "frozen .pb")
    # A converted model converts again (its table is now an ordinary graph node).
    again = convert(out_dir)
    assert_all_match(dict(zip(again.signature.outputs, again.run([WORDS]))), ref, "converted twice")


def test_lookup_table_through_cli(table_saved_model, tmp_path):
    out_dir = tmp_path / "table_cli"
    result = run_cli("convert", f"--input_model={table_saved_model}", f"--output_model={out_dir}")
    assert result.returncode == 0, result.stderr
    assert_all_match(serve(str(out_dir), words=WORDS), serve(table_saved_model, words=WORDS), "CLI SavedModel")


def test_keras_string_lookup_model_runs_and_matches():
    keras.utils.set_random_seed(0)
    words = keras.Input((3,), dtype="string", name="words")
    ids = keras.layers.StringLookup(vocabulary=KEYS)(words)
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(len(KEYS) + 1, DIM)(ids))
    x = keras.layers.Dense(16, activation="relu", bias_initializer="random_normal")(x)
    outputs = keras.layers.Dense(4, bias_initializer="random_normal")(x)
    model = keras.Model(words, outputs)
    converted = convert(model)
    assert "MatMul" in bf16_ops(converted.graph_def) and "HashTableV2" in ops(converted.graph_def)
    got, = converted.run([WORDS])
    assert_matches(got, model(tf.constant(WORDS)).numpy(), "Keras StringLookup")


def _table_function(kind: str):
    """A concrete function reading (or, for ``insert``, writing) a mutable table of ``kind``."""
    if kind == "dense":
        table = tf.lookup.experimental.DenseHashTable(tf.string, tf.int64, -1, empty_key="", deleted_key="$")
    else:
        table = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, -1)
    table.insert(tf.constant(["a", "b"]), tf.constant([1, 2], tf.int64))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="s")], autograph=False)
    def lookup(s):
        if kind == "insert":
            table.insert(s, tf.zeros_like(s, tf.int64))
        return table.lookup(s)

    return lookup.get_concrete_function()


def test_mutable_table_is_frozen_as_its_contents():
    model = Model(_table_function("mutable"))
    got, = model.run([np.array([b"b", b"z", b"a"], dtype=object)])
    assert got.tolist() == [2, -1, 1]


@pytest.mark.parametrize("kind, message", [("dense", "not a plain key -> scalar table"),
                                           ("insert", "is modified by")])
def test_tables_a_snapshot_would_change_are_refused(kind, message):
    with pytest.raises(UnsupportedModelError, match=message):
        Model(_table_function(kind))


# ----------------------------------------------------------------------------- several signatures

class _TwoSignatures(tf.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(7)
        self.w1 = tf.Variable((rng.randn(16, 32) * 0.3).astype(np.float32))
        self.b1 = tf.Variable(rng.randn(32).astype(np.float32))
        self.w2 = tf.Variable((rng.randn(32, 4) * 0.3).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="x")])
    def embed(self, x):
        return {"embedding": tf.nn.relu(tf.matmul(x, self.w1) + self.b1)}

    @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="x")])
    def classify(self, x):
        hidden = tf.nn.relu(tf.matmul(x, self.w1) + self.b1)
        return {"logits": tf.matmul(hidden, self.w2), "label": tf.argmax(tf.matmul(hidden, self.w2), axis=-1)}


def test_each_signature_of_a_multi_signature_saved_model_converts_runs_and_matches(tmp_path):
    """tf_bf16 converts one signature per run (``signature=``/``--signature``); the output holds that one."""
    module = _TwoSignatures()
    src = str(tmp_path / "two")
    tf.saved_model.save(module, src, signatures={"serving_default": module.classify, "embed": module.embed})
    x = RNG.randn(6, 16).astype(np.float32)

    default = convert(src)   # MixedPrecision: the default signature
    assert default.signature.key == "serving_default" and list(default.signature.outputs) == ["label", "logits"]
    embed = convert(Model(src, signature="embed"))
    assert embed.signature.key == "embed" and list(embed.signature.outputs) == ["embedding"]
    for converted in (default, embed):
        assert "MatMul" in bf16_ops(converted.graph_def)
        out_dir = str(tmp_path / f"two_{converted.signature.key}")
        converted.save(out_dir)
        assert list(tf.saved_model.load(out_dir).signatures.keys()) == [converted.signature.key]
        ref = serve(src, converted.signature.key, x=x)
        got = serve(out_dir, converted.signature.key, x=x)
        assert_all_match(got, ref, converted.signature.key)
        by_model = dict(zip(converted.signature.outputs, converted.run([x])))
        assert_all_match(by_model, ref, f"{converted.signature.key} via Model.run")

    out_dir = tmp_path / "two_embed_cli"
    result = run_cli("convert", f"--input_model={src}", f"--output_model={out_dir}", "--signature=embed")
    assert result.returncode == 0, result.stderr
    assert list(tf.saved_model.load(str(out_dir)).signatures.keys()) == ["embed"]
    assert_all_match(serve(str(out_dir), "embed", x=x), serve(src, "embed", x=x), "CLI --signature=embed")


# ----------------------------------------------------------------------------- recurrent Keras

def _recurrent(layer: str) -> keras.Model:
    keras.utils.set_random_seed(3)
    cell = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[layer]
    return keras.Sequential([keras.Input((10, 8), name="sequence"), cell(16), keras.layers.Dense(4)])


@pytest.mark.parametrize("layer", ["lstm", "gru"])
def test_keras_recurrent_model_runs_and_matches(layer, tmp_path):
    """The recurrence is a (lowered) while loop: it stays FP32; the Dense head goes BF16."""
    model = _recurrent(layer)
    x = np.random.RandomState(4).randn(3, 10, 8).astype(np.float32)
    ref = model(x, training=False).numpy()
    exported = str(tmp_path / layer)
    model.export(exported, verbose=False)
    for source, what in ((model, "keras.Model"), (exported, "SavedModel export")):
        converted = convert(source)
        assert bf16_ops(converted.graph_def).count("MatMul") == 1, what   # the Dense kernel
        looped = [e for e in converted.report["fp32_nodes"] if e["op"] == "MatMul"]
        assert looped and all("while-loop frame" in e["reason"] for e in looped), what
        got, = converted.run([x])
        assert_matches(got, ref, f"{layer} from {what}")
        assert not np.array_equal(got, ref)
        out_dir = str(tmp_path / f"{layer}_{len(what)}_bf16")
        converted.save(out_dir)
        (key,) = converted.signature.inputs
        (out,) = serve(out_dir, **{key: x}).values()
        assert_matches(out, ref, f"{layer} from {what}, saved")
