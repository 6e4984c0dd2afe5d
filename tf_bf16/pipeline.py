"""The conversion pipeline: registered passes by name, in stages.

Stages run in order: generic FP32 clean-up, INT8 generation (only for a plan with calibrated
ranges: ``tf_bf16.quantization``), BF16 painting (left out for INT8 + FP32), cast folding, the
optional kernel rewrite (tf_bf16's fused oneDNN ops, only when asked for), then the library
functions' bodies (each body goes through the BF16 and cast-folding stages on its own). A new pass is one file in
``transforms/``, one line in the driver's registry and its name in a stage here. The
converter, the tuner, the CLI and the benchmarks all call this module, so every caller gets
the same graph for the same plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Dict, Mapping, Tuple

from tensorflow.core.framework import graph_pb2

from tf_bf16.transforms import driver
from tf_bf16.transforms.context import FunctionReport, TransformContext
from tf_bf16.transforms.plan import PrecisionPlan

# Strip again at the end of clean-up to drop what folding left unreferenced.
CLEAN_UP: Tuple[str, ...] = ("strip_unused", "remove_identity", "fold_constants", "fold_batch_norms", "sink_reshapes",
                             "residual_addn", "fuse_layer_norm", "transpose_matmul", "strip_unused")
INT8: Tuple[str, ...] = ("quantize", "strip_unused")   # only when the plan carries calibrated ranges
BF16: Tuple[str, ...] = ("bf16_convert",)
CAST_FOLDING: Tuple[str, ...] = ("fold_casts",)  # also drops nodes the Casts' removal left dead
# Only with kernels=True: the graph then needs tf_bf16.kernels. int8_kernels does nothing
# without the INT8 stage's ops; strip_unused drops the QuantizeV2s it folded.
KERNELS: Tuple[str, ...] = ("int8_kernels", "strip_unused", "fuse_kernels")
FUNCTION_BODIES: Tuple[str, ...] = ("convert_function_bodies",)


def body_transforms(bf16: bool = True) -> Tuple[str, ...]:
    """The passes applied to each library function body: BF16 painting (when on) and cast folding."""
    return (BF16 if bf16 else ()) + CAST_FOLDING


BODY_TRANSFORMS: Tuple[str, ...] = body_transforms()

STAGES: Mapping[str, Tuple[str, ...]] = {
    "clean_up": CLEAN_UP, "int8": INT8, "bf16": BF16, "cast_folding": CAST_FOLDING, "kernels": KERNELS,
    "function_bodies": FUNCTION_BODIES,
}


def conversion(kernels: bool = False, int8: bool = False, bf16: bool = True) -> Tuple[str, ...]:
    """The passes after clean-up (what the tuner re-runs), with the INT8 stage and the kernel
    rewrite when asked, and without BF16 painting for INT8 + FP32 (``bf16`` False).

    Cast folding stays either way: its rewrites are exact and also fold the Casts the model
    itself has (chains, duplicates), so INT8 + FP32 and INT8 + BF16 differ by the BF16 stage alone.
    """
    return (INT8 if int8 else ()) + (BF16 if bf16 else ()) + CAST_FOLDING + (KERNELS if kernels else ()) + \
        FUNCTION_BODIES


CONVERSION: Tuple[str, ...] = conversion()


@dataclasses.dataclass
class ConversionResult:
    """The converted graph, the FP32-kept nodes with reasons, and timings."""

    graph_def: graph_pb2.GraphDef
    cleaned: graph_pb2.GraphDef
    fp32_reasons: Dict[str, str]
    bf16_nodes: frozenset
    seconds: Dict[str, float]
    consts_converted: int = 0
    functions: Dict[str, FunctionReport] = dataclasses.field(default_factory=dict)
    kernel_nodes: int = 0
    int8_nodes: frozenset = frozenset()


def new_context(plan: PrecisionPlan, bf16: bool = True) -> TransformContext:
    """A fresh context for one pipeline run, with the body passes set (no BF16 painting when ``bf16`` is False)."""
    return TransformContext(plan, body_transforms=body_transforms(bf16))


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic GC while a pass allocates many protobuf objects (a third of the
    time on 20k-node graphs); restores the previous state, so nested use is safe."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run(graph_def: graph_pb2.GraphDef, context: TransformContext, names: Tuple[str, ...]) -> graph_pb2.GraphDef:
    """The registered passes ``names`` on ``graph_def``, with Python's GC paused."""
    with _gc_paused():
        return driver.run_transforms(graph_def, context, names)


def clean_up(graph_def: graph_pb2.GraphDef, plan: PrecisionPlan) -> graph_pb2.GraphDef:
    """Generic FP32 clean-up (strip, identities, constants, BatchNorm folding)."""
    return run(graph_def, new_context(plan), CLEAN_UP)


def convert_cleaned(cleaned: graph_pb2.GraphDef, plan: PrecisionPlan, kernels: bool = False,
                    bf16: bool = True) -> ConversionResult:
    """The stages after clean-up on an already cleaned graph (the tuner re-runs only these);
    ``bf16`` False leaves out BF16 painting (INT8 + FP32, for CPUs without ``avx512_bf16``).

    Library functions (cond/while branches, PartitionedCall bodies) are converted too, each
    with FP32 arguments and results, so their callers need no change.
    """
    t0 = time.perf_counter()
    context = new_context(plan, bf16)
    converted = run(cleaned, context, conversion(kernels, int8=plan.quantization is not None, bf16=bf16))
    return ConversionResult(converted, cleaned, context.fp32_reasons(), context.bf16_nodes(),
                            {"convert": time.perf_counter() - t0}, context.consts_converted, dict(context.functions),
                            context.kernel_nodes, frozenset(context.int8_nodes))


def convert_graph(graph_def: graph_pb2.GraphDef, plan: PrecisionPlan, kernels: bool = False,
                  bf16: bool = True) -> ConversionResult:
    """The whole pipeline: clean-up, then ``convert_cleaned``."""
    t0 = time.perf_counter()
    cleaned = clean_up(graph_def, plan)
    t1 = time.perf_counter()
    result = convert_cleaned(cleaned, plan, kernels, bf16)
    result.seconds["clean_up"] = t1 - t0
    return result
