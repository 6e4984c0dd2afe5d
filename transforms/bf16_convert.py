"""BF16Convert: paint a frozen FP32 graph BF16 where safe and worth it, then insert Casts.

The paint works on (node, type attribute) vertices, so FusedBatchNormV3 can be BF16 on ``T``
and FP32 on ``U``. ALLOW ops (and nodes the plan forces BF16) seed BF16 islands. An INFER op
joins an island only where it cannot round anything an FP32 consumer reads or compound
error on the way out: between two island ops (TensorFlow's rule), or as the bias, residual
add or batch norm directly after one. Exact CLEAR ops follow an island both ways when all
their inputs or all their consumers are BF16, so Casts appear only at island borders. DENY
ops and INFER ops downstream of them, normalization statistics, long BF16-accumulating
reductions, the last computation before an output, nodes on non-CPU devices, nodes the plan
forces FP32 or allows only INT8/FP32 (left float by the INT8 stage), graph inputs/outputs,
control-flow frames, function calls and unknown ops stay FP32. The result does not depend on
node order. FP32 Consts feeding BF16 vertices become BF16 Consts offline (one converted copy
per Const); a Const declared as a graph input keeps its dtype and gets a Cast. Every FP32-kept
float node is recorded with its reason in ``decisions``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

import numpy as np

from tensorflow.core.framework import graph_pb2, node_def_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.norm_stats import normalization_statistics
from tf_bf16.transforms.context import Decision, TransformContext
from tf_bf16.transforms.op_classes import (CALL_OPS, COND_MERGE_OPS, COND_SWITCH_OPS, FRAME_ENTER_OPS, FRAME_EXIT_OPS,
                                           ISLAND_EPILOGUE_OPS, SOURCE_OPS, PaintRule, bf16_refusal, paint_rule)
from tf_bf16.transforms.plan import BF16, FP32, PrecisionPlan

Vertex = Tuple[str, str]  # (node name, TypeSlot.key)

OUTPUT_REASON = "last computation before a graph output kept FP32 (output precision)"
STAT_REASON = "normalization statistic kept FP32 (mean/variance of a tensor)"
INT8_FP32_REASON = "config allows only int8 or fp32 and the INT8 stage left it float: FP32"


@dataclasses.dataclass
class _Edges:
    """Float-vertex adjacency of one graph (see ``_Conversion._edges``)."""

    succ: Dict[Vertex, List[Vertex]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    pred: Dict[Vertex, List[Vertex]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    fp32_input: Set[Vertex] = dataclasses.field(default_factory=set)
    fp32_consumer: Set[Vertex] = dataclasses.field(default_factory=set)


class _Conversion:
    """One conversion of one graph (``bf16_convert`` is the pass): per-run state only, so
    several conversions can run side by side."""

    def __init__(self, graph_def: graph_pb2.GraphDef, plan: PrecisionPlan, int8_nodes: FrozenSet[str] = frozenset()):
        self.graph_def = g.copy_graph(graph_def)
        self.plan = plan
        self.int8_nodes = int8_nodes   # names the INT8 stage replaced: what now has the name is its product
        self.index = g.GraphIndex(self.graph_def)
        self.sigs = g.OpSignatures(self.graph_def)
        self.decisions: Dict[str, Decision] = {}
        self.consts_converted = 0
        self._in_slots: Dict[str, Optional[List[g.TypeSlot]]] = {}
        self._out_slots: Dict[str, Optional[List[g.TypeSlot]]] = {}

    # ------------------------------------------------------------------ public

    def do_transformation(self) -> graph_pb2.GraphDef:
        """Paint, rewrite dtype attrs and insert Casts; returns a new GraphDef."""
        for node in self.graph_def.node:
            self._in_slots[node.name] = self.sigs.input_slots(node)
            self._out_slots[node.name] = self.sigs.output_slots(node)
        float_vertices = self._float_vertices()
        blocked = self._blocked_vertices(float_vertices)
        edges = self._edges(float_vertices)
        painted = self._paint(float_vertices, blocked, edges)
        self._record_decisions(float_vertices, blocked, painted, edges)
        return self._rewrite({v: float_vertices[v] for v in painted})

    # ------------------------------------------------------------------ vertices

    def _float_vertices(self) -> Dict[Vertex, g.TypeSlot]:
        """Every float32 type-attr vertex of a non-Const, non-Cast node."""
        out: Dict[Vertex, g.TypeSlot] = {}
        for node in self.graph_def.node:
            if node.op in SOURCE_OPS or node.op == "Cast":
                continue
            for slot in self.sigs.type_attrs(node):
                if g.slot_dtype(node, slot) == g.FLOAT and self._slot_carries_data(node, slot):
                    out[(node.name, slot.key)] = slot
        return out

    def _slot_carries_data(self, node: node_def_pb2.NodeDef, slot: g.TypeSlot) -> bool:
        ins = self._in_slots.get(node.name) or []
        outs = self._out_slots.get(node.name) or []
        return any(s.key == slot.key for s in ins) or any(s.key == slot.key for s in outs)

    def _rule(self, v: Vertex) -> PaintRule:
        """The paint rule of a vertex's op (``op_classes.PAINT_RULES``)."""
        return paint_rule(self.index[v[0]].op)

    def _blocked_vertices(self, vertices: Dict[Vertex, g.TypeSlot]) -> Dict[Vertex, str]:
        """Vertices that may not be BF16, with the reason (taint handled in ``_paint``)."""
        blocked: Dict[Vertex, str] = {}
        protected = self.plan.protected
        control_flow = self._control_flow_nodes()
        for (name, key), slot in vertices.items():
            node = self.index[name]
            reason = None
            if name in protected:
                reason = "graph input/output keeps its dtype"
            elif name in control_flow:
                reason = control_flow[name]
            elif not g.on_cpu(node.device):
                reason = f"placed on {node.device}: tf_bf16 converts CPU nodes only"
            elif self.sigs.is_function(node.op) or node.op in CALL_OPS:
                reason = "function call: its arguments and results stay FP32 (the body is converted on its own)"
            elif self._limited_to_int8(node):
                reason = INT8_FP32_REASON
            else:
                reason = bf16_refusal(node.op, slot.attr, self.plan.forced(name, node.op),
                                      self._dtype_allows_bf16(node.op, slot.attr),
                                      self.plan.kernel_has_bf16(node.op, slot.attr),
                                      lambda node=node: accumulated_terms(node, self.index))
            if reason:
                blocked[(name, key)] = reason
        return blocked

    def _limited_to_int8(self, node: node_def_pb2.NodeDef) -> bool:
        """Whether the plan allows this node INT8 or FP32 but not BF16, and the INT8 stage left it float."""
        return (node.name not in self.int8_nodes and self.plan.forced(node.name, node.op) is None
                and BF16 not in self.plan.allowed(node.name, node.op))

    def _dtype_allows_bf16(self, op: str, attr: str) -> bool:
        allowed = self.sigs.allowed_types(op, attr)
        return allowed is None or g.BFLOAT16 in allowed

    def _control_flow_nodes(self) -> Dict[str, str]:
        """Nodes inside v1 while-loop frames or cond branches: FP32, with the reason."""
        out: Dict[str, str] = {}
        for starts, stops, reason in ((FRAME_ENTER_OPS, FRAME_EXIT_OPS, "inside a while-loop frame"),
                                      (COND_SWITCH_OPS, COND_MERGE_OPS | FRAME_EXIT_OPS,
                                       "inside a cond branch (Switch/Merge)")):
            stack = [n.name for n in self.graph_def.node if n.op in starts]
            seen: Set[str] = set()
            while stack:
                name = stack.pop()
                if name in seen:
                    continue
                seen.add(name)
                out.setdefault(name, reason)
                if self.index[name].op in stops:
                    continue
                for consumer, _ in self.index.consumers(name):
                    stack.append(consumer.name)
                for consumer in self.index.control_consumers(name):
                    stack.append(consumer.name)
        return out

    # ------------------------------------------------------------------ edges

    def _data_edges(self):
        """Every typed data edge: (consumer, input index, consumer slot, producer name, port)."""
        for node in self.graph_def.node:
            in_slots = self._in_slots.get(node.name)
            if not in_slots:
                continue
            for i, spec in enumerate(node.input):
                src, port, control = g.parse_input(spec)
                if not control and i < len(in_slots):
                    yield node, i, in_slots[i], src, port

    def _edges(self, vertices: Dict[Vertex, g.TypeSlot]) -> "_Edges":
        """Adjacency between float vertices, and which vertices also touch FP32 tensors.

        A vertex has an FP32 input when a float input on its slot comes from something that
        is not a vertex (a graph input, a Cast, a declared-input Const); it has an FP32
        consumer when a non-vertex (a Cast, a fixed-float slot) reads its output. Unprotected
        float Consts are neither: they are converted offline.
        """
        edges = _Edges()
        protected = self.plan.protected
        for node, _, slot, src, port in self._data_edges():
            out_slots = self._out_slots.get(src)
            src_v = (src, out_slots[port].key) if out_slots and port < len(out_slots) else None
            dst_v = (node.name, slot.key)
            src_in, dst_in = src_v in vertices, dst_v in vertices
            if src_in and dst_in:
                edges.succ[src_v].append(dst_v)
                edges.pred[dst_v].append(src_v)
            elif dst_in:
                producer = self.index.nodes.get(src)
                if producer is None or producer.op != "Const" or src in protected:
                    edges.fp32_input.add(dst_v)
            elif src_in:
                edges.fp32_consumer.add(src_v)
        return edges

    # ------------------------------------------------------------------ paint

    def _paint(self, vertices: Dict[Vertex, g.TypeSlot], blocked: Dict[Vertex, str], edges: "_Edges") -> Set[Vertex]:
        """BF16 vertices: ALLOW seeds, INFER/CLEAR between them, then what rounds nothing new.

        1. Seeds are the unblocked ALLOW vertices and the vertices the plan forces BF16.
        2. An INFER or CLEAR vertex on a path seed -> ... -> seed (TensorFlow's rule) goes BF16:
           its value is rounded for the next seed anyway.
        3. To a fixpoint (``_propagate``): exact CLEAR vertices whose inputs or consumers are
           all BF16, and epilogue INFER vertices one step after the island. An INFER op
           upstream of or beside an island therefore stays FP32 and never computes on values
           that FP32 consumers also read.
        """
        stats = normalization_statistics(self.index)
        for v in vertices:
            if v[0] in stats and v not in blocked and self.plan.forced(v[0], self.index[v[0]].op) != BF16:
                blocked[v] = STAT_REASON
        deny = [v for v in blocked if self._rule(v).taints]
        self._taint(blocked, edges.succ, edges.pred, deny, mixing=True)
        self._taint(blocked, edges.succ, edges.pred, [v for v, why in blocked.items() if why == STAT_REASON],
                    mixing=False)
        self._block_output_tail(vertices, blocked, edges.succ, edges.pred)

        seeds = [v for v in vertices if v not in blocked and
                 (self._rule(v).seeds or self.plan.forced(v[0], self.index[v[0]].op) == BF16)]
        free = {v for v in vertices if v not in blocked and self._rule(v).joins}
        painted = set(seeds) | self._between(seeds, free, edges)
        self._propagate(painted, free, edges)
        return painted

    @staticmethod
    def _between(seeds: List[Vertex], free: Set[Vertex], edges: "_Edges") -> Set[Vertex]:
        """Free vertices on a path from one seed to another through free vertices only."""
        downstream = _reach(seeds, edges.succ, free)
        return _reach(seeds, edges.pred, downstream)

    def _propagate(self, painted: Set[Vertex], free: Set[Vertex], edges: "_Edges") -> None:
        """Grow ``painted`` (the island: seeds and what lies between them) to a fixpoint, in place.

        * An exact CLEAR vertex goes BF16 when all its float inputs are BF16 (or Consts), or
          when all its consumers are BF16: either way it rounds nothing that is not rounded anyway.
        * An INFER vertex of an epilogue op (``ISLAND_EPILOGUE_OPS``: bias, residual add,
          batch norm) goes BF16 when all its float inputs are BF16 (or Consts) and
          one of them comes straight from the island: one step out of an island, so the
          patterns TensorFlow fuses into one BF16 kernel stay whole, and never a chain of
          steps, so error cannot compound on the way to an FP32 consumer or an output.
          TensorFlow's AMP takes this step for every INFER op and chains it.

        Both rules are monotone, so the result does not depend on the visiting order.
        """
        island = frozenset(painted)

        def fed_by_bf16(v: Vertex) -> bool:
            ins = edges.pred.get(v, ())
            if not ins or v in edges.fp32_input or not all(w in painted for w in ins):
                return False
            if self._rule(v).exact:
                return True
            return self.index[v[0]].op in ISLAND_EPILOGUE_OPS and any(w in island for w in ins)

        def read_by_bf16(v: Vertex) -> bool:
            outs = edges.succ.get(v, ())
            return (bool(outs) and v not in edges.fp32_consumer and self._rule(v).exact
                    and all(w in painted for w in outs))

        stack = [w for v in painted for w in edges.succ.get(v, []) + edges.pred.get(v, [])]
        while stack:
            v = stack.pop()
            if v in painted or v not in free or not (fed_by_bf16(v) or read_by_bf16(v)):
                continue
            painted.add(v)
            stack.extend(edges.succ.get(v, ()))
            stack.extend(edges.pred.get(v, ()))

    def _block_output_tail(self, vertices: Dict[Vertex, g.TypeSlot], blocked: Dict[Vertex, str],
                           succ: Dict[Vertex, List[Vertex]], pred: Dict[Vertex, List[Vertex]]) -> None:
        """Keep the last INFER op before each graph output FP32 (and CLEAR ops after it).

        That op (a final Softmax, BiasAdd or Add) is cheap, and running it in FP32 means the
        output is not rounded to BF16 after the last real computation; the Cast moves one op
        up, so the Cast count does not change.
        """
        protected = self.plan.protected
        stack: List[Vertex] = []
        for name in protected:
            node = self.index.nodes.get(name)
            if node is None:
                continue
            for spec in node.input:
                src, port, control = g.parse_input(spec)
                src_slots = self._out_slots.get(src) or []
                if not control and port < len(src_slots):
                    stack.append((src, src_slots[port].key))
        seen: Set[Vertex] = set()
        while stack:
            v = stack.pop()
            if v in seen or v not in vertices or v in blocked:
                continue
            seen.add(v)
            rule = self._rule(v)
            if rule.exact:
                stack.extend(pred.get(v, ()))
            elif rule.rounds and self.plan.forced(v[0], self.index[v[0]].op) != BF16:
                blocked[v] = OUTPUT_REASON
        # CLEAR vertices between such an INFER op and the output stay FP32 with it; those that
        # reach no INFER op gain nothing from FP32 and are left free.
        anchors = {v for v in seen if blocked.get(v) == OUTPUT_REASON}
        for v in self._linked_through_clear(anchors, seen, succ) - anchors:
            blocked[v] = OUTPUT_REASON

    def _linked_through_clear(self, anchors: Set[Vertex], members: Set[Vertex],
                              step: Dict[Vertex, List[Vertex]]) -> Set[Vertex]:
        """``anchors`` plus the CLEAR vertices of ``members`` reached from them along ``step``.

        Both FP32 regions (deny/statistics and the output tail) keep a CLEAR vertex only when
        it connects to one of their INFER members; elsewhere it is free to go BF16.
        """
        linked, stack = set(anchors), list(anchors)
        while stack:
            for w in step.get(stack.pop(), ()):
                if w in members and w not in linked and self._rule(w).exact:
                    linked.add(w)
                    stack.append(w)
        return linked

    def _taint(self, blocked: Dict[Vertex, str], succ: Dict[Vertex, List[Vertex]],
               pred: Dict[Vertex, List[Vertex]], sources: List[Vertex], mixing: bool) -> None:
        """Grow an FP32 region from deny ops (``mixing``) or normalization statistics.

        Downstream of a deny op (Exp, Log, Pow ...) every INFER vertex that reads the region
        joins it, as in TensorFlow's AMP: rounding the wide-range FP32 result of such an op
        where it is next used would undo keeping the op FP32. Downstream of a normalization
        statistic a vertex joins only when every float input it reads comes from the region,
        from a Const, or is the tensor the statistic normalizes: a LayerNorm stays FP32 as a
        whole (mean, variance, scale and shift) while the residual Add that mixes its output
        with a BF16 branch does not join, so the taint never leaks along a residual stream.
        Either way CLEAR members that lead to no INFER member leave the region again.
        """
        region: Set[Vertex] = set(sources)
        origin: Dict[Vertex, str] = {v: v[0] for v in sources}
        normalized = {g.skip_identity(self.index, self.index[v[0]].input[0]) for v in sources if self.index[v[0]].input}

        def joins(v: Vertex) -> bool:
            if v in blocked or not self._rule(v).joins:
                return False
            if self.plan.forced(v[0], self.index[v[0]].op) == BF16:
                return False
            if mixing:
                return True   # it is a consumer of a region member
            node = self.index[v[0]]
            slots = self._in_slots.get(v[0]) or []
            for i, spec in enumerate(node.input):
                if spec.startswith("^") or i >= len(slots) or slots[i].key != v[1]:
                    continue
                src, port, _ = g.parse_input(spec)
                src_slots = self._out_slots.get(src) or []
                src_v = (src, src_slots[port].key) if port < len(src_slots) else None
                if src_v in region or self.index[src].op == "Const":
                    continue
                if g.skip_identity(self.index, spec) in normalized:
                    continue
                return False
            return True

        stack = list(sources)
        while stack:
            v = stack.pop()
            for w in succ.get(v, ()):
                if w not in region and joins(w):
                    region.add(w)
                    origin[w] = origin[v]
                    stack.append(w)
        # A CLEAR vertex stays in the region only on the way to an INFER member: one that
        # merely forwards the region's output (a Reshape before a MatMul) may go BF16, so the
        # region's single border Cast is shared with the other consumers.
        anchors = {v for v in region if v in sources or self._rule(v).rounds}
        for v in self._linked_through_clear(anchors, region, pred):
            if v not in blocked:
                blocked[v] = f"fed by FP32-only node {origin[v]}"

    # ------------------------------------------------------------------ report

    def _record_decisions(self, vertices, blocked, painted, edges: "_Edges") -> None:
        per_node: Dict[str, List[Vertex]] = collections.defaultdict(list)
        for v in vertices:
            per_node[v[0]].append(v)
        for name, vs in per_node.items():
            if any(v in painted for v in vs):
                fp32_attrs = [v[1] for v in vs if v not in painted]
                note = f"attrs {fp32_attrs} stay FP32" if fp32_attrs else ""
                self.decisions[name] = Decision(BF16, note)
                continue
            reasons = [blocked[v] for v in vs if v in blocked]
            self.decisions[name] = Decision(FP32, reasons[0] if reasons else self._unpainted_reason(vs[0], painted, edges))

    def _unpainted_reason(self, v: Vertex, painted: Set[Vertex], edges: "_Edges") -> str:
        """Why a vertex no rule blocked still stays FP32: which FP32 neighbour keeps it there."""
        ins, outs = edges.pred.get(v, []), edges.succ.get(v, [])
        if not any(w in painted for w in ins + outs):
            return "no BF16 neighbour: converting it would only add Casts"
        fp32_inputs = [w[0] for w in ins if w not in painted]
        if v in edges.fp32_input:
            fp32_inputs.append("graph input or Cast")
        if self._rule(v).exact:
            return "links FP32 and BF16 tensors: BF16 here would round values FP32 consumers read"
        if fp32_inputs:
            return (f"reads FP32 {fp32_inputs[0]}: BF16 here would round an FP32 value outside a BF16 island "
                    f"(INFER ops go BF16 between BF16 compute ops, or one step after them)")
        if any(w in painted for w in ins):
            return ("after a BF16 island but neither between two BF16 compute ops nor its direct epilogue "
                    "(bias, residual add, batch norm): kept FP32 so rounding errors do not compound")
        return "feeds BF16 ops but is not between two BF16 compute ops"

    # ------------------------------------------------------------------ rewrite

    def _rewrite(self, painted: Dict[Vertex, g.TypeSlot]) -> graph_pb2.GraphDef:
        for (name, _), slot in painted.items():
            g.set_slot_dtype(self.index[name], slot, g.BFLOAT16)
        existing = dict(self.index.nodes)
        new_nodes: List[node_def_pb2.NodeDef] = []
        casts: Dict[Tuple[str, int, int], str] = {}
        const_copies: Dict[str, str] = {}
        const_consumers = self._const_bf16_demand()
        for node, i, slot, src, port in list(self._data_edges()):
            want = g.slot_dtype(node, slot)
            producer = self.index[src]
            have = self._output_dtype(producer, port)
            if want == have or {want, have} != {g.FLOAT, g.BFLOAT16}:
                continue
            if producer.op == "Const" and want == g.BFLOAT16 and src not in self.plan.protected:
                node.input[i] = self._bf16_const(producer, const_consumers, const_copies, existing, new_nodes)
                continue
            key = (src, port, want)
            if key not in casts:
                suffix = "CastToBf16" if want == g.BFLOAT16 else "CastToFp32"
                cast_name = g.unique_name(existing, f"{src}/{suffix}" + (f"_{port}" if port else ""))
                # The Cast runs beside the BF16 side, which is always on the CPU.
                device = producer.device if g.on_cpu(producer.device) else node.device
                cast = g.make_cast(cast_name, g.tensor_name(src, port), have, want, device=device)
                existing[cast_name] = cast
                new_nodes.append(cast)
                casts[key] = cast_name
            node.input[i] = casts[key]
        self.graph_def.node.extend(new_nodes)
        return self.graph_def

    def _output_dtype(self, node: node_def_pb2.NodeDef, port: int) -> int:
        if node.op == "Const":
            return node.attr["dtype"].type
        slots = self._out_slots.get(node.name)
        if not slots or port >= len(slots):
            return -1
        return g.slot_dtype(node, slots[port])

    def _const_bf16_demand(self) -> Dict[str, bool]:
        """For each float32 Const: True when every data consumer now wants BF16."""
        demand: Dict[str, bool] = {}
        for node in self.graph_def.node:
            if node.op != "Const" or node.attr["dtype"].type != g.FLOAT:
                continue
            wants = []
            for consumer, i in self.index.consumers(node.name, 0):
                slots = self._in_slots.get(consumer.name)
                wants.append(bool(slots) and i < len(slots) and g.slot_dtype(consumer, slots[i]) == g.BFLOAT16)
            demand[node.name] = bool(wants) and all(wants) and not self.index.control_consumers(node.name)
        return demand

    def _bf16_const(self, const: node_def_pb2.NodeDef, demand: Dict[str, bool], copies: Dict[str, str],
                    existing: Dict[str, node_def_pb2.NodeDef], new_nodes: List[node_def_pb2.NodeDef]) -> str:
        """Name of a BF16 version of ``const``: converted in place when all consumers want BF16."""
        if const.name in copies:
            return copies[const.name]
        if demand.get(const.name):
            converted = g.bf16_const_from(const, const.name)
            const.attr["dtype"].type = g.BFLOAT16
            const.attr["value"].CopyFrom(converted.attr["value"])
            copies[const.name] = const.name
        else:
            name = g.unique_name(existing, f"{const.name}/bf16")
            copy = g.bf16_const_from(const, name)
            existing[name] = copy
            new_nodes.append(copy)
            copies[const.name] = name
        self.consts_converted += 1
        return copies[const.name]


def _reach(roots: List[Vertex], step: Dict[Vertex, List[Vertex]], within: Set[Vertex]) -> Set[Vertex]:
    """Vertices of ``within`` reached from ``roots`` (roots themselves excluded) along ``step``."""
    seen: Set[Vertex] = set()
    stack = [w for v in roots for w in step.get(v, ()) if w in within]
    while stack:
        v = stack.pop()
        if v not in seen:
            seen.add(v)
            stack.extend(w for w in step.get(v, ()) if w in within)
    return seen


def accumulated_terms(node: node_def_pb2.NodeDef, index: g.GraphIndex) -> Optional[int]:
    """How many input values each output of a pooling or reduction node accumulates; None if unknown.

    Pools read their window from ``ksize``; reductions need the input's static shape (its
    producer's ``_output_shapes``) and constant axes.
    """
    if "ksize" in node.attr:
        terms = 1
        for k in node.attr["ksize"].list.i:
            terms *= int(k)
        return terms
    if len(node.input) < 2:
        return None
    src, port, _ = g.parse_input(node.input[0])
    axes_node = index.nodes.get(g.node_name(node.input[1]))
    producer = index.nodes.get(src)
    if producer is None or axes_node is None or axes_node.op != "Const":
        return None
    shapes = producer.attr["_output_shapes"].list.shape if "_output_shapes" in producer.attr else []
    if port >= len(shapes) or shapes[port].unknown_rank:
        return None
    dims = [d.size for d in shapes[port].dim]
    terms = 1
    for axis in np.atleast_1d(g.const_value(axes_node)).astype(int).tolist():
        if not -len(dims) <= axis < len(dims) or dims[axis] < 0:
            return None
        terms *= dims[axis]
    return terms


def bf16_convert(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Convert ``graph_def`` to mixed BF16/FP32 following ``context.plan``.

    Records every float node's precision (and, for FP32 ones, why) in ``context.decisions``
    and counts the Consts converted offline in ``context.consts_converted``.
    """
    conversion = _Conversion(graph_def, context.plan, frozenset(context.int8_nodes))
    out = conversion.do_transformation()
    context.decisions.update(conversion.decisions)
    context.consts_converted += conversion.consts_converted
    return out
