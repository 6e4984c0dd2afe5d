"""What TensorFlow actually ran for a graph: the nodes of its partition graphs after Grappler.

Fusions (``_MklLayerNorm``, ``_FusedConv2D`` with its ``fused_ops``, ``_MklNativeFusedMatMul``)
only exist after Grappler's remapper and oneDNN's layout pass, so tests that check which
fusions fire read them here rather than in the GraphDef they hand to TensorFlow.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np
import tensorflow as tf


def executed_nodes(graph_def: Any, input_names: Sequence[str], output_names: Sequence[str],
                   feeds: Sequence[np.ndarray]) -> Tuple[List[Any], List[np.ndarray]]:
    """(NodeDefs TensorFlow executed, the outputs) for one run of ``graph_def`` on ``feeds``."""
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    tensor = lambda n: n if ":" in n else f"{n}:0"  # noqa: E731
    options = tf.compat.v1.RunOptions(output_partition_graphs=True)
    meta = tf.compat.v1.RunMetadata()
    with tf.compat.v1.Session(graph=graph) as sess:
        outputs = sess.run([tensor(n) for n in output_names], {tensor(n): v for n, v in zip(input_names, feeds)},
                           options=options, run_metadata=meta)
    return [n for g in meta.partition_graphs for n in g.node], outputs


def fused_ops(node: Any) -> List[str]:
    """The ``fused_ops`` attr of a fused contraction, as strings (empty when absent)."""
    return [s.decode() for s in node.attr["fused_ops"].list.s] if "fused_ops" in node.attr else []
