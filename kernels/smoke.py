"""Smoke-test a built kernel library: ``python -m tf_bf16.kernels.smoke PATH``.

Loads ``PATH`` (e.g. bazel's ``bazel-bin/_bf16_ops.so``) from a temporary copy, so that it
must find oneDNN through its own rpath rather than through files beside it (bazel's _solib
links), and runs one TfBf16Conv2D and one TfBf16MatMul against tf.nn.conv2d and tf.matmul, and one
TfBf16QuantizedMatMul against its FP32 reference.
Prints one line; exits 0 when all match, 1 otherwise. tests/test_kernels.py and
tests/test_quantized_kernels.py are the full tests.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np


def check(path: str) -> None:
    """Raises when the library cannot be loaded or an op disagrees with TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, os.path.basename(path))
        shutil.copyfile(path, copy)
        ops = tf.load_op_library(copy)

        x = rng.standard_normal([2, 7, 9, 5]).astype(np.float32)
        w = rng.standard_normal([3, 3, 5, 13]).astype(np.float32)
        bias = rng.standard_normal([13]).astype(np.float32)
        actual = ops.tf_bf16_conv2d(input=x, filter=w, args=[bias], strides=[1, 2, 2, 1],
                                    padding="SAME", fused_ops=["BiasAdd", "Relu"])
        expected = tf.nn.relu(tf.nn.conv2d(x, w, strides=2, padding="SAME") + bias)
        _assert_close("TfBf16Conv2D", actual, expected)

        a = rng.standard_normal([3, 5, 24]).astype(np.float32)
        b = rng.standard_normal([24, 13]).astype(np.float32)
        _assert_close("TfBf16MatMul", ops.tf_bf16_mat_mul(a=a, b=b, args=[]), tf.matmul(a, b))

        # INT8: a signed input on its 127-step grid times 63-level weights is exact in FP32.
        q = rng.integers(-63, 64, size=[24, 13]).astype(np.int8)
        top = float(np.abs(a).max())
        on_grid = np.clip(np.round(a * 127 / top), -127, 127) * (top / 127)
        actual = ops.tf_bf16_quantized_mat_mul(a=a, b=tf.bitcast(tf.constant(q), tf.qint8), args=[],
                                               Tout=tf.float32, input_range=[-top, top], filter_scales=[0.01])
        _assert_close("TfBf16QuantizedMatMul", actual, np.matmul(on_grid, q.astype(np.float32) * 0.01))


def _assert_close(name: str, actual, expected) -> None:
    expected = np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-3)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=f"{name} differs from TensorFlow")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        print("usage: python -m tf_bf16.kernels.smoke PATH_TO_LIBRARY", file=sys.stderr)
        return 2
    try:
        check(argv[0])
    except Exception as exc:  # noqa: BLE001 - any failure is reported in one line
        message = str(exc).strip().splitlines()
        print(f"kernel library {argv[0]} FAILED: {type(exc).__name__}: "
              f"{' '.join(message[:3])}")
        return 1
    print(f"kernel library {argv[0]}: TfBf16Conv2D, TfBf16MatMul and TfBf16QuantizedMatMul match TensorFlow")
    return 0


if __name__ == "__main__":
    sys.exit(main())
