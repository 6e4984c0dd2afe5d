"""Fingerprint tf_bf16's conversions of a fixed model set, to show a refactor changes no output.

Converts the Keras zoo (ResNet50, MobileNetV2, EfficientNetB0, DenseNet121, InceptionV3, the
4- and 12-layer BERT-like encoders), the test models (digits CNN, small BERT, three-conv
graph, the bundled example SavedModel), a few plan variants (op-wise and op-type FP32
overrides, FP32 only), a graph with library functions and seeded random graphs, and prints one JSON line per conversion:
the SHA-256 of the deterministically serialized output GraphDef and of the report's
content (counts, FP32 nodes and reasons, function reports; timings left out).

    python -m bench.identical --inputs_dir=/tmp/models --out=/tmp/before.jsonl       # on the old tree
    python -m bench.identical --inputs_dir=/tmp/models --compare=/tmp/before.jsonl   # new tree: exit 1 on a difference
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Write the fingerprints to this file.")
flags.DEFINE_string("compare", None, "Compare with fingerprints written earlier; exit 1 on any difference.")
flags.DEFINE_integer("random_graphs", 200, "Number of seeded random graphs (seeds 0..N-1).", lower_bound=0)
flags.DEFINE_list("zoo", None, "Zoo models to convert (default: all).")
flags.DEFINE_string("inputs_dir", None, "Store the models converted here on the first run and read them back "
                    "on later runs, so models whose build is not reproducible compare on the same input.")

_REPORT_KEYS = ("summary", "op_types", "fp32_nodes", "functions", "consts_converted", "precisions")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(model: Any, source: Any) -> Dict[str, Any]:
    """Hashes of a converted ``tf_bf16.Model``'s GraphDef and report content, plus its size,
    and of the model it was converted from (so a nondeterministic input shows as such)."""
    report = {k: model.report[k] for k in _REPORT_KEYS if k in (model.report or {})}
    return {"input": _sha(source.graph_def.SerializeToString(deterministic=True)),
            "graph": _sha(model.graph_def.SerializeToString(deterministic=True)),
            "report": _sha(json.dumps(report, sort_keys=True, default=str).encode()),
            "nodes": len(model.graph_def.node)}


def _cached(name: str, source: Any, inputs: Optional[Sequence[str]], outputs: Optional[Sequence[str]],
            inputs_dir: Optional[str]) -> Any:
    """The model to convert, as a ``tf_bf16.Model`` read from a frozen GraphDef.

    With ``inputs_dir``, the first run stores each model there and later runs read it back,
    so a model whose build is not bit-reproducible (seeded Keras layers are not always) is
    still compared on the same input.
    """
    from tensorflow.core.framework import graph_pb2

    from tf_bf16 import Model

    model = source if isinstance(source, Model) else None
    path = os.path.join(inputs_dir, name) if inputs_dir else None
    if path and os.path.exists(path + ".pb"):
        graph_def = graph_pb2.GraphDef.FromString(open(path + ".pb", "rb").read())
        with open(path + ".json") as f:
            names = json.load(f)
        return Model(graph_def, inputs=names["inputs"], outputs=names["outputs"])
    if model is None:
        model = Model(source, inputs=inputs, outputs=outputs)
    if path:
        os.makedirs(inputs_dir, exist_ok=True)
        with open(path + ".pb", "wb") as f:
            f.write(model.graph_def.SerializeToString(deterministic=True))
        with open(path + ".json", "w") as f:
            json.dump({"inputs": list(model.input_names), "outputs": list(model.output_names)}, f)
    return Model(model.graph_def, inputs=list(model.input_names), outputs=list(model.output_names))


def _convert(model: Any, conf: Optional[Mapping[str, Any]] = None) -> Any:
    """(converted model, source model): ``MixedPrecision`` with ``conf`` and FORCE_BF16 set."""
    from tf_bf16 import MixedPrecision

    converter = MixedPrecision(dict(conf or {}), env={"FORCE_BF16": "1"})
    converter.model = model
    return converter(), model


def _functions_graph() -> Any:
    """An unfrozen graph with a PartitionedCall and a cond: library function bodies to convert.

    Built first, so the traced functions' generated names do not depend on what ran before.
    """
    import numpy as np
    import tensorflow as tf

    w = tf.constant(np.random.RandomState(0).randn(16, 16).astype(np.float32))

    @tf.function(autograph=False)
    def inner(x: Any) -> Any:
        return tf.nn.relu(tf.matmul(x, w)) + 1.0

    def outer(x: Any) -> Any:
        y = inner(x)
        return tf.cond(tf.reduce_sum(y) > 0, lambda: tf.matmul(y, w) * 2.0, lambda: y - 1.0)

    spec = tf.TensorSpec([None, 16], tf.float32, name="x")
    return tf.function(outer).get_concrete_function(spec).graph.as_graph_def()


def conversions(zoo_names: Optional[Sequence[str]], random_graphs: int,
                inputs_dir: Optional[str]) -> Iterator[Tuple[str, Any]]:
    """(name, (converted model, source model)) for every conversion in the fixed set."""
    def load(name: str, source: Any, inputs: Optional[Sequence[str]] = None,
             outputs: Optional[Sequence[str]] = None) -> Any:
        return _cached(name, source, inputs, outputs, inputs_dir)

    yield "library_functions", _convert(load("library_functions", _functions_graph(), ["x"], ["Identity"]))
    zoo = common.tests_module("zoo")
    for name in zoo_names or zoo.NAMES:
        model = load(name, zoo.keras_model(name))
        yield name, _convert(model)
        if name == "resnet50":
            first_conv = next(n.name for n in model.graph_def.node if n.op == "Conv2D")
            yield "resnet50+op_wise_fp32", _convert(
                model, {"mixed_precision": {"op_wise": {first_conv: {"activation": {"dtype": "fp32"}}}}})
            yield "resnet50+fp32_only", _convert(model, {"mixed_precision": {"precisions": ["fp32"]}})
        if name == "bert":
            yield "bert+op_type_fp32", _convert(
                model, {"mixed_precision": {"op_type_wise": {"Softmax": {"activation": {"dtype": "fp32"}}}}})
    yield "digits_cnn_model", _convert(load("digits_cnn_model", zoo.digits_cnn_model()))
    yield "bert_small", _convert(load("bert_small", zoo.bert_like(num_layers=1, seq_len=16, hidden=32, heads=2,
                                                                  intermediate=64, vocab=100)))
    yield "three_conv_graph", _convert(load("three_conv_graph", zoo.three_conv_graph(), ["input"], ["final"]))
    yield "example_digits_cnn", _convert(load("example_digits_cnn",
                                              os.path.join(common.repo_root(), "examples", "digits_cnn")))
    random_graphs_mod = common.tests_module("random_graphs")
    from tf_bf16.errors import TfBf16Error

    for seed in range(random_graphs):
        rg = random_graphs_mod.random_graph(seed)
        try:
            yield f"random_{seed}", _convert(load(f"random_{seed}", rg.graph_def, rg.inputs, rg.outputs))
        except TfBf16Error as exc:
            yield f"random_{seed}", str(exc)


def main(argv: Sequence[str]) -> None:
    del argv
    common.configure_env()
    rows = {}
    for name, result in conversions(FLAGS.zoo, FLAGS.random_graphs, FLAGS.inputs_dir):
        row = {"name": name, **(fingerprint(*result) if not isinstance(result, str) else {"error": result})}
        rows[name] = row
        print(json.dumps(row), flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            for row in rows.values():
                f.write(json.dumps(row) + "\n")
    if FLAGS.compare:
        with open(FLAGS.compare) as f:
            before = {r["name"]: r for r in map(json.loads, f)}
        # A model whose own GraphDef differs between runs (seeded Keras builds are not always
        # reproducible) cannot be compared; it is listed apart, not counted as a difference.
        unstable = sorted(n for n in before.keys() & rows.keys() if before[n].get("input") != rows[n].get("input"))
        differ = sorted(n for n in before.keys() | rows.keys() if before.get(n) != rows.get(n) and n not in unstable)
        print(json.dumps({"identical_summary": {"conversions": len(rows), "compared": len(before) - len(unstable),
                                                "different": differ, "input_not_reproducible": unstable}}))
        if differ:
            sys.exit(1)


if __name__ == "__main__":
    app.run(main)
