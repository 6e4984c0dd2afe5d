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
_ANY = frozenset(ALL_PRECISIONS)  # what a node the plan says nothing about may take


def _freeze_mapping(value: Optional[Mapping]) -> Mapping:
    return types.MappingProxyType(dict(value or {}))


def _freeze_allowed(where: str, value: Optional[Mapping[str, Iterable[str]]]) -> Mapping[str, FrozenSet[str]]:
    """``value`` with frozenset values; ValueError unless each set holds FP32 (the fallback) and one more precision."""
    frozen = {name: frozenset(precisions) for name, precisions in (value or {}).items()}
    bad = {name: sorted(s) for name, s in frozen.items()
           if not s <= _ANY or FP32 not in s or len(s) < 2}
    if bad:
        raise ValueError(f"{where}: each set must hold fp32 and at least one of {INT8}, {BF16} "
                         f"(one precision goes in node_precisions/op_type_precisions), got {bad}")
    return types.MappingProxyType(frozen)


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
    ``op_type_precisions`` force a precision; ``node_allowed`` and ``op_type_allowed`` instead
    limit a node to a set of precisions that includes FP32, the fallback: {bf16, fp32} keeps it
    out of INT8, {int8, fp32} out of BF16 (``allowed``). For a node, a forced precision beats an
    allowed set, and a node entry of either kind beats an op-type entry. With ``quantization``
    set, the INT8 stage quantizes every eligible node whose allowed precisions include INT8.
    """

    inputs: Tuple[str, ...] = ()
    outputs: Tuple[str, ...] = ()
    bf16_kernel_attrs: Optional[Mapping[str, FrozenSet[str]]] = None
    node_precisions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    op_type_precisions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    quantization: Optional[QuantizationSpec] = None
    node_allowed: Mapping[str, FrozenSet[str]] = dataclasses.field(default_factory=dict)
    op_type_allowed: Mapping[str, FrozenSet[str]] = dataclasses.field(default_factory=dict)

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
        for where in ("node_allowed", "op_type_allowed"):
            object.__setattr__(self, where, _freeze_allowed(where, getattr(self, where)))

    @property
    def protected(self) -> FrozenSet[str]:
        """Node names that must keep their name, op and dtype: the graph's inputs and outputs."""
        from tf_bf16.transforms.graph import node_name
        return frozenset(node_name(n) for n in self.inputs + self.outputs)

    def forced(self, node_name: str, op: str) -> Optional[str]:
        """The precision the user or tuner forced on a node, or None (also when its node entry is an allowed set)."""
        if node_name in self.node_precisions:
            return self.node_precisions[node_name]
        return None if node_name in self.node_allowed else self.op_type_precisions.get(op)

    def allowed(self, node_name: str, op: str) -> FrozenSet[str]:
        """The precisions a node may take: its forced one, else its allowed set, else those of its op type, else all."""
        for forced, sets, key in ((self.node_precisions, self.node_allowed, node_name),
                                  (self.op_type_precisions, self.op_type_allowed, op)):
            if key in forced:
                return frozenset({forced[key]})
            if key in sets:
                return sets[key]
        return _ANY

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
