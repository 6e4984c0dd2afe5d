"""Build the PrecisionPlan the passes take, from the model, the kernel registry and the config.

This is the one place where what TensorFlow can run (kernel registry), what the user asked
(op-wise and op-type-wise precisions) and what tuning forced come together.
"""

from __future__ import annotations

from typing import FrozenSet, Iterable, Mapping, Optional

from tensorflow.core.framework import graph_pb2

from tf_bf16.capability import KernelRegistry
from tf_bf16.transforms import op_classes
from tf_bf16.transforms.plan import PrecisionPlan


def build_plan(graph_def: graph_pb2.GraphDef, inputs: Iterable[str], outputs: Iterable[str],
               registry: Optional[KernelRegistry] = None,
               node_precisions: Optional[Mapping[str, str]] = None,
               op_type_precisions: Optional[Mapping[str, str]] = None,
               node_allowed: Optional[Mapping[str, FrozenSet[str]]] = None,
               op_type_allowed: Optional[Mapping[str, FrozenSet[str]]] = None) -> PrecisionPlan:
    """A plan whose BF16 kernel table covers every op in ``graph_def`` and in the paint lists.

    ``node_precisions``/``op_type_precisions`` force one precision, ``node_allowed``/``op_type_allowed``
    limit a node to a set of them (``PrecisionPlan``).

    The listed ops are included because clean-up passes may introduce them (BatchNorm
    folding adds BiasAdd) after the plan is built.
    """
    registry = registry or KernelRegistry()
    functions = {f.signature.name for f in graph_def.library.function}
    listed = set().union(*op_classes.OPS_BY_CLASS.values())
    ops = sorted(({n.op for n in graph_def.node} | listed) - functions)
    kernels = {op: registry.bf16_attrs(op) for op in ops}
    return PrecisionPlan(inputs=tuple(inputs), outputs=tuple(outputs), bf16_kernel_attrs=kernels,
                         node_precisions=dict(node_precisions or {}),
                         op_type_precisions=dict(op_type_precisions or {}),
                         node_allowed=dict(node_allowed or {}), op_type_allowed=dict(op_type_allowed or {}))
