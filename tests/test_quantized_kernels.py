"""The INT8 kernel ops (TfBf16QuantizedConv2D, TfBf16QuantizedMatMul) against a float reference.

The reference computes in FP32 on exactly the values the op sees: the input rounded to its
quantization grid (round half to even, saturated), the INT8 weights times their scales. The
op must then match to FP32 summation error for an FP32 output, to half a BF16 ulp (plus
summation) for BF16, and to one quantization step for a UINT8/INT8 output. Weights use 63
levels a side so that the same expectations hold on CPUs without VNNI, where oneDNN's
u8 x s8 pair sums would saturate with full-range weights (see CpuFeatures.int8_weight_max).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

LEVELS = 63


@pytest.fixture(scope="module")
def ops(kernel_ops):
    return kernel_ops


def quantize_weights(w: np.ndarray, per_channel: bool, depthwise_groups: int = 0):
    """(int8 weights, scales, dequantized weights) for an HWIO / [K, N] float filter."""
    flat = w.reshape(-1, w.shape[-1])
    top = np.abs(flat).max(axis=0) if per_channel else np.array([np.abs(w).max()])
    top = np.maximum(top, 1e-8).astype(np.float32)
    scales = top / LEVELS
    q = np.clip(np.round(w / (scales if per_channel else scales[0])), -LEVELS, LEVELS).astype(np.int8)
    return q, scales, q.astype(np.float32) * (scales if per_channel else scales[0])


def grid(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``x`` on the quantization grid the op uses for a float input with range [low, high]."""
    if low >= 0:
        step = high / 255.0
        return np.clip(np.round(x / step), 0, 255) * step
    step = max(abs(low), abs(high)) / 127.0
    return np.clip(np.round(x / step), -127, 127) * step


def as_qint8(q: np.ndarray):
    return tf.bitcast(tf.constant(q, tf.int8), tf.qint8)


def quantized_tensor(x: np.ndarray, dtype, top: float):
    """A quint8/qint8 tensor of ``x`` with SCALED range [0, top] / [-top, top], and its real values."""
    if dtype == tf.quint8:
        q = np.clip(np.round(x / (top / 255.0)), 0, 255).astype(np.uint8)
        return tf.bitcast(tf.constant(q), tf.quint8), q.astype(np.float32) * (top / 255.0)
    q = np.clip(np.round(x / (top / 127.0)), -127, 127).astype(np.int8)
    return tf.bitcast(tf.constant(q), tf.qint8), q.astype(np.float32) * (top / 127.0)


def read_output(y, tout, out_range: Sequence[float]) -> np.ndarray:
    """The op's output as real FP32 values."""
    if tout == tf.quint8:
        return tf.bitcast(y, tf.uint8).numpy().astype(np.float32) * (out_range[1] / 255.0)
    if tout == tf.qint8:
        top = max(abs(out_range[0]), abs(out_range[1]))
        return tf.bitcast(y, tf.int8).numpy().astype(np.float32) * (top / 127.0)
    return tf.cast(y, tf.float32).numpy()


def check(actual: np.ndarray, expected: np.ndarray, tout, out_range: Sequence[float] = ()) -> None:
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-3)
    if tout in (tf.quint8, tf.qint8):
        top = max(abs(out_range[0]), abs(out_range[1]))
        step = top / (255.0 if tout == tf.quint8 else 127.0)
        np.testing.assert_allclose(actual, np.clip(expected, out_range[0], out_range[1]), rtol=0,
                                   atol=0.5 * step + 1e-4 * scale)
    elif tout == tf.bfloat16:
        np.testing.assert_allclose(actual, expected, rtol=0, atol=2.0 ** (np.floor(np.log2(scale)) - 7))
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def conv(ops, x, q, scales, args, tout, input_range, fused_ops, output_range=(), summand_range=(), groups=1,
         strides=(1, 1, 1, 1), padding="SAME", explicit_paddings=(), input_dtype=None):
    return ops.TfBf16QuantizedConv2D(
        input=x if input_dtype is None else tf.cast(x, input_dtype), filter=as_qint8(q), args=args, Tout=tout,
        input_range=list(input_range), filter_scales=[float(s) for s in scales], output_range=list(output_range),
        summand_range=list(summand_range), strides=list(strides), padding=padding,
        explicit_paddings=list(explicit_paddings), groups=groups, fused_ops=list(fused_ops), weights_constant=True)


# ------------------------------------------------------------------------------------------
# Conv2D


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("tout", [tf.float32, tf.bfloat16, tf.quint8, tf.qint8])
def test_conv_quantizes_a_float_input_and_writes_each_output_type(ops, signed, tout):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 7, 16)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    w = rng.standard_normal((3, 3, 16, 24)).astype(np.float32) / 12
    bias = rng.standard_normal(24).astype(np.float32)
    q, scales, wf = quantize_weights(w, per_channel=True)
    top = float(np.abs(x).max())
    input_range = (0.0, top) if not signed else (-top, top)
    relu = tout == tf.quint8
    expected = tf.nn.conv2d(grid(x, *input_range), wf, 1, "SAME").numpy() + bias
    if relu:
        expected = np.maximum(expected, 0)
    top_out = float(np.abs(expected).max())
    out_range = (0.0, top_out) if relu else (-top_out, top_out)
    fused = ["BiasAdd"] + (["Relu"] if relu else [])
    y = conv(ops, x, q, scales, [bias], tout, input_range, fused,
             output_range=out_range if tout in (tf.quint8, tf.qint8) else ())
    check(read_output(y, tout, out_range), expected, tout, out_range)


def test_conv_reads_bf16_and_quantized_inputs(ops):
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_normal((1, 8, 8, 8))).astype(np.float32)
    w = rng.standard_normal((1, 1, 8, 16)).astype(np.float32) / 3
    q, scales, wf = quantize_weights(w, per_channel=False)
    top = float(x.max())
    bf16_x = tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()
    y = conv(ops, x, q, scales, [], tf.float32, (0.0, top), [], input_dtype=tf.bfloat16)
    check(y.numpy(), tf.nn.conv2d(grid(bf16_x, 0.0, top), wf, 1, "SAME").numpy(), tf.float32)
    for dtype in (tf.quint8, tf.qint8):
        qx, real = quantized_tensor(x - (0 if dtype == tf.quint8 else 0.5), dtype, top)
        rng_ = (0.0, top) if dtype == tf.quint8 else (-top, top)
        y = conv(ops, qx, q, scales, [], tf.float32, rng_, [])
        check(y.numpy(), tf.nn.conv2d(real, wf, 1, "SAME").numpy(), tf.float32)


@pytest.mark.parametrize("summand", [tf.float32, tf.bfloat16, tf.quint8])
def test_conv_fuses_a_residual_of_any_type_then_relu(ops, summand):
    rng = np.random.default_rng(3)
    x = np.abs(rng.standard_normal((2, 6, 6, 16))).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 16)).astype(np.float32) / 12
    bias = rng.standard_normal(16).astype(np.float32)
    residual = rng.standard_normal((2, 6, 6, 16)).astype(np.float32)
    q, scales, wf = quantize_weights(w, per_channel=True)
    top = float(x.max())
    if summand == tf.quint8:
        residual = np.abs(residual)
        arg, real = quantized_tensor(residual, tf.quint8, float(residual.max()))
        summand_range = (0.0, float(residual.max()))
    else:
        arg = tf.cast(residual, summand)
        real = tf.cast(arg, tf.float32).numpy()
        summand_range = ()
    expected = np.maximum(tf.nn.conv2d(grid(x, 0, top), wf, 1, "SAME").numpy() + bias + real, 0)
    y = conv(ops, x, q, scales, [bias, arg], tf.float32, (0.0, top), ["BiasAdd", "Add", "Relu"],
             summand_range=summand_range)
    check(y.numpy(), expected, tf.float32)


def test_depthwise_strided_explicit_padding_and_output_clip(ops):
    """groups == channels (a depthwise filter in the grouped layout), stride 2, EXPLICIT pads; a
    float output with output_range is clipped there (what an INT8 output saturates at)."""
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_normal((1, 11, 10, 8))).astype(np.float32)
    dw = rng.standard_normal((3, 3, 8, 1)).astype(np.float32)
    q, scales, wf = quantize_weights(dw.reshape(3, 3, 1, 8), per_channel=True)
    top = float(x.max())
    pads = [0, 0, 1, 2, 0, 1, 0, 0]
    padded = np.pad(grid(x, 0, top), [(0, 0), (1, 2), (0, 1), (0, 0)])
    ref = tf.nn.depthwise_conv2d(padded, wf.reshape(3, 3, 8, 1), [1, 2, 2, 1], "VALID").numpy()
    expected = np.clip(ref, 0.0, 2.0)
    y = conv(ops, x, q, scales, [], tf.float32, (0.0, top), ["Relu"], output_range=(0.0, 2.0), groups=8,
             strides=(1, 2, 2, 1), padding="EXPLICIT", explicit_paddings=pads)
    check(y.numpy(), expected, tf.float32)


# ------------------------------------------------------------------------------------------
# MatMul


@pytest.mark.parametrize("shape,transpose_b", [((5, 64), False), ((3, 7, 64), False), ((5, 64), True)])
@pytest.mark.parametrize("tout", [tf.float32, tf.bfloat16])
def test_matmul_signed_input_per_column_scales_gelu(ops, shape, transpose_b, tout):
    rng = np.random.default_rng(5)
    a = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((64, 32)).astype(np.float32) / 8
    bias = rng.standard_normal(32).astype(np.float32)
    q, scales, wf = quantize_weights(w, per_channel=True)
    top = float(np.abs(a).max())
    expected = tf.nn.gelu(grid(a, -top, top) @ wf + bias, approximate=False).numpy()
    y = ops.TfBf16QuantizedMatMul(a=a, b=as_qint8(q.T.copy() if transpose_b else q), args=[bias], Tout=tout,
                                  input_range=[-top, top], filter_scales=scales.tolist(), transpose_b=transpose_b,
                                  fused_ops=["BiasAdd", "GeluErf"], weights_constant=True)
    check(read_output(y, tout, ()), expected, tout)


def test_matmul_uint8_chain_output_feeds_the_next_op(ops):
    """Two ops chained in UINT8: the first's quint8 output (range [0, m]) is the second's input."""
    rng = np.random.default_rng(6)
    a = np.abs(rng.standard_normal((4, 32))).astype(np.float32)
    q1, s1, w1 = quantize_weights(rng.standard_normal((32, 16)).astype(np.float32) / 4, per_channel=True)
    q2, s2, w2 = quantize_weights(rng.standard_normal((16, 8)).astype(np.float32) / 4, per_channel=True)
    top = float(a.max())
    hidden = np.maximum(grid(a, 0, top) @ w1, 0)
    m = float(hidden.max())
    first = ops.TfBf16QuantizedMatMul(a=a, b=as_qint8(q1), args=[], Tout=tf.quint8, input_range=[0.0, top],
                                      filter_scales=s1.tolist(), output_range=[0.0, m], fused_ops=["Relu"])
    second = ops.TfBf16QuantizedMatMul(a=first, b=as_qint8(q2), args=[], Tout=tf.float32, input_range=[0.0, m],
                                       filter_scales=s2.tolist())
    expected = grid(hidden, 0, m) @ w2
    check(second.numpy(), expected, tf.float32)


# ------------------------------------------------------------------------------------------
# Errors and shapes


@pytest.mark.parametrize("kwargs,message", [
    ({"input_range": [1.0, -1.0]}, "input_range must be [min, max]"),
    ({"input_range": [0.0, 0.0]}, "input_range must not be [0, 0]"),
    ({"filter_scales": [0.1, 0.2, 0.3]}, "needs 1 or one per output channel (4)"),
    ({"filter_scales": [-1.0]}, "filter_scales must be positive"),
    ({"Tout": tf.quint8}, "output_range must be [min, max]"),
    ({"fused_ops": ["Add"]}, "num_args is 0 but fused_ops [Add] consumes 1"),
])
def test_bad_attributes_are_named(ops, kwargs, message):
    base = dict(a=np.ones((2, 8), np.float32), b=as_qint8(np.ones((8, 4), np.int8)), args=[], Tout=tf.float32,
                input_range=[-1.0, 1.0], filter_scales=[0.01])
    base.update(kwargs)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=None) as info:
        ops.TfBf16QuantizedMatMul(**base)
    assert message in str(info.value) and "TfBf16QuantizedMatMul" in str(info.value)


def test_shape_inference_keeps_unknown_batch(ops):
    spec = tf.TensorSpec([None, 8, 8, 4], tf.float32)

    @tf.function(input_signature=[spec])
    def f(x):
        return ops.TfBf16QuantizedConv2D(input=x, filter=as_qint8(np.ones((3, 3, 4, 6), np.int8)), args=[],
                                         Tout=tf.bfloat16, input_range=[-1.0, 1.0], filter_scales=[0.01],
                                         strides=[1, 2, 2, 1], padding="SAME")

    out = f.get_concrete_function().structured_outputs
    assert out.shape.as_list() == [None, 4, 4, 6] and out.dtype == tf.bfloat16


@pytest.mark.parametrize("groups", [8, 2])
def test_signed_input_grouped_and_depthwise(ops, groups):
    """A signed float input (UINT8 with zero point 128 inside) into depthwise and 2-group convolutions."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 9, 9, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8 // groups, 8)).astype(np.float32)
    q, scales, wf = quantize_weights(w, per_channel=True)
    top = float(np.abs(x).max())
    on_grid = grid(x, -top, top)
    if groups == 8:
        expected = tf.nn.depthwise_conv2d(on_grid, wf.reshape(3, 3, 8, 1), [1, 1, 1, 1], "SAME").numpy()
    else:
        expected = tf.nn.conv2d(on_grid, wf, 1, "SAME").numpy()
    y = conv(ops, x, q, scales, [], tf.float32, (-top, top), [], groups=groups)
    check(y.numpy(), expected, tf.float32)
