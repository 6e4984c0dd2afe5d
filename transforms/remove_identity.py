"""remove_identity: bypass pass-through ops (Identity, IdentityN, StopGradient, CheckNumerics, ...).

Frozen graphs are full of them (every Keras variable read leaves an Identity), and each one
blocks pattern matching in later passes (BatchNorm folding, BF16 painting, cast folding).
Consumers are rewired to the source tensor; control inputs of a removed node move onto its
consumers, so ordering and v1 control-flow deadness are kept. Nodes next to v1 control-flow
ops (Switch, Merge, Enter, ...) stay, because there an Identity carries frame and deadness
meaning (the pivot of a ``cond``), not just a value.
"""

from __future__ import annotations

from typing import Dict, List, Set, Tuple

from tensorflow.core.framework import graph_pb2, node_def_pb2

from tf_bf16.transforms.graph import (GraphIndex, canonical_tensor, copy_graph, parse_input,
                                      rebuild)
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.op_classes import PASS_THROUGH_OPS, V1_CONTROL_FLOW_OPS


# removed node -> (tensor read instead of each output port, control inputs readers inherit)
_Forward = Dict[str, Tuple[List[str], List[str]]]


def remove_identity(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Remove pass-through nodes, rewiring consumers to the source tensor.

    Protected nodes (the graph's inputs and outputs) stay. One walk in topological order
    resolves whole chains (Identity -> StopGradient -> Identity) in linear time.
    """
    plan = context.plan
    out = copy_graph(graph_def)
    index = GraphIndex(out)
    protected = plan.protected
    forward: _Forward = {}
    for node in index.topological_order():
        _rewire(node, forward)
        if _removable(node, index, protected):
            data = [s for s in node.input if not s.startswith("^")]
            controls = [s[1:] for s in node.input if s.startswith("^")]
            forward[node.name] = ([canonical_tensor(s) for s in data], controls)
    return rebuild(out, (n for n in out.node if n.name not in forward))


def _removable(node: node_def_pb2.NodeDef, index: GraphIndex, protected: Set[str]) -> bool:
    """Whether ``node`` (inputs already rewired) is a pass-through that may be bypassed."""
    if node.op not in PASS_THROUGH_OPS or node.name in protected:
        return False
    data = [s for s in node.input if not s.startswith("^")]
    if not data or (node.op != "IdentityN" and len(data) != 1):
        return False
    for spec in data:  # IdentityN forwards input k to output k; the others have one of each
        source = parse_input(spec)[0]
        if source not in index or index[source].op in V1_CONTROL_FLOW_OPS:
            return False
    consumers = [c for c, _ in index.consumers(node.name)] + index.control_consumers(node.name)
    # Moving control inputs (and the value) onto a control-flow op would change deadness rules.
    return not any(c.op in V1_CONTROL_FLOW_OPS for c in consumers)


def _rewire(node: node_def_pb2.NodeDef, forward: _Forward) -> None:
    """Point ``node``'s inputs past removed nodes and inherit their control inputs."""
    if not any(parse_input(s)[0] in forward for s in node.input):
        return
    data: List[str] = []
    controls: List[str] = []
    for spec in node.input:
        src, port, is_control = parse_input(spec)
        if src not in forward:
            (controls if is_control else data).append(spec[1:] if is_control else spec)
            continue
        tensors, carried = forward[src]
        if is_control:  # waiting on a pass-through means waiting on what it forwards
            controls.extend(parse_input(t)[0] for t in tensors)
        else:
            data.append(tensors[port])
        controls.extend(carried)
    data_nodes = {parse_input(s)[0] for s in data}
    seen: Set[str] = set()
    kept_controls = []
    for name in controls:
        # A control edge on a node that already feeds data, or on itself, adds nothing.
        if name in seen or name in data_nodes or name == node.name:
            continue
        seen.add(name)
        kept_controls.append("^" + name)
    del node.input[:]
    node.input.extend(data + kept_controls)
