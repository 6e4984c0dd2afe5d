"""What every pass receives besides the GraphDef, and the facts passes report back.

In the spirit of graph_transforms' ``TransformFuncContext``: a pass is
``fn(graph_def, context) -> graph_def``; it reads the precision plan from the context and
records what a caller needs to know (per-node precision decisions, converted Consts,
library-function reports) on it. One context serves one run of one pipeline on one graph.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

from tensorflow.core.framework import graph_pb2

from tf_bf16.transforms.plan import BF16, FP32, PrecisionPlan


@dataclasses.dataclass(frozen=True)
class Decision:
    """Final precision of one float node and, for FP32 ones, why."""

    precision: str
    reason: str = ""


@dataclasses.dataclass
class FunctionReport:
    """What happened to one library function."""

    converted: bool
    reason: str = ""
    bf16_nodes: int = 0
    casts: int = 0
    fp32_nodes: Dict[str, str] = dataclasses.field(default_factory=dict)


# run(graph_def, context, names) -> graph_def: how a pass that converts sub-graphs (function
# bodies) runs other registered passes; the driver fills it in.
Runner = Callable[[graph_pb2.GraphDef, "TransformContext", Sequence[str]], graph_pb2.GraphDef]


@dataclasses.dataclass
class TransformContext:
    """The plan a pass reads, and the facts passes record while the pipeline runs.

    ``body_transforms`` names the passes applied to each library function body;
    ``run`` is set by the driver so such a pass can apply them without importing it.
    """

    plan: PrecisionPlan
    body_transforms: Tuple[str, ...] = ()
    run: Optional[Runner] = None
    decisions: Dict[str, Decision] = dataclasses.field(default_factory=dict)
    consts_converted: int = 0
    kernel_nodes: int = 0
    int8_nodes: set = dataclasses.field(default_factory=set)   # float nodes the INT8 stage replaced
    functions: Dict[str, FunctionReport] = dataclasses.field(default_factory=dict)

    def for_body(self, inputs: Sequence[str], outputs: Sequence[str]) -> "TransformContext":
        """A fresh context for a function body: its arguments and results are the protected
        FP32 borders, and node-level precisions (names of the outer graph) do not apply."""
        plan = dataclasses.replace(self.plan, inputs=tuple(inputs), outputs=tuple(outputs), node_precisions={},
                                   node_allowed={})
        return TransformContext(plan, self.body_transforms, self.run)

    def fp32_reasons(self) -> Dict[str, str]:
        """Node -> reason for every float node BF16Convert kept FP32."""
        return {n: d.reason for n, d in self.decisions.items() if d.precision == FP32}

    def bf16_nodes(self) -> frozenset:
        """Names of the nodes BF16Convert made BF16."""
        return frozenset(n for n, d in self.decisions.items() if d.precision == BF16)
