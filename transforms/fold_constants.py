"""fold_constants: replace every subgraph whose value depends only on Consts by Const nodes.

Keras 3 frozen graphs compute BatchNorm's scale and shift at run time from the stored
moments (Reshape -> AddV2(eps) -> Rsqrt -> Mul -> Sub on constants); folding turns each BN
into one Mul and one AddV2 with constant operands, which ``fold_batch_norms`` then merges
into the convolution. The values come from a small evaluator: the constant subgraph is
imported into a fresh ``tf.Graph`` and all frontier tensors are fetched in ONE session run,
so results are bit-identical to what TensorFlow computes at inference time.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Set, Tuple

import numpy as np
from absl import logging
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2
from tensorflow.python.framework import errors

from tf_bf16.transforms.graph import (GraphIndex, OpSignatures, copy_graph,
                                      make_const, parse_input, reachable_from, rebuild, slot_dtype,
                                      unique_name)
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.op_classes import RUNTIME_IO_OPS, STATEFUL_SOURCE_OPS, V1_CONTROL_FLOW_OPS

# A folded tensor above this many elements that is also much larger than its inputs
# (Fill, Tile, BroadcastTo, ZerosLike of a big shape) stays an op: storing it would bloat the
# model far more than computing it costs.
MAX_FOLDED_ELEMENTS = 10_000_000
MAX_GROWTH = 4

# Never constant even with constant inputs: they carry frame/deadness or feed values in.
NEVER_FOLD_OPS = STATEFUL_SOURCE_OPS | V1_CONTROL_FLOW_OPS | RUNTIME_IO_OPS
UNFOLDABLE_DTYPES = frozenset({types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT, types_pb2.DT_INVALID})


def fold_constants(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Evaluate constant subgraphs once and splice their values in as Const nodes.

    Protected nodes (inputs, outputs) are never replaced, so every output keeps its name, op
    and dtype; their constant inputs are folded instead. Control edges from constant nodes
    (and from NoOps that only wait on constants, like the one Keras freezing leaves behind)
    order nothing and are dropped, and constants nobody reads any more are removed.
    """
    plan = context.plan
    out = copy_graph(graph_def)
    index = GraphIndex(out)
    signatures = OpSignatures(out)
    protected = plan.protected
    constant, inert = _classify(index, signatures, protected)
    if not inert:
        return out
    frontier = _frontier(index, constant, set())
    values: Dict[Tuple[str, int], Tuple[np.ndarray, int]] = {}
    if frontier:
        try:
            evaluator = _Evaluator(out, index, frontier)
            keep_as_op = evaluator.too_large()
            if keep_as_op:
                frontier = _frontier(index, constant, keep_as_op)
            values = evaluator.run(frontier)
        except (errors.OpError, ValueError) as exc:  # a kernel refused its inputs: fold nothing
            logging.warning("fold_constants: evaluating %d constant tensors failed (%s); not folding",
                            sum(len(p) for p in frontier.values()), str(exc).splitlines()[0])
            frontier, values = {}, {}
    nodes, added = _splice(out, index, inert, frontier, values)
    return _drop_dead_constants(rebuild(out, nodes), inert | added, protected)


# ----------------------------------------------------------------------------- analysis

def _classify(index: GraphIndex, signatures: OpSignatures, protected: FrozenSet[str]) -> Tuple[Set[str], Set[str]]:
    """(constant nodes, inert nodes), decided in one topological walk."""
    constant: Set[str] = set()
    inert: Set[str] = set()
    for node in index.topological_order():
        srcs = [parse_input(s) for s in node.input]
        controls_ok = all(name in inert for name, _, ctl in srcs if ctl)
        data = [name for name, _, ctl in srcs if not ctl]
        if node.name in protected or not controls_ok:
            continue
        if node.op == "NoOp" and not data:
            inert.add(node.name)
            continue
        if node.op == "Const":
            if node.attr["dtype"].type not in UNFOLDABLE_DTYPES:
                constant.add(node.name)
                inert.add(node.name)
            continue
        if data and all(name in constant for name in data) and _foldable_op(node, signatures):
            constant.add(node.name)
            inert.add(node.name)
    return constant, inert


def _foldable_op(node: node_def_pb2.NodeDef, signatures: OpSignatures) -> bool:
    """Pure, registered, non-function op whose outputs are plain tensors."""
    if node.op in NEVER_FOLD_OPS or signatures.is_function(node.op):
        return False
    op_def = signatures.op_def(node.op)
    if op_def is None or op_def.is_stateful or not op_def.output_arg:
        return False
    if any(a.type in ("func", "list(func)") for a in op_def.attr):
        return False
    if any(arg.is_ref for arg in list(op_def.input_arg) + list(op_def.output_arg)):
        return False
    defaults = {a.name: a.default_value.type for a in op_def.attr if a.HasField("default_value")}
    slots = signatures.output_slots(node) or []
    for slot in slots:
        dtype = slot_dtype(node, slot)
        if dtype == types_pb2.DT_INVALID and slot.attr is not None and slot.index is None:
            dtype = defaults.get(slot.attr, dtype)  # GraphDefs saved with default attrs stripped
        if dtype in UNFOLDABLE_DTYPES:
            return False
    return bool(slots)


def _frontier(index: GraphIndex, constant: Set[str], keep_as_op: Set[str]) -> Dict[str, Tuple[int, ...]]:
    """Non-Const constant nodes read by a node that stays (non-constant or kept as an op)."""
    ports: Dict[str, Set[int]] = {}
    for node in index.graph_def.node:
        if node.name in constant and node.name not in keep_as_op:
            continue
        for spec in node.input:
            src, port, is_control = parse_input(spec)
            if is_control or src not in constant or src in keep_as_op or index[src].op == "Const":
                continue
            ports.setdefault(src, set()).add(port)
    return {name: tuple(sorted(p)) for name, p in ports.items()}


class _Evaluator:
    """The constant subgraph imported into a fresh tf.Graph, fetched in one session run."""

    def __init__(self, graph_def: graph_pb2.GraphDef, index: GraphIndex, frontier: Dict[str, Tuple[int, ...]]):
        import tensorflow as tf

        self._frontier = frontier
        needed = reachable_from(index, frontier)  # closed: constant nodes read only constants
        sub = rebuild(graph_def, (n for n in graph_def.node if n.name in needed))
        for node in sub.node:
            node.device = ""
            if "_class" in node.attr:  # colocation with nodes outside the subgraph
                del node.attr["_class"]
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.graph_util.import_graph_def(sub, name="")

    def too_large(self) -> Set[str]:
        """Frontier-reachable nodes whose output would be big and much bigger than their inputs."""
        big: Set[str] = set()
        stack = list(self._frontier)
        seen: Set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            op = self.graph.get_operation_by_name(name)
            size = max((t.shape.num_elements() or 0 for t in op.outputs), default=0)
            if size <= MAX_FOLDED_ELEMENTS:
                continue
            inputs = sum(t.shape.num_elements() or 0 for t in op.inputs)
            if size > MAX_GROWTH * inputs:
                big.add(name)
                # Its constant, non-Const inputs become the frontier instead; check them too.
                stack.extend(t.op.name for t in op.inputs if t.op.type != "Const")
        return big

    def run(self, frontier: Dict[str, Tuple[int, ...]]) -> Dict[Tuple[str, int], Tuple[np.ndarray, int]]:
        """{(node, port): (value, dtype enum)} for every frontier tensor, in one run."""
        import tensorflow as tf

        keys = [(name, port) for name, ports in frontier.items() for port in ports]
        if not keys:
            return {}
        tensors = [self.graph.get_operation_by_name(n).outputs[p] for n, p in keys]
        config = tf.compat.v1.ConfigProto()
        config.graph_options.rewrite_options.disable_meta_optimizer = True  # plain kernels, no rewrites
        with tf.compat.v1.Session(graph=self.graph, config=config) as session:
            values = session.run(tensors)
        return {key: (value, t.dtype.as_datatype_enum) for key, value, t in zip(keys, values, tensors)}


# ----------------------------------------------------------------------------- rewrite

def _splice(graph_def: graph_pb2.GraphDef, index: GraphIndex, inert: Set[str],
            frontier: Dict[str, Tuple[int, ...]],
            values: Dict[Tuple[str, int], Tuple[np.ndarray, int]]) -> Tuple[List[node_def_pb2.NodeDef], Set[str]]:
    """(new node list, names of Consts added under new names).

    Frontier nodes become Consts (port 0 keeps the node's name, other ports get fresh names
    and their readers are rewired); control edges from inert nodes are dropped.
    """
    names: Dict[str, None] = dict.fromkeys(index.nodes)
    renamed: Dict[Tuple[str, int], str] = {}
    replacements: Dict[str, List[node_def_pb2.NodeDef]] = {}
    for name, ports in frontier.items():
        node = index[name]
        consts = []
        for port in ports:
            if port == 0:
                const_name = name
            else:
                const_name = unique_name(names, f"{name}_port{port}")
                names[const_name] = None
                renamed[(name, port)] = const_name
            value, dtype = values[(name, port)]
            consts.append(make_const(const_name, value, dtype, device=node.device))
        replacements[name] = consts
    nodes: List[node_def_pb2.NodeDef] = []
    for node in graph_def.node:
        if node.name in replacements:
            nodes.extend(replacements[node.name])
            continue
        new_inputs = []
        for spec in node.input:
            src, port, is_control = parse_input(spec)
            if is_control:
                if src not in inert:
                    new_inputs.append(spec)
            elif (src, port) in renamed:
                new_inputs.append(renamed[(src, port)])
            else:
                new_inputs.append(spec)
        if len(new_inputs) != len(node.input) or any(a != b for a, b in zip(new_inputs, node.input)):
            del node.input[:]
            node.input.extend(new_inputs)
        nodes.append(node)
    return nodes, set(renamed.values())


def _drop_dead_constants(graph_def: graph_pb2.GraphDef, removable: Set[str],
                         protected: FrozenSet[str]) -> graph_pb2.GraphDef:
    """Remove constant/inert nodes that nothing live reads any more; other nodes all stay."""
    index = GraphIndex(graph_def)
    seeds = [n.name for n in graph_def.node if n.name not in removable or n.name in protected]
    keep = reachable_from(index, seeds)
    if len(keep) == len(graph_def.node):
        return graph_def
    return rebuild(graph_def, (n for n in graph_def.node if n.name in keep))
