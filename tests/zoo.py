"""Builders of real test models, shared by every test module.

Everything here builds a fresh, deterministic model on each call; caching lives in
``tests/conftest.py`` (session fixtures), so each architecture is built once per worker.

* ``keras_model(name)``: keras.applications CNNs (``weights=None``) and BERT-like encoders.
* ``bert_like(...)``: a small transformer encoder made only of Keras layers.
* ``sample_inputs(model_or_name)``: random feeds matching a model's inputs.
* ``digits_cnn()``: a small CNN trained in seconds on scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SEED = 0

# keras.applications builders and their default input shapes (HWC, batch left out).
_APPLICATIONS: Dict[str, Tuple[str, Tuple[int, int, int]]] = {
    "resnet50": ("ResNet50", (224, 224, 3)),
    "mobilenetv2": ("MobileNetV2", (224, 224, 3)),
    "efficientnetb0": ("EfficientNetB0", (224, 224, 3)),
    "densenet121": ("DenseNet121", (224, 224, 3)),
    "inceptionv3": ("InceptionV3", (299, 299, 3)),
}
# BERT-like encoders: name -> number of layers (the other sizes are bert_like's defaults).
_BERTS: Dict[str, int] = {"bert": 4, "bert12": 12}
BERT_SEQ_LEN = 128
BERT_VOCAB = 1000

NAMES: Tuple[str, ...] = tuple(_APPLICATIONS) + tuple(_BERTS)


@keras.saving.register_keras_serializable(package="tf_bf16_zoo")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of positions ``0 .. seq_len-1`` (gathered over a range) to its input."""

    def __init__(self, seq_len: int, hidden: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.seq_len = seq_len
        self.hidden = hidden

    def build(self, input_shape: Any) -> None:
        self.table = self.add_weight(name="table", shape=(self.seq_len, self.hidden),
                                     initializer=keras.initializers.RandomNormal(stddev=0.02, seed=SEED))
        super().build(input_shape)

    def call(self, x: Any) -> Any:
        positions = keras.ops.arange(self.seq_len, dtype="int32")
        return x + keras.ops.expand_dims(keras.ops.take(self.table, positions, axis=0), 0)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "seq_len": self.seq_len, "hidden": self.hidden}


def bert_like(num_layers: int = 4, seq_len: int = 128, hidden: int = 256, heads: int = 4,
              intermediate: int = 1024, vocab: int = 1000) -> keras.Model:
    """A BERT-like encoder from Keras layers: int32 token ids in, [sequence output, class probs] out.

    Token + learned position embeddings, then per layer self-attention, dropout, residual,
    LayerNorm, GELU feed-forward, residual, LayerNorm; the pooled head is Dense(tanh) then
    Dense(2, softmax) on the first token. Weights come from a fixed seed.
    """
    from keras import layers

    keras.utils.set_random_seed(SEED)
    tokens = keras.Input(shape=(seq_len,), dtype="int32", name="input_ids")
    x = layers.Embedding(vocab, hidden, name="token_embedding")(tokens)
    x = PositionEmbedding(seq_len, hidden, name="position_embedding")(x)
    x = layers.LayerNormalization(epsilon=1e-12, name="embedding_norm")(x)
    x = layers.Dropout(0.1, name="embedding_dropout")(x)
    for i in range(num_layers):
        attn = layers.MultiHeadAttention(heads, hidden // heads, dropout=0.1, name=f"layer_{i}_attention")(x, x)
        attn = layers.Dropout(0.1, name=f"layer_{i}_attention_dropout")(attn)
        x = layers.Add(name=f"layer_{i}_attention_residual")([x, attn])
        x = layers.LayerNormalization(epsilon=1e-12, name=f"layer_{i}_attention_norm")(x)
        ffn = layers.Dense(intermediate, activation="gelu", name=f"layer_{i}_intermediate")(x)
        ffn = layers.Dense(hidden, name=f"layer_{i}_output")(ffn)
        ffn = layers.Dropout(0.1, name=f"layer_{i}_output_dropout")(ffn)
        x = layers.Add(name=f"layer_{i}_output_residual")([x, ffn])
        x = layers.LayerNormalization(epsilon=1e-12, name=f"layer_{i}_output_norm")(x)
    sequence_output = x
    first = layers.Cropping1D((0, seq_len - 1), name="first_token")(x)
    pooled = layers.Flatten(name="first_token_flat")(first)
    pooled = layers.Dense(hidden, activation="tanh", name="pooler")(pooled)
    probs = layers.Dense(2, activation="softmax", name="classifier")(pooled)
    return keras.Model(tokens, [sequence_output, probs], name=f"bert_like_{num_layers}")


def make_trained_like(model: Any, seed: int = 1) -> int:
    """Give constant-initialised weights (biases, BatchNorm/LayerNorm parameters and statistics) seeded
    random values near their initial ones; returns how many variables changed.

    Straight after ``weights=None`` initialisation every bias is 0 and every BatchNorm is
    x * 1/sqrt(1+eps) + 0, so TensorFlow's Grappler deletes those nodes as ``x + 0`` and folds
    the scale into the filter: the FP32 ResNet50 then runs 52 bare Conv2D with no BiasAdd, which
    no trained model allows, and fusions such as ``_FusedConv2D`` never show up.
    """
    rng = np.random.default_rng(seed)
    changed = 0
    for weight in model.weights:
        value = np.asarray(weight.numpy())
        if not value.size or not np.issubdtype(value.dtype, np.floating):
            continue
        first = float(value.flat[0])
        if first not in (0.0, 1.0) or not np.all(value == first):
            continue
        if first == 0.0:
            new = rng.normal(0.0, 0.05, value.shape)
        else:
            new = rng.uniform(0.5, 1.5, value.shape)
        weight.assign(new.astype(value.dtype))
        changed += 1
    return changed


def keras_model(name: str) -> keras.Model:
    """A fresh, deterministic Keras model by zoo name (see ``NAMES``)."""
    if name in _BERTS:
        return bert_like(num_layers=_BERTS[name], seq_len=BERT_SEQ_LEN, vocab=BERT_VOCAB)
    if name not in _APPLICATIONS:
        raise ValueError(f"unknown zoo model {name!r}; known: {list(NAMES)}")
    builder, shape = _APPLICATIONS[name]
    keras.utils.set_random_seed(SEED)
    return getattr(keras.applications, builder)(weights=None, input_shape=shape)


def _input_specs(model_or_name: Any) -> List[Tuple[Tuple[Optional[int], ...], str, int]]:
    """(shape with batch first, dtype, high bound for integers) per input of a zoo name or model."""
    if isinstance(model_or_name, str):
        if model_or_name in _BERTS:
            return [((None, BERT_SEQ_LEN), "int32", BERT_VOCAB)]
        if model_or_name in _APPLICATIONS:
            return [((None,) + _APPLICATIONS[model_or_name][1], "float32", 0)]
        raise ValueError(f"unknown zoo model {model_or_name!r}; known: {list(NAMES)}")
    if isinstance(model_or_name, keras.Model):
        bound = _token_bound(model_or_name)
        return [(tuple(t.shape), str(t.dtype), bound) for t in model_or_name.inputs]
    signature = getattr(model_or_name, "signature", None)
    if signature is not None and hasattr(model_or_name, "graph_def"):  # a tf_bf16.Model
        by_node = {spec.name: spec for spec in signature.inputs.values()}
        bound = _graph_token_bound(model_or_name.graph_def)
        specs = []
        for name in model_or_name.input_names:
            spec = by_node.get(name)
            if spec is None or spec.shape is None:
                raise ValueError(f"input {name!r} has no known shape; build feeds by hand")
            specs.append((tuple(spec.shape), spec.dtype, bound))
        return specs
    raise TypeError(f"expected a zoo name, keras.Model or tf_bf16.Model, got {type(model_or_name).__name__}")


def _token_bound(model: keras.Model) -> int:
    """Exclusive upper bound for integer inputs: the smallest Embedding vocabulary in the model."""
    dims, stack = [], list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.layers.Embedding):
            dims.append(layer.input_dim)
        stack.extend(getattr(layer, "layers", ()))
    return min(dims) if dims else 2


def _graph_token_bound(graph_def: Any) -> int:
    """Exclusive bound for integer feeds of a frozen graph: the fewest rows of any constant Gather table."""
    nodes = {n.name: n for n in graph_def.node}
    rows = []
    for node in graph_def.node:
        if node.op not in ("GatherV2", "Gather", "ResourceGather") or not node.input:
            continue
        source = nodes.get(node.input[0].split(":")[0])
        while source is not None and source.op == "Identity" and source.input:
            source = nodes.get(source.input[0].split(":")[0])
        if source is not None and source.op == "Const":
            dims = source.attr["value"].tensor.tensor_shape.dim
            if dims:
                rows.append(int(dims[0].size))
    return min(rows) if rows else BERT_VOCAB


def sample_inputs(model_or_name: Any, batch: int = 2, seed: int = 0) -> List[np.ndarray]:
    """Random feeds in input order: floats uniform in [0, 1), integers uniform in [0, vocab)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for shape, dtype, bound in _input_specs(model_or_name):
        full = (batch,) + tuple(int(d) for d in shape[1:])
        if np.issubdtype(np.dtype(dtype), np.integer):
            feeds.append(rng.integers(0, bound, size=full).astype(dtype))
        else:
            feeds.append(rng.random(full).astype(dtype))
    return feeds


def digits_data(seed: int = SEED) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as (x_train, x_test, y_train, y_test): NHWC float32 in [0, 1], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]
    labels = digits.target.astype(np.int64)
    return tuple(train_test_split(images, labels, test_size=0.25, random_state=seed, stratify=labels))


def digits_cnn_model() -> keras.Model:
    """The untrained digits CNN: Conv-BN-ReLU, pool, Conv-BN-ReLU, pool, Dense-ReLU, Dense-softmax."""
    from keras import layers

    keras.utils.set_random_seed(SEED)
    inputs = keras.Input(shape=(8, 8, 1), name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="fc")(x)
    outputs = layers.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def digits_cnn(epochs: int = 12) -> Tuple[keras.Model, Tuple[np.ndarray, np.ndarray]]:
    """Train the digits CNN (seconds on a CPU) and return it with held-out ``(x_test, y_test)``."""
    x_train, x_test, y_train, y_test = digits_data()
    model = digits_cnn_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    return model, (x_test, y_test)


def accuracy(probs: np.ndarray, labels: Sequence[int]) -> float:
    """Top-1 accuracy of class probabilities (or logits) against integer labels."""
    return float(np.mean(np.argmax(probs, axis=-1) == np.asarray(labels)))


def run_graph(graph_def: Any, fetches: Any, feeds: Any) -> Any:
    """Run ``fetches`` of a GraphDef in a fresh graph and session (for pass tests on raw graphs)."""
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run(fetches, feeds)


def three_conv_graph(seed: int = SEED) -> Any:
    """Neural Compressor's BF16 test graph ("graph A"), built here as a frozen GraphDef.

    ``input`` (NHWC, 3 channels, unknown shape) -> conv1 -> conv1_bias_add -> relu -> conv2
    -> conv2_bias_add -> relu2 -> log1 (Log, a deny op) -> conv3 -> ``final`` (Identity).
    Weights and biases are |N(0, 1)| so every activation is positive and Log is defined.
    """
    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, None, name="input")

        def conv(inp: Any, cin: int, name: str) -> Any:
            w = tf.constant(np.abs(rng.standard_normal((3, 3, cin, 32))).astype(np.float32), name=f"{name}_weights")
            return tf.raw_ops.Conv2D(input=inp, filter=w, strides=[1, 1, 1, 1], padding="SAME", name=name)

        def bias(inp: Any, name: str) -> Any:
            b = tf.constant(np.abs(rng.standard_normal(32)).astype(np.float32), name=f"{name}_bias")
            return tf.raw_ops.BiasAdd(value=inp, bias=b, name=f"{name}_bias_add")

        h = tf.raw_ops.Relu(features=bias(conv(x, 3, "conv1"), "conv1"), name="relu")
        h = tf.raw_ops.Relu(features=bias(conv(h, 32, "conv2"), "conv2"), name="relu2")
        h = tf.raw_ops.Log(x=h, name="log1")
        tf.identity(conv(h, 32, "conv3"), name="final")
    return graph.as_graph_def()
