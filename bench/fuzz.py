"""Fuzz at scale: tf_bf16 vs TensorFlow's AMP on thousands of seeded random float graphs.

The graphs and the per-graph check are the fuzz test's (``tests/random_graphs.py``,
``tests/test_fuzz.py``): convert, run, keep the interface, and stay within
max(1.25 x TF AMP's error, 1e-2) of FP32. This prints one ``fuzz_graph`` JSON line per
graph that failed (or every graph with ``--all``) and one ``fuzz_summary`` line: counts,
quantiles of both errors and of their ratio, how often tf_bf16 is the more accurate one,
and Casts in total.

    python -m bench.fuzz --start=0 --count=2000 --out=bench/results/fuzz.jsonl
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence

import numpy as np
from absl import app, flags, logging

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("start", 0, "First seed.", lower_bound=0)
flags.DEFINE_integer("count", 2000, "Number of graphs (seeds start .. start+count-1).", lower_bound=1)
flags.DEFINE_bool("all", False, "Print a line for every graph, not only the failing ones.")
flags.DEFINE_string("out", None, "Also write the JSON lines to this file (truncated first).")
flags.DEFINE_bool("kernels", False, "Convert with kernels=True (tf_bf16's fused kernel ops; the library must be built).")


def _quantiles(values: Sequence[float]) -> Dict[str, float]:
    if not values:
        return {}
    q = np.quantile(np.asarray(values, np.float64), [0.5, 0.9, 0.99, 1.0])
    return {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(q[3])}


def summarize(results: Sequence[Any], seconds: float) -> Dict[str, Any]:
    """Counts, error and ratio quantiles, win/loss against TF's AMP and Cast totals over ``results``."""
    ok = [r for r in results if r.status == "ok"]
    measurable = [r for r in ok if max(r.ours, r.tf_amp) > 1e-3 and r.tf_amp > 0]
    ratios = [r.ours / r.tf_amp for r in measurable]
    return {
        "graphs": len(results),
        "ok": len(ok),
        "refused": sum(r.status == "refused" for r in results),
        "skipped_non_finite_fp32": sum(r.status == "skipped" for r in results),
        "failed": sum(r.failed for r in results),
        "worse_than_allowed": sum(r.worse for r in results),
        "interface_changed": sum(bool(r.io_problems) for r in results),
        "error_tf_bf16": _quantiles([r.ours for r in ok]),
        "error_tf_amp": _quantiles([r.tf_amp for r in ok]),
        "above_1e-2": {"tf_bf16": sum(r.ours > 1e-2 for r in ok), "tf_amp": sum(r.tf_amp > 1e-2 for r in ok)},
        "ratio_tf_bf16_over_tf_amp": _quantiles(ratios),
        "tf_bf16_more_accurate_by_20pct": sum(x < 0.8 for x in ratios),
        "tf_bf16_less_accurate_by_20pct": sum(x > 1.25 for x in ratios),
        "casts": {"tf_bf16": int(sum(r.casts for r in ok)), "tf_amp": int(sum(r.tf_amp_casts for r in ok))},
        "seconds": round(seconds, 1),
    }


def main(argv: Sequence[str]) -> None:
    """Run the fuzz check on ``--count`` graphs; print failing graphs and a summary."""
    del argv
    common.configure_env()
    rg = common.tests_module("random_graphs")
    logging.set_verbosity(logging.WARNING)
    host = {k: v for k, v in common.host_info().fields().items() if k != "note"}
    results: List[Any] = []
    start = time.perf_counter()
    with common.JsonLines(FLAGS.out) as out:
        for seed in range(FLAGS.start, FLAGS.start + FLAGS.count):
            result = rg.compare(rg.random_graph(seed), kernels=FLAGS.kernels)
            results.append(result)
            if FLAGS.all or result.failed:
                out.emit({**host, "kind": "fuzz_graph", **result.to_dict()})
        out.emit({**host, "kind": "fuzz_summary", "kernels": FLAGS.kernels, "start": FLAGS.start, "draws_per_graph": rg.DRAWS,
                  **summarize(results, time.perf_counter() - start)})


if __name__ == "__main__":
    app.run(main)
