"""Shared GraphDef toolkit every pass builds on.

One index over a GraphDef (node by name, consumers per output port, control edges,
topological order), dtype-slot resolution through TensorFlow's own ``op_def_registry``
(which type attribute governs each input and output of a node), and small node builders.
Passes never re-implement these; they import them from here.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, op_def_pb2, types_pb2
from tensorflow.python.framework import op_def_registry, tensor_util

from tf_bf16.errors import GraphError
from tf_bf16.transforms.op_classes import IDENTITY_OPS

FLOAT = types_pb2.DT_FLOAT
BFLOAT16 = types_pb2.DT_BFLOAT16


def parse_input(spec: str) -> Tuple[str, int, bool]:
    """Split an input string (``name``, ``name:1`` or ``^name``) into (node, port, is_control)."""
    if spec[:1] == "^":
        return spec[1:], -1, True
    if ":" not in spec:
        return spec, 0, False
    name, sep, port = spec.rpartition(":")
    if sep and port.isdigit():
        return name, int(port), False
    return spec, 0, False


def node_name(spec: str) -> str:
    """The producing node's name of an input or tensor string."""
    return parse_input(spec)[0]


def tensor_name(node: str, port: int = 0) -> str:
    """Canonical input string for output ``port`` of ``node`` (``name`` for port 0)."""
    return node if port == 0 else f"{node}:{port}"


def tf_tensor_name(spec: str) -> str:
    """The ``node:port`` name TensorFlow's graph and session APIs want (``x`` -> ``x:0``)."""
    name, port, _ = parse_input(spec)
    return f"{name}:{port}"


def has_cpu_kernel(op: str, type_attrs: Mapping[str, int]) -> bool:
    """Whether this TensorFlow registers an unlabelled CPU kernel for ``op`` taking these type attrs."""
    from tensorflow.python.framework import kernels

    for kernel in kernels.get_registered_kernels_for_op(op).kernel:
        if kernel.device_type != "CPU" or kernel.label:
            continue
        allowed = {c.name: set(c.allowed_values.list.type) for c in kernel.constraint}
        if all(key not in allowed or dtype in allowed[key] for key, dtype in type_attrs.items()):
            return True
    return False


def canonical_tensor(spec: str) -> str:
    """Normalise ``x:0`` to ``x`` so tensor names compare equal however they were written."""
    name, port, control = parse_input(spec)
    return "^" + name if control else tensor_name(name, port)


class GraphIndex:
    """Read-mostly index over a GraphDef: lookups by name, fan-out per port, order.

    The NodeDefs are the GraphDef's own messages, so a pass may edit attributes in place;
    after changing edges or adding/removing nodes it must build a new index.
    """

    def __init__(self, graph_def: graph_pb2.GraphDef):
        self.graph_def = graph_def
        self.nodes: Dict[str, node_def_pb2.NodeDef] = {}
        for node in graph_def.node:
            if node.name in self.nodes:
                raise GraphError(f"duplicate node name {node.name!r} in GraphDef")
            self.nodes[node.name] = node
        # (producer, port) -> [(consumer, input index)]
        self._consumers: Dict[Tuple[str, int], List[Tuple[node_def_pb2.NodeDef, int]]] = (
            collections.defaultdict(list))
        self._control_consumers: Dict[str, List[node_def_pb2.NodeDef]] = collections.defaultdict(list)
        self._fed = set()
        self._ports: Dict[str, set] = collections.defaultdict(set)
        for node in graph_def.node:
            for i, spec in enumerate(node.input):
                src, port, control = parse_input(spec)
                self._fed.add(src)
                if control:
                    self._control_consumers[src].append(node)
                else:
                    self._consumers[(src, port)].append((node, i))
                    self._ports[src].add(port)

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def __getitem__(self, name: str) -> node_def_pb2.NodeDef:
        return self.nodes[name]

    def consumers(self, name: str, port: Optional[int] = None) -> List[Tuple[node_def_pb2.NodeDef, int]]:
        """Data consumers (node, input index) of one output port, or of every port."""
        if port is not None:
            return list(self._consumers.get((name, port), ()))
        out = []
        for p in self.output_ports(name):
            out.extend(self._consumers[(name, p)])
        return out

    def output_ports(self, name: str) -> List[int]:
        """Output ports of ``name`` that something consumes, ascending."""
        return sorted(self._ports.get(name, ()))

    def control_consumers(self, name: str) -> List[node_def_pb2.NodeDef]:
        return list(self._control_consumers.get(name, ()))

    def has_consumers(self, name: str) -> bool:
        """True when any node reads ``name`` through a data or control edge."""
        return name in self._fed

    def producer(self, node: node_def_pb2.NodeDef, input_index: int) -> Tuple[node_def_pb2.NodeDef, int]:
        """(producer node, output port) feeding data input ``input_index`` of ``node``."""
        src, port, control = parse_input(node.input[input_index])
        if control:
            raise ValueError(f"input {input_index} of {node.name} is a control edge")
        return self.nodes[src], port

    def data_inputs(self, node: node_def_pb2.NodeDef) -> List[str]:
        return [s for s in node.input if not s.startswith("^")]

    def dangling_inputs(self) -> List[Tuple[str, str]]:
        """(node, input string) for every input naming a node that is not in the graph."""
        return [(node.name, spec) for node in self.graph_def.node for spec in node.input
                if node_name(spec) not in self.nodes]

    def _ordering_inputs(self, node: node_def_pb2.NodeDef) -> List[str]:
        """Producers ordered before ``node``: every input but a loop's NextIteration -> Merge back edge."""
        sources = [node_name(spec) for spec in node.input]
        if node.op in _MERGE_OPS:
            sources = [s for s in sources if self.nodes[s].op not in _NEXT_ITERATION_OPS]
        return sources

    def topological_order(self) -> List[node_def_pb2.NodeDef]:
        """Nodes so that every producer precedes its consumers (loop back edges ignored).

        Raises GraphError naming the inputs that point outside the graph, or the nodes of a
        cycle that is not a while loop's, since no order exists for either.
        """
        dangling = self.dangling_inputs()
        if dangling:
            raise GraphError(dangling_message(dangling))
        indegree = {name: 0 for name in self.nodes}
        fanout: Dict[str, List[str]] = collections.defaultdict(list)
        for node in self.graph_def.node:
            for src in self._ordering_inputs(node):
                indegree[node.name] += 1
                fanout[src].append(node.name)
        ready = collections.deque(n.name for n in self.graph_def.node if indegree[n.name] == 0)
        order = []
        while ready:
            name = ready.popleft()
            order.append(self.nodes[name])
            for dst in fanout.get(name, ()):
                indegree[dst] -= 1
                if indegree[dst] == 0:
                    ready.append(dst)
        if len(order) != len(self.nodes):
            stuck = {n for n, d in indegree.items() if d > 0}
            raise GraphError(f"GraphDef has a cycle outside any while loop: {' -> '.join(self._one_cycle(stuck))} "
                             f"({len(stuck)} node(s) in or after a cycle cannot be ordered)")
        return order

    def _one_cycle(self, stuck: set) -> List[str]:
        """One cycle among ``stuck`` (nodes each left with an unordered producer): data-flow order,
        starting and ending at its smallest name."""
        walk: List[str] = []
        position: Dict[str, int] = {}
        name = min(stuck)
        while name not in position:  # walk producers until one repeats
            position[name] = len(walk)
            walk.append(name)
            name = next(s for s in self._ordering_inputs(self.nodes[name]) if s in stuck)
        cycle = list(reversed(walk[position[name]:]))
        first = cycle.index(min(cycle))
        cycle = cycle[first:] + cycle[:first]
        return cycle + cycle[:1]


_MERGE_OPS = frozenset({"Merge", "RefMerge"})
_NEXT_ITERATION_OPS = frozenset({"NextIteration", "RefNextIteration"})


def dangling_message(dangling: Sequence[Tuple[str, str]], limit: int = 5) -> str:
    """'node 'a' reads 'x', ...' for the first ``limit`` dangling inputs, with a count of the rest."""
    shown = ", ".join(f"node {node!r} reads {spec!r}" for node, spec in dangling[:limit])
    more = f" and {len(dangling) - limit} more" if len(dangling) > limit else ""
    return f"GraphDef inputs name nodes that are not in the graph: {shown}{more}"


def reachable_from(index: GraphIndex, targets: Iterable[str]) -> set:
    """Names of every node that ``targets`` depend on (data and control), targets included."""
    seen = set()
    stack = [node_name(t) for t in targets]
    while stack:
        name = stack.pop()
        if name in seen or name not in index.nodes:
            continue
        seen.add(name)
        stack.extend(node_name(s) for s in index.nodes[name].input)
    return seen


# --------------------------------------------------------------------------------------
# dtype slots
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TypeSlot:
    """What governs the dtype of one input or output of a node.

    ``attr`` is the type attribute (``T``, ``U``, ``DstT`` ...), with ``index`` set when the
    attribute is a ``list(type)``; ``fixed`` is the dtype of an argument declared with a
    concrete type (an int32 shape, a bool predicate) and is set only when ``attr`` is None.
    """

    attr: Optional[str]
    index: Optional[int] = None
    fixed: Optional[int] = None

    @property
    def key(self) -> str:
        """Stable identifier of the paintable vertex: ``T``, ``T[2]`` or ``fixed``."""
        if self.attr is None:
            return "fixed"
        return self.attr if self.index is None else f"{self.attr}[{self.index}]"


class OpSignatures:
    """Resolves each node's input and output dtype slots from its OpDef.

    Ops come from TensorFlow's ``op_def_registry``; functions defined in the graph's own
    library are resolved from their signature. Unknown ops resolve to None so callers can
    keep them FP32 and report them.
    """

    def __init__(self, graph_def: Optional[graph_pb2.GraphDef] = None):
        self._functions: Dict[str, op_def_pb2.OpDef] = {}
        if graph_def is not None:
            for fn in graph_def.library.function:
                self._functions[fn.signature.name] = fn.signature

    def op_def(self, op: str) -> Optional[op_def_pb2.OpDef]:
        return self._functions.get(op) or op_def_registry.get(op)

    def is_function(self, op: str) -> bool:
        return op in self._functions

    def _slots(self, node: node_def_pb2.NodeDef, args) -> List[TypeSlot]:
        slots: List[TypeSlot] = []
        for arg in args:
            if arg.type_list_attr:
                n = len(node.attr[arg.type_list_attr].list.type)
                slots.extend(TypeSlot(arg.type_list_attr, i) for i in range(n))
                continue
            repeat = node.attr[arg.number_attr].i if arg.number_attr else 1
            if arg.type_attr:
                slot = TypeSlot(arg.type_attr)
            else:
                slot = TypeSlot(None, None, arg.type)
            slots.extend([slot] * repeat)
        return slots

    def input_slots(self, node: node_def_pb2.NodeDef) -> Optional[List[TypeSlot]]:
        """One slot per data input of ``node``, or None when the op is unknown."""
        op_def = self.op_def(node.op)
        if op_def is None:
            return None
        return self._slots(node, op_def.input_arg)

    def output_slots(self, node: node_def_pb2.NodeDef) -> Optional[List[TypeSlot]]:
        """One slot per output port of ``node``, or None when the op is unknown."""
        op_def = self.op_def(node.op)
        if op_def is None:
            return None
        return self._slots(node, op_def.output_arg)

    def type_attrs(self, node: node_def_pb2.NodeDef) -> List[TypeSlot]:
        """Every paintable type vertex of the node (each list element separately)."""
        op_def = self.op_def(node.op)
        if op_def is None:
            return []
        slots = []
        for attr in op_def.attr:
            if attr.type == "type":
                slots.append(TypeSlot(attr.name))
            elif attr.type == "list(type)":
                n = len(node.attr[attr.name].list.type)
                slots.extend(TypeSlot(attr.name, i) for i in range(n))
        return slots

    def allowed_types(self, op: str, attr: str) -> Optional[List[int]]:
        """The OpDef's allowed values for a type attr; None means any type."""
        op_def = self.op_def(op)
        if op_def is None:
            return []
        for a in op_def.attr:
            if a.name == attr:
                values = list(a.allowed_values.list.type)
                return values or None
        return []


def slot_dtype(node: node_def_pb2.NodeDef, slot: TypeSlot) -> int:
    """Current dtype (a ``types_pb2`` enum) of a slot on ``node``; DT_INVALID if unset."""
    if slot.attr is None:
        return slot.fixed
    if slot.attr not in node.attr:
        return types_pb2.DT_INVALID
    value = node.attr[slot.attr]
    if slot.index is None:
        return value.type
    types = value.list.type
    return types[slot.index] if slot.index < len(types) else types_pb2.DT_INVALID


def set_slot_dtype(node: node_def_pb2.NodeDef, slot: TypeSlot, dtype: int) -> None:
    """Rewrite the attr governing ``slot``; fixed-type slots cannot change."""
    if slot.attr is None:
        raise ValueError(f"{node.name}: a fixed-type slot cannot be retyped")
    if slot.index is None:
        node.attr[slot.attr].type = dtype
    else:
        node.attr[slot.attr].list.type[slot.index] = dtype


# --------------------------------------------------------------------------------------
# node builders
# --------------------------------------------------------------------------------------

def on_cpu(device: str) -> bool:
    """Whether a node's requested device is the CPU (an empty device is placed there too)."""
    if not device:
        return True
    from tensorflow.python.framework.device_spec import DeviceSpecV2
    try:
        kind = DeviceSpecV2.from_string(device).device_type
    except ValueError:
        return False
    return kind is None or kind.upper() == "CPU"


def make_const(name: str, value: np.ndarray, dtype: Optional[int] = None, device: str = "") -> node_def_pb2.NodeDef:
    """A Const node holding ``value`` (as ``dtype`` when given, e.g. DT_BFLOAT16)."""
    node = node_def_pb2.NodeDef(name=name, op="Const", device=device)
    tf_dtype = dtype if dtype is not None else _numpy_to_tf(np.asarray(value).dtype)
    if tf_dtype == BFLOAT16:
        tensor = tensor_util.make_tensor_proto(np.asarray(value, dtype=np.float32).astype(_bf16_numpy()))
    else:
        from tensorflow.python.framework import dtypes
        tensor = tensor_util.make_tensor_proto(np.asarray(value), dtype=dtypes.as_dtype(tf_dtype))
    node.attr["dtype"].type = tf_dtype
    node.attr["value"].tensor.CopyFrom(tensor)
    return node


def bf16_const_from(node: node_def_pb2.NodeDef, name: str) -> node_def_pb2.NodeDef:
    """A bfloat16 copy of float32 Const ``node`` named ``name`` (round to nearest even).

    Works on the raw tensor bytes where possible, so converting a large model's weights
    costs one vectorised pass instead of a Python-level tensor rebuild.
    """
    src = node.attr["value"].tensor
    out = node_def_pb2.NodeDef(name=name, op="Const", device=node.device)
    out.attr["dtype"].type = BFLOAT16
    tensor = out.attr["value"].tensor
    tensor.dtype = BFLOAT16
    tensor.tensor_shape.CopyFrom(src.tensor_shape)
    if src.tensor_content:
        values = np.frombuffer(src.tensor_content, dtype=np.float32)
    else:
        values = tensor_util.MakeNdarray(src).reshape(-1)
        if values.size == 1 and _num_elements(src.tensor_shape) != 1:
            # A splat constant (one value for the whole shape): keep it a splat.
            tensor.half_val.append(int(_to_bf16_bits(values.astype(np.float32))[0]))
            return out
    tensor.tensor_content = values.astype(np.float32).astype(_bf16_numpy()).tobytes()
    return out


def _num_elements(shape) -> int:
    n = 1
    for d in shape.dim:
        n *= d.size
    return n


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    return values.astype(_bf16_numpy()).view(np.uint16)


def const_value(node: node_def_pb2.NodeDef) -> np.ndarray:
    """The ndarray a Const node holds."""
    return tensor_util.MakeNdarray(node.attr["value"].tensor)


def make_cast(name: str, source: str, src_dtype: int, dst_dtype: int, device: str = "") -> node_def_pb2.NodeDef:
    """A Cast node from ``source`` (an input string) converting ``src_dtype`` to ``dst_dtype``."""
    node = node_def_pb2.NodeDef(name=name, op="Cast", input=[source], device=device)
    node.attr["SrcT"].type = src_dtype
    node.attr["DstT"].type = dst_dtype
    node.attr["Truncate"].b = False
    return node


def make_node(op: str, name: str, inputs: Sequence[str] = (), attrs: Optional[Mapping[str, attr_value_pb2.AttrValue]] = None,
              device: str = "") -> node_def_pb2.NodeDef:
    node = node_def_pb2.NodeDef(name=name, op=op, input=list(inputs), device=device)
    for key, value in (attrs or {}).items():
        node.attr[key].CopyFrom(value)
    return node


def unique_name(existing: Mapping[str, object], base: str) -> str:
    """``base`` if unused, else ``base_1``, ``base_2`` ... (checked against ``existing``)."""
    if base not in existing:
        return base
    k = 1
    while f"{base}_{k}" in existing:
        k += 1
    return f"{base}_{k}"


def _bf16_numpy():
    from tensorflow.python.framework import dtypes
    return dtypes.bfloat16.as_numpy_dtype


def _numpy_to_tf(dtype: np.dtype) -> int:
    from tensorflow.python.framework import dtypes
    return dtypes.as_dtype(dtype).as_datatype_enum


def dtype_name(dtype: int) -> str:
    """Short name (``float32``, ``bfloat16`` ...) of a ``types_pb2`` enum."""
    from tensorflow.python.framework import dtypes
    try:
        return dtypes.as_dtype(dtype).name
    except TypeError:
        return f"dtype{dtype}"


def copy_graph(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """A deep copy, so a pass never mutates its caller's GraphDef."""
    out = graph_pb2.GraphDef()
    out.CopyFrom(graph_def)
    return out


def rebuild(graph_def: graph_pb2.GraphDef, nodes: Iterable[node_def_pb2.NodeDef]) -> graph_pb2.GraphDef:
    """A GraphDef with ``nodes`` and everything else (versions, library) from ``graph_def``."""
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    out.node.extend(nodes)
    return out


def skip_identity(index: GraphIndex, spec: str, max_depth: int = 64) -> str:
    """The tensor behind a chain of Identity-like nodes (they do not change values)."""
    for _ in range(max_depth):
        name, _, _ = parse_input(spec)
        node = index.nodes.get(name)
        if node is None or node.op not in IDENTITY_OPS or not node.input:
            break
        spec = node.input[0]
    return canonical_tensor(spec)


def consumers_through_identity(index: GraphIndex, name: str, port: int = 0) -> List[node_def_pb2.NodeDef]:
    """Data consumers of a tensor, looking through Identity-like nodes in between."""
    out, stack, seen = [], [(name, port)], set()
    while stack:
        src = stack.pop()
        if src in seen:
            continue
        seen.add(src)
        for consumer, _ in index.consumers(*src):
            if consumer.op in IDENTITY_OPS:
                stack.append((consumer.name, 0))
            else:
                out.append(consumer)
    return out
