"""fold_batch_norms: merge inference BatchNorm (and any per-channel scale/shift) into the
preceding Conv2D / DepthwiseConv2dNative / MatMul.

At inference BatchNorm is ``y = x * s + t`` per output channel, which equals the same
convolution with its filter scaled by ``s`` followed by one BiasAdd. Two forms are matched:
``FusedBatchNorm{,V2,V3}`` with ``is_training=False`` and constant parameters, and the
chain Keras 3 leaves after ``fold_constants`` (``[BiasAdd] -> Mul(c) -> AddV2(c)``). The last
node of the chain keeps its name and becomes the BiasAdd, so consumers and outputs still
read the same tensor; removing the BN nodes also lets oneDNN fuse Conv+BiasAdd(+Relu).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from tf_bf16.transforms.graph import (GraphIndex, const_value, copy_graph, make_const, parse_input, rebuild,
                                      reachable_from, unique_name)
from tf_bf16.transforms.context import TransformContext

BASE_OPS = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul"})
FUSED_BN_OPS = frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"})
FLOAT_TYPES = frozenset({types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16})


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the output channel of the base op lives: rank, axis, count, BiasAdd format."""

    rank: int
    axis: int
    channels: int
    data_format: bytes  # for the BiasAdd that replaces the chain


@dataclasses.dataclass
class _Chain:
    """A base op followed by per-channel affine steps: ``y = base(x) * scale + shift``."""

    base: node_def_pb2.NodeDef
    filter: node_def_pb2.NodeDef
    layout: _Layout
    members: List[node_def_pb2.NodeDef]
    scale: np.ndarray
    shift: np.ndarray
    scaled: bool  # a Mul or BatchNorm is in the chain (else only biases were merged)


def fold_batch_norms(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Fold each exact per-channel scale/shift chain after a conv/matmul into filter and bias.

    Only chains whose filter is a Const read by nothing else and whose intermediate tensors
    have no other readers are folded; protected nodes are never changed or removed.
    """
    plan = context.plan
    out = copy_graph(graph_def)
    index = GraphIndex(out)
    protected = plan.protected
    names: Dict[str, None] = dict.fromkeys(index.nodes)
    removed: Set[str] = set()
    maybe_dead: Set[str] = set()
    added: List[node_def_pb2.NodeDef] = []
    for node in list(out.node):
        if node.op not in BASE_OPS:
            continue
        chain = _match(node, index, protected)
        if chain is None or not (chain.scaled or len(chain.members) > 1):
            continue
        for member in chain.members:  # before _apply rewires the last one
            maybe_dead.update(parse_input(s)[0] for s in member.input)
        added.append(_apply(chain, names))
        removed.update(m.name for m in chain.members[:-1])
    if not added:
        return out
    nodes = [n for n in out.node if n.name not in removed] + added
    folded = rebuild(out, nodes)
    # Drop the BN parameter / old bias Consts that only the folded nodes read.
    dead = {n for n in maybe_dead - removed - protected if n in index and index[n].op == "Const"}
    if dead:
        live_index = GraphIndex(folded)
        seeds = [n.name for n in folded.node if n.name not in dead]
        keep = reachable_from(live_index, seeds)
        folded = rebuild(folded, (n for n in folded.node if n.name in keep))
    return folded


# ----------------------------------------------------------------------------- matching

def _type_attr(node: node_def_pb2.NodeDef, key: str) -> int:
    """A type attr's value without inserting the key (proto maps grow on ``[]`` access)."""
    return node.attr[key].type if key in node.attr else types_pb2.DT_INVALID


def _format(node: node_def_pb2.NodeDef) -> bytes:
    """The node's data_format attr, defaulting to NHWC like the OpDefs do."""
    return (node.attr["data_format"].s if "data_format" in node.attr else b"") or b"NHWC"


def _flag(node: node_def_pb2.NodeDef, key: str, default: bool) -> bool:
    return node.attr[key].b if key in node.attr else default


def _layout(base: node_def_pb2.NodeDef, filter_value: np.ndarray) -> Optional[_Layout]:
    """Output-channel layout of a conv/matmul from its attrs and constant filter."""
    if base.op == "MatMul":
        if filter_value.ndim != 2:
            return None
        channels = filter_value.shape[0] if _flag(base, "transpose_b", False) else filter_value.shape[1]
        return _Layout(2, 1, int(channels), b"NHWC")
    if filter_value.ndim != 4:
        return None
    data_format = _format(base)
    if data_format not in (b"NHWC", b"NCHW"):
        return None
    if base.op == "Conv2D":
        channels = filter_value.shape[3]
    else:  # DepthwiseConv2dNative: HWCM, output channel c * M + m
        channels = filter_value.shape[2] * filter_value.shape[3]
    return _Layout(4, 3 if data_format == b"NHWC" else 1, int(channels), data_format)


def _const_input(index: GraphIndex, spec: str) -> Optional[np.ndarray]:
    """The value of a data input that is output 0 of a Const node, else None."""
    name, port, is_control = parse_input(spec)
    if is_control or port != 0 or name not in index or index[name].op != "Const":
        return None
    return const_value(index[name])


def _per_channel(value: Optional[np.ndarray], layout: _Layout) -> Optional[np.ndarray]:
    """``value`` as a float64 vector over channels when it broadcasts only along the channel axis."""
    if value is None or value.ndim > layout.rank:
        return None
    shape = (1,) * (layout.rank - value.ndim) + tuple(value.shape)
    for axis, dim in enumerate(shape):
        if dim != 1 and (axis != layout.axis or dim != layout.channels):
            return None
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    return np.broadcast_to(flat, (layout.channels,)).copy()


def _sole_consumer(node: node_def_pb2.NodeDef, index: GraphIndex) -> Optional[Tuple[node_def_pb2.NodeDef, int]]:
    """The one (consumer, input index) reading ``node``, which must be port 0 only, else None."""
    if index.control_consumers(node.name) or index.output_ports(node.name) != [0]:
        return None
    consumers = index.consumers(node.name, 0)
    return consumers[0] if len(consumers) == 1 else None


def _match(base: node_def_pb2.NodeDef, index: GraphIndex, protected: frozenset) -> Optional[_Chain]:
    """The longest foldable chain after ``base``, or None when the base cannot be rewritten."""
    dtype = _type_attr(base, "T")
    if base.name in protected or dtype not in FLOAT_TYPES or len(base.input) < 2:
        return None
    filter_name, port, is_control = parse_input(base.input[1])
    if is_control or port != 0 or filter_name not in index or filter_name in protected:
        return None
    filter_node = index[filter_name]
    if filter_node.op != "Const" or index.control_consumers(filter_name) or len(index.consumers(filter_name)) != 1:
        return None
    layout = _layout(base, const_value(filter_node))
    if layout is None:
        return None
    chain = _Chain(base, filter_node, layout, [], np.ones(layout.channels), np.zeros(layout.channels), False)
    current = base
    while True:
        if chain.members and any(s.startswith("^") for s in current.input):
            break  # an intermediate with control inputs cannot be removed
        found = _sole_consumer(current, index)
        if found is None:
            break
        nxt, slot = found
        if nxt.name in protected or _type_attr(nxt, "T") != dtype or not _step(chain, nxt, slot, index):
            break
        chain.members.append(nxt)
        current = nxt
    return chain if chain.members else None


def _step(chain: _Chain, node: node_def_pb2.NodeDef, slot: int, index: GraphIndex) -> bool:
    """Compose one per-channel affine node into ``chain``'s scale/shift; False if not exact."""
    layout = chain.layout
    data = [s for s in node.input if not s.startswith("^")]
    if node.op == "BiasAdd":
        bias = _const_input(index, data[1]) if slot == 0 else None
        fmt = _format(node)
        if bias is None or bias.shape != (layout.channels,):
            return False
        if (layout.rank == 4 and fmt != layout.data_format) or (layout.rank == 2 and fmt != b"NHWC"):
            return False
        chain.shift = chain.shift + bias.astype(np.float64)
        return True
    if node.op in ("Mul", "Add", "AddV2", "Sub") and len(data) == 2:
        if node.op == "Sub" and slot != 0:
            return False  # c - x flips the sign of x: not a bias
        value = _per_channel(_const_input(index, data[1 - slot]), layout)
        if value is None:
            return False
        if node.op == "Mul":
            chain.scale, chain.shift, chain.scaled = chain.scale * value, chain.shift * value, True
        elif node.op == "Sub":
            chain.shift = chain.shift - value
        else:
            chain.shift = chain.shift + value
        return True
    if node.op in FUSED_BN_OPS:
        return _fused_batch_norm(chain, node, slot, data, index)
    return False


def _fused_batch_norm(chain: _Chain, node: node_def_pb2.NodeDef, slot: int, data: List[str],
                      index: GraphIndex) -> bool:
    """Compose an inference FusedBatchNorm: scale = gamma / sqrt(var + eps)."""
    layout = chain.layout
    if slot != 0 or layout.rank != 4 or len(data) < 5:
        return False
    if _flag(node, "is_training", True) or _format(node) != layout.data_format:
        return False
    if any(index.consumers(node.name, p) for p in index.output_ports(node.name) if p != 0):
        return False
    params = [_const_input(index, s) for s in data[1:5]]
    if any(p is None or p.shape != (layout.channels,) for p in params):
        return False
    gamma, beta, mean, variance = (p.astype(np.float64) for p in params)
    epsilon = node.attr["epsilon"].f if "epsilon" in node.attr else 1e-4
    scale = gamma / np.sqrt(variance + epsilon)
    chain.scale = chain.scale * scale
    chain.shift = (chain.shift - mean) * scale + beta
    chain.scaled = True
    return True


# ----------------------------------------------------------------------------- rewrite

def _apply(chain: _Chain, names: Dict[str, None]) -> node_def_pb2.NodeDef:
    """Scale the filter in place, turn the last chain node into BiasAdd; return the new bias Const."""
    base, layout = chain.base, chain.layout
    weights = const_value(chain.filter).astype(np.float64)
    if base.op == "Conv2D":
        weights = weights * chain.scale
    elif base.op == "DepthwiseConv2dNative":
        weights = weights * chain.scale.reshape(weights.shape[2], weights.shape[3])
    elif _flag(base, "transpose_b", False):
        weights = weights * chain.scale[:, None]
    else:
        weights = weights * chain.scale
    filter_dtype = chain.filter.attr["dtype"].type
    chain.filter.attr["value"].tensor.CopyFrom(_tensor(weights, filter_dtype, chain.filter.name))

    final = chain.members[-1]
    dtype = _type_attr(base, "T")
    bias_name = unique_name(names, f"{final.name}/folded_bias")
    names[bias_name] = None
    bias = make_const(bias_name, _cast(chain.shift, dtype), dtype, device=final.device)
    controls = [s for s in final.input if s.startswith("^")]
    final.op = "BiasAdd"
    final.attr.clear()
    final.attr["T"].type = dtype
    final.attr["data_format"].s = layout.data_format
    del final.input[:]
    final.input.extend([base.name, bias_name] + controls)
    return bias


def _cast(value: np.ndarray, dtype: int) -> np.ndarray:
    """float64 ``value`` as the numpy type make_const expects for ``dtype``."""
    if dtype == types_pb2.DT_DOUBLE:
        return value
    return value.astype(np.float16 if dtype == types_pb2.DT_HALF else np.float32)


def _tensor(value: np.ndarray, dtype: int, name: str):
    """TensorProto of ``value`` stored as ``dtype``."""
    return make_const(name, _cast(value, dtype), dtype).attr["value"].tensor
