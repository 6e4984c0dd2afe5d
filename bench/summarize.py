"""Markdown tables from the JSON lines the benchmarks write.

    python -m bench.summarize bench/results/2026-11-27-amd-epyc.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Sequence

from absl import app

_CATS = ("contraction", "cast", "elementwise", "norm_reduce", "pool", "data_movement", "other")


def read(paths: Iterable[str]) -> List[Dict[str, Any]]:
    """Every record of every file, in order."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records


def _fmt(value: Any) -> str:
    """A table cell: '-' for None, 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def model_table(records: Sequence[Dict[str, Any]]) -> str:
    """One row per model/batch/variant timing."""
    rows = [(r["model"], r["batch"], r["threads"], r["variant"], r["median_ms"], f"{r['p10_ms']:.4g}-{r['p90_ms']:.4g}",
             r["ratio_vs_fp32"], r["casts"], r["bf16_share"], r["nodes"], r["convert_seconds"], r["max_rel_err"])
            for r in records if r.get("kind") == "model"]
    return _table(("model", "batch", "threads", "variant", "median ms", "p10-p90 ms", "x FP32", "Casts", "BF16 share",
                   "nodes", "convert s", "max rel err"), rows)


def profile_table(records: Sequence[Dict[str, Any]]) -> str:
    """Per-op-category milliseconds per run, executed Casts and fused ops."""
    rows = []
    for r in records:
        if r.get("kind") != "op_profile":
            continue
        cats = [f"{r['categories'][c]['ms']:.3g} ({r['categories'][c]['share']:.0%})" for c in _CATS]
        fused = ", ".join(f"{k} {v}" for k, v in r["fused_ops"].items()) or "none"
        rows.append((r["model"], r["batch"], r["variant"], r["op_ms"], *cats, r["executed_casts"], fused))
    return _table(("model", "batch", "variant", "op ms", *_CATS, "Casts run", "fused/oneDNN ops executed"), rows)


def top_ops(records: Sequence[Dict[str, Any]], top: int = 6) -> str:
    """The heaviest executed op types (with dtype) of every profiled variant."""
    rows = []
    for r in records:
        if r.get("kind") == "op_profile":
            ops = "; ".join(f"{o['op']} x{o['count']} {o['ms']:.3g}" for o in r["top_ops"][:top])
            rows.append((r["model"], r["batch"], r["variant"], ops))
    return _table(("model", "batch", "variant", f"top {top} op types (count, ms per run)"), rows)


def speed_table(records: Sequence[Dict[str, Any]]) -> str:
    """Conversion throughput rows and the linearity summary."""
    rows = [(r["family"], r["nodes"], r["method"], r.get("gc", "default"), r["seconds"], r["nodes_per_second"])
            for r in records if r.get("kind") == "convert_speed"]
    lin = [(r["family"], r["method"], r.get("gc", "default"), r["exponent"],
            ", ".join(f"{k}: {v}" for k, v in r["us_per_node"].items()))
           for r in records if r.get("kind") == "convert_speed_linearity"]
    return (_table(("family", "nodes", "method", "gc", "seconds", "nodes/s"), rows) + "\n\n"
            + _table(("family", "method", "gc", "log-log exponent", "us per node by size"), lin))


def main(argv: Sequence[str]) -> None:
    """Print the tables for the JSON-lines files named on the command line."""
    records = read(argv[1:])
    kinds = {r.get("kind") for r in records}
    if "model" in kinds:
        print(model_table(records), end="\n\n")
    if "op_profile" in kinds:
        print(profile_table(records), end="\n\n")
        print(top_ops(records), end="\n\n")
    if kinds & {"convert_speed", "convert_speed_linearity"}:
        print(speed_table(records), end="\n\n")


if __name__ == "__main__":
    app.run(main)
