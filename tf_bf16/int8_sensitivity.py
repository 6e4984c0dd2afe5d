"""Which INT8 ops cost accuracy: the quantization noise each one adds, relative to its signal.

An INT8 contraction rounds its input activation to a step of ``range / levels`` (255 levels
for UINT8, 127 per side for INT8) and its weights to ``max|w_c| / 127`` per output channel.
Uniform rounding noise has variance ``step^2 / 12``; divided by the mean square of the FP32
values it is the op's noise-to-signal ratio. The score of an op is the sum over its input and
weights: ops whose calibrated range is wide compared with their typical values (outliers,
long tails) or whose weights have outlier channels score high and fall back to BF16 first.
One FP32 run on a few sample batches gives the mean squares; no INT8 model is run.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2

from tf_bf16.transforms import graph as g


def _input_tensor(node, index: g.GraphIndex) -> str:
    """The activation a contraction reads, looking through a zero Pad the INT8 op folds in."""
    producer = index.nodes.get(g.node_name(node.input[0]))
    if producer is not None and producer.op == "Pad":
        return g.canonical_tensor(producer.input[0])
    return g.canonical_tensor(node.input[0])


def _weight_noise(node, index: g.GraphIndex) -> float:
    """Per-channel symmetric INT8 rounding noise of the weights, relative to their mean square."""
    w = np.asarray(g.const_value(index.nodes[g.node_name(node.input[1])]), np.float64)
    channels = w.reshape(-1, w.shape[-1] if node.op != "DepthwiseConv2dNative" else w.shape[-2] * w.shape[-1])
    steps = np.abs(channels).max(axis=0) / 127.0
    signal = float(np.mean(w * w))
    return float(np.mean(steps ** 2) / 12.0 / signal) if signal > 0 else 0.0


def int8_noise(cleaned: graph_pb2.GraphDef, ranges: Mapping[str, Tuple[float, float]], units: Sequence[str],
               input_names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]) -> Dict[str, float]:
    """Contraction node -> relative INT8 noise (input + weights); higher = more sensitive."""
    import tensorflow as tf

    index = g.GraphIndex(cleaned)
    inputs = {u: _input_tensor(index.nodes[u], index) for u in units}
    fetch = sorted(set(inputs.values()))
    squares: Dict[str, float] = {t: 0.0 for t in fetch}
    if feeds and fetch:
        graph = tf.Graph()
        with graph.as_default():
            tf.graph_util.import_graph_def(cleaned, name="")
        tensors = [graph.get_tensor_by_name(g.tf_tensor_name(t)) for t in fetch]
        with tf.compat.v1.Session(graph=graph) as session:
            for feed in feeds:
                values = session.run(tensors, {graph.get_tensor_by_name(g.tf_tensor_name(n)): feed[n] for n in input_names})
                for t, v in zip(fetch, values):
                    squares[t] += float(np.mean(np.square(v, dtype=np.float64))) / len(feeds)
    scores = {}
    for unit, tensor in inputs.items():
        low, high = ranges.get(tensor, (0.0, 0.0))
        levels = 255.0 if low >= 0.0 else 127.0
        step = max(abs(low), abs(high)) / levels
        activation = (step * step / 12.0) / squares[tensor] if squares[tensor] > 0 else 0.0
        scores[unit] = activation + _weight_noise(index.nodes[unit], index)
    return scores
