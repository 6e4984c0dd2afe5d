"""Which BF16 nodes cost accuracy: a first-order estimate from one FP32 and one BF16 run.

BF16 loses precision where a float32 tensor is *rounded* to bfloat16: at the output of a
BF16 node that computes (ALLOW/INFER ops; exact CLEAR ops only pass rounded values on), and
where an FP32 tensor (a graph input, an FP32 node's output, a weight Const) enters a BF16
node. Each such *rounding source* ``t`` gets a unit: the BF16 nodes that must fall back to
FP32 so that ``t`` is never rounded (its producer, the CLEAR nodes that carry the rounded
value on, and the nodes that read it).

The score of ``t`` estimates, to first order, how much of the BF16 model's output error
rounding ``t`` causes. With ``delta_t = bf16(y_t) - y_t`` (the rounding of the FP32 value)
and ``Delta_n`` the actual output error of the full BF16 model on sample ``n``,
``score_t = sum_n |<J_n delta_t, Delta_n>| / sum_n |Delta_n|^2``: the output perturbation
``t``'s rounding alone causes, projected on the error actually seen. ``J^T Delta`` is one
reverse-mode gradient for all tensors at once, so scoring needs one BF16 forward run (for
``Delta``) and one FP32 forward+backward run on a few batches, whatever the graph size.
Absolute values per sample keep correlated roundings (the two sides of a cancelling
difference) from hiding each other; weights (Consts) have no sample axis and are scored in
total. Outputs produced by Softmax/Sigmoid are measured at their logits, where saturated
probabilities would otherwise hide every gradient. Errors a BF16 kernel makes beyond
rounding its inputs and output (internal accumulation) are not modelled.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
from absl import logging
from tensorflow.core.framework import graph_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.op_classes import IDENTITY_OPS, SATURATING_OPS, OpClass, op_class

Tensor = Tuple[str, int]  # (node, port) in the FP32 cleaned graph



@dataclasses.dataclass(frozen=True)
class Unit:
    """One rounding source and the BF16 nodes to fall back so that it is not rounded."""

    tensor: str                 # tensor in the cleaned FP32 graph ("node" or "node:k")
    nodes: FrozenSet[str]       # BF16 nodes that read, carry or produce the rounded value
    score: float = 0.0          # first-order output error its rounding causes, relative to the total

    def to_dict(self) -> Dict[str, Any]:
        return {"tensor": self.tensor, "nodes": sorted(self.nodes), "score": round(self.score, 6)}


@dataclasses.dataclass
class Ranking:
    """Units most sensitive first, and how the ranking was obtained."""

    units: List[Unit]
    method: str                 # "gradient" (first-order estimate) or "structure" (``structural_order``)
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0
    note: str = ""

    def to_dict(self, top: int = 20) -> Dict[str, Any]:
        return {"method": self.method, "batches": self.batches, "samples": self.samples,
                "seconds": round(self.seconds, 3), "note": self.note, "units": len(self.units),
                "top": [u.to_dict() for u in self.units[:top]]}


# --------------------------------------------------------------------------------------
# rounding sources and their units
# --------------------------------------------------------------------------------------

def rounding_units(cleaned: graph_pb2.GraphDef, converted: graph_pb2.GraphDef,
                   bf16_nodes: Iterable[str], candidates: Optional[Iterable[str]] = None) -> List[Unit]:
    """Every rounding source of ``converted`` with its fallback unit (score 0), in graph order.

    Names refer to ``cleaned`` (its FP32 source); ``candidates`` limits units to nodes the tuner may force.
    """
    bf16 = set(bf16_nodes)
    allowed = bf16 if candidates is None else set(candidates) & bf16
    index = g.GraphIndex(cleaned)
    conv_nodes = {n.name: n for n in converted.node}
    sigs = g.OpSignatures(converted)
    reads: Dict[Tensor, List[str]] = collections.defaultdict(list)   # tensor -> BF16 nodes reading it rounded
    rounded_out: Set[Tensor] = set()
    for name in bf16:
        node, conv = index.nodes.get(name), conv_nodes.get(name)
        if node is None or conv is None:
            continue
        in_slots = sigs.input_slots(conv) or []
        for i, spec in enumerate(node.input):
            src, port, control = g.parse_input(spec)
            if control or i >= len(in_slots):
                continue
            if g.slot_dtype(conv, in_slots[i]) == g.BFLOAT16:
                reads[(src, port)].append(name)
        for port, slot in enumerate(sigs.output_slots(conv) or []):
            if g.slot_dtype(conv, slot) == g.BFLOAT16:
                rounded_out.add((name, port))

    def is_carrier(node_name: str) -> bool:
        return node_name in bf16 and op_class(index[node_name].op) is OpClass.CLEAR

    order = {n.name: i for i, n in enumerate(index.topological_order())}
    sources = sorted((t for t in set(reads) | rounded_out if t[0] in index.nodes and not is_carrier(t[0])),
                     key=lambda t: (order.get(t[0], 0), t[1]))
    units = []
    for src in sources:
        nodes = {src[0]} if src[0] in bf16 else set()
        stack, seen = [src], {src}
        while stack:
            tensor = stack.pop()
            for consumer in reads.get(tensor, ()):
                nodes.add(consumer)
                if is_carrier(consumer):
                    for out in ((consumer, p) for p in index.output_ports(consumer)):
                        if out in rounded_out and out not in seen:
                            seen.add(out)
                            stack.append(out)
        nodes &= allowed
        if nodes:
            units.append(Unit(g.tensor_name(*src), frozenset(nodes)))
    return units


# --------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------

def measurement_targets(cleaned: graph_pb2.GraphDef, outputs: Sequence[str]) -> List[str]:
    """The tensors the output error is measured at: each output, or the logits before a final Softmax/Sigmoid."""
    index = g.GraphIndex(cleaned)
    targets = []
    for out in outputs:
        name, port, _ = g.parse_input(out)
        node = index.nodes.get(name)
        while node is not None and node.op in IDENTITY_OPS and node.input:
            name, port, _ = g.parse_input(node.input[0])
            node = index.nodes.get(name)
        if node is not None and node.op in SATURATING_OPS and port == 0:
            targets.append(g.canonical_tensor(node.input[0]))
        else:
            targets.append(g.canonical_tensor(out))
    return list(dict.fromkeys(targets))


def _session(graph_def: graph_pb2.GraphDef):
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    return graph, tf.compat.v1.Session(graph=graph)


def _magnitude(product, x):
    """|<gradient, rounding>| per sample (leading axis) for activations, in total for Consts.

    Per-sample absolute values keep two rounding errors that cancel on average (or are
    correlated, such as the two sides of a difference) from hiding each other.
    """
    import tensorflow as tf

    rank = x.shape.rank
    if x.op.type == "Const" or rank is None or rank == 0:
        return tf.abs(tf.reduce_sum(product))
    per_sample = tf.reduce_sum(product, axis=list(range(1, rank))) if rank > 1 else product
    return tf.reduce_sum(tf.abs(per_sample))


def gradient_scores(cleaned: graph_pb2.GraphDef, converted: graph_pb2.GraphDef, units: Sequence[Unit],
                    input_names: Sequence[str], output_names: Sequence[str],
                    feeds: Sequence[Mapping[str, np.ndarray]]) -> List[float]:
    """First-order output error caused by each unit's rounding source, relative to the total error.

    Raises LookupError when an op on the way has no gradient, ValueError when nothing is measurable.
    """
    import tensorflow as tf

    targets = [t for t in measurement_targets(cleaned, output_names)
               if g.node_name(t) in {n.name for n in converted.node}]
    if not targets:
        targets = list(output_names)
    graph, fp32 = _session(cleaned)
    bf16_graph, bf16 = _session(converted)
    try:
        with graph.as_default():
            ys = [graph.get_tensor_by_name(g.tf_tensor_name(t)) for t in targets]
            ys = [y for y in ys if y.dtype == tf.float32]
            if not ys:
                raise ValueError("no float32 output to measure the BF16 error at")
            bf16_values = [tf.compat.v1.placeholder(tf.float32, shape=None, name=f"tf_bf16_sensitivity/bf16_{i}")
                           for i in range(len(ys))]
            deltas = [tf.stop_gradient(v - y) for v, y in zip(bf16_values, ys)]
            xs = [graph.get_tensor_by_name(g.tf_tensor_name(u.tensor)) for u in units]
            grads = tf.gradients(ys, xs, grad_ys=deltas)
            contributions, slots = [], []
            for i, (x, grad) in enumerate(zip(xs, grads)):
                if grad is None or x.dtype != tf.float32:
                    continue
                grad = tf.convert_to_tensor(grad)
                rounding = tf.cast(tf.cast(x, tf.bfloat16), tf.float32) - x
                contributions.append(_magnitude(tf.cast(grad * rounding, tf.float64), x))
                slots.append(i)
            energy = tf.add_n([tf.reduce_sum(tf.square(tf.cast(d, tf.float64))) for d in deltas])
        fetch_bf16 = [bf16_graph.get_tensor_by_name(g.tf_tensor_name(t)) for t in targets if
                      graph.get_tensor_by_name(g.tf_tensor_name(t)).dtype == tf.float32]
        totals = np.zeros(len(slots))
        total_energy = 0.0
        for feed in feeds:
            fp32_feed = {graph.get_tensor_by_name(g.tf_tensor_name(n)): v for n, v in feed.items()}
            bf16_feed = {bf16_graph.get_tensor_by_name(g.tf_tensor_name(n)): v for n, v in feed.items()}
            measured = bf16.run(fetch_bf16, feed_dict=bf16_feed)
            fp32_feed.update({p: np.asarray(v, dtype=np.float32) for p, v in zip(bf16_values, measured)})
            values = fp32.run(contributions + [energy], feed_dict=fp32_feed)
            totals += np.asarray(values[:-1], dtype=np.float64)
            total_energy += float(values[-1])
    finally:
        fp32.close()
        bf16.close()
    scores = [0.0] * len(units)
    scale = total_energy if total_energy > 0 else 1.0
    for slot, total in zip(slots, totals):
        scores[slot] = float(total / scale) if np.isfinite(total) else 0.0
    return scores


def structural_order(cleaned: graph_pb2.GraphDef, units: Sequence[Unit], output_names: Sequence[str]) -> List[Unit]:
    """Units most likely harmful first, from the graph alone (no data to measure with).

    Nearest the outputs first (a rounding there reaches the output undamped; Neural
    Compressor's op-wise order is bottom-up too), then INFER before CLEAR before ALLOW nodes:
    arithmetic is cheap to run in FP32, the heavy ops are what BF16 is for.
    """
    index = g.GraphIndex(cleaned)
    distance: Dict[str, int] = {}
    frontier = [g.node_name(o) for o in output_names if g.node_name(o) in index.nodes]
    for name in frontier:
        distance[name] = 0
    while frontier:
        nxt = []
        for name in frontier:
            for spec in index[name].input:
                src = g.node_name(spec)
                if src in index.nodes and src not in distance:
                    distance[src] = distance[name] + 1
                    nxt.append(src)
        frontier = nxt
    rank_of = {OpClass.INFER: 0, OpClass.CLEAR: 1, OpClass.ALLOW: 2}
    far = len(index.nodes) + 1

    def key(unit: Unit):
        nodes = sorted(unit.nodes)
        near = min((distance.get(n, far) for n in nodes), default=far)
        cls = min((rank_of.get(op_class(index[n].op), 3) for n in nodes if n in index.nodes), default=3)
        return near, cls, unit.tensor

    return sorted(units, key=key)


def rank(cleaned: graph_pb2.GraphDef, converted: graph_pb2.GraphDef, bf16_nodes: Iterable[str],
         input_names: Sequence[str], output_names: Sequence[str],
         feeds: Sequence[Mapping[str, np.ndarray]], candidates: Optional[Iterable[str]] = None) -> Ranking:
    """Rank the fallback units of a BF16 conversion, most harmful rounding first.

    Without data or gradients it ranks by graph structure (``structural_order``) and says why.
    """
    start = time.perf_counter()
    units = rounding_units(cleaned, converted, bf16_nodes, candidates)
    samples = sum(len(next(iter(f.values()))) for f in feeds if f)
    if not units:
        return Ranking([], "structure", note="no BF16 node to fall back")
    note = ""
    scores: Optional[List[float]] = None
    if not feeds:
        note = "no input data for the sensitivity runs"
    else:
        try:
            scores = gradient_scores(cleaned, converted, units, input_names, output_names, feeds)
        except (LookupError, ValueError, TypeError) as e:  # no gradient for some op, nothing measurable
            note = f"first-order estimate unavailable: {e}"
    if scores is None:
        logging.warning("tf_bf16 tuning: %s; ranking fallback candidates by graph structure instead", note)
        return Ranking(structural_order(cleaned, units, output_names), "structure", batches=len(feeds),
                       samples=samples, seconds=time.perf_counter() - start, note=note)
    bottom_up = {u.tensor: i for i, u in enumerate(units)}
    ranked = [dataclasses.replace(u, score=s) for u, s in zip(units, scores)]
    ranked.sort(key=lambda u: (-u.score, -bottom_up[u.tensor]))
    return Ranking(ranked, "gradient", batches=len(feeds), samples=samples,
                   seconds=time.perf_counter() - start, note=note)
