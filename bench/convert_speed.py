"""Conversion throughput: tf_bf16 vs TensorFlow's Grappler AMP pass on graphs of 1k to 50k nodes.

Graphs are made by replicating one frozen-style block (a BERT encoder layer, or a ResNet
basic block of Conv2D/FusedBatchNormV3/Relu/AddV2) by GraphDef renaming, so every size has the
same real op mix; weights are small (hidden 64 / 16 channels) so the time measured is the
per-node work, not tensor bytes. Each line gives nodes, seconds and nodes/s of:

* ``tf_bf16_stages23``: ``pipeline.convert_cleaned`` (BF16Convert + cast folding) on the cleaned graph;
* ``tf_bf16_full``: ``build_plan`` + ``pipeline.convert_graph`` (clean-up included);
* ``tf_amp``: ``tf_amp.tf_amp_bf16`` (TensorFlow's auto_mixed_precision_onednn_bfloat16 alone).

A ``linearity`` line per family and method gives microseconds per node at every size and the
exponent of a log-log fit of seconds against nodes (1.0 = linear).

    python -m bench.convert_speed --sizes=1000,5000,10000,20000,50000
"""

from __future__ import annotations

import cProfile
import contextlib
import gc
import io
import math
import pstats
import time
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
from absl import app, flags, logging

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["1000", "5000", "10000", "20000", "50000"], "Target node counts.")
flags.DEFINE_list("families", ["bert", "cnn"], "Block families: bert, cnn.")
flags.DEFINE_list("methods", ["tf_bf16_stages23", "tf_bf16_full", "tf_amp"], "What to time.")
flags.DEFINE_integer("repeats", 1, "Timings per method and size (the fastest is reported).", lower_bound=1)
flags.DEFINE_integer("amp_max_nodes", 100000, "Skip tf_amp above this many nodes.")
flags.DEFINE_enum("gc", "default", ["default", "disabled"], "Python's cyclic GC during each timed call: "
                  "'disabled' shows what tf_bf16 would gain by pausing GC inside its passes.")
flags.DEFINE_string("out", None, "Also write the JSON lines to this file.")
flags.DEFINE_string("profile_out", None, "If set, cProfile tf_bf16_full on the --profile_nodes graph of each "
                    "family and write the top functions to PROFILE_OUT-FAMILY.txt.")
flags.DEFINE_integer("profile_nodes", 20000, "Graph size to profile.")

INPUT = "input"
OUTPUT = "output"
_TEMPLATE_IN = "x"
_TEMPLATE_OUT = "y"


# ------------------------------------------------------------------------------ blocks

def _const(tf: Any, rng: np.random.Generator, shape: Sequence[int], name: str, scale: float = 0.1) -> Any:
    """A weight as a frozen Keras graph has it: Const followed by Identity."""
    value = (rng.standard_normal(shape) * scale).astype(np.float32)
    return tf.identity(tf.constant(value, name=name), name=name + "/read")


def _dense(tf: Any, rng: np.random.Generator, x2d: Any, units: int, name: str) -> Any:
    """MatMul + BiasAdd with frozen-style weights."""
    kernel = _const(tf, rng, (int(x2d.shape[-1]), units), name + "/kernel")
    bias = _const(tf, rng, (units,), name + "/bias")
    return tf.nn.bias_add(tf.matmul(x2d, kernel), bias, name=name)


def _layer_norm(tf: Any, rng: np.random.Generator, x: Any, name: str) -> Any:
    """LayerNorm over the last axis as Keras decomposes it (moments, rsqrt, scale, shift)."""
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True, name=name + "/moments")
    gamma = _const(tf, rng, (int(x.shape[-1]),), name + "/gamma")
    beta = _const(tf, rng, (int(x.shape[-1]),), name + "/beta")
    return (x - mean) * tf.math.rsqrt(var + 1e-12) * gamma + beta


def bert_block(tf: Any, rng: np.random.Generator, x: Any, hidden: int = 64, heads: int = 4, seq: int = 16,
               intermediate: int = 256) -> Any:
    """One BERT encoder layer on x [batch, seq, hidden] from tf ops (MatMul, BatchMatMulV2, Softmax, Erf...)."""
    dh = hidden // heads
    flat = tf.reshape(x, [-1, hidden])

    def split_heads(t: Any) -> Any:
        """[batch*seq, hidden] -> [batch, heads, seq, head_dim]."""
        return tf.transpose(tf.reshape(t, [-1, seq, heads, dh]), [0, 2, 1, 3])

    q, k, v = (split_heads(_dense(tf, rng, flat, hidden, n)) for n in ("query", "key", "value"))
    scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(dh))
    context = tf.matmul(tf.nn.softmax(scores), v)
    context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [-1, hidden])
    attn = tf.reshape(_dense(tf, rng, context, hidden, "attention_output"), [-1, seq, hidden])
    x = _layer_norm(tf, rng, x + tf.identity(attn, name="dropout"), "attention_norm")
    ffn = tf.nn.gelu(_dense(tf, rng, tf.reshape(x, [-1, hidden]), intermediate, "intermediate"), approximate=False)
    ffn = tf.reshape(_dense(tf, rng, ffn, hidden, "output"), [-1, seq, hidden])
    return _layer_norm(tf, rng, x + tf.identity(ffn, name="output_dropout"), "output_norm")


def cnn_block(tf: Any, rng: np.random.Generator, x: Any, channels: int = 16) -> Any:
    """A ResNet basic block: (Conv2D, FusedBatchNormV3, Relu) x2 with an AddV2 residual."""
    def conv_bn(t: Any, name: str) -> Any:
        """3x3 Conv2D then inference FusedBatchNormV3."""
        conv = tf.nn.conv2d(t, _const(tf, rng, (3, 3, channels, channels), name + "/kernel"), 1, "SAME", name=name)
        params = [_const(tf, rng, (channels,), f"{name}/bn/{p}") for p in ("gamma", "beta", "mean")]
        var = tf.identity(tf.constant(np.ones(channels, np.float32), name=name + "/bn/var"), name=name + "/bn/var/read")
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(conv, params[0], params[1], params[2], var, is_training=False,
                                                   name=name + "/bn")
        return y
    y = tf.nn.relu(conv_bn(x, "conv1"))
    return tf.nn.relu(conv_bn(y, "conv2") + x)


BLOCKS: Dict[str, Tuple[Callable[..., Any], Tuple[int, ...]]] = {
    "bert": (bert_block, (None, 16, 64)),
    "cnn": (cnn_block, (None, 8, 8, 16)),
}


def template(family: str) -> Any:
    """The GraphDef of one block: Placeholder ``x`` -> block -> Identity ``y``."""
    import tensorflow as tf

    block, shape = BLOCKS[family]
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, shape, name=_TEMPLATE_IN)
        tf.identity(block(tf, np.random.default_rng(0), x), name=_TEMPLATE_OUT)
    return graph.as_graph_def()


def replicate(block: Any, nodes: int) -> Any:
    """A GraphDef of ``input`` -> enough copies of ``block`` chained to reach ~``nodes`` -> ``output``."""
    from tensorflow.core.framework import graph_pb2

    body = [n for n in block.node if n.name != _TEMPLATE_IN]
    placeholder = next(n for n in block.node if n.name == _TEMPLATE_IN)
    copies = max(1, round((nodes - 2) / len(body)))
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(block.versions)
    first = out.node.add()
    first.CopyFrom(placeholder)
    first.name = INPUT
    previous = INPUT
    for i in range(copies):
        prefix = f"block_{i}/"
        for node in body:
            new = out.node.add()
            new.CopyFrom(node)
            new.name = prefix + node.name
            del new.input[:]
            for ref in node.input:
                control = ref.startswith("^")
                name = ref[1:] if control else ref
                base = name.split(":")[0]
                target = previous + name[len(base):] if base == _TEMPLATE_IN else prefix + name
                new.input.append(("^" if control else "") + target)
        previous = prefix + _TEMPLATE_OUT
    last = out.node.add()
    last.name, last.op = OUTPUT, "Identity"
    last.input.append(previous)
    last.attr["T"].type = placeholder.attr["dtype"].type
    return out


# ------------------------------------------------------------------------------ timing

@contextlib.contextmanager
def _gc_paused(paused: bool) -> Iterator[None]:
    """Disable Python's cyclic garbage collector inside the block when ``paused``."""
    was_enabled = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused and was_enabled:
            gc.enable()


def _timed(fn: Callable[[], Any], repeats: int, gc_paused: bool = False) -> Tuple[float, Any]:
    """Fastest of ``repeats`` wall-clock timings of ``fn()`` in seconds, with that run's return value."""
    best, value = math.inf, None
    for _ in range(repeats):
        gc.collect()
        with _gc_paused(gc_paused):
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
        if elapsed < best:
            best, value = elapsed, result
    return best, value


def measure(graph_def: Any, methods: Sequence[str], repeats: int, amp_max_nodes: int,
            gc_paused: bool = False) -> Dict[str, Tuple[float, Dict[str, float]]]:
    """(seconds, seconds per stage) per method on ``graph_def`` (tf_amp skipped above ``amp_max_nodes``)."""
    from tf_bf16 import pipeline
    from tf_bf16.plan_builder import build_plan
    from tf_bf16.tf_amp import tf_amp_bf16

    def full() -> Dict[str, float]:
        """build_plan + convert_graph; returns seconds per stage."""
        start = time.perf_counter()
        plan = build_plan(graph_def, [INPUT], [OUTPUT])
        planned = time.perf_counter() - start
        return {"build_plan": planned, **pipeline.convert_graph(graph_def, plan).seconds}

    out: Dict[str, Tuple[float, Dict[str, float]]] = {}
    if "tf_bf16_stages23" in methods:
        plan = build_plan(graph_def, [INPUT], [OUTPUT])
        cleaned = pipeline.clean_up(graph_def, plan)
        seconds, result = _timed(lambda: pipeline.convert_cleaned(cleaned, plan), repeats, gc_paused)
        out["tf_bf16_stages23"] = (seconds, result.seconds)
    if "tf_bf16_full" in methods:
        out["tf_bf16_full"] = _timed(full, repeats, gc_paused)
    if "tf_amp" in methods and len(graph_def.node) <= amp_max_nodes:
        out["tf_amp"] = (_timed(lambda: tf_amp_bf16(graph_def, [OUTPUT]), repeats, gc_paused)[0], {})
    return out


def linearity(points: List[Tuple[int, float]]) -> Dict[str, Any]:
    """Microseconds per node at each size and the log-log slope of seconds vs nodes."""
    nodes = np.log([p[0] for p in points])
    secs = np.log([max(p[1], 1e-9) for p in points])
    slope = round(float(np.polyfit(nodes, secs, 1)[0]), 3) if len(points) > 1 else None
    return {"us_per_node": {str(n): round(s / n * 1e6, 2) for n, s in points}, "exponent": slope}


def profile(graph_def: Any, path: str, top: int = 40, gc_paused: bool = False) -> None:
    """cProfile the full tf_bf16 pipeline on ``graph_def``; write the top functions to ``path``."""
    from tf_bf16 import pipeline
    from tf_bf16.plan_builder import build_plan

    profiler = cProfile.Profile()
    gc.collect()
    with _gc_paused(gc_paused):
        profiler.enable()
        pipeline.convert_graph(graph_def, build_plan(graph_def, [INPUT], [OUTPUT]))
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# cProfile of build_plan + convert_graph on {len(graph_def.node)} nodes, "
                f"GC {'disabled' if gc_paused else 'on'}\n")
        f.write(text.getvalue())


def main(argv: Sequence[str]) -> None:
    """Time every method on every family and size; print JSON lines."""
    del argv
    common.configure_env()
    host = {k: v for k, v in common.host_info().fields().items() if k != "note"}  # the note is about run speed
    sizes = [int(s) for s in FLAGS.sizes]
    with common.JsonLines(FLAGS.out) as out:
        for family in FLAGS.families:
            block = template(family)
            points: Dict[str, List[Tuple[int, float]]] = {m: [] for m in FLAGS.methods}
            for size in sizes:
                graph_def = replicate(block, size)
                nodes = len(graph_def.node)
                logging.info("%s graph: %d nodes", family, nodes)
                timings = measure(graph_def, FLAGS.methods, FLAGS.repeats, FLAGS.amp_max_nodes, FLAGS.gc == "disabled")
                for method, (seconds, stages) in timings.items():
                    points[method].append((nodes, seconds))
                    out.emit({**host, "kind": "convert_speed", "family": family, "nodes": nodes,
                              "method": method, "gc": FLAGS.gc, "seconds": round(seconds, 4),
                              "nodes_per_second": round(nodes / seconds, 1),
                              "stages": {k: round(v, 4) for k, v in stages.items()}})
                if FLAGS.profile_out and size == FLAGS.profile_nodes:
                    profile(graph_def, f"{FLAGS.profile_out}-{family}.txt", gc_paused=FLAGS.gc == "disabled")
            for method, pts in points.items():
                if pts:
                    out.emit({**host, "kind": "convert_speed_linearity", "family": family, "method": method, "gc": FLAGS.gc,
                              **linearity(pts)})


if __name__ == "__main__":
    app.run(main)
