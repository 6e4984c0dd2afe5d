"""int8_kernels: put tf_bf16's INT8 kernel ops in place of TensorFlow's quantized contractions.

The INT8 stage (``quantize``) emits TensorFlow's quantized oneDNN ops, whose ranges travel
as min/max tensors beside every INT8 tensor. Where tf_bf16's kernel library is built, each
``QuantizedConv2DWithBias*AndRequantize``, ``QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize``,
``QuantizedMatMulWithBias*`` and ``_QuantizedMatMul`` becomes one ``TfBf16QuantizedConv2D`` /
``TfBf16QuantizedMatMul`` with the (calibrated, constant) ranges as attributes, and:

* a ``QuantizeV2`` feeding it is folded in: the op reads the float (or, through a
  ``Cast``, BF16) tensor and quantizes it itself; a quantized residual read from a
  ``QuantizeV2`` is read in float instead;
* a ``Dequantize`` that alone reads it is folded in: the op writes FP32 or BF16 (clipped to
  the range the INT8 output would have saturated at), under the Dequantize's name; a float
  output read only by a ``Cast`` to BF16 writes BF16 under the Cast's name;
* an INT8 output read by other INT8 ops stays INT8 under the node's name; its min/max
  outputs become Consts, so TensorFlow's quantized pools, reshapes and concats keep working;
* a float/BF16 output (no activation yet) read only by a residual Add of the same shape and
  type, then maybe a ReLU/ReLU6, takes those in too (the residual is added in FP32; the output
  is no longer clipped to the INT8 range, which only makes it closer to the float model).

Ranges are followed through QuantizeV2, the quantized pools, reshape and UINT8 concat and the
requantized ops to the Consts the INT8 stage wrote; a node whose ranges are not constant is left
as it is. Run after cast folding, before ``fuse_kernels``; the graph then needs ``tf_bf16.kernels``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
from absl import logging
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, types_pb2

from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import TransformContext
from tf_bf16.transforms.patterns import StaticShapes, grouped_depthwise_filter, residual_partner, sole_reader

CONV_OP = "TfBf16QuantizedConv2D"
MATMUL_OP = "TfBf16QuantizedMatMul"
QUINT8, QINT8 = types_pb2.DT_QUINT8, types_pb2.DT_QINT8
ADD_OPS = frozenset({"Add", "AddV2", "AddN"})
ACTIVATIONS = frozenset({"Relu", "Relu6"})
# TensorFlow's quantized contractions -> (kernel op, fused activation, output requantized).
CONVERSIONS: Dict[str, Tuple[str, Optional[str], bool]] = {
    "QuantizedConv2DWithBiasAndRequantize": (CONV_OP, None, True),
    "QuantizedConv2DWithBiasAndReluAndRequantize": (CONV_OP, "Relu", True),
    "QuantizedConv2DWithBiasSumAndReluAndRequantize": (CONV_OP, "Relu", True),
    "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize": (CONV_OP, "Relu", True),
    "QuantizedMatMulWithBiasAndReluAndRequantize": (MATMUL_OP, "Relu", True),
    "QuantizedMatMulWithBiasAndDequantize": (MATMUL_OP, None, False),
    "_QuantizedMatMul": (MATMUL_OP, None, False),
}
SUM_OP = "QuantizedConv2DWithBiasSumAndReluAndRequantize"
DEPTHWISE_OP = "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize"
# Inputs shared by all of them: values, filter, bias, then min/max of input and filter.
INPUT, FILTER, BIAS, MIN_INPUT, MAX_INPUT, MIN_FILTER, MAX_FILTER, MIN_OUTPUT, MAX_OUTPUT = range(9)
SUMMAND, MIN_SUMMAND, MAX_SUMMAND = 9, 10, 11
# Ops whose min/max outputs (ports 1 and 2) are their min/max inputs at these positions.
RANGE_PASSING = {"QuantizeV2": 1, "QuantizedMaxPool": 1, "QuantizedAvgPool": 1, "QuantizedReshape": 2,
                 **{op: MIN_OUTPUT for op, (_, _, requantized) in CONVERSIONS.items() if requantized}}


@dataclasses.dataclass
class _Kernel:
    """What one translated node becomes."""

    op: str
    name: str
    inputs: List[str]
    attrs: Dict[str, attr_value_pb2.AttrValue]
    replaced: List[str]          # original nodes it stands for (removed from the graph)
    range_consts: Dict[str, float] = dataclasses.field(default_factory=dict)   # "node:port" -> value


def int8_kernels(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Translate every quantized contraction with constant ranges into tf_bf16's INT8 kernel ops."""
    if not any(node.op in CONVERSIONS for node in graph_def.node):
        return graph_def
    if not _kernels_registered():
        logging.warning("tf_bf16: the kernel library has no INT8 ops (TfBf16Quantized*): rebuild it with "
                        "'python -m tf_bf16.kernels.build'; TensorFlow's quantized ops are kept")
        return graph_def
    out = g.copy_graph(graph_def)
    index = g.GraphIndex(out)
    taken: Dict[str, object] = dict(index.nodes)
    protected = context.plan.protected
    shapes = StaticShapes(graph_def)
    kernels: List[_Kernel] = []
    new_nodes: List[node_def_pb2.NodeDef] = []
    claimed: set = set()    # residual adds already taken (an add reads two branches)
    for node in out.node:
        if node.op in CONVERSIONS and node.name not in protected and g.on_cpu(node.device):
            kernel = _translate(node, index, protected, taken, new_nodes)
            if kernel is not None:
                _absorb_residual(kernel, index, protected, shapes, claimed)
                kernels.append(kernel)
    if not kernels:
        return graph_def
    renamed: Dict[str, str] = {}
    for kernel in kernels:
        for tensor, value in kernel.range_consts.items():
            name = g.unique_name(taken, f"{g.node_name(tensor)}/range_{tensor.rsplit(':', 1)[1]}")
            taken[name] = True
            new_nodes.append(g.make_const(name, np.array(value, np.float32), device=index[g.node_name(tensor)].device))
            renamed[tensor] = name
    removed = {name for kernel in kernels for name in kernel.replaced}
    nodes = [n for n in out.node if n.name not in removed]
    for kernel in kernels:
        device = index[kernel.replaced[0]].device
        nodes.append(g.make_node(kernel.op, kernel.name, kernel.inputs, kernel.attrs,
                                 device=device))
    for node in nodes + new_nodes:
        for i, spec in enumerate(node.input):
            if spec in renamed:
                node.input[i] = renamed[spec]
    context.kernel_nodes += len(kernels)
    return g.rebuild(out, nodes + new_nodes)


def _kernels_registered() -> bool:
    from tensorflow.python.framework import op_def_registry
    return op_def_registry.get(CONV_OP) is not None and op_def_registry.get(MATMUL_OP) is not None


# ------------------------------------------------------------------------------ ranges

def _scalar(spec: str, index: g.GraphIndex, depth: int = 0) -> Optional[float]:
    """The constant value of a scalar range tensor, followed through range-passing ops."""
    node = index.nodes.get(g.node_name(spec))
    if node is None or depth > 64:
        return None
    if node.op == "Const":
        value = np.asarray(g.const_value(node), np.float64)
        return float(value) if value.size == 1 else None
    _, port, _ = g.parse_input(spec)
    if node.op == "QuantizedConcatV2" and port in (1, 2):
        return _concat_bound(node, port, index, depth)
    first = RANGE_PASSING.get(node.op)
    if first is None or port not in (1, 2):
        return None
    return _scalar(node.input[first + port - 1], index, depth + 1)


def _concat_bound(node: node_def_pb2.NodeDef, port: int, index: g.GraphIndex, depth: int) -> Optional[float]:
    """A UINT8 ``QuantizedConcatV2``'s output min (port 1) or max (port 2): TensorFlow requantizes the
    inputs to [min(0, their mins), max(their maxes)] (measured). INT8 concats widen their range by
    QuantizeV2's 128/127 asymmetry at run time, so they are left unresolved."""
    if node.attr["T"].type != QUINT8:
        return None
    n = node.attr["N"].i
    data = [s for s in node.input if not s.startswith("^")]
    bounds = data[n + 1:2 * n + 1] if port == 1 else data[2 * n + 1:3 * n + 1]
    values = [_scalar(b, index, depth + 1) for b in bounds]
    if len(values) != n or any(v is None for v in values):
        return None
    return min([0.0] + values) if port == 1 else max(values)


def _range(node: node_def_pb2.NodeDef, low: int, high: int, index: g.GraphIndex) -> Optional[List[float]]:
    """[min, max] from two of ``node``'s range inputs, when both are constant."""
    values = [_scalar(node.input[low], index), _scalar(node.input[high], index)]
    return None if any(v is None for v in values) else values


def _scaled_range(dtype: int, bounds: List[float]) -> List[float]:
    """The range a SCALED-mode tensor of ``dtype`` really covers: [0, max] or symmetric."""
    top = max(abs(bounds[0]), abs(bounds[1]))
    return [0.0, top] if dtype == QUINT8 else [-top, top]


def _filter_scales(node: node_def_pb2.NodeDef, index: g.GraphIndex) -> Optional[List[float]]:
    """Per-channel (or one) weight steps: max(|min|, |max|) / 127 of the filter's range Consts."""
    bounds = []
    for position in (MIN_FILTER, MAX_FILTER):
        producer = index.nodes.get(g.node_name(node.input[position]))
        if producer is None or producer.op != "Const":
            return None
        bounds.append(np.abs(np.asarray(g.const_value(producer), np.float64)).reshape(-1))
    if bounds[0].shape != bounds[1].shape:
        return None
    return [float(v) for v in np.maximum(bounds[0], bounds[1]) / 127.0]


# ------------------------------------------------------------------------------ translation

def _translate(node: node_def_pb2.NodeDef, index: g.GraphIndex, protected: frozenset, taken: Dict[str, object],
               new_nodes: List[node_def_pb2.NodeDef]) -> Optional[_Kernel]:
    """The kernel op standing for ``node`` (and the QuantizeV2/Dequantize/Cast folded into it), or None."""
    kernel_op, activation, requantized = CONVERSIONS[node.op]
    filter_node = index.nodes.get(g.node_name(node.input[FILTER]))
    bias_node = index.nodes.get(g.node_name(node.input[BIAS]))
    if filter_node is None or filter_node.op != "Const" or bias_node is None or \
            _type_attr(node, ("Tbias",)) != types_pb2.DT_FLOAT or \
            node.attr["input_quant_mode"].s not in (b"", b"SCALED"):
        return None
    input_type = _type_attr(node, ("Tinput", "T1"))
    input_range = _range(node, MIN_INPUT, MAX_INPUT, index)
    scales = _filter_scales(node, index)
    if input_range is None or scales is None:
        return None
    source, source_type = _source(node.input[INPUT], input_type, index)
    attrs: Dict[str, attr_value_pb2.AttrValue] = {
        "Tinput": attr_value_pb2.AttrValue(type=source_type),
        "input_range": _floats(_scaled_range(input_type, input_range)),
        "filter_scales": _floats(scales),
        "weights_constant": attr_value_pb2.AttrValue(b=True),
    }
    args, arg_types, fused = [node.input[BIAS]], [types_pb2.DT_FLOAT], ["BiasAdd"]
    if node.op == SUM_OP:
        summand = _summand(node, index, attrs)
        if summand is None:
            return None
        args.append(summand[0])
        arg_types.append(summand[1])
        fused.append("Add")
    if activation:
        fused.append(activation)
    attrs["Targs"] = attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(type=arg_types))
    attrs["fused_ops"] = attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(
        s=[f.encode() for f in fused]))
    filter_input = node.input[FILTER]
    if kernel_op == CONV_OP:
        filter_input = _conv_attrs(node, filter_node, attrs, taken, new_nodes)
    else:
        for key in ("transpose_a", "transpose_b"):
            attrs[key] = attr_value_pb2.AttrValue(b=node.attr[key].b)
    kernel = _Kernel(kernel_op, node.name, [source, filter_input] + args, attrs, [node.name])
    if not _output(kernel, node, requantized, index, protected):
        return None
    controls = [s for s in node.input if s.startswith("^")]
    kernel.inputs.extend(controls)
    return kernel


def _type_attr(node: node_def_pb2.NodeDef, keys: Tuple[str, ...]) -> Optional[int]:
    for key in keys:
        if key in node.attr:
            return node.attr[key].type
    return None


def _floats(values: List[float]) -> attr_value_pb2.AttrValue:
    return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(f=values))


def _source(spec: str, dtype: int, index: g.GraphIndex) -> Tuple[str, int]:
    """The tensor the kernel reads for a quantized input: a QuantizeV2's float input (through a
    BF16->FP32 Cast, its BF16 input), else the quantized tensor itself."""
    producer = index.nodes.get(g.node_name(spec))
    _, port, _ = g.parse_input(spec)
    if producer is None or producer.op != "QuantizeV2" or port != 0 or producer.attr["mode"].s != b"SCALED":
        return spec, dtype
    if _range(producer, 1, 2, index) is None:
        return spec, dtype
    floating = producer.input[0]
    cast = index.nodes.get(g.node_name(floating))
    if cast is not None and cast.op == "Cast" and cast.attr["SrcT"].type == g.BFLOAT16 and \
            cast.attr["DstT"].type == g.FLOAT:
        return cast.input[0], g.BFLOAT16
    return floating, types_pb2.DT_FLOAT


def _summand(node: node_def_pb2.NodeDef, index: g.GraphIndex, attrs: Dict[str, attr_value_pb2.AttrValue]) -> Optional[Tuple[str, int]]:
    """The residual input and its type: the float tensor behind a QuantizeV2, else the quantized
    summand with its range in ``attrs``."""
    dtype = _type_attr(node, ("Tsummand",))
    source, source_type = _source(node.input[SUMMAND], dtype, index)
    if source_type in (QUINT8, QINT8):
        bounds = _range(node, MIN_SUMMAND, MAX_SUMMAND, index)
        if bounds is None:
            return None
        attrs["summand_range"] = _floats(_scaled_range(dtype, bounds))
    return source, source_type


def _conv_attrs(node: node_def_pb2.NodeDef, filter_node: node_def_pb2.NodeDef,
                attrs: Dict[str, attr_value_pb2.AttrValue], taken: Dict[str, object],
                new_nodes: List[node_def_pb2.NodeDef]) -> str:
    """Strides, padding (a folded Pad's padding_list as EXPLICIT), dilations and groups; the
    filter input (a depthwise filter re-shaped to the grouped layout, same bytes)."""
    attrs["strides"] = node.attr["strides"]
    if "dilations" in node.attr:
        attrs["dilations"] = node.attr["dilations"]
    pads = list(node.attr["padding_list"].list.i) if "padding_list" in node.attr else []
    if any(pads):
        attrs["padding"] = attr_value_pb2.AttrValue(s=b"EXPLICIT")
        attrs["explicit_paddings"] = attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(i=pads))
    else:
        attrs["padding"] = node.attr["padding"]
    if node.op != DEPTHWISE_OP:
        return node.input[FILTER]
    dims = [d.size for d in filter_node.attr["value"].tensor.tensor_shape.dim]
    attrs["groups"] = attr_value_pb2.AttrValue(i=int(dims[2]))
    grouped = grouped_depthwise_filter(filter_node, taken)
    new_nodes.append(grouped)
    return grouped.name


def _output(kernel: _Kernel, node: node_def_pb2.NodeDef, requantized: bool, index: g.GraphIndex,
            protected: frozenset) -> bool:
    """Set the kernel's output type, name and range; False when the output cannot be expressed."""
    if not requantized:   # FP32 out (dequantization fused); BF16 when only a Cast to BF16 reads it
        readers = index.consumers(node.name)
        kernel.attrs["Tout"] = attr_value_pb2.AttrValue(type=types_pb2.DT_FLOAT)
        if len(readers) == 1 and not index.control_consumers(node.name):
            cast = readers[0][0]
            if cast.op == "Cast" and cast.attr["DstT"].type == g.BFLOAT16 and cast.name not in protected and \
                    cast.device == node.device:
                kernel.attrs["Tout"] = attr_value_pb2.AttrValue(type=g.BFLOAT16)
                kernel.name = cast.name
                kernel.replaced.append(cast.name)
        return True
    out_type = _type_attr(node, ("out_type", "Toutput"))
    bounds = _range(node, MIN_OUTPUT, MAX_OUTPUT, index)
    if bounds is None or out_type not in (QUINT8, QINT8):
        return False
    out_range = _scaled_range(out_type, bounds)
    kernel.attrs["output_range"] = _floats(out_range)
    dequantize = _sole_dequantize(node, index, protected)
    if dequantize is not None:
        kernel.attrs["Tout"] = attr_value_pb2.AttrValue(type=_dequantized_type(dequantize))
        kernel.name = dequantize.name
        kernel.replaced.append(dequantize.name)
        return True
    kernel.attrs["Tout"] = attr_value_pb2.AttrValue(type=out_type)
    kernel.range_consts = {g.tensor_name(node.name, 1): out_range[0], g.tensor_name(node.name, 2): out_range[1]}
    return True


def _sole_dequantize(node: node_def_pb2.NodeDef, index: g.GraphIndex,
                     protected: frozenset) -> Optional[node_def_pb2.NodeDef]:
    """The SCALED Dequantize (to FP32 or BF16) that is the only reader of every output of ``node``."""
    readers = {reader.name: reader for reader, _ in index.consumers(node.name)}
    if len(readers) != 1 or index.control_consumers(node.name):
        return None
    (reader,) = readers.values()
    ok = reader.op == "Dequantize" and reader.attr["mode"].s == b"SCALED" and reader.name not in protected and \
        _dequantized_type(reader) in (types_pb2.DT_FLOAT, g.BFLOAT16) and reader.device == node.device and \
        [g.canonical_tensor(s) for s in reader.input[:3]] == [g.tensor_name(node.name, p) for p in range(3)]
    return reader if ok else None


def _dequantized_type(dequantize: node_def_pb2.NodeDef) -> int:
    """A Dequantize's output type (its ``dtype`` attr, FP32 when unset)."""
    return dequantize.attr["dtype"].type if "dtype" in dequantize.attr else types_pb2.DT_FLOAT


def _absorb_residual(kernel: _Kernel, index: g.GraphIndex, protected: frozenset, shapes: StaticShapes,
                     claimed: set) -> None:
    """Fuse the residual Add (and a ReLU after it) that alone read a float kernel output."""
    out_type = kernel.attrs["Tout"].type
    fused = [f.decode() for f in kernel.attrs["fused_ops"].list.s]
    if out_type not in (types_pb2.DT_FLOAT, g.BFLOAT16) or "Add" in fused or set(fused) & ACTIVATIONS:
        return
    add = sole_reader(index[kernel.name], index, protected)
    if add is None or add.op not in ADD_OPS or add.name in protected or add.name in claimed or \
            add.attr["T"].type != out_type or add.device != index[kernel.replaced[0]].device:
        return
    other = residual_partner(add, kernel.name, index, shapes)
    if other is None:
        return
    claimed.add(add.name)
    first_control = next((i for i, s in enumerate(kernel.inputs) if s.startswith("^")), len(kernel.inputs))
    kernel.inputs.insert(first_control, other)
    kernel.attrs["Targs"].list.type.append(out_type)
    fused.append("Add")
    kernel.replaced.append(add.name)
    kernel.name = add.name
    kernel.attrs.pop("output_range", None)
    kernel.inputs.extend(s for s in add.input if s.startswith("^") and s not in kernel.inputs)
    relu = sole_reader(add, index, protected)
    if relu is not None and relu.op in ACTIVATIONS and relu.attr["T"].type == out_type and relu.device == add.device:
        fused.append(relu.op)
        kernel.replaced.append(relu.name)
        kernel.name = relu.name
    kernel.attrs["fused_ops"] = attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(
        s=[f.encode() for f in fused]))
