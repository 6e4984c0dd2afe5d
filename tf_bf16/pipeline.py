"""The conversion pipeline: clean-up, BF16Convert, cast folding.

One function the converter, the tuner and the benchmarks share, so every caller gets the
same graph for the same plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Any, Dict

from tensorflow.core.framework import graph_pb2

from tf_bf16.transforms import driver
from tf_bf16.transforms.bf16_convert import BF16Convert
from tf_bf16.transforms.fold_casts import fold_casts
from tf_bf16.transforms.function_bodies import convert_function_bodies
from tf_bf16.transforms.plan import PrecisionPlan


@dataclasses.dataclass
class ConversionResult:
    """The converted graph, the FP32-kept nodes with reasons, and timings."""

    graph_def: graph_pb2.GraphDef
    cleaned: graph_pb2.GraphDef
    fp32_reasons: Dict[str, str]
    bf16_nodes: frozenset
    seconds: Dict[str, float]
    consts_converted: int = 0
    functions: Dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> FunctionReport


def clean_up(graph_def: graph_pb2.GraphDef, plan: PrecisionPlan) -> graph_pb2.GraphDef:
    """Generic FP32 clean-up (strip, identities, constants, BatchNorm folding)."""
    return driver.run_transforms(graph_def, plan, driver.DEFAULT_CLEANUP)


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


def _convert_stages(graph_def: graph_pb2.GraphDef, plan: PrecisionPlan):
    """BF16Convert then cast folding on one graph (a model or a function body)."""
    converter = BF16Convert(graph_def, plan)
    converted = converter.do_transformation()
    folded = fold_casts(converted, plan)  # also drops nodes the Casts' removal left dead
    return folded, converter


def convert_cleaned(cleaned: graph_pb2.GraphDef, plan: PrecisionPlan) -> ConversionResult:
    """Stages 2 and 3 on an already cleaned graph (the tuner re-runs only these).

    Library functions (cond/while branches, PartitionedCall bodies) are converted too, each
    with FP32 arguments and results, so their callers need no change.
    """
    t0 = time.perf_counter()
    with _gc_paused():
        folded, converter = _convert_stages(cleaned, plan)
    reasons = {n: d.reason for n, d in converter.decisions.items() if d.precision == "fp32"}
    bf16 = set(n for n, d in converter.decisions.items() if d.precision == "bf16")
    functions: Dict[str, Any] = {}
    if folded.library.function:
        def body(graph_def, sub_plan):
            out, conv = _convert_stages(graph_def, sub_plan)
            return out, {n: (d.precision, d.reason) for n, d in conv.decisions.items()}

        with _gc_paused():
            folded, functions = convert_function_bodies(folded, plan, body)
    t1 = time.perf_counter()
    return ConversionResult(folded, cleaned, reasons, frozenset(bf16), {"convert": t1 - t0},
                            converter.consts_converted, functions)


def convert_graph(graph_def: graph_pb2.GraphDef, plan: PrecisionPlan) -> ConversionResult:
    """The whole pipeline for BF16: clean-up, then ``convert_cleaned``."""
    t0 = time.perf_counter()
    with _gc_paused():
        cleaned = clean_up(graph_def, plan)
    t1 = time.perf_counter()
    result = convert_cleaned(cleaned, plan)
    result.seconds["clean_up"] = t1 - t0
    return result
