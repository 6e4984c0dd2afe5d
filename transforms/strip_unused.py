"""strip_unused: drop every node the graph's outputs do not depend on.

Dead branches (training-only ops, unused weights, debugging nodes) cost memory and make
later passes and reports noisier; like ``graph_transforms``' strip_unused_nodes, this keeps
only the data and control ancestors of the outputs. The inputs always stay, even when no
output reads them, so the model's signature keeps working.
"""

from __future__ import annotations

from tensorflow.core.framework import graph_pb2

from tf_bf16.transforms.graph import GraphIndex, node_name, reachable_from, rebuild
from tf_bf16.errors import GraphError
from tf_bf16.transforms.context import TransformContext


def strip_unused(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Keep the outputs' data and control ancestors plus the inputs, in their original order.

    Raises GraphError when an input or output names a node that is not in the graph, since
    stripping against a wrong name would silently delete the whole model.
    """
    plan = context.plan
    if not plan.outputs:
        raise GraphError("strip_unused: the plan names no outputs, so every node would be dropped")
    index = GraphIndex(graph_def)
    seeds = [node_name(name) for name in tuple(plan.outputs) + tuple(plan.inputs)]
    missing = sorted({name for name in seeds if name not in index})
    if missing:
        raise GraphError(f"strip_unused: input/output node(s) {missing} are not in the graph")
    keep = reachable_from(index, seeds)
    # rebuild() copies each kept NodeDef, so the caller's GraphDef is never shared or mutated.
    return rebuild(graph_def, (node for node in graph_def.node if node.name in keep))
