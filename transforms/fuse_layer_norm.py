"""fuse_layer_norm: replace a LayerNorm written out in element-wise ops by one ``_MklLayerNorm``.

Keras 3's LayerNormalization runs as ~12 kernels per norm (two Means, SquaredDifference,
Rsqrt, Muls, Adds, Neg): in a BERT-like model that is the largest share of the element-wise
time. TensorFlow's own oneDNN op ``_MklLayerNorm(x, scale, offset, epsilon)`` (registered in
stock TensorFlow for float32, bfloat16 and half) computes it in one pass with FP32 statistics.
TensorFlow's remapper would build that op itself from the form ``x*s + (beta - mean*s)``, but
it does not match Keras' ordering, and when it matches it drops the epsilon (measured on TF
2.21: the fused op then uses its default 1e-3, so a norm with epsilon 1e-12 moves by ~1e-2),
and it accepts a [1, 1, H] scale that the kernel then rejects. So this pass writes the op
directly, with the graph's epsilon and 1-D scale and offset, when this TensorFlow has a CPU
kernel for it; the op stays FP32 in the BF16 stage (oneDNN cannot make a BF16 layer-norm
primitive on AVX2-only CPUs; measured).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.patterns import StaticShapes, data_readers, is_const, sole_reader

ADD_OPS = frozenset({"Add", "AddV2"})
FUSED_OP = "_MklLayerNorm"
FUSED_RANKS = (2, 3)   # the remapper fuses only 2-D and 3-D inputs


@dataclasses.dataclass
class _Norm:
    """The nodes of one matched LayerNorm, by their role in ``x*s + (beta - mean*s)``."""

    x: str                            # the normalized tensor
    mean: node_def_pb2.NodeDef        # Mean(x)
    sq_diff: node_def_pb2.NodeDef     # SquaredDifference(x, mean)
    variance: node_def_pb2.NodeDef    # Mean(sq_diff)
    add_eps: node_def_pb2.NodeDef     # variance + eps
    epsilon: str                      # the scalar Const eps
    rsqrt: node_def_pb2.NodeDef
    scale: node_def_pb2.NodeDef       # rsqrt * gamma
    gamma: str
    x_scaled: node_def_pb2.NodeDef    # x * scale
    mean_scaled: node_def_pb2.NodeDef  # mean * scale, or -mean * scale (Keras)
    neg: Optional[node_def_pb2.NodeDef]  # Neg(mean) in the Keras form
    shift: node_def_pb2.NodeDef       # beta - mean*scale, or -mean*scale + beta
    beta: str
    output: node_def_pb2.NodeDef      # x_scaled + shift

    def nodes(self) -> List[node_def_pb2.NodeDef]:
        """The computing nodes the fused op replaces (constants stay for strip_unused)."""
        found = [self.mean, self.sq_diff, self.variance, self.add_eps, self.rsqrt, self.scale, self.x_scaled,
                 self.mean_scaled, self.shift, self.output]
        return found + ([self.neg] if self.neg is not None else [])


def fuse_layer_norm(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Each LayerNorm over the last axis of a 2-D/3-D FP32 tensor -> ``_MklLayerNorm`` (same name as its output)."""
    if not g.has_cpu_kernel(FUSED_OP, {"T": types_pb2.DT_FLOAT}):
        return graph_def
    out = g.copy_graph(graph_def)
    index = g.GraphIndex(out)
    protected = frozenset(context.plan.protected)
    shapes = StaticShapes(graph_def)
    added: List[node_def_pb2.NodeDef] = []
    dropped = set()
    taken = dict(index.nodes)
    for node in list(out.node):
        if node.op != "Rsqrt" or node.attr["T"].type != types_pb2.DT_FLOAT or not g.on_cpu(node.device):
            continue
        norm = _match(node, index, protected)
        if norm is None:
            continue
        shape = shapes.of(norm.x)
        if shape is None or len(shape) not in FUSED_RANKS or not _reduces_last_axis(norm, index, len(shape)):
            continue
        vectors = [_as_vector(spec, index, shape[-1], taken) for spec in (norm.gamma, norm.beta)]
        if any(v is None for v in vectors):
            continue
        inputs = []
        for vector in vectors:
            if isinstance(vector, node_def_pb2.NodeDef):
                taken[vector.name] = vector
                added.append(vector)
                vector = vector.name
            inputs.append(vector)
        epsilon = float(np.asarray(g.const_value(index.nodes[g.node_name(norm.epsilon)])).reshape(-1)[0])
        controls = [s for n in norm.nodes() for s in n.input if s.startswith("^")]
        fused = g.make_node(FUSED_OP, norm.output.name, [norm.x] + inputs + sorted(set(controls)),
                            device=norm.output.device)
        fused.attr["T"].type = types_pb2.DT_FLOAT
        fused.attr["epsilon"].f = epsilon
        dropped.update(n.name for n in norm.nodes())
        added.append(fused)
    if not added:
        return graph_def
    return g.rebuild(out, [n for n in out.node if n.name not in dropped] + added)


def _match(rsqrt: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset) -> Optional[_Norm]:
    """The LayerNorm around ``rsqrt``, or None when any node differs from the pattern or is read elsewhere."""
    add_eps = _producer(rsqrt, 0, index)
    if add_eps is None or add_eps.op not in ADD_OPS:
        return None
    variance, eps = _split(add_eps, index, lambda n: n.op == "Mean")
    if variance is None or not _is_scalar_const(eps, index):
        return None
    sq_diff = _producer(variance, 0, index)
    if sq_diff is None or sq_diff.op != "SquaredDifference":
        return None
    mean = None
    for i in (0, 1):
        candidate = _producer(sq_diff, i, index)
        if candidate is not None and candidate.op == "Mean" and \
                g.canonical_tensor(candidate.input[0]) == g.canonical_tensor(sq_diff.input[1 - i]):
            mean = candidate
    if mean is None:
        return None
    x = g.canonical_tensor(mean.input[0])
    scale = _sole_reader(rsqrt, index, protected, "Mul")
    if scale is None:
        return None
    _, gamma = _split(scale, index, lambda n: n is rsqrt)
    if gamma is None or not is_const(gamma, index):
        return None
    readers = data_readers(scale, index, protected)
    if readers is None or len(readers) != 2 or any(r.op != "Mul" for r in readers):
        return None
    x_scaled = next((r for r in readers if x in map(g.canonical_tensor, r.input)), None)
    if x_scaled is None:
        return None
    mean_scaled = next(r for r in readers if r is not x_scaled)
    moment, _ = _split(mean_scaled, index, lambda n: n is not scale)
    neg = moment if moment is not None and moment.op == "Neg" else None
    if neg is not None:
        moment = _producer(neg, 0, index)
        if data_readers(neg, index, protected) != [mean_scaled]:
            return None
    if moment is not mean:
        return None
    shift = _sole_reader(mean_scaled, index, protected, "Sub" if neg is None else None)
    if shift is None:
        return None
    beta = _beta(shift, mean_scaled, neg is not None, index)
    if beta is None:
        return None
    output = _sole_reader(shift, index, protected, None)
    if output is None or output.op not in ADD_OPS or x_scaled.name in protected or \
            data_readers(x_scaled, index, protected) != [output]:
        return None
    if {g.node_name(s) for s in output.input} != {x_scaled.name, shift.name}:
        return None
    mean_readers = {r.name for r in data_readers(mean, index, protected) or ()}
    if mean_readers != {sq_diff.name, (neg or mean_scaled).name}:
        return None
    for inner in (sq_diff, variance, add_eps):
        if data_readers(inner, index, protected) is None or len(data_readers(inner, index, protected)) != 1:
            return None
    return _Norm(x, mean, sq_diff, variance, add_eps, eps, rsqrt, scale, gamma, x_scaled, mean_scaled, neg, shift,
                 beta, output)


def _beta(shift: node_def_pb2.NodeDef, mean_scaled: node_def_pb2.NodeDef, keras_form: bool,
          index: g.GraphIndex) -> Optional[str]:
    """The constant ``beta`` of ``beta - mean*s`` (Sub) or ``-mean*s + beta`` (Add)."""
    if keras_form:
        if shift.op not in ADD_OPS:
            return None
        _, beta = _split(shift, index, lambda n: n is mean_scaled)
    else:
        if shift.op != "Sub" or g.node_name(shift.input[1]) != mean_scaled.name:
            return None
        beta = shift.input[0]
    return beta if beta is not None and is_const(beta, index) else None


def _reduces_last_axis(norm: _Norm, index: g.GraphIndex, rank: int) -> bool:
    """Both means keep dims and reduce exactly the last axis (given as -1 or rank-1)."""
    for mean in (norm.mean, norm.variance):
        if not mean.attr["keep_dims"].b or not is_const(mean.input[1], index):
            return False
        axes = np.asarray(g.const_value(index.nodes[g.node_name(mean.input[1])])).reshape(-1)
        if axes.size != 1 or int(axes[0]) % rank != rank - 1:
            return False
    return True


def _as_vector(spec: str, index: g.GraphIndex, width: Optional[int], taken: dict):
    """``spec`` when its Const is 1-D of ``width``; a new 1-D copy when its shape is [1, ..., 1, width];
    None otherwise (``_MklLayerNorm`` requires 1-D scale and offset, the remapper does not check)."""
    node = index.nodes[g.node_name(spec)]
    value = np.asarray(g.const_value(node))
    if width is None or value.ndim == 0 or value.shape[-1] != width or any(d != 1 for d in value.shape[:-1]):
        return None
    if value.ndim == 1:
        return spec
    return g.make_const(g.unique_name(taken, f"{node.name}/vector"), value.reshape(-1), dtype=node.attr["dtype"].type,
                        device=node.device)


def _producer(node: node_def_pb2.NodeDef, i: int, index: g.GraphIndex) -> Optional[node_def_pb2.NodeDef]:
    """The node feeding data input ``i`` of ``node`` (None if absent or a control edge)."""
    data = [s for s in node.input if not s.startswith("^")]
    if i >= len(data) or g.parse_input(data[i])[1] != 0:
        return None
    return index.nodes.get(g.node_name(data[i]))


def _split(node: node_def_pb2.NodeDef, index: g.GraphIndex, wanted) -> tuple:
    """(producer matching ``wanted``, the other input's spec) of a two-input commutative node."""
    data = [s for s in node.input if not s.startswith("^")]
    if len(data) != 2:
        return None, None
    for i in (0, 1):
        producer = _producer(node, i, index)
        if producer is not None and wanted(producer):
            return producer, data[1 - i]
    return None, None


def _sole_reader(node: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset,
                 op: Optional[str]) -> Optional[node_def_pb2.NodeDef]:
    """``patterns.sole_reader``, and of type ``op`` when given."""
    reader = sole_reader(node, index, protected)
    return reader if reader is not None and (op is None or reader.op == op) else None


def _is_scalar_const(spec: Optional[str], index: g.GraphIndex) -> bool:
    return spec is not None and is_const(spec, index) and \
        np.asarray(g.const_value(index.nodes[g.node_name(spec)])).size == 1
