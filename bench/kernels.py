"""Per-op benchmark: tf_bf16's fused kernel ops against TensorFlow's own FP32 and BF16 paths.

For each shape, one fused pattern runs four ways side by side in one process, interleaved:
TensorFlow FP32 and BF16 (``tf.function`` of the stock ops: Conv2D+BiasAdd+Add+Relu, or
MatMul+BiasAdd+Relu) and ``TfBf16Conv2D``/``TfBf16MatMul`` in FP32 and BF16 (constant
weights, reordered once). One JSON line per shape and variant: median ms, GFLOP/s, the ratio
to TF FP32 and to TF BF16, and the error against TF FP32 on the same (BF16-rounded) inputs.

    python -m bench.kernels                    # batch 1, 1 intra-op thread
    python -m bench.kernels --batches=1,32 --runs=20

On a CPU without avx512_bf16 the BF16 kernels take their FP32 fallback (and TF's BF16 path is
Eigen), so only the FP32 rows say something about the kernels there.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1"], "Batch sizes (rows M for matmuls).")
flags.DEFINE_integer("threads", 1, "intra_op_parallelism_threads.")
flags.DEFINE_integer("runs", 10, "Timed runs per variant (median reported).", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed runs per variant.", lower_bound=1)
flags.DEFINE_string("out", None, "Also write the JSON lines to this file.")

# (name, H, W, C, K, R): the ResNet50 convolutions the issue measured directly with oneDNN.
CONVS: Tuple[Tuple[str, int, int, int, int, int], ...] = (
    ("conv3x3_56x56_64", 56, 56, 64, 64, 3),
    ("conv3x3_14x14_256", 14, 14, 256, 256, 3),
    ("conv1x1_28x28_512to128", 28, 28, 512, 128, 1),
)
# (name, rows per batch item, K, N): BERT-base feed-forward and projection matmuls at seq 128.
MATMULS: Tuple[Tuple[str, int, int, int], ...] = (
    ("matmul_128x768x3072", 128, 768, 3072),
    ("matmul_128x3072x768", 128, 3072, 768),
)


def _conv_variants(tf: Any, lib: Any, batch: int, h: int, w: int, c: int, k: int, r: int,
                   rng: np.random.Generator) -> Tuple[Dict[str, Callable[[], Any]], float]:
    """name -> zero-argument callable running the fused conv pattern; and its GFLOP."""
    x = rng.uniform(-1, 1, (batch, h, w, c)).astype(np.float32)
    f = (rng.standard_normal((r, r, c, k)) / np.sqrt(r * r * c)).astype(np.float32)
    b = rng.uniform(-0.1, 0.1, (k,)).astype(np.float32)
    res = rng.uniform(-1, 1, (batch, h, w, k)).astype(np.float32)
    out = {}
    for dtype, tag in ((tf.float32, "fp32"), (tf.bfloat16, "bf16")):
        xs, fs, bs, rs = (tf.constant(v, dtype) for v in (x, f, b, res))

        @tf.function
        def stock(xs=xs, fs=fs, bs=bs, rs=rs):
            return tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(xs, fs, 1, "SAME"), bs) + rs)

        @tf.function
        def kernel(xs=xs, fs=fs, bs=bs, rs=rs):
            return lib.tf_bf16_conv2d(input=xs, filter=fs, args=[bs, rs], strides=[1, 1, 1, 1], padding="SAME",
                                      fused_ops=["BiasAdd", "Add", "Relu"], weights_constant=True)

        out[f"tf_{tag}"], out[f"kernel_{tag}"] = stock, kernel
    return out, 2.0 * batch * h * w * k * c * r * r / 1e9


def _matmul_variants(tf: Any, lib: Any, batch: int, m: int, kdim: int, n: int,
                     rng: np.random.Generator) -> Tuple[Dict[str, Callable[[], Any]], float]:
    rows = batch * m
    a = rng.uniform(-1, 1, (rows, kdim)).astype(np.float32)
    wt = (rng.standard_normal((kdim, n)) / np.sqrt(kdim)).astype(np.float32)
    b = rng.uniform(-0.1, 0.1, (n,)).astype(np.float32)
    out = {}
    for dtype, tag in ((tf.float32, "fp32"), (tf.bfloat16, "bf16")):
        as_, ws, bs = (tf.constant(v, dtype) for v in (a, wt, b))

        @tf.function
        def stock(as_=as_, ws=ws, bs=bs):
            return tf.nn.relu(tf.nn.bias_add(tf.matmul(as_, ws), bs))

        @tf.function
        def kernel(as_=as_, ws=ws, bs=bs):
            return lib.tf_bf16_mat_mul(a=as_, b=ws, args=[bs], fused_ops=["BiasAdd", "Relu"], weights_constant=True)

        out[f"tf_{tag}"], out[f"kernel_{tag}"] = stock, kernel
    return out, 2.0 * rows * kdim * n / 1e9


def _time(variants: Dict[str, Callable[[], Any]], runs: int, warmup: int) -> Tuple[Dict[str, List[float]], Dict[str, np.ndarray]]:
    outputs = {}
    for name, fn in variants.items():
        for _ in range(warmup):
            result = fn()
        outputs[name] = np.asarray(result.numpy(), dtype=np.float32)
    times: Dict[str, List[float]] = {name: [] for name in variants}
    order = list(variants)
    for rep in range(runs):
        for name in (order if rep % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            variants[name]().numpy()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times, outputs


def records(host: common.HostInfo, shape: str, batch: int, gflop: float, times: Dict[str, List[float]],
            outputs: Dict[str, np.ndarray]) -> List[Dict[str, Any]]:
    """One JSON record per variant: median ms, GFLOP/s, ratios to TF FP32 / TF BF16, error."""
    median = {name: common.percentiles(t)["median_ms"] for name, t in times.items()}
    out = []
    for name in times:
        tag = name.rsplit("_", 1)[1]
        out.append({**host.fields(), "kind": "kernel", "shape": shape, "batch": batch, "threads": FLAGS.threads,
                    "variant": name, "runs": len(times[name]), "median_ms": median[name],
                    "gflops": round(gflop / (median[name] / 1e3), 1),
                    "speedup_vs_tf_fp32": round(median["tf_fp32"] / median[name], 3),
                    f"speedup_vs_tf_{tag}": round(median[f"tf_{tag}"] / median[name], 3),
                    "max_rel_err": float(f"{common.max_rel_err([outputs['tf_fp32']], [outputs[name]]):.3g}")})
    return out


def main(argv: Sequence[str]) -> None:
    del argv
    common.configure_env()
    import tensorflow as tf

    from tf_bf16 import kernels

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    lib = kernels.require()
    host = common.host_info()
    sink = common.JsonLines(FLAGS.out)
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in FLAGS.batches):
        cases = [(name, *_conv_variants(tf, lib, batch, h, w, c, k, r, rng)) for name, h, w, c, k, r in CONVS]
        cases += [(name, *_matmul_variants(tf, lib, batch, m, kd, n, rng)) for name, m, kd, n in MATMULS]
        for name, variants, gflop in cases:
            times, outputs = _time(variants, FLAGS.runs, FLAGS.warmup)
            for record in records(host, name, batch, gflop, times, outputs):
                sink.emit(record)
    sink.close()


if __name__ == "__main__":
    app.run(main)
