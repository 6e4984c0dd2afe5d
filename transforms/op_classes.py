"""Every op-type fact the passes use, and the BF16 paint policy as data plus one function.

The one home of op knowledge: the paint classes and what each class does (``PAINT_RULES``),
the per-op refusal checks (``bf16_refusal``), FP32-only attrs, BF16-accumulating ops,
control flow, identity-like ops, sources, state and INT8 ops. A new op rule is a change here.

Which op types are worth, safe or unsafe to run in BF16: the paint lists of BF16Convert.

Four classes, as in TensorFlow's oneDNN auto-mixed-precision pass (TF 2.21 lists are the
fact base), with deliberate changes noted below:

* ALLOW - compute-bound ops (convolutions, matmuls) where BF16 is the point; always painted.
* INFER - arithmetic that runs BF16 inside a BF16 island (between ALLOW ops) and, for the
  epilogues in ``ISLAND_EPILOGUE_OPS``, one step after one; FP32 elsewhere.
* CLEAR - data movement and exact ops (selection, comparison, sign): BF16 whenever the tensor is.
* DENY  - numerically unsafe in BF16; stays FP32 unless the user forces it, and so do the
  INFER ops downstream of it (as in TensorFlow's AMP).

An op in no class (``op_class`` returns None) stays FP32: quantized ops, ``Cast`` (handled
by the converter itself), gradient/training-only ops, control flow (v1 Switch/Merge frames,
While/If functions) and TensorList ops, which the design keeps FP32.

Changes from TF 2.21's lists, and why:

* DENY gains Log, Log1p, LogSoftmax (TF: INFER): log near 1 and log-probabilities lose all
  significant digits in an 8-bit mantissa; tf_bf16 keeps Log/Exp nodes FP32 unless forced.
* DENY gains FloorDiv, FloorMod (TF: FloorDiv INFER): a rounding change moves the result by a
  whole unit; and Xlogy, Xlog1py, Lgamma, Digamma, Cumsum, Cumprod (TF: unlisted), whose
  error grows with the magnitude or length of the input.
* ALLOW gains the fused forms (_FusedMatMul, _FusedConv2D, _FusedConv3D,
  _FusedDepthwiseConv2dNative) because tf_bf16 may paint after fusion, and BatchMatMulV3;
  it keeps only the backprop-input convolutions (used by transposed-convolution layers at
  inference) and drops the backprop-filter ones, which only training graphs contain.
* INFER gains DivNoNan and MulNoNan (same arithmetic as RealDiv/Mul) and drops the *Grad ops.
* CLEAR drops control-flow, TensorList and *Grad ops and gains OneHot and Size.
* Sum/Mean/Prod stay INFER as in TF >= 2.12. TF 2.21's BF16 CPU Sum and Mean accumulate in
  FP32 (measured: 12,544 BF16 terms summed with only the output's rounding), so they may run
  BF16 at any length. Prod, AvgPool and AvgPool3D accumulate in BF16 (measured on TF 2.21's
  Eigen kernels, worst of 1,280 rows of values in [0.5, 1.5]: 9e-3 at 8 terms, 1.2e-2 at 16,
  2.6e-2 (AvgPool) and 3.8e-2 (Prod) at 64; a 1,024-term AvgPool window loses the whole
  result), so they are in
  ``BF16_ACCUMULATE_OPS``: the converter keeps such a node FP32 unless it provably reduces at
  most ``MAX_BF16_ACCUMULATION`` (9: a 3x3 pooling window stays within about 1e-2) terms.
  oneDNN's pooling (``_MklAvgPool``, AMX machines) accumulates in FP32; the limit is for the
  kernels every CPU has.

The converter must still confirm every paint with ``tf_bf16.capability.KernelRegistry``:
being listed here says an op is worth BF16, not that this TensorFlow build can run it.
``KERNEL_CHECK_OPS`` names the listed ops known to lack a valid BF16 CPU kernel in some
TensorFlow builds, TF 2.21 included.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from typing import Callable, Dict, FrozenSet, Mapping, Optional


class OpClass(enum.Enum):
    """The paint class of an op type (see the module docstring)."""

    ALLOW = "allow"
    INFER = "infer"
    CLEAR = "clear"
    DENY = "deny"


ALLOW_OPS: FrozenSet[str] = frozenset({
    "Conv2D", "Conv3D", "DepthwiseConv2dNative", "FusedPadConv2D",
    "Conv2DBackpropInput", "Conv3DBackpropInputV2", "DepthwiseConv2dNativeBackpropInput",
    "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum",
    "_FusedMatMul", "_FusedConv2D", "_FusedConv3D", "_FusedDepthwiseConv2dNative",
})

INFER_OPS: FrozenSet[str] = frozenset({
    # element-wise arithmetic
    "Add", "AddV2", "AddN", "Sub", "Mul", "MulNoNan", "RealDiv", "DivNoNan", "Reciprocal", "Inv",
    "Square", "SquaredDifference", "Sqrt", "Rsqrt",
    "BiasAdd", "BiasAddV1",
    # activations (Gelu has no op in TF 2.21: tf.nn.gelu is Mul/Erf/AddV2, or Mul/Pow/Tanh)
    "Tanh", "Sigmoid", "Erf", "Erfc", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "Softmax",
    # normalization (statistics attr U stays FP32: FP32_ONLY_ATTRS) and pooling
    "FusedBatchNormV2", "FusedBatchNormV3", "_FusedBatchNormEx",
    "AvgPool", "AvgPool3D",
    # reductions (see BF16_ACCUMULATE_OPS)
    "Sum", "Mean", "Prod",
})

CLEAR_OPS: FrozenSet[str] = frozenset({
    # exact element-wise ops: no rounding beyond the inputs'
    "Relu", "Relu6", "Abs", "Neg", "Sign", "Ceil", "Floor", "Round",
    "Maximum", "Minimum", "ClipByValue",
    "Equal", "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual",
    "IsFinite", "IsInf", "IsNan", "Select", "SelectV2", "Where",
    # selecting reductions
    "Max", "Min", "ArgMax", "ArgMin", "MaxPool", "MaxPoolV2", "MaxPool3D", "TopK", "TopKV2",
    # shape and data movement
    "Reshape", "Transpose", "Squeeze", "ExpandDims", "BroadcastTo", "Tile",
    "Concat", "ConcatV2", "Pack", "Unpack", "Split", "SplitV",
    "Slice", "StridedSlice", "Gather", "GatherV2", "GatherNd", "ScatterNd",
    "DynamicPartition", "DynamicStitch", "OneHot", "Fill", "ZerosLike", "OnesLike",
    "Pad", "PadV2", "MirrorPad", "Reverse", "ReverseV2", "ReverseSequence",
    "DepthToSpace", "SpaceToDepth", "BatchToSpace", "BatchToSpaceND", "SpaceToBatch",
    "SpaceToBatchND", "ResizeBilinear", "ResizeNearestNeighbor",
    # identities and shape readers
    "Identity", "IdentityN", "Snapshot", "StopGradient", "PreventGradient", "CheckNumerics",
    "EnsureShape", "Shape", "ShapeN", "Rank", "Size",
})

DENY_OPS: FrozenSet[str] = frozenset({
    "Exp", "Expm1", "Log", "Log1p", "LogSoftmax", "Pow", "Xlogy", "Xlog1py", "Lgamma", "Digamma",
    "FloorDiv", "FloorMod", "Cumsum", "Cumprod",
    "L2Loss", "SoftmaxCrossEntropyWithLogits", "SparseSoftmaxCrossEntropyWithLogits",
})

# INFER ops whose BF16 CPU kernels accumulate in BF16 (see the module docstring): FP32 unless
# the number of terms each output reduces is known and at most MAX_BF16_ACCUMULATION.
BF16_ACCUMULATE_OPS: FrozenSet[str] = frozenset({"Prod", "AvgPool", "AvgPool3D"})
MAX_BF16_ACCUMULATION = 9

# INFER ops that may follow a BF16 island one step out of it (outside islands INFER ops stay
# FP32): the linear epilogues TensorFlow's remapper fuses into _FusedConv2D/_FusedMatMul (bias,
# residual add, batch norm), whose fused BF16 kernels round once for the whole pattern.
# Nonlinear activations, reductions, Softmax and other arithmetic go BF16 only between islands.
ISLAND_EPILOGUE_OPS: FrozenSet[str] = frozenset({
    "BiasAdd", "BiasAddV1", "Add", "AddV2", "AddN", "FusedBatchNormV2", "FusedBatchNormV3", "_FusedBatchNormEx",
})

# Type attrs that may hold float32 but must stay FP32 even when the node goes BF16 (batch-norm
# scale/offset/mean/variance: the CPU kernels accept only float for U). Integer-only attrs
# (Tidx, Tshape, Tindices ...) never hold float32, so they need no entry.
FP32_ONLY_ATTRS: Mapping[str, FrozenSet[str]] = types.MappingProxyType({
    "FusedBatchNormV2": frozenset({"U"}),
    "FusedBatchNormV3": frozenset({"U"}),
    "_FusedBatchNormEx": frozenset({"U"}),
})

# Listed ops whose BF16 CPU support varies by TensorFlow build. In TF 2.21 the remapper's
# _FusedConv2D has a registered bf16 CPU kernel, but its OpDef does not allow bfloat16 for T,
# so a bf16 _FusedConv2D node fails validation: paint Conv2D before fusion instead.
KERNEL_CHECK_OPS: FrozenSet[str] = frozenset({"_FusedConv2D"})

# --------------------------------------------------------------------------------------
# Graph-structure facts every pass shares (control flow, identities, sources)
# --------------------------------------------------------------------------------------

# TF1 (v1) control flow: frames and deadness, so passes never fold, bypass or retype across them.
FRAME_ENTER_OPS: FrozenSet[str] = frozenset({"Enter", "RefEnter"})
FRAME_EXIT_OPS: FrozenSet[str] = frozenset({"Exit", "RefExit"})
COND_SWITCH_OPS: FrozenSet[str] = frozenset({"Switch", "RefSwitch"})
COND_MERGE_OPS: FrozenSet[str] = frozenset({"Merge", "RefMerge"})
V1_CONTROL_FLOW_OPS: FrozenSet[str] = (FRAME_ENTER_OPS | FRAME_EXIT_OPS | COND_SWITCH_OPS | COND_MERGE_OPS | frozenset({
    "_SwitchN", "NextIteration", "RefNextIteration", "LoopCond", "ControlTrigger"}))
# Function-calling ops (v2 control flow and calls): their arguments and results stay FP32 and
# their bodies are converted on their own.
CALL_OPS: FrozenSet[str] = frozenset({
    "PartitionedCall", "StatefulPartitionedCall", "While", "StatelessWhile", "If", "StatelessIf", "Case",
    "StatelessCase",
})
# Control-flow ops: deliberately in no paint class, so graphs with them keep those nodes FP32.
CONTROL_FLOW_OPS: FrozenSet[str] = V1_CONTROL_FLOW_OPS | CALL_OPS

# Single-input ops whose output is their input at inference time (looked through when
# matching patterns); PASS_THROUGH_OPS adds those that forward several inputs or check them.
IDENTITY_OPS: FrozenSet[str] = frozenset({"Identity", "StopGradient", "Snapshot", "PreventGradient"})
PASS_THROUGH_OPS: FrozenSet[str] = IDENTITY_OPS | frozenset({"IdentityN", "CheckNumerics"})

# Graph inputs: their value does not depend on other nodes, so they are never folded or dropped.
STATEFUL_SOURCE_OPS: FrozenSet[str] = frozenset({"Placeholder", "PlaceholderWithDefault", "PlaceholderV2", "_Arg"})
# Nodes BF16Convert never paints (sources; a Const feeding BF16 is converted offline instead).
SOURCE_OPS: FrozenSet[str] = frozenset({"Placeholder", "PlaceholderWithDefault", "Const"})

# Runtime data transfer (function returns, cross-device sends): never constant, never pure.
RUNTIME_IO_OPS: FrozenSet[str] = frozenset({"_Retval", "_Recv", "_Send", "_HostRecv", "_HostSend"})

# Ops that mean a graph still holds state to restore (variables, lookup tables, checkpoints).
STATE_OPS: FrozenSet[str] = frozenset({
    "VariableV2", "Variable", "VarHandleOp", "_VarHandlesOp", "ReadVariableOp", "AssignVariableOp", "Assign",
    "HashTableV2", "HashTable", "MutableHashTableV2", "MutableHashTableOfTensorsV2", "MutableDenseHashTableV2",
    "InitializeTableV2", "InitializeTableFromTextFileV2", "RestoreV2", "SaveV2",
})

# INT8 ops: QuantizeV2/Dequantize and every op whose name starts with a quantized prefix
# (TensorFlow's, and tf_bf16's INT8 kernel ops TfBf16QuantizedConv2D/MatMul).
QUANTIZE_OPS: FrozenSet[str] = frozenset({"QuantizeV2", "Dequantize"})
QUANTIZED_OP_PREFIXES = ("Quantized", "_Quantized", "_FusedQuantized", "TfBf16Quantized")


def is_int8_op(op: str) -> bool:
    """Whether op type ``op`` computes on or converts to quantized (INT8) tensors."""
    return op in QUANTIZE_OPS or op.startswith(QUANTIZED_OP_PREFIXES)


# Ops whose output saturates: BF16 error is measured at their input (the logits) when ranking.
SATURATING_OPS: FrozenSet[str] = frozenset({"Softmax", "Sigmoid"})


def _index(classes: Mapping[OpClass, FrozenSet[str]]) -> Mapping[str, OpClass]:
    """op -> class, refusing an op listed in two classes (an error in this module's data)."""
    out: Dict[str, OpClass] = {}
    for cls, ops in classes.items():
        for op in ops:
            if op in out:
                raise ValueError(f"op {op} is in both {out[op].name} and {cls.name}")
            out[op] = cls
    return types.MappingProxyType(out)


OPS_BY_CLASS: Mapping[OpClass, FrozenSet[str]] = types.MappingProxyType({
    OpClass.ALLOW: ALLOW_OPS,
    OpClass.INFER: INFER_OPS,
    OpClass.CLEAR: CLEAR_OPS,
    OpClass.DENY: DENY_OPS,
})

_CLASS_OF: Mapping[str, OpClass] = _index(OPS_BY_CLASS)


def op_class(op: str) -> Optional[OpClass]:
    """The paint class of op type ``op``; None for an unlisted op, which stays FP32."""
    return _CLASS_OF.get(op)


# --------------------------------------------------------------------------------------
# The paint policy: what each class does in BF16Convert, and the one per-op refusal check
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PaintRule:
    """How BF16Convert treats the ops of one class.

    ``seeds``: starts a BF16 island wherever nothing refuses it (ALLOW). ``joins``: may go
    BF16 between islands, and joins an FP32 region grown from a deny op or a statistic
    (INFER, CLEAR). ``exact``: rounds nothing beyond its inputs, so it follows an island both
    ways and is looked through (CLEAR). ``taints``: keeps the INFER ops that read it FP32 (DENY).
    """

    seeds: bool = False
    joins: bool = False
    exact: bool = False
    taints: bool = False

    @property
    def rounds(self) -> bool:
        """Joins islands but rounds its result (INFER): the op that anchors an FP32 region."""
        return self.joins and not self.exact


PAINT_RULES: Mapping[OpClass, PaintRule] = types.MappingProxyType({
    OpClass.ALLOW: PaintRule(seeds=True),
    OpClass.INFER: PaintRule(joins=True),
    OpClass.CLEAR: PaintRule(joins=True, exact=True),
    OpClass.DENY: PaintRule(taints=True),
})
UNLISTED_RULE = PaintRule()  # an op in no class stays FP32 and takes part in no rule

# Fused normalizations the clean-up writes (fuse_layer_norm): statistics and all stay FP32,
# since oneDNN cannot make a BF16 layer-norm primitive on AVX2-only CPUs (measured).
FP32_FUSED_NORM_OPS: FrozenSet[str] = frozenset({"_MklLayerNorm"})


def paint_rule(op: str) -> PaintRule:
    """The paint rule of op type ``op`` (``UNLISTED_RULE`` for an op in no class)."""
    cls = _CLASS_OF.get(op)
    return PAINT_RULES[cls] if cls is not None else UNLISTED_RULE


def bf16_refusal(op: str, attr: str, forced: Optional[str], opdef_allows_bf16: bool, kernel_has_bf16: bool,
                 terms: Callable[[], Optional[int]]) -> Optional[str]:
    """Why type attr ``attr`` of an ``op`` node may not be BF16, from op facts alone; None if it may.

    ``forced`` is the precision the plan forces on the node ("fp32", "bf16" or None);
    ``terms()`` counts what one output of a BF16-accumulating op sums (None if unknown) and
    is called only for such ops. The checks run in this order and the first one that fails names the reason.
    """
    cls = _CLASS_OF.get(op)
    if forced == "fp32":
        return "forced FP32 by config"
    if op in FP32_FUSED_NORM_OPS and forced != "bf16":
        return f"normalization statistics kept FP32 inside the fused {op} (one op, FP32 statistics)"
    if cls is None and forced != "bf16":
        return f"op {op} is not in tf_bf16's op lists"
    if cls is OpClass.DENY and forced != "bf16":
        return f"op {op} is numerically unsafe in BF16 (deny list)"
    if attr in FP32_ONLY_ATTRS.get(op, ()):
        return f"attr {attr} of {op} only runs in FP32"
    if not opdef_allows_bf16:
        return f"{op}'s OpDef does not allow bfloat16 for {attr}"
    if not kernel_has_bf16:
        return f"no CPU bfloat16 kernel for {op} (attr {attr}) in this TensorFlow"
    if op in BF16_ACCUMULATE_OPS and forced != "bf16":
        count = terms()
        if count is None or count > MAX_BF16_ACCUMULATION:
            return (f"{op} accumulates in BF16 on TensorFlow's CPU kernels and sums "
                    f"{count if count is not None else 'an unknown number of'} terms per output "
                    f"(BF16 only up to {MAX_BF16_ACCUMULATION})")
    return None
