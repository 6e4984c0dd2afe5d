"""The oneDNN custom ops (TfBf16Conv2D, TfBf16MatMul) against TensorFlow's own ops.

The library is built once (``kernels/_bf16_ops.so``, only when missing or older than its
sources); where it cannot be built (no g++, no oneDNN >= 3) the whole module is skipped with
the build's reason. FP32 results must match TensorFlow tightly. BF16 inputs are compared
with TensorFlow FP32 on the same BF16-rounded inputs, within a few BF16 ulps of the output's
scale (on CPUs without AVX-512 the kernels take their FP32 fallback, elsewhere oneDNN's BF16
primitives).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import zlib
from typing import Dict, List, Sequence

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tf_bf16.kernels import build as kernel_build  # noqa: E402

ACTIVATIONS: Dict[str, object] = {
    "Relu": tf.nn.relu,
    "Relu6": tf.nn.relu6,
    "GeluErf": lambda x: tf.nn.gelu(x, approximate=False),
    "GeluTanh": lambda x: tf.nn.gelu(x, approximate=True),
    "Sigmoid": tf.nn.sigmoid,
    "Swish": tf.nn.silu,
}

# Every allowed fused_ops shape: each stage alone, bias + residual, each activation after a
# bias, and all three together with each activation.
FUSIONS: List[List[str]] = (
    [[], ["BiasAdd"], ["Add"], ["BiasAdd", "Add"]]
    + [["BiasAdd", act] for act in ACTIVATIONS]
    + [["BiasAdd", "Add", act] for act in ACTIVATIONS]
    + [["Add", "Relu"], ["Swish"]]
)

DTYPES = [tf.float32, tf.bfloat16]


@pytest.fixture(scope="module")
def ops(kernel_ops):
    return kernel_ops


# ------------------------------------------------------------------------------------------
# Helpers


def random(rng: np.random.Generator, shape: Sequence[int], dtype, scale: float = 1.0) -> np.ndarray:
    """Normal values, already rounded to BF16 when dtype is BF16 (so the FP32 reference sees
    exactly the kernel's inputs)."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if dtype == tf.bfloat16:
        x = tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()
    return x


def epilogue(y, fused_ops: Sequence[str], args: Sequence[np.ndarray]):
    """TensorFlow FP32 reference of the fused epilogue."""
    args = list(args)
    for name in fused_ops:
        if name in ("BiasAdd", "Add"):
            y = y + args.pop(0)
        else:
            y = ACTIVATIONS[name](y)
    return y


def fused_args(rng, fused_ops, channels: int, out_shape, dtype) -> List[np.ndarray]:
    args = []
    if "BiasAdd" in fused_ops:
        args.append(random(rng, [channels], dtype))
    if "Add" in fused_ops:
        args.append(random(rng, out_shape, dtype))
    return args


def assert_close(actual, expected: np.ndarray, dtype) -> None:
    actual = tf.cast(actual, tf.float32).numpy()
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-3)
    if dtype == tf.bfloat16:
        # Output rounding is half an ulp; allow a few ulps of the output's scale for FP32
        # summation order and oneDNN's activation approximations.
        ulp = 2.0 ** (np.floor(np.log2(scale)) - 7)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=3 * ulp)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def cast_all(arrays, dtype):
    return [tf.cast(a, dtype) for a in arrays]


# ------------------------------------------------------------------------------------------
# Conv2D


def conv_reference(x, w, strides, padding, explicit_paddings, dilations, groups):
    """tf.nn.conv2d (which does grouped convolution itself when the filter has fewer input
    channels than x)."""
    del groups  # implied by the shapes
    if padding == "EXPLICIT":
        p = explicit_paddings
        padding = [[p[0], p[1]], [p[2], p[3]], [p[4], p[5]], [p[6], p[7]]]
    return tf.nn.conv2d(x, w, strides=strides, padding=padding, dilations=dilations)


def run_conv_case(ops, rng, dtype, batch, hw, in_c, out_c, kernel, strides=(1, 1),
                  padding="SAME", pads=None, dilations=(1, 1), groups=1,
                  fused_ops=(), weights_constant=False):
    x = random(rng, [batch, hw[0], hw[1], in_c], dtype)
    w = random(rng, [kernel[0], kernel[1], in_c // groups, out_c], dtype,
               scale=1.0 / np.sqrt(kernel[0] * kernel[1] * in_c / groups))
    strides = [1, strides[0], strides[1], 1]
    dilations = [1, dilations[0], dilations[1], 1]
    explicit = list(pads) if padding == "EXPLICIT" else []
    ref = conv_reference(x, w, strides, padding, explicit, dilations, groups)
    args = fused_args(rng, fused_ops, out_c, ref.shape, dtype)
    expected = epilogue(ref, fused_ops, args)
    actual = ops.tf_bf16_conv2d(
        input=tf.cast(x, dtype), filter=tf.cast(w, dtype), args=cast_all(args, dtype),
        strides=strides, padding=padding, explicit_paddings=explicit, dilations=dilations,
        groups=groups, fused_ops=list(fused_ops), weights_constant=weights_constant)
    assert actual.dtype == dtype
    assert_close(actual, expected, dtype)


CONV_GEOMETRIES = {
    "b1_same_3to5": dict(batch=1, hw=(7, 9), in_c=3, out_c=5, kernel=(3, 3)),
    "b3_valid_s2_5to13": dict(batch=3, hw=(7, 9), in_c=5, out_c=13, kernel=(3, 3),
                              strides=(2, 2), padding="VALID"),
    "explicit_s21_k23": dict(batch=2, hw=(7, 9), in_c=3, out_c=5, kernel=(2, 3),
                             strides=(2, 1), padding="EXPLICIT", pads=(0, 0, 1, 2, 0, 3, 0, 0)),
    "same_s2_even_kernel": dict(batch=1, hw=(8, 9), in_c=4, out_c=6, kernel=(2, 4),
                                strides=(2, 2)),
    "dilation2_same": dict(batch=3, hw=(7, 9), in_c=5, out_c=13, kernel=(3, 3),
                           dilations=(2, 2)),
    "dilation2_valid_s2": dict(batch=1, hw=(9, 11), in_c=3, out_c=5, kernel=(3, 2),
                               strides=(2, 2), padding="VALID", dilations=(2, 2)),
    "pointwise": dict(batch=3, hw=(7, 9), in_c=13, out_c=5, kernel=(1, 1)),
    "grouped": dict(batch=2, hw=(7, 9), in_c=6, out_c=9, kernel=(3, 3), groups=3),
    "depthwise": dict(batch=3, hw=(7, 9), in_c=5, out_c=5, kernel=(3, 3), groups=5),
    "depthwise_mult2_s2": dict(batch=1, hw=(7, 9), in_c=5, out_c=10, kernel=(3, 3),
                               strides=(2, 2), groups=5),
    "depthwise_dilation2": dict(batch=1, hw=(9, 9), in_c=13, out_c=13, kernel=(3, 3),
                                dilations=(2, 2), groups=13, padding="VALID"),
}


@pytest.mark.parametrize("weights_constant", [False, True], ids=["plain_w", "const_w"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(CONV_GEOMETRIES))
def test_conv_geometry(ops, name, dtype, weights_constant):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    run_conv_case(ops, rng, dtype, fused_ops=["BiasAdd", "Relu"],
                  weights_constant=weights_constant, **CONV_GEOMETRIES[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("fused_ops", FUSIONS, ids=lambda f: "+".join(f) or "none")
def test_conv_fusions(ops, fused_ops, dtype):
    rng = np.random.default_rng(7)
    run_conv_case(ops, rng, dtype, batch=3, hw=(7, 9), in_c=5, out_c=13, kernel=(3, 3),
                  strides=(2, 2), fused_ops=fused_ops, weights_constant=True)
    run_conv_case(ops, rng, dtype, batch=1, hw=(7, 9), in_c=5, out_c=5, kernel=(3, 3),
                  groups=5, fused_ops=fused_ops)


def test_depthwise_matches_tf_depthwise_conv2d(ops):
    """groups == in_channels with filter [kh, kw, 1, C * m] is tf.nn.depthwise_conv2d with
    the filter [kh, kw, C, m] reshaped (the layout the graph rewrite produces)."""
    rng = np.random.default_rng(3)
    x = random(rng, [2, 7, 9, 5], tf.float32)
    w = random(rng, [3, 3, 5, 2], tf.float32)
    expected = tf.nn.depthwise_conv2d(x, w, strides=[1, 2, 2, 1], padding="SAME")
    actual = ops.tf_bf16_conv2d(input=x, filter=w.reshape(3, 3, 1, 10), args=[],
                                strides=[1, 2, 2, 1], padding="SAME", groups=5)
    assert_close(actual, expected, tf.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_conv_caches_in_a_graph(ops, dtype):
    """One op instance: the same Const weights twice, then a second input shape, then the
    first again, so both the packed-weight and the per-shape primitive caches are hit."""
    rng = np.random.default_rng(11)
    w = random(rng, [3, 3, 5, 13], dtype, scale=0.2)
    b = random(rng, [13], dtype)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 5], dtype)])
    def conv(x):
        return ops.tf_bf16_conv2d(input=x, filter=tf.constant(w, dtype),
                                  args=[tf.constant(b, dtype)], strides=[1, 2, 2, 1], padding="SAME",
                                  fused_ops=["BiasAdd", "GeluTanh"], weights_constant=True)

    for shape in ([3, 7, 9, 5], [3, 7, 9, 5], [1, 11, 6, 5], [3, 7, 9, 5]):
        x = random(rng, shape, dtype)
        expected = tf.nn.gelu(tf.nn.conv2d(x, w, 2, "SAME") + b, approximate=True)
        assert_close(conv(tf.cast(x, dtype)), expected, dtype)


def test_weights_constant_in_eager_mode(ops):
    """Eager mode shares one kernel between calls with equal attributes: new weights of the
    same shape (even in a just-freed buffer) must not hit the packed-weight cache."""
    rng = np.random.default_rng(19)
    x = random(rng, [1, 7, 9, 5], tf.float32)
    for _ in range(3):
        w = tf.constant(random(rng, [3, 3, 5, 13], tf.float32))
        actual = ops.tf_bf16_conv2d(input=x, filter=w, args=[], strides=[1, 1, 1, 1],
                                    padding="SAME", weights_constant=True)
        assert_close(actual, tf.nn.conv2d(x, w, 1, "SAME"), tf.float32)
        del w


def test_conv_concurrent_calls(ops):
    """Concurrent executions of one kernel share its caches but not their scratch space."""
    rng = np.random.default_rng(5)
    w = random(rng, [3, 3, 5, 13], tf.float32, scale=0.2)

    @tf.function(input_signature=[tf.TensorSpec([None, 7, 9, 5], tf.float32)])
    def conv(x):
        return ops.tf_bf16_conv2d(input=x, filter=tf.constant(w), args=[], strides=[1, 1, 1, 1],
                                  padding="SAME", weights_constant=True)

    inputs = [random(rng, [1 + i % 3, 7, 9, 5], tf.float32) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: conv(x).numpy(), inputs))
    for x, y in zip(inputs, results):
        assert_close(y, tf.nn.conv2d(x, w, 1, "SAME"), tf.float32)


@pytest.mark.parametrize("name", ["b3_valid_s2_5to13", "explicit_s21_k23", "dilation2_same",
                                  "depthwise_mult2_s2"])
def test_conv_shape_function(ops, name):
    """Static output shapes, with the batch unknown, equal the computed ones."""
    g = CONV_GEOMETRIES[name]
    padding = g.get("padding", "SAME")
    strides = [1, *g.get("strides", (1, 1)), 1]
    dilations = [1, *g.get("dilations", (1, 1)), 1]
    groups = g.get("groups", 1)
    explicit = list(g["pads"]) if padding == "EXPLICIT" else []
    w = np.zeros([*g["kernel"], g["in_c"] // groups, g["out_c"]], np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, *g["hw"], g["in_c"]], tf.float32)])
    def conv(x):
        return ops.tf_bf16_conv2d(input=x, filter=w, args=[], strides=strides, padding=padding,
                                  explicit_paddings=explicit, dilations=dilations,
                                  groups=groups)

    static = conv.get_concrete_function().structured_outputs.shape.as_list()
    x = np.zeros([2, *g["hw"], g["in_c"]], np.float32)
    expected = conv_reference(x, w, strides, padding, explicit, dilations, groups).shape
    assert static == [None, *expected[1:]]


# ------------------------------------------------------------------------------------------
# MatMul


def run_matmul_case(ops, rng, dtype, a_shape, b_shape, transpose_a=False, transpose_b=False,
                    fused_ops=(), weights_constant=False):
    a = random(rng, a_shape, dtype)
    b = random(rng, b_shape, dtype, scale=1.0 / np.sqrt(b_shape[-1 if transpose_b else -2]))
    ref = tf.linalg.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    args = fused_args(rng, fused_ops, ref.shape[-1], ref.shape, dtype)
    expected = epilogue(ref, fused_ops, args)
    actual = ops.tf_bf16_mat_mul(a=tf.cast(a, dtype), b=tf.cast(b, dtype),
                                 args=cast_all(args, dtype), transpose_a=transpose_a,
                                 transpose_b=transpose_b, fused_ops=list(fused_ops),
                                 weights_constant=weights_constant)
    assert actual.dtype == dtype
    assert_close(actual, expected, dtype)


MATMUL_SHAPES = {
    "2d": ([5, 7], [7, 3]),
    "2d_wide": ([1, 37], [37, 29]),
    "batched": ([3, 5, 7], [3, 7, 4]),
    "batched_rank4": ([2, 3, 5, 7], [2, 3, 7, 4]),
    "shared_b": ([3, 5, 7], [7, 4]),
    "shared_b_rank4": ([2, 3, 5, 7], [7, 4]),
}


def transposed(shape: Sequence[int], flag: bool) -> List[int]:
    shape = list(shape)
    return shape[:-2] + shape[-2:][::-1] if flag else shape


@pytest.mark.parametrize("weights_constant", [False, True], ids=["plain_w", "const_w"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("transpose_a,transpose_b",
                         list(itertools.product([False, True], repeat=2)),
                         ids=["nn", "nt", "tn", "tt"])
@pytest.mark.parametrize("name", sorted(MATMUL_SHAPES))
def test_matmul_shapes(ops, name, transpose_a, transpose_b, dtype, weights_constant):
    a_shape, b_shape = MATMUL_SHAPES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    run_matmul_case(ops, rng, dtype, transposed(a_shape, transpose_a),
                    transposed(b_shape, transpose_b), transpose_a, transpose_b,
                    fused_ops=["BiasAdd"], weights_constant=weights_constant)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("fused_ops", FUSIONS, ids=lambda f: "+".join(f) or "none")
def test_matmul_fusions(ops, fused_ops, dtype):
    rng = np.random.default_rng(13)
    run_matmul_case(ops, rng, dtype, [3, 5, 24], [24, 13], fused_ops=fused_ops,
                    weights_constant=True)
    run_matmul_case(ops, rng, dtype, [5, 24], [13, 24], transpose_b=True, fused_ops=fused_ops)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_matmul_caches_in_a_graph(ops, dtype):
    """Dense on a 3-D input: Const weights reused, then new batch/sequence shapes."""
    rng = np.random.default_rng(17)
    w = random(rng, [24, 13], dtype, scale=0.2)
    b = random(rng, [13], dtype)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 24], dtype)])
    def dense(x):
        return ops.tf_bf16_mat_mul(a=x, b=tf.constant(w, dtype), args=[tf.constant(b, dtype)],
                                   fused_ops=["BiasAdd", "GeluErf"], weights_constant=True)

    for shape in ([2, 5, 24], [2, 5, 24], [1, 9, 24], [2, 5, 24]):
        x = random(rng, shape, dtype)
        expected = tf.nn.gelu(tf.linalg.matmul(x, w) + b, approximate=False)
        assert_close(dense(tf.cast(x, dtype)), expected, dtype)


def test_matmul_shape_function(ops):
    @tf.function(input_signature=[tf.TensorSpec([None, 5, 7], tf.float32),
                                  tf.TensorSpec([4, 7], tf.float32)])
    def shared(a, b):
        return ops.tf_bf16_mat_mul(a=a, b=b, args=[], transpose_b=True)

    assert shared.get_concrete_function().structured_outputs.shape.as_list() == [None, 5, 4]

    @tf.function(input_signature=[tf.TensorSpec([None, 3, 7, 5], tf.float32),
                                  tf.TensorSpec([2, None, 7, 4], tf.float32)])
    def batched(a, b):
        return ops.tf_bf16_mat_mul(a=a, b=b, args=[], transpose_a=True)

    assert batched.get_concrete_function().structured_outputs.shape.as_list() == [2, 3, 5, 4]


def test_bf16_output_rounding_matches_tf_cast(ops):
    """BF16 outputs round to nearest even like tf.cast (ties both ways, NaN kept)."""
    tie = 2.0 ** -8  # half a BF16 ulp of 1.0
    a = np.array([[1.0, tie], [1.0 + 2 * tie, tie], [-1.0, -tie], [np.nan, 0.0],
                  [3.0e38, 3.0e38]], np.float32)
    b = np.ones([2, 1], np.float32)
    exact = ops.tf_bf16_mat_mul(a=a, b=b, args=[])
    rounded = ops.tf_bf16_mat_mul(a=tf.cast(a, tf.bfloat16), b=tf.cast(b, tf.bfloat16), args=[])
    np.testing.assert_array_equal(tf.cast(rounded, tf.float32).numpy(),
                                  tf.cast(tf.cast(exact, tf.bfloat16), tf.float32).numpy())
    assert tf.cast(rounded, tf.float32).numpy()[:3, 0].tolist() == [1.0, 1.015625, -1.0]


def test_empty_batch(ops):
    out = ops.tf_bf16_mat_mul(a=np.zeros([0, 5, 7], np.float32), b=np.ones([7, 4], np.float32),
                              args=[])
    assert out.shape == (0, 5, 4)
    out = ops.tf_bf16_conv2d(input=np.zeros([0, 7, 9, 3], np.float32),
                             filter=np.ones([3, 3, 3, 5], np.float32), args=[],
                             strides=[1, 2, 2, 1], padding="SAME")
    assert out.shape == (0, 4, 5, 5)


# ------------------------------------------------------------------------------------------
# Errors: eager calls reach the kernel, graph construction reaches the shape function.

X = np.zeros([1, 7, 9, 3], np.float32)
W = np.zeros([3, 3, 3, 5], np.float32)
CONV_DEFAULTS = dict(input=X, filter=W, args=[], strides=[1, 1, 1, 1], padding="SAME")


def conv_call(ops, **overrides):
    return ops.tf_bf16_conv2d(**{**CONV_DEFAULTS, **overrides})


CONV_ERRORS = {
    "num_args": (dict(fused_ops=["BiasAdd"]), "num_args is 0"),
    "extra_args": (dict(args=[np.zeros([5], np.float32)]), "num_args is 1"),
    "order": (dict(fused_ops=["Relu", "BiasAdd"], args=[np.zeros([5], np.float32)]),
              "not in the order"),
    "two_activations": (dict(fused_ops=["Relu", "Sigmoid"]), "not in the order"),
    "unknown_fusion": (dict(fused_ops=["Tanh"]), "unknown entry 'Tanh'"),
    "channels": (dict(filter=np.zeros([3, 3, 4, 5], np.float32)), "3 channels"),
    "groups_out": (dict(input=np.zeros([1, 7, 9, 4], np.float32),
                        filter=np.zeros([3, 3, 2, 5], np.float32), groups=2), "divisible"),
    "rank": (dict(input=np.zeros([7, 9, 3], np.float32)), "rank 4"),
    "strides": (dict(strides=[1, 1, 1]), "strides must have 4 entries"),
    "batch_stride": (dict(strides=[2, 1, 1, 1]), "batch and channel"),
    "explicit": (dict(padding="EXPLICIT", explicit_paddings=[0, 0, 1, 1]), "8 entries"),
    "too_small": (dict(padding="VALID", filter=np.zeros([9, 3, 3, 5], np.float32),
                       dilations=[1, 2, 1, 1]), "smaller than the dilated filter"),
    "empty_filter": (dict(filter=np.zeros([0, 3, 3, 5], np.float32)),
                     "filter height must be at least 1"),
    "bias_shape": (dict(fused_ops=["BiasAdd"], args=[np.zeros([4], np.float32)]),
                   "BiasAdd argument"),
    "residual_shape": (dict(fused_ops=["Add"], args=[np.zeros([1, 7, 9, 4], np.float32)]),
                       "Add argument"),
}


@pytest.mark.parametrize("name", sorted(CONV_ERRORS))
def test_conv_errors(ops, name):
    overrides, message = CONV_ERRORS[name]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message) as info:
        conv_call(ops, **overrides)
    assert "TfBf16Conv2D" in str(info.value)


MATMUL_ERRORS = {
    "inner": (dict(a=np.zeros([5, 7], np.float32), b=np.zeros([6, 4], np.float32)),
              "inner dimensions differ"),
    "batch": (dict(a=np.zeros([2, 5, 7], np.float32), b=np.zeros([3, 7, 4], np.float32)),
              "batch dimension 0 differs"),
    "rank_b": (dict(a=np.zeros([2, 2, 5, 7], np.float32), b=np.zeros([2, 7, 4], np.float32)),
               "b must have rank 2 or the rank of a"),
    "rank_a": (dict(a=np.zeros([7], np.float32), b=np.zeros([7, 4], np.float32)), "rank >= 2"),
    "order": (dict(fused_ops=["Add", "BiasAdd"],
                   args=[np.zeros([5, 4], np.float32), np.zeros([4], np.float32)]),
              "not in the order"),
    "num_args": (dict(fused_ops=["BiasAdd", "Add"], args=[np.zeros([4], np.float32)]),
                 "num_args is 1"),
}


@pytest.mark.parametrize("name", sorted(MATMUL_ERRORS))
def test_matmul_errors(ops, name):
    overrides, message = MATMUL_ERRORS[name]
    kwargs = {**dict(a=np.zeros([5, 7], np.float32), b=np.zeros([7, 4], np.float32), args=[]),
              **overrides}
    with pytest.raises(tf.errors.InvalidArgumentError, match=message) as info:
        ops.tf_bf16_mat_mul(**kwargs)
    assert "TfBf16MatMul" in str(info.value)


@pytest.mark.parametrize("name", ["order", "channels", "strides", "too_small", "bias_shape",
                                  "residual_shape"])
def test_conv_shape_function_errors(ops, name):
    """The shape function applies the same rules when a graph is built."""
    overrides, message = CONV_ERRORS[name]

    @tf.function
    def conv():
        return conv_call(ops, **{k: (tf.constant(v) if isinstance(v, np.ndarray) else v)
                                 for k, v in overrides.items()})

    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=message):
        conv.get_concrete_function()


def test_build_reports_reason_without_onednn(monkeypatch, tmp_path):
    """A machine without oneDNN gets a one-line reason, not a traceback or a stale file."""
    monkeypatch.setattr(kernel_build, "find_compiler", lambda: "g++")
    monkeypatch.setattr(kernel_build, "_onednn_candidates", lambda: [])
    out = tmp_path / "lib.so"
    result = kernel_build.build(str(out))
    assert not result.ok and "no oneDNN headers" in result.reason
    assert "\n" not in str(result)
    assert not out.exists() and list(tmp_path.iterdir()) == []
