"""Run TensorFlow's own Grappler BF16 auto-mixed-precision pass on a frozen graph.

It is the baseline tf_bf16 is measured against (tests compare accuracy and Cast counts,
benchmarks compare speed). Needs a oneDNN-enabled TensorFlow: on CPUs where oneDNN is not
on by default, ``TF_ENABLE_ONEDNN_OPTS=1`` must be set before TensorFlow is imported.
"""

from __future__ import annotations

from typing import Sequence

from tensorflow.core.framework import graph_pb2

from tf_bf16.errors import TfBf16Error
from tf_bf16.transforms import graph as g

AMP_OPTIMIZER = "auto_mixed_precision_onednn_bfloat16"
CPU_DEVICE = "/job:localhost/replica:0/task:0/device:CPU:0"


def tf_amp_bf16(graph_def: graph_pb2.GraphDef, outputs: Sequence[str], constant_folding: bool = False) -> graph_pb2.GraphDef:
    """The graph TF's AMP pass produces (only that pass, plus constant folding if asked).

    Raises TfBf16Error when this TensorFlow build refuses the pass (no oneDNN) or leaves the
    graph without any bfloat16 node.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.grappler import tf_optimizer

    pinned = g.copy_graph(graph_def)
    for node in pinned.node:
        node.device = CPU_DEVICE
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(pinned, name="")
        meta = tf.compat.v1.train.export_meta_graph(graph=graph)
    fetch = meta.collection_def["train_op"].node_list.value
    for name in outputs:
        fetch.append(g.node_name(name))
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.min_graph_nodes = -1
    setattr(rewrite, AMP_OPTIMIZER, rewriter_config_pb2.RewriterConfig.ON)
    rewrite.optimizers.append(AMP_OPTIMIZER)
    if constant_folding:
        rewrite.optimizers.append("constfold")
    out = tf_optimizer.OptimizeGraph(config, meta)
    if not any(n.attr["T"].type == g.BFLOAT16 for n in out.node if "T" in n.attr):
        raise TfBf16Error("TensorFlow's auto_mixed_precision_onednn_bfloat16 pass changed nothing; "
                          "is TF_ENABLE_ONEDNN_OPTS=1 set before TensorFlow is imported?")
    for node in out.node:
        node.device = ""
    return out
