"""The precision plan: the only thing the front end hands to the passes.

It says which tensors are the graph's inputs and outputs (never renamed, never retyped),
which op types this TensorFlow build can run in BF16 on the CPU (per type attribute), and
which nodes or op types the user or the tuner forced to a precision. Passes read nothing
else: no config files, no environment.
"""

from __future__ import annotations

import dataclasses
import types
from typing import FrozenSet, Iterable, Mapping, Optional, Tuple

FP32 = "fp32"
BF16 = "bf16"
INT8 = "int8"
PRECISIONS = (BF16, FP32)  # the float precisions; also the order of the config's normalised precision tuples
ALL_PRECISIONS = (INT8,) + PRECISIONS
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")


def _freeze_mapping(value: Optional[Mapping]) -> Mapping:
    return types.MappingProxyType(dict(value or {}))


@dataclasses.dataclass(frozen=True)
class QuantizationSpec:
    """What the INT8 stage needs: calibrated (min, max) per float tensor ("node:port") and weight options."""

    ranges: Mapping[str, Tuple[float, float]] = dataclasses.field(default_factory=dict)
    weight_granularity: str = "per_channel"
    # The largest INT8 weight magnitude used: 127, or 63 for CPUs without VNNI/AMX, whose
    # u8 x s8 dot products add pairs into saturating int16 (measured: a 768x3072 INT8 MatMul on
    # AVX2 has 9.4% relative error with 127, 1.4% with 63).
    weight_max: int = 127

    def __post_init__(self):
        object.__setattr__(self, "ranges", _freeze_mapping(self.ranges))
        if not 1 <= self.weight_max <= 127:
            raise ValueError(f"weight_max must be in [1, 127], got {self.weight_max}")
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {self.weight_granularity!r}")


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """Immutable input to every pass.

    ``bf16_kernel_attrs`` maps an op type to the type attributes for which a CPU BF16 kernel
    exists (from the kernel registry); None means "ask nobody, assume the op lists are
    right", which only tests of the pure algorithm use. ``node_precisions`` and
    ``op_type_precisions`` force a precision; a node entry beats an op-type entry. With
    ``quantization`` set, the INT8 stage quantizes every eligible node not forced to BF16/FP32.
    """

    inputs: Tuple[str, ...] = ()
    outputs: Tuple[str, ...] = ()
    bf16_kernel_attrs: Optional[Mapping[str, FrozenSet[str]]] = None
    node_precisions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    op_type_precisions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    quantization: Optional[QuantizationSpec] = None

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "node_precisions", _freeze_mapping(self.node_precisions))
        object.__setattr__(self, "op_type_precisions", _freeze_mapping(self.op_type_precisions))
        if self.bf16_kernel_attrs is not None:
            object.__setattr__(self, "bf16_kernel_attrs", _freeze_mapping(self.bf16_kernel_attrs))
        for where, mapping in (("node_precisions", self.node_precisions),
                               ("op_type_precisions", self.op_type_precisions)):
            bad = {k: v for k, v in mapping.items() if v not in ALL_PRECISIONS}
            if bad:
                raise ValueError(f"{where}: precisions must be one of {ALL_PRECISIONS}, got {bad}")

    @property
    def protected(self) -> FrozenSet[str]:
        """Node names that must keep their name, op and dtype: the graph's inputs and outputs."""
        from tf_bf16.transforms.graph import node_name
        return frozenset(node_name(n) for n in self.inputs + self.outputs)

    def forced(self, node_name: str, op: str) -> Optional[str]:
        """The precision the user or tuner forced on a node, or None."""
        return self.node_precisions.get(node_name) or self.op_type_precisions.get(op)

    def with_fp32(self, names: Iterable[str]) -> "PrecisionPlan":
        """A copy that also forces ``names`` to FP32 (what accuracy tuning does)."""
        merged = dict(self.node_precisions)
        merged.update({n: FP32 for n in names})
        return dataclasses.replace(self, node_precisions=merged)

    def kernel_has_bf16(self, op: str, attr: str) -> bool:
        """Whether the target TensorFlow has a CPU BF16 kernel for ``op`` on ``attr``."""
        if self.bf16_kernel_attrs is None:
            return True
        return attr in self.bf16_kernel_attrs.get(op, frozenset())
