"""quantize: stage 1, FP32+INT8 generation from calibrated ranges, with quantized ops chained.

Each Conv2D / DepthwiseConv2dNative / MatMul with constant weights is matched with the
epilogue TensorFlow's quantized oneDNN ops fuse: BiasAdd, a residual add (convolutions,
before a ReLU) and ReLU/ReLU6 (ReLU6 is the ReLU requantized to at most 6, which saturates
there). The pattern becomes one ``Quantized*AndRequantize`` op whose INT8 output feeds the
next quantized op, pool (``QuantizedMaxPool``/``QuantizedAvgPool``), reshape
(``QuantizedReshape``) or concat (``QuantizedConcatV2``) directly: a chain starts with one ``QuantizeV2`` and ends in a
``Dequantize`` only where a float op reads it. The ``Dequantize`` takes the name of the
pattern's last node, so float readers, graph outputs and later stages see the same tensor
names; unread ones are removed by ``strip_unused``.

Activations are UINT8 where provably non-negative (the output of a ReLU or of a quantized
ReLU pattern, or a pool/concat of such), otherwise INT8 with a symmetric range. Depthwise and
residual-sum ops take only UINT8 inputs (a signed input keeps the depthwise float and the sum
outside); a MatMul of a signed input (BERT's dense layers) becomes ``_QuantizedMatMul``
(INT8 x INT8, bias and dequantization fused, FP32 out), which ends its chain, and so does a
BatchMatMul of an activation by a constant 2-D weight (BERT's attention projections), run as
rows x weight between two Reshapes.
Weights are symmetric INT8, per output channel unless the plan asks per tensor, using at most
``plan.quantization.weight_max`` levels per side (63 for CPUs without VNNI/AMX, see plan.py). Ranges come
from ``plan.quantization.ranges`` (see ``calibration_tensors``); a node whose allowed precisions
exclude INT8 (forced to BF16 or FP32, or limited to {bf16, fp32}) stays float for the later stages.

These ops run through oneDNN: TensorFlow registers them as placeholders that its oneDNN
layout pass replaces, so the result needs ``TF_ENABLE_ONEDNN_OPTS=1`` (the default on Intel CPUs).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.patterns import BIAS_OPS, is_const, sole_reader
from tf_bf16.transforms.plan import INT8, PrecisionPlan, QuantizationSpec

QUINT8, QINT8 = types_pb2.DT_QUINT8, types_pb2.DT_QINT8
CONTRACTIONS = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMul", "BatchMatMulV2"})
BATCHED = frozenset({"BatchMatMul", "BatchMatMulV2"})   # with a 2-D constant weight: rows x weight
ADD_OPS = frozenset({"Add", "AddV2", "AddN"})
RELU_OPS = frozenset({"Relu", "Relu6"})
POOLS = {"MaxPool": "QuantizedMaxPool", "AvgPool": "QuantizedAvgPool"}
NON_NEGATIVE_OPS = frozenset({"Relu", "Relu6", "Softmax", "Sigmoid"})
# Ops whose output is >= 0 wherever their first input is.
SIGN_KEEPING_OPS = frozenset({"Reshape", "Squeeze", "ExpandDims", "Identity", "Transpose", "MaxPool", "AvgPool",
                              "Mean", "StridedSlice", "Slice", "Pad", "MirrorPad"})
RELU6_MAX = 6.0
SIGNED_MATMUL = "_QuantizedMatMul"   # INT8 x INT8 -> FP32; takes one weight range (per tensor)
SIGNED_MATMUL_ATTRS = {"T1": types_pb2.DT_QINT8, "T2": types_pb2.DT_QINT8, "Tbias": types_pb2.DT_FLOAT,
                       "Tout": types_pb2.DT_FLOAT}


@dataclasses.dataclass
class _Pattern:
    """One contraction and the epilogue nodes its quantized op absorbs."""

    contraction: node_def_pb2.NodeDef
    pad: Optional[node_def_pb2.NodeDef] = None     # a zero Pad folded into the convolution's padding_list
    bias: Optional[node_def_pb2.NodeDef] = None
    add: Optional[node_def_pb2.NodeDef] = None
    summand: Optional[str] = None          # the residual add's other input
    relu: Optional[node_def_pb2.NodeDef] = None

    @property
    def output(self) -> node_def_pb2.NodeDef:
        return self.relu or self.add or self.bias or self.contraction

    @property
    def input(self) -> str:
        return g.canonical_tensor((self.pad or self.contraction).input[0])

    def nodes(self) -> List[node_def_pb2.NodeDef]:
        return [n for n in (self.pad, self.contraction, self.bias, self.add, self.relu) if n is not None]


@dataclasses.dataclass(frozen=True)
class _QTensor:
    """A quantized tensor: the INT8 values and the tensors holding its float range."""

    values: str
    min: str
    max: str
    dtype: int


def calibration_tensors(graph_def: graph_pb2.GraphDef, plan: PrecisionPlan) -> List[str]:
    """The float tensors whose (min, max) the pass needs: pattern inputs, requantized outputs, summands."""
    index = g.GraphIndex(graph_def)
    wanted: List[str] = []
    for pattern in _patterns(index, plan):
        unsigned = _non_negative(pattern.input, index)
        op = pattern.contraction.op
        if op == "DepthwiseConv2dNative" and not unsigned:
            continue                                       # stays float: nothing to calibrate
        wanted.append(pattern.input)
        if op in BATCHED or (op == "MatMul" and not unsigned):
            continue                                       # _QuantizedMatMul to FP32: no output range
        wanted.append(g.canonical_tensor(pattern.output.name))
        if pattern.summand is not None:
            wanted.append(g.canonical_tensor(pattern.summand))
            # The convolution alone, in case the sum cannot be fused (a signed input or summand).
            wanted.append(g.canonical_tensor((pattern.bias or pattern.contraction).name))
    return list(dict.fromkeys(wanted))


def quantize(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Replace every eligible contraction pattern (and pools/concats between them) by chained INT8 ops."""
    spec = context.plan.quantization
    if spec is None:
        return graph_def
    out = g.copy_graph(graph_def)
    index = g.GraphIndex(out)
    builder = _Builder(index, spec)
    # A pattern is built at its last node, after everything it reads (a residual's other branch too).
    by_output = {p.output.name: p for p in _patterns(index, context.plan)}
    protected = context.plan.protected
    for node in index.topological_order():
        if node.name in by_output:
            builder.contraction(by_output[node.name])
        elif node.op in POOLS and node.name not in protected and _int8_allowed(node, context.plan):
            builder.pool(node)
        elif node.op == "ConcatV2" and node.name not in protected and _int8_allowed(node, context.plan):
            builder.concat(node)
        elif node.op == "Reshape" and node.name not in protected and _int8_allowed(node, context.plan):
            builder.reshape(node)
    if not builder.replaced:
        return graph_def
    context.int8_nodes.update(builder.replaced)
    kept = [n for n in out.node if n.name not in builder.removed]
    return g.rebuild(out, kept + builder.added)


# ------------------------------------------------------------------------------ matching

def _int8_allowed(node: node_def_pb2.NodeDef, plan: PrecisionPlan) -> bool:
    """INT8 among the precisions the plan allows the node (not forced or limited to BF16/FP32), and on the CPU."""
    return INT8 in plan.allowed(node.name, node.op) and g.on_cpu(node.device)


def _patterns(index: g.GraphIndex, plan: PrecisionPlan) -> List[_Pattern]:
    """Every quantizable contraction with its epilogue, in graph order."""
    protected = plan.protected
    found = []
    claimed: set = set()     # epilogue nodes already taken (a residual add joins two convolutions)
    for node in index.graph_def.node:
        if node.op not in CONTRACTIONS or node.name in protected or not _int8_allowed(node, plan):
            continue
        if node.attr["T"].type != types_pb2.DT_FLOAT or not _weight_ok(node, index):
            continue
        pattern = _grow(_Pattern(node), index, protected, plan, claimed)
        if node.op == "DepthwiseConv2dNative" and pattern.relu is None:
            continue   # TensorFlow's quantized depthwise ops requantize only after a ReLU
        claimed.update(n.name for n in pattern.nodes())
        found.append(pattern)
    return found


def _weight_ok(node: node_def_pb2.NodeDef, index: g.GraphIndex) -> bool:
    """Constant weights and attrs the quantized ops take (NHWC, SAME/VALID, plain MatMul)."""
    weight = index.nodes.get(g.node_name(node.input[1])) if len(node.input) > 1 else None
    if weight is None or weight.op != "Const":
        return False
    if node.op == "MatMul":
        return not node.attr["transpose_a"].b and not node.attr["transpose_b"].b
    if node.op in BATCHED:
        return not node.attr["adj_x"].b and not node.attr["adj_y"].b and \
            len(weight.attr["value"].tensor.tensor_shape.dim) == 2
    if node.attr["data_format"].s not in (b"", b"NHWC") or node.attr["padding"].s not in (b"SAME", b"VALID"):
        return False
    return list(node.attr["dilations"].list.i) in ([], [1, 1, 1, 1])


def _grow(pattern: _Pattern, index: g.GraphIndex, protected: frozenset, plan: PrecisionPlan,
          claimed: set) -> _Pattern:
    """Extend a contraction with its sole-reader BiasAdd, residual add (convolutions) and ReLU,
    none of them ``claimed`` by an earlier pattern."""
    node = pattern.contraction
    pattern.pad = _zero_pad(node, index, protected, plan, claimed)
    nxt = sole_reader(node, index, protected)
    if nxt is not None and nxt.op in BIAS_OPS and is_const(nxt.input[1], index) and _int8_allowed(nxt, plan):
        pattern.bias, node = nxt, nxt
        nxt = sole_reader(node, index, protected)
    if pattern.contraction.op == "Conv2D" and nxt is not None and nxt.op in ADD_OPS and len(nxt.input) == 2 \
            and _int8_allowed(nxt, plan) and nxt.name not in claimed:
        relu = sole_reader(nxt, index, protected)
        if relu is not None and relu.op == "Relu" and _int8_allowed(relu, plan):   # the fused sum needs the ReLU
            other = [s for s in nxt.input if g.node_name(s) != node.name]
            if len(other) == 1 and not other[0].startswith("^"):
                pattern.add, pattern.summand, node = nxt, other[0], nxt
                nxt = relu
    if nxt is not None and nxt.op in RELU_OPS and _int8_allowed(nxt, plan) and nxt.name not in protected:
        pattern.relu = nxt
    return pattern


def _zero_pad(conv: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset, plan: PrecisionPlan,
              claimed: set) -> Optional[node_def_pb2.NodeDef]:
    """A zero ``Pad`` of only H and W read by nothing but this VALID convolution (Keras' ZeroPadding2D)."""
    if conv.op == "MatMul" or conv.attr["padding"].s != b"VALID":
        return None
    pad = index.nodes.get(g.node_name(conv.input[0]))
    if pad is None or pad.op != "Pad" or pad.name in claimed or not _int8_allowed(pad, plan) or \
            not is_const(pad.input[1], index) or sole_reader(pad, index, protected) is not conv:
        return None
    paddings = np.asarray(g.const_value(index.nodes[g.node_name(pad.input[1])]))
    if paddings.shape != (4, 2) or paddings[0].any() or paddings[3].any():
        return None
    return pad


def _non_negative(tensor: str, index: g.GraphIndex, depth: int = 0) -> bool:
    """Provably >= 0: a ReLU-like op's output, or that moved, reshaped, max-pooled or concatenated."""
    producer = index.nodes.get(g.node_name(tensor))
    if producer is None or depth > 16:
        return False
    if producer.op in NON_NEGATIVE_OPS:
        return True
    if producer.op in SIGN_KEEPING_OPS:
        return _non_negative(g.canonical_tensor(producer.input[0]), index, depth + 1)
    if producer.op == "ConcatV2":
        values = [s for s in producer.input if not s.startswith("^")][:-1]
        return bool(values) and all(_non_negative(g.canonical_tensor(v), index, depth + 1) for v in values)
    return False


# ------------------------------------------------------------------------------ building

class _Builder:
    """Emits the quantized nodes for one graph; keeps which float tensors exist in INT8."""

    def __init__(self, index: g.GraphIndex, spec: QuantizationSpec):
        self.index = index
        self.spec = spec
        self.taken: Dict[str, object] = dict(index.nodes)
        self.quantized: Dict[str, _QTensor] = {}      # float tensor -> its INT8 form
        self.quantize_nodes: Dict[Tuple[str, int], _QTensor] = {}
        self.added: List[node_def_pb2.NodeDef] = []
        self.removed: set = set()
        self.replaced: set = set()

    # -------------------------------------------------------------- per node kind

    def contraction(self, pattern: _Pattern) -> None:
        """One quantized op for the pattern, or nothing when an input or range is missing."""
        op = pattern.contraction.op
        if op in BATCHED:
            self._batched_matmul(pattern)
            return
        if op == "MatMul" and not _non_negative(pattern.input, self.index):
            self._signed_matmul(pattern)
            return
        source = self._input(pattern.input, needs_unsigned=op != "Conv2D" or pattern.add is not None)
        if source is None and pattern.add is not None:
            # The fused residual sum needs a UINT8 input: quantize the convolution alone instead.
            pattern = dataclasses.replace(pattern, add=None, summand=None, relu=None)
            source = self._input(pattern.input, needs_unsigned=False)
        if source is None:
            return
        summand = None
        if pattern.add is not None:
            summand = self._input(g.canonical_tensor(pattern.summand), needs_unsigned=False)
            # TF's SignedSum op (INT8 summand) was measured to add ~6e-2 to ResNet50's output
            # error (1.5e-2 with those adds in float): keep a signed residual outside. A summand
            # that is also the convolution's input crashes TensorFlow's fused sum (it writes the
            # output over the summand while the convolution still reads it): keep that outside too.
            if summand is None or summand.dtype != QUINT8 or summand.values == source.values:
                pattern = dataclasses.replace(pattern, add=None, summand=None, relu=None)
                summand = None
        out_range = self._range(g.canonical_tensor(pattern.output.name))
        if out_range is None:
            return
        relu = pattern.relu is not None
        low, high = out_range
        float_out = op == "MatMul" and not relu      # TF's quantized MatMul requantizes only to UINT8
        if relu:
            out_type, out_min, out_max = QUINT8, 0.0, max(high, 1e-6)
            if pattern.relu.op == "Relu6":
                out_max = min(out_max, RELU6_MAX)
        else:
            out_type = QINT8
            out_max = max(abs(low), abs(high), 1e-6)
            out_min = -out_max
        op_type = _quantized_op(op, relu, summand)
        attrs = _type_attrs(op, source.dtype, types_pb2.DT_FLOAT if float_out else out_type,
                            summand.dtype if summand is not None else None)
        if not g.has_cpu_kernel(op_type, attrs):
            return
        name = pattern.output.name if float_out else self._name(f"{pattern.output.name}/int8")
        weights, w_min, w_max = self._weights(pattern)
        bias = self._bias(pattern)
        device = pattern.contraction.device
        inputs = [source.values, weights, bias, source.min, source.max, w_min, w_max,
                  self._scalar(f"{name}/min_output", out_min, device), self._scalar(f"{name}/max_output", out_max, device)]
        if summand is not None:
            inputs += [summand.values, summand.min, summand.max]
        node = g.make_node(op_type, name, inputs, device=device)
        _copy_attrs(pattern.contraction, node)
        if pattern.pad is not None:
            paddings = g.const_value(self.index.nodes[g.node_name(pattern.pad.input[1])])
            node.attr["padding_list"].list.i.extend(int(v) for v in np.asarray(paddings).reshape(-1))
        for key, dtype in attrs.items():
            node.attr[key].type = dtype
        if op == "MatMul":
            node.attr["input_quant_mode"].s = b"SCALED"
        self.added.append(node)
        removed = [n.name for n in pattern.nodes()]
        if float_out:   # the op's float output is the pattern's result under the same name
            self.removed.update(removed)
            self.replaced.update(removed)
            return
        self._replace(pattern.output, removed, _QTensor(name, f"{name}:1", f"{name}:2", out_type))

    def _signed_matmul(self, pattern: _Pattern) -> None:
        """A MatMul of a signed activation: INT8 x INT8 with the bias and the dequantization fused
        (``_QuantizedMatMul``, FP32 output under the pattern's name); a ReLU after it stays float."""
        if not g.has_cpu_kernel(SIGNED_MATMUL, SIGNED_MATMUL_ATTRS):
            return
        source = self._input(pattern.input, needs_unsigned=False)
        if source is None or source.dtype != QINT8:
            return
        pattern = dataclasses.replace(pattern, relu=None)    # the fused op has no ReLU: it stays float
        self._emit_signed_matmul(pattern, source, pattern.output.name)

    def _batched_matmul(self, pattern: _Pattern) -> None:
        """A BatchMatMul of a [..., K] activation by a constant [K, N] weight (BERT's attention
        projections) as rows x weight: Reshape to [-1, K] (shared by every projection of the same
        input, with its QuantizeV2), ``_QuantizedMatMul``, Reshape back to [..., N] under the
        pattern's name."""
        if not g.has_cpu_kernel(SIGNED_MATMUL, SIGNED_MATMUL_ATTRS):
            return
        pattern = dataclasses.replace(pattern, relu=None)
        value_range = self._range(pattern.input)
        if value_range is None:
            return
        k, n = (int(d.size) for d in self.index.nodes[g.node_name(pattern.contraction.input[1])]
                .attr["value"].tensor.tensor_shape.dim)
        device = pattern.contraction.device
        source = self._rows(pattern.input, k, value_range, device)
        product = self._name(f"{pattern.output.name}/int8_rows")
        self._emit_signed_matmul(pattern, source, product)
        shape = self._name(f"{pattern.output.name}/int8_shape")
        self.added.append(_node("Shape", shape, [pattern.input], device, T=types_pb2.DT_FLOAT,
                                out_type=types_pb2.DT_INT32))
        lead = self._name(f"{pattern.output.name}/int8_leading_dims")
        slice_node = _node("StridedSlice", lead, [shape, self._ints(f"{lead}/begin", [0], device),
                                                  self._ints(f"{lead}/end", [-1], device),
                                                  self._ints(f"{lead}/strides", [1], device)],
                           device, T=types_pb2.DT_INT32, Index=types_pb2.DT_INT32)
        self.added.append(slice_node)
        full = self._name(f"{pattern.output.name}/int8_out_shape")
        self.added.append(_node("ConcatV2", full, [lead, self._ints(f"{full}/last", [n], device),
                                                   self._ints(f"{full}/axis", 0, device)],
                                device, T=types_pb2.DT_INT32, Tidx=types_pb2.DT_INT32, N=2))
        self.added.append(_node("Reshape", pattern.output.name, [product, full], device, T=types_pb2.DT_FLOAT,
                                Tshape=types_pb2.DT_INT32))

    def _rows(self, tensor: str, k: int, value_range: Tuple[float, float], device: str) -> _QTensor:
        """``tensor`` reshaped to [-1, k] and quantized to symmetric INT8, once per tensor."""
        key = (f"{tensor}/rows{k}", QINT8)
        if key not in self.quantize_nodes:
            rows = self._name(f"{g.node_name(tensor)}/int8_rows_{k}")
            self.added.append(_node("Reshape", rows, [tensor, self._ints(f"{rows}/shape", [-1, k], device)],
                                    device, T=types_pb2.DT_FLOAT, Tshape=types_pb2.DT_INT32))
            self.quantize_nodes[key] = self._quantize_v2(rows, QINT8, value_range, device)
        return self.quantize_nodes[key]

    def _emit_signed_matmul(self, pattern: _Pattern, source: _QTensor, name: str) -> None:
        """``_QuantizedMatMul`` named ``name`` for the pattern's contraction and bias; drops the pattern's nodes."""
        weights, w_min, w_max = self._weights(pattern)
        inputs = [source.values, weights, self._bias(pattern), source.min, source.max, w_min, w_max]
        node = g.make_node(SIGNED_MATMUL, name, inputs, device=pattern.contraction.device)
        for key, dtype in SIGNED_MATMUL_ATTRS.items():
            node.attr[key].type = dtype
        node.attr["U"].type = types_pb2.DT_FLOAT
        node.attr["Thost_inputs"].list.type.extend([QINT8, QINT8] + [types_pb2.DT_FLOAT] * 5)
        node.attr["Thost_outputs"].list.type.append(types_pb2.DT_FLOAT)
        node.attr["Tdevice_inputs"].list.SetInParent()
        node.attr["Tdevice_outputs"].list.SetInParent()
        node.attr["fused_ops"].list.s.extend([b"BiasAdd", b"Dequantize"])
        node.attr["input_quant_mode"].s = node.attr["output_quant_mode"].s = b"SCALED"
        if pattern.contraction.op == "MatMul":
            _copy_attrs(pattern.contraction, node)
        self.added.append(node)
        self.removed.update(n.name for n in pattern.nodes())
        self.replaced.update(n.name for n in pattern.nodes())

    def pool(self, node: node_def_pb2.NodeDef) -> None:
        """A pool of an INT8 tensor pools the INT8 values; the range passes through."""
        source = self.quantized.get(g.canonical_tensor(node.input[0]))
        if source is None or node.attr["data_format"].s not in (b"", b"NHWC"):
            return
        name = self._name(f"{node.name}/int8")
        pooled = g.make_node(POOLS[node.op], name, [source.values, source.min, source.max], device=node.device)
        pooled.attr["T"].type = source.dtype
        for key in ("ksize", "strides", "padding"):
            pooled.attr[key].CopyFrom(node.attr[key])
        self.added.append(pooled)
        self._replace(node, [node.name], _QTensor(name, f"{name}:1", f"{name}:2", source.dtype))

    def reshape(self, node: node_def_pb2.NodeDef) -> None:
        """A Reshape of an INT8 tensor (e.g. Flatten before a Dense) reshapes the INT8 values."""
        source = self.quantized.get(g.canonical_tensor(node.input[0]))
        attrs = {"T": source.dtype} if source is not None else {}
        if source is None or not g.has_cpu_kernel("QuantizedReshape", attrs):
            return
        name = self._name(f"{node.name}/int8")
        reshaped = g.make_node("QuantizedReshape", name, [source.values, node.input[1], source.min, source.max],
                               device=node.device)
        reshaped.attr["T"].type = source.dtype
        reshaped.attr["Tshape"].CopyFrom(node.attr["Tshape"])
        self.added.append(reshaped)
        self._replace(node, [node.name], _QTensor(name, f"{name}:1", f"{name}:2", source.dtype))

    def concat(self, node: node_def_pb2.NodeDef) -> None:
        """A concat whose inputs are all INT8 of one dtype concatenates INT8 (one output range)."""
        values = [s for s in node.input if not s.startswith("^")]
        parts = [self.quantized.get(g.canonical_tensor(s)) for s in values[:-1]]
        if not parts or any(p is None for p in parts) or len({p.dtype for p in parts}) != 1:
            return
        name = self._name(f"{node.name}/int8")
        inputs = [p.values for p in parts] + [values[-1]] + [p.min for p in parts] + [p.max for p in parts]
        joined = g.make_node("QuantizedConcatV2", name, inputs, device=node.device)
        joined.attr["N"].i = len(parts)
        joined.attr["T"].type = parts[0].dtype
        joined.attr["Tidx"].CopyFrom(node.attr["Tidx"])
        self.added.append(joined)
        self._replace(node, [node.name], _QTensor(name, f"{name}:1", f"{name}:2", parts[0].dtype))

    # -------------------------------------------------------------- helpers

    def _input(self, tensor: str, needs_unsigned: bool) -> Optional[_QTensor]:
        """The INT8 form of a float tensor: a chained producer's output, or a (shared) QuantizeV2."""
        known = self.quantized.get(tensor)
        if known is not None:
            return known if (known.dtype == QUINT8 or not needs_unsigned) else None
        value_range = self._range(tensor)
        if value_range is None:
            return None
        unsigned = _non_negative(tensor, self.index)
        if needs_unsigned and not unsigned:
            return None
        dtype = QUINT8 if unsigned else QINT8
        key = (tensor, dtype)
        if key not in self.quantize_nodes:
            producer = self.index.nodes[g.node_name(tensor)]
            self.quantize_nodes[key] = self._quantize_v2(tensor, dtype, value_range, producer.device)
        return self.quantize_nodes[key]

    def _quantize_v2(self, tensor: str, dtype: int, value_range: Tuple[float, float], device: str) -> _QTensor:
        """A QuantizeV2 (SCALED) of ``tensor``: [0, max] for UINT8, symmetric for INT8."""
        low, high = value_range
        top = max(abs(low), abs(high), 1e-6)
        name = self._name(f"{g.node_name(tensor)}/quantize")
        node = g.make_node("QuantizeV2", name,
                           [tensor, self._scalar(f"{name}/min", 0.0 if dtype == QUINT8 else -top, device),
                            self._scalar(f"{name}/max", top, device)], device=device)
        node.attr["T"].type = dtype
        node.attr["mode"].s = b"SCALED"
        node.attr["round_mode"].s = b"HALF_TO_EVEN"
        self.added.append(node)
        return _QTensor(name, f"{name}:1", f"{name}:2", dtype)

    def _range(self, tensor: str) -> Optional[Tuple[float, float]]:
        found = self.spec.ranges.get(tensor)
        if found is None:
            return None
        low, high = float(found[0]), float(found[1])
        return (low, high) if np.isfinite(low) and np.isfinite(high) else None

    def _weights(self, pattern: _Pattern) -> Tuple[str, str, str]:
        """(qint8 weight Const, min Const, max Const), symmetric, per output channel unless per tensor."""
        node = pattern.contraction
        weight_node = self.index.nodes[g.node_name(node.input[1])]
        w = np.asarray(g.const_value(weight_node), np.float32)
        if self.spec.weight_granularity == "per_tensor" or node.op == "MatMul" or node.op in BATCHED:
            # TensorFlow's quantized MatMuls take one weight range
            top = np.array(max(float(np.abs(w).max()), 1e-8), np.float32)
        else:
            top = np.maximum(np.abs(w.reshape(-1, w.shape[-1] if node.op != "DepthwiseConv2dNative" else
                                               w.shape[-2] * w.shape[-1])).max(axis=0), 1e-8).astype(np.float32)
        flat_top = top if top.ndim == 0 else top.reshape(w.shape[-1] if node.op != "DepthwiseConv2dNative"
                                                         else w.shape[-2:])
        levels = self.spec.weight_max
        q = np.clip(np.round(w / flat_top * levels), -levels, levels).astype(np.int8)
        name = self._name(f"{node.name}/weights_int8")
        const = g.make_const(name, q, dtype=QINT8, device=weight_node.device)
        self.added.append(const)
        # The ops map +-127 to the given range: with fewer levels the range widens to match.
        edge = top * (127.0 / levels)
        return (name, self._const(f"{name}/min", -edge, weight_node.device),
                self._const(f"{name}/max", edge, weight_node.device))

    def _bias(self, pattern: _Pattern) -> str:
        """The FP32 bias Const (zeros when the contraction has no BiasAdd)."""
        if pattern.bias is not None:
            return pattern.bias.input[1]
        weight = g.const_value(self.index.nodes[g.node_name(pattern.contraction.input[1])])
        channels = weight.shape[-1] if pattern.contraction.op != "DepthwiseConv2dNative" else \
            weight.shape[-2] * weight.shape[-1]
        return self._const(f"{pattern.contraction.name}/zero_bias", np.zeros(channels, np.float32),
                           pattern.contraction.device)

    def _replace(self, last: node_def_pb2.NodeDef, removed: Sequence[str], result: _QTensor) -> None:
        """Drop the float nodes; a Dequantize named like the last one serves any float reader."""
        self.removed.update(removed)
        self.replaced.update(removed)
        dequantize = g.make_node("Dequantize", last.name, [result.values, result.min, result.max], device=last.device)
        dequantize.attr["T"].type = result.dtype
        dequantize.attr["mode"].s = b"SCALED"
        dequantize.attr["dtype"].type = types_pb2.DT_FLOAT
        self.added.append(dequantize)
        self.quantized[g.canonical_tensor(last.name)] = result

    def _name(self, base: str) -> str:
        name = g.unique_name(self.taken, base)
        self.taken[name] = True
        return name

    def _ints(self, base: str, value, device: str) -> str:
        """An int32 Const (a shape, a slice bound, an axis)."""
        name = self._name(base)
        self.added.append(g.make_const(name, np.asarray(value, np.int32), device=device))
        return name

    def _scalar(self, base: str, value: float, device: str) -> str:
        return self._const(base, np.array(value, np.float32), device)

    def _const(self, base: str, value: np.ndarray, device: str) -> str:
        name = self._name(base)
        self.added.append(g.make_const(name, np.asarray(value, np.float32), device=device))
        return name


def _node(op: str, name: str, inputs: Sequence[str], device: str, **attrs) -> node_def_pb2.NodeDef:
    """A node whose attrs are type enums (ints) or an int ``N``."""
    node = g.make_node(op, name, inputs, device=device)
    for key, value in attrs.items():
        if key == "N":
            node.attr[key].i = value
        else:
            node.attr[key].type = value
    return node


def _quantized_op(op: str, relu: bool, summand: Optional[_QTensor]) -> str:
    """The TensorFlow quantized op for a contraction and its epilogue."""
    if op == "MatMul":
        return "QuantizedMatMulWithBiasAndReluAndRequantize" if relu else "QuantizedMatMulWithBiasAndDequantize"
    if op == "DepthwiseConv2dNative":
        return "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize"
    if summand is not None:     # UINT8 summands only (see Builder.contraction)
        return "QuantizedConv2DWithBiasSumAndReluAndRequantize"
    return "QuantizedConv2DWithBiasAndReluAndRequantize" if relu else "QuantizedConv2DWithBiasAndRequantize"


def _type_attrs(op: str, input_dtype: int, output_dtype: int, summand_dtype: Optional[int]) -> Dict[str, int]:
    """The type attrs of the quantized op for ``op`` (FP32 bias, INT8 weights)."""
    if op == "MatMul":
        return {"T1": input_dtype, "T2": QINT8, "Tbias": types_pb2.DT_FLOAT, "Toutput": output_dtype}
    attrs = {"Tinput": input_dtype, "Tfilter": QINT8, "Tbias": types_pb2.DT_FLOAT, "out_type": output_dtype}
    if summand_dtype is not None:
        attrs["Tsummand"] = summand_dtype
    return attrs


def _copy_attrs(contraction: node_def_pb2.NodeDef, node: node_def_pb2.NodeDef) -> None:
    """Strides, padding and dilations of a convolution; transposes of a MatMul."""
    keys = ("transpose_a", "transpose_b") if contraction.op == "MatMul" else ("strides", "padding", "dilations")
    for key in keys:
        if key in contraction.attr:
            node.attr[key].CopyFrom(contraction.attr[key])

