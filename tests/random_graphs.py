"""Seeded random float graphs and the accuracy comparison the fuzz test and ``bench/fuzz.py`` share.

``random_graph(seed)`` builds a valid frozen GraphDef of 5-60 float ops (MatMul, Conv2D,
depthwise, BiasAdd, element-wise binary and unary ops, reductions, reshapes, transposes,
concatenations, pads, pools, FusedBatchNormV3, Cast round trips) with its feeds: ``DRAWS``
independent batches of random inputs in [-1, 1]. The same seed always gives the same graph.
``compare(case)`` converts it with tf_bf16, runs TensorFlow's own BF16 AMP pass on the same
graph, and measures both against FP32.

The error of a graph is the relative error ``max |y - y32| / max |y32|`` (worst output) of
the median draw: one draw's maximum is a noisy statistic (on one graph, two BF16 graphs of
equal quality traded places by up to 1.7x from draw to draw) and a mean over draws is
dominated by the rare draw where a near-zero denominator amplifies everything.

Discontinuous ops (Floor, Round, Sign, comparisons) are left out on purpose: one rounding
flips their output by a whole unit, so their relative error says nothing about a paint rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

Shape = Tuple[int, ...]
BATCH = 2
DRAWS = 51
MAX_SPATIAL = 16
MAX_FEATURES = 64


@dataclasses.dataclass
class _Value:
    """A float32 tensor in the graph being built: its static shape and whether it is >= 0."""

    tensor: Any
    shape: Shape
    nonneg: bool = False
    uses: int = 0


@dataclasses.dataclass
class RandomGraph:
    """A generated graph: GraphDef, input/output node names, feed draws (each in input order), op mix."""

    seed: int
    graph_def: Any
    inputs: List[str]
    outputs: List[str]
    draws: List[List[np.ndarray]]
    ops: List[str]


class _Builder:
    """Grows one random graph op by op inside a ``tf.Graph``."""

    def __init__(self, tf: Any, rng: np.random.Generator):
        self.tf = tf
        self.raw = tf.raw_ops
        self.rng = rng
        self.pool: List[_Value] = []
        self.ops: List[str] = []
        self.count = 0

    # ------------------------------------------------------------------ helpers

    def name(self, op: str) -> str:
        self.count += 1
        return f"{op.lower()}_{self.count}"

    def const(self, value: np.ndarray, what: str = "w") -> Any:
        return self.tf.constant(np.asarray(value, np.float32), name=self.name(what))

    def add(self, tensor: Any, shape: Shape, nonneg: bool = False) -> _Value:
        value = _Value(tensor, tuple(shape), nonneg)
        self.pool.append(value)
        self.ops.append(tensor.op.type)
        return value

    def pick(self, pred: Callable[[_Value], bool] = lambda v: True) -> Optional[_Value]:
        """A pool value satisfying ``pred``, favouring recent and unused ones (deep, connected graphs)."""
        choices = [v for v in self.pool if pred(v)]
        if not choices:
            return None
        weights = np.array([(i + 1.0) * (3.0 if v.uses == 0 else 1.0) for i, v in enumerate(choices)])
        value = choices[int(self.rng.choice(len(choices), p=weights / weights.sum()))]
        value.uses += 1
        return value

    def positive(self, value: _Value) -> Any:
        """``value`` made >= 0 (Abs or Square when it may be negative)."""
        if value.nonneg:
            return value.tensor
        op = self.raw.Abs if self.rng.random() < 0.5 else self.raw.Square
        return self.add(op(x=value.tensor, name=self.name("pos")), value.shape, True).tensor

    def scale(self, fan_in: int) -> float:
        return float(self.rng.uniform(0.5, 2.0) / math.sqrt(max(fan_in, 1)))

    # ------------------------------------------------------------------ op builders

    def conv(self) -> bool:
        x = self.pick(lambda v: len(v.shape) == 4)
        if x is None:
            return False
        b, h, w, c = x.shape
        k = int(self.rng.choice([1, 3]))
        stride = 2 if h >= 4 and self.rng.random() < 0.3 else 1
        depthwise = self.rng.random() < 0.3
        if depthwise:
            filt = self.const(self.rng.normal(0, self.scale(k * k), (k, k, c, 1)))
            out = self.raw.DepthwiseConv2dNative(input=x.tensor, filter=filt, strides=[1, stride, stride, 1],
                                                 padding="SAME", name=self.name("dwconv"))
            cout = c
        else:
            cout = int(self.rng.choice([4, 8, 16]))
            filt = self.const(self.rng.normal(0, self.scale(k * k * c), (k, k, c, cout)))
            out = self.raw.Conv2D(input=x.tensor, filter=filt, strides=[1, stride, stride, 1], padding="SAME",
                                  name=self.name("conv"))
        oh = -(-h // stride)
        self.add(out, (b, oh, oh, cout))
        return True

    def matmul(self) -> bool:
        x = self.pick(lambda v: len(v.shape) == 2)
        if x is None:
            return False
        f = x.shape[1]
        g = int(self.rng.choice([4, 8, 16, 32]))
        transpose_b = bool(self.rng.random() < 0.3)
        w = self.rng.normal(0, self.scale(f), (f, g))
        out = self.raw.MatMul(a=x.tensor, b=self.const(w.T if transpose_b else w), transpose_b=transpose_b,
                              name=self.name("matmul"))
        self.add(out, (x.shape[0], g))
        return True

    def bias_add(self) -> bool:
        x = self.pick()
        bias = self.const(self.rng.uniform(-1, 1, x.shape[-1]), "bias")
        self.add(self.raw.BiasAdd(value=x.tensor, bias=bias, name=self.name("biasadd")), x.shape)
        return True

    def binary(self) -> bool:
        x = self.pick()
        op = str(self.rng.choice(["Add", "AddV2", "Sub", "Mul", "Maximum", "Minimum", "SquaredDifference",
                                  "RealDiv"]))
        mates = [v for v in self.pool if v is not x and (v.shape == x.shape or v.shape == x.shape[:-1] + (1,))]
        if mates and self.rng.random() < 0.6:
            y = mates[int(self.rng.integers(len(mates)))]
            y.uses += 1
            other, other_nonneg = y.tensor, y.nonneg
        else:
            size = x.shape[-1] if self.rng.random() < 0.5 else 1
            other_nonneg = op == "RealDiv" or self.rng.random() < 0.3
            low, high = (0.5, 1.5) if other_nonneg else (-1.0, 1.5)
            if op in ("Maximum", "Minimum"):
                # Clip inside the inputs' range: a bound outside it would make the output a
                # constant that no longer depends on the inputs.
                low, high = -0.5, 0.5
                other_nonneg = False
            other = self.const(self.rng.uniform(low, high, size if size > 1 else ()), "k")
        if op == "RealDiv":
            if not other_nonneg:
                return False
            # x / (y + 0.5) with y >= 0: a denominator bounded away from zero.
            other = self.raw.AddV2(x=other, y=self.const(0.5, "eps"), name=self.name("denom"))
        fn = getattr(self.raw, op)
        out = fn(x=x.tensor, y=other, name=self.name(op))
        nonneg = op == "SquaredDifference" or (op in ("Add", "AddV2", "Mul", "Maximum") and x.nonneg and other_nonneg)
        self.add(out, x.shape, nonneg)
        return True

    def unary(self) -> bool:
        x = self.pick()
        op = str(self.rng.choice(["Tanh", "Sigmoid", "Relu", "Relu6", "Elu", "Selu", "Softplus", "Softsign",
                                  "LeakyRelu", "Erf", "Neg", "Abs", "Square", "Sqrt", "Rsqrt", "Exp", "Log",
                                  "Reciprocal"]))
        nonneg = op in ("Sigmoid", "Relu", "Relu6", "Softplus", "Abs", "Square", "Sqrt", "Rsqrt", "Exp")
        arg = x.tensor
        if op in ("Sqrt",):
            arg = self.positive(x)
        elif op in ("Rsqrt", "Log", "Reciprocal"):
            eps = float(self.rng.choice([1e-3, 0.1, 1.0]))
            arg = self.raw.AddV2(x=self.positive(x), y=self.const(eps, "eps"), name=self.name("plus_eps"))
            nonneg = nonneg or op == "Reciprocal"
        elif op == "Exp" and not x.nonneg:
            arg = self.raw.Tanh(x=arg, name=self.name("squash"))  # keep exp's input in [-1, 1]
        fn = getattr(self.raw, op)
        out = fn(features=arg, name=self.name(op)) if op in ("Relu", "Relu6", "Elu", "Selu", "Softplus", "Softsign",
                                                           "LeakyRelu") else fn(x=arg, name=self.name(op))
        self.add(out, x.shape, nonneg)
        return True

    def softmax(self) -> bool:
        x = self.pick()
        self.add(self.raw.Softmax(logits=x.tensor, name=self.name("softmax")), x.shape, True)
        return True

    def reduce(self) -> bool:
        x = self.pick()
        op = "Mean" if self.rng.random() < 0.6 else "Sum"
        fn = getattr(self.raw, op)
        if len(x.shape) == 4 and self.rng.random() < 0.5:
            out = fn(input=x.tensor, axis=self.tf.constant([1, 2]), keep_dims=False, name=self.name(op))
            self.add(out, (x.shape[0], x.shape[3]), x.nonneg)
        else:
            axis = len(x.shape) - 1
            out = fn(input=x.tensor, axis=self.tf.constant([axis]), keep_dims=True, name=self.name(op))
            self.add(out, x.shape[:-1] + (1,), x.nonneg)
        return True

    def reshape(self) -> bool:
        x = self.pick(lambda v: len(v.shape) == 4 or (len(v.shape) == 2 and v.shape[1] % 4 == 0))
        if x is None:
            return False
        if len(x.shape) == 4:
            b, h, w, c = x.shape
            if h * w * c > 1024:
                return False
            shape: Shape = (b, h * w * c)
        else:
            b, f = x.shape
            shape = (b, 2, 2, f // 4)
        out = self.raw.Reshape(tensor=x.tensor, shape=self.tf.constant([-1] + list(shape[1:])), name=self.name("reshape"))
        self.add(out, shape, x.nonneg)
        return True

    def transpose(self) -> bool:
        x = self.pick(lambda v: len(v.shape) in (2, 4))
        perm = [0, 2, 1, 3] if len(x.shape) == 4 else [0, 1]
        out = self.raw.Transpose(x=x.tensor, perm=self.tf.constant(perm), name=self.name("transpose"))
        self.add(out, x.shape, x.nonneg)
        return True

    def concat(self) -> bool:
        x = self.pick()
        mates = [v for v in self.pool if v is not x and v.shape[:-1] == x.shape[:-1]
                 and v.shape[-1] + x.shape[-1] <= MAX_FEATURES]
        if not mates:
            return False
        y = mates[int(self.rng.integers(len(mates)))]
        y.uses += 1
        axis = len(x.shape) - 1
        out = self.raw.ConcatV2(values=[x.tensor, y.tensor], axis=self.tf.constant(axis), name=self.name("concat"))
        self.add(out, x.shape[:-1] + (x.shape[-1] + y.shape[-1],), x.nonneg and y.nonneg)
        return True

    def pad(self) -> bool:
        x = self.pick(lambda v: len(v.shape) == 4 and v.shape[1] + 2 <= MAX_SPATIAL)
        if x is None:
            return False
        b, h, w, c = x.shape
        out = self.raw.Pad(input=x.tensor, paddings=self.tf.constant([[0, 0], [1, 1], [1, 1], [0, 0]]),
                           name=self.name("pad"))
        self.add(out, (b, h + 2, w + 2, c), x.nonneg)
        return True

    def pooling(self) -> bool:
        x = self.pick(lambda v: len(v.shape) == 4 and v.shape[1] >= 2)
        if x is None:
            return False
        b, h, w, c = x.shape
        op = "MaxPool" if self.rng.random() < 0.5 else "AvgPool"
        if self.rng.random() < 0.5:
            ksize, strides, padding, oh = [1, 2, 2, 1], [1, 2, 2, 1], "VALID", h // 2
        else:
            ksize, strides, padding, oh = [1, 3, 3, 1], [1, 1, 1, 1], "SAME", h
        arg = {"MaxPool": "input", "AvgPool": "value"}[op]
        out = getattr(self.raw, op)(**{arg: x.tensor}, ksize=ksize, strides=strides, padding=padding,
                                    name=self.name(op))
        self.add(out, (b, oh, oh, c), x.nonneg)
        return True

    def batch_norm(self) -> bool:
        x = self.pick(lambda v: len(v.shape) == 4)
        if x is None:
            return False
        c = x.shape[3]
        scale = self.const(self.rng.uniform(0.5, 1.5, c), "gamma")
        offset = self.const(self.rng.uniform(-0.5, 0.5, c), "beta")
        mean = self.const(self.rng.uniform(-0.5, 0.5, c), "mean")
        var = self.const(self.rng.uniform(0.5, 2.0, c), "var")
        out = self.raw.FusedBatchNormV3(x=x.tensor, scale=scale, offset=offset, mean=mean, variance=var,
                                        epsilon=1e-3, is_training=False, name=self.name("bn"))
        self.add(out[0], x.shape)
        return True

    def cast(self) -> bool:
        x = self.pick()
        mid = [self.tf.float16, self.tf.bfloat16, self.tf.float64][int(self.rng.integers(3))]
        there = self.raw.Cast(x=x.tensor, DstT=mid, name=self.name("cast_to"))
        back = self.raw.Cast(x=there, DstT=self.tf.float32, name=self.name("cast_back"))
        self.add(back, x.shape, x.nonneg)
        return True


# Relative frequency of each builder: heavy ops and element-wise ops dominate, as in real models.
_BUILDERS: Tuple[Tuple[str, float], ...] = (
    ("conv", 2.0), ("matmul", 2.0), ("bias_add", 1.5), ("binary", 3.0), ("unary", 3.5), ("softmax", 0.4),
    ("reduce", 1.0), ("reshape", 1.0), ("transpose", 0.5), ("concat", 0.6), ("pad", 0.4), ("pooling", 0.8),
    ("batch_norm", 0.6), ("cast", 0.4),
)


def random_graph(seed: int, min_ops: int = 5, max_ops: int = 60) -> RandomGraph:
    """A random float graph of ``min_ops``..``max_ops`` ops (besides Consts), deterministic per seed."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    target = int(rng.integers(min_ops, max_ops + 1))
    graph = tf.Graph()
    with graph.as_default():
        builder = _Builder(tf, rng)
        inputs, shapes = [], []
        for i in range(1 if rng.random() < 0.7 else 2):
            if rng.random() < 0.6:
                hw = int(rng.choice([4, 8]))
                shape: Shape = (BATCH, hw, hw, int(rng.choice([2, 4, 8])))
            else:
                shape = (BATCH, int(rng.choice([8, 16, 32])))
            static = [None if rng.random() < 0.3 else BATCH] + list(shape[1:])
            ph = tf.compat.v1.placeholder(tf.float32, static, name=f"input_{i}")
            builder.pool.append(_Value(ph, shape))
            inputs.append(f"input_{i}")
            shapes.append(shape)
        names = [n for n, _ in _BUILDERS]
        weights = np.array([w for _, w in _BUILDERS])
        attempts = 0
        while len(builder.ops) < target and attempts < 20 * max_ops:
            attempts += 1
            getattr(builder, names[int(rng.choice(len(names), p=weights / weights.sum()))])()
        sinks = [v for v in builder.pool[len(inputs):] if v.uses == 0]
        if not sinks:
            sinks = [builder.pool[-1]]
        rng.shuffle(sinks)
        outputs = []
        for i, v in enumerate(sinks[:3]):
            if rng.random() < 0.5:
                outputs.append(tf.identity(v.tensor, name=f"output_{i}").op.name)
            else:
                outputs.append(v.tensor.op.name)
        graph_def = graph.as_graph_def()
    draws = [[rng.uniform(-1, 1, shape).astype(np.float32) for shape in shapes] for _ in range(DRAWS)]
    return RandomGraph(seed, graph_def, inputs, outputs, draws, builder.ops)


# --------------------------------------------------------------------------------------
# comparison with FP32 and TensorFlow's AMP
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Comparison:
    """One graph's outcome: errors relative to FP32 of tf_bf16 and TF's AMP, and what differed."""

    seed: int
    nodes: int
    status: str                   # "ok", "skipped" (FP32 output not finite), "refused" (tf_bf16 error)
    ours: float = 0.0
    tf_amp: float = 0.0
    casts: int = 0
    tf_amp_casts: int = 0
    bf16_nodes: int = 0
    detail: str = ""
    io_problems: List[str] = dataclasses.field(default_factory=list)

    @property
    def allowed(self) -> float:
        """The bound the fuzz test holds tf_bf16 to: max(1.25 x TF AMP's error, 1e-2)."""
        return max(1.25 * self.tf_amp, 1e-2)

    @property
    def worse(self) -> bool:
        return self.status == "ok" and not self.ours <= self.allowed

    @property
    def failed(self) -> bool:
        """Worse than allowed, or the graph's interface changed."""
        return self.worse or bool(self.io_problems)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["worse"] = self.worse
        return out


def relative_error(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """max |y - y32| / max |y32| over each output, worst output; inf when y is not finite."""
    worst = 0.0
    for out, ref in zip(outputs, reference):
        out = np.asarray(out, np.float64)
        ref = np.asarray(ref, np.float64)
        if not np.all(np.isfinite(out)):
            return math.inf
        scale = max(float(np.abs(ref).max(initial=0.0)), 1e-30)
        worst = max(worst, float(np.abs(out - ref).max(initial=0.0)) / scale)
    return worst


def run_draws(graph_def: Any, inputs: Sequence[str], outputs: Sequence[str],
              draws: Sequence[Sequence[np.ndarray]]) -> List[List[np.ndarray]]:
    """The outputs of ``graph_def`` for each feed draw, in one session on one thread."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        fetches = [graph.get_tensor_by_name(f"{o}:0") for o in outputs]
        placeholders = [graph.get_tensor_by_name(f"{i}:0") for i in inputs]
        return [session.run(fetches, dict(zip(placeholders, feeds))) for feeds in draws]


def median_error(runs: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]]) -> float:
    """``relative_error`` of the median draw."""
    return float(np.median([relative_error(o, r) for o, r in zip(runs, reference)]))


def io_problems(case: RandomGraph, converted: Any) -> List[str]:
    """What the conversion changed about the graph's interface (names, ops, dtypes); [] when nothing."""
    problems = []
    if list(converted.input_names) != list(case.inputs) or list(converted.output_names) != list(case.outputs):
        problems.append(f"names changed: {converted.input_names} -> {converted.output_names}")
    nodes = {n.name: n for n in converted.graph_def.node}
    for name in case.inputs:
        node = nodes.get(name)
        if node is None or node.op != "Placeholder" or node.attr["dtype"].type != 1:  # DT_FLOAT
            problems.append(f"input {name} is no longer a float32 Placeholder")
    return problems


def convert(case: RandomGraph, kernels: bool = False) -> Any:
    """tf_bf16's conversion of ``case`` (a ``tf_bf16.Model``), targeting a Sapphire Rapids CPU;
    ``kernels`` uses tf_bf16's fused kernel ops (the library must be built)."""
    from tf_bf16 import MixedPrecision, Model

    converter = MixedPrecision(target="spr", env={}, kernels=kernels)
    converter.model = Model(case.graph_def, inputs=case.inputs, outputs=case.outputs)
    return converter()


def compare(case: RandomGraph, kernels: bool = False) -> Comparison:
    """Convert ``case`` with tf_bf16 (with its kernels when ``kernels``) and with TF's AMP pass;
    errors of both against FP32."""
    from tf_bf16.errors import TfBf16Error
    from tf_bf16.tf_amp import tf_amp_bf16

    result = Comparison(case.seed, len(case.graph_def.node), "ok")
    reference = run_draws(case.graph_def, case.inputs, case.outputs, case.draws)
    if not all(np.all(np.isfinite(r)) for run in reference for r in run):
        result.status, result.detail = "skipped", "FP32 output not finite"
        return result
    try:
        converted = convert(case, kernels)
    except TfBf16Error as e:
        result.status, result.detail = "refused", str(e)
        return result
    result.io_problems = io_problems(case, converted)
    ours = run_draws(converted.graph_def, case.inputs, case.outputs, case.draws)
    if any(np.asarray(o).dtype != np.float32 for run in ours for o in run):
        result.io_problems.append("an output is no longer float32")
    try:
        amp_graph = tf_amp_bf16(case.graph_def, case.outputs)
    except TfBf16Error:   # no ALLOW op: TF's pass leaves the graph as it is
        amp_graph = case.graph_def
    amp = run_draws(amp_graph, case.inputs, case.outputs, case.draws)
    result.ours = median_error(ours, reference)
    result.tf_amp = median_error(amp, reference)
    result.casts = sum(n.op == "Cast" for n in converted.graph_def.node)
    result.tf_amp_casts = sum(n.op == "Cast" for n in amp_graph.node)
    result.bf16_nodes = int(converted.report["summary"].get("bf16_nodes", 0))
    return result
