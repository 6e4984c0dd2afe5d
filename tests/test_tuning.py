"""Tests for accuracy-aware tuning (tf_bf16.tuning, tf_bf16.sensitivity) on real trained models.

The fragile model is the trained digits CNN whose ``fc`` layer is split into two branches
``a = flat @ (W + R) + (b + 1e4)`` and ``b = flat @ R + 1e4`` with ``fc = relu(a - b)``: in
FP32 the difference is exact to ~1e-3, in BF16 (spacing 64 at 1e4) it is destroyed. Only
the two BiasAdds (and the Sub between them) must stay FP32.
"""

from __future__ import annotations

import logging
import math
import textwrap
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tf_bf16 import evaluation, pipeline, sensitivity, tuning
from tf_bf16.errors import ConfigError
from tf_bf16.experimental import MixedPrecision, common
from tf_bf16.model import Model
from tests import zoo

OFFSET = 1e4


class Digits:
    """The held-out digits as a user dataset: ``(image, label)`` samples."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]

    def __len__(self) -> int:
        return len(self.x)


def fragile_keras(base: Any, seed: int = 0) -> Any:
    """The trained digits CNN with its ``fc`` layer computed as a difference of two ~1e4 activations."""
    import keras
    from keras import layers

    w, b = base.get_layer("fc").get_weights()
    noise = np.random.default_rng(seed).normal(0.0, 0.05, w.shape).astype(np.float32)
    flat = base.get_layer("flatten").output
    branch_a = layers.Dense(w.shape[1], name="branch_a")
    branch_b = layers.Dense(w.shape[1], name="branch_b")
    diff = layers.Subtract(name="difference")([branch_a(flat), branch_b(flat)])
    hidden = layers.ReLU(name="fc_relu")(diff)
    head = layers.Dense(10, activation="softmax", name="head")
    model = keras.Model(base.input, head(hidden), name="fragile_digits")
    branch_a.set_weights([w + noise, b + OFFSET])
    branch_b.set_weights([noise, np.full_like(b, OFFSET)])
    head.set_weights(base.get_layer("probs").get_weights())
    return model


@pytest.fixture(scope="module")
def digits_model(digits) -> Tuple[Model, np.ndarray, np.ndarray]:
    keras_model, (x, y) = digits
    model = Model(keras_model)
    yield model, x, y
    model.close()


@pytest.fixture(scope="module")
def fragile(digits) -> Tuple[Model, np.ndarray, np.ndarray, FrozenSet[str], FrozenSet[str]]:
    """(model, x, y, the two large BiasAdds, their neighbourhood incl. the Sub)."""
    keras_model, (x, y) = digits
    model = Model(fragile_keras(keras_model))
    ops = {n.name: n.op for n in model.graph_def.node}
    core = frozenset(n for n, op in ops.items() if op == "BiasAdd" and ("branch_a" in n or "branch_b" in n))
    subs = frozenset(n for n, op in ops.items() if op == "Sub" and "difference" in n)
    assert len(core) == 2 and len(subs) == 1
    yield model, x, y, core, core | subs
    model.close()


def _converter(model: Model, x: np.ndarray, y: np.ndarray, conf: Optional[Dict[str, Any]] = None) -> MixedPrecision:
    converter = MixedPrecision(conf)
    converter.model = model
    converter.eval_dataloader = common.DataLoader(Digits(x, y), batch_size=64)
    converter.metric = common.TopK(1)
    return converter


def _accuracy(model: Model, x: np.ndarray, y: np.ndarray) -> float:
    return zoo.accuracy(model.run([x])[0], y)


def _bound(candidates: int) -> int:
    return math.ceil(math.log2(candidates)) + 3


def test_experimental_reexports_both_converters_and_common():
    """``tf_bf16.experimental`` offers Neural Compressor's experimental names, as the package's own objects."""
    import tf_bf16
    from tf_bf16 import experimental

    assert experimental.MixedPrecision is tf_bf16.MixedPrecision is MixedPrecision
    assert experimental.Quantization is tf_bf16.Quantization
    assert experimental.common is tf_bf16.common is common
    assert set(experimental.__all__) == {"MixedPrecision", "Quantization", "common"}


# --------------------------------------------------------------------------------------
# end to end on trained models
# --------------------------------------------------------------------------------------

def test_digits_full_bf16_meets_one_percent_in_one_trial(digits_model, caplog):
    model, x, y = digits_model
    with caplog.at_level(logging.INFO, logger="absl"):
        optimized = _converter(model, x, y, {"tuning": {"accuracy_criterion": {"relative": 0.01}}})()
    tuning_report = optimized.report["tuning"]
    baseline = tuning_report["baseline"]["accuracy"]
    assert baseline == pytest.approx(_accuracy(model, x, y)) and baseline > 0.9
    assert tuning_report["evaluations"] == 1 and len(tuning_report["trials"]) == 1
    trial = tuning_report["trials"][0]
    assert trial["phase"] == "full" and trial["passed"] and trial["fp32_nodes"] == []
    assert optimized.report["goal_met"] is True and tuning_report["best"]["trial"] == 1
    measured = _accuracy(optimized, x, y)
    assert measured == pytest.approx(trial["accuracy"]) and measured >= baseline * 0.99
    assert optimized.report["summary"]["bf16_share"] == trial["bf16_share"] > 0.8
    assert tuning_report["sensitivity"] is None  # nothing to rank: no extra runs
    text = caplog.text
    assert "trial 1/100 [full]" in text and "Tune Result Statistics" in text and "Baseline (FP32)" in text


def test_fragile_node_fails_full_bf16_and_falls_back_alone(fragile, caplog):
    model, x, y, core, neighbourhood = fragile
    with caplog.at_level(logging.INFO, logger="absl"):
        optimized = _converter(model, x, y)()
    report = optimized.report["tuning"]
    first = report["trials"][0]
    assert first["phase"] == "full" and not first["passed"]
    assert first["accuracy"] < report["criterion"]["target"] - 0.5  # BF16 destroys the difference
    assert report["goal_met"] and optimized.report["goal_met"]
    best = report["best"]
    fallen = set(best["fp32_nodes"])
    assert core <= fallen <= neighbourhood, fallen
    candidates = report["candidates"]
    assert best["bf16_nodes"] == candidates - len(fallen)  # everything else stays BF16
    assert report["evaluations"] <= _bound(candidates)
    assert report["evaluations"] < candidates  # one-op-per-trial needs at least one trial per BF16 node
    assert _accuracy(optimized, x, y) >= report["criterion"]["target"]
    for name in fallen:
        node = next(n for n in optimized.graph_def.node if n.name == name)
        assert node.attr["T"].type == 1  # DT_FLOAT
    assert {r["name"] for r in optimized.report["fp32_nodes"]} >= fallen
    lines = [r.getMessage() for r in caplog.records]
    assert sum("tf_bf16 tuning: trial " in line for line in lines) == report["evaluations"]
    assert any(line.startswith("Best (tune ") for line in lines)


def test_fragile_search_gives_back_all_but_what_must_stay_fp32(fragile):
    model, x, y, core, neighbourhood = fragile
    optimized = _converter(model, x, y, {"tuning": {"exit_policy": {"timeout": 600}}})()
    report = optimized.report["tuning"]
    assert report["goal_met"]
    assert core <= set(report["best"]["fp32_nodes"]) <= neighbourhood
    phases = [t["phase"] for t in report["trials"]]
    assert phases[0] == "full" and "give-back" in phases
    assert report["evaluations"] <= _bound(report["candidates"])
    configs = [tuple(t["fp32_nodes"]) for t in report["trials"]]
    assert len(configs) == len(set(configs))  # no configuration is evaluated twice
    assert all(not t["passed"] for t in report["trials"] if set(t["fp32_nodes"]) < core)


def _inc_trials(model: Model, x: np.ndarray, y: np.ndarray, target: float) -> Dict[str, Tuple[int, int]]:
    """Trials Neural Compressor's auto-mixed-precision stages need on this model (per the reference, section 4.2).

    Trial 1 is full BF16. Op-type-wise: one whole op type falls back per trial, types sorted by
    name. Op-wise: one op per trial, not cumulative, bottom-up; then fallbacks accumulate in the
    order of those accuracies. Returns {stage: (trials until the first pass, BF16 nodes left)}.
    """
    plan = MixedPrecision().plan_for(model)
    full = pipeline.convert_graph(model.graph_def, plan)
    ops = {n.name: n.op for n in full.cleaned.node}
    order = [n.name for n in full.cleaned.node if n.name in full.bf16_nodes][::-1]

    def evaluate(names) -> Tuple[float, int]:
        result = pipeline.convert_cleaned(full.cleaned, plan.with_fp32(names))
        candidate = model.with_graph_def(result.graph_def)
        try:
            return _accuracy(candidate, x, y), len(result.bf16_nodes)
        finally:
            candidate.close()

    out: Dict[str, Tuple[int, int]] = {}
    trials = 1
    for op_type in sorted({ops[n] for n in order}):
        trials += 1
        accuracy, left = evaluate([n for n in order if ops[n] == op_type])
        if accuracy >= target:
            out["op_type_wise"] = (trials, left)
            break
    trials, single = 1, []
    for name in order:
        trials += 1
        accuracy, left = evaluate([name])
        single.append((accuracy, name))
        if accuracy >= target:
            out["op_wise"] = (trials, left)
            return out
    fallen: List[str] = []
    for accuracy, name in sorted(single, key=lambda item: -item[0]):
        fallen.append(name)
        trials += 1
        accuracy, left = evaluate(fallen)
        if accuracy >= target:
            out["op_wise"] = (trials, left)
            break
    return out


def test_fewer_trials_than_neural_compressor_on_the_same_model(fragile):
    model, x, y, _, _ = fragile
    ours = _converter(model, x, y)().report["tuning"]
    inc = _inc_trials(model, x, y, ours["criterion"]["target"])
    candidates = ours["candidates"]
    op_wise_trials, _ = inc["op_wise"]
    assert op_wise_trials > candidates  # no single-op fallback passes: one trial per op, then accumulation
    assert ours["evaluations"] < op_wise_trials
    # Op-type-wise fallback passes sooner by giving a whole op type up; ours keeps more BF16.
    _, type_bf16 = inc["op_type_wise"]
    assert ours["best"]["bf16_nodes"] > type_bf16


def test_timeout_ends_the_search_after_the_first_trial(fragile):
    model, x, y, _, _ = fragile
    optimized = _converter(model, x, y, {"tuning": {"exit_policy": {"timeout": 1e-6}}})()
    report = optimized.report["tuning"]
    assert report["evaluations"] == 1 and not report["goal_met"] and "timeout" in report["stopped"]


def test_without_data_the_ranking_follows_the_graph_structure(fragile):
    model, _, _, _, _ = fragile
    result = pipeline.convert_graph(model.graph_def, MixedPrecision().plan_for(model))
    ranking = sensitivity.rank(result.cleaned, result.graph_def, result.bf16_nodes, model.input_names,
                               model.output_names, [])
    units = sensitivity.rounding_units(result.cleaned, result.graph_def, result.bf16_nodes)
    assert ranking.method == "structure" and "no input data" in ranking.note
    assert sorted(u.tensor for u in ranking.units) == sorted(u.tensor for u in units)
    assert set().union(*(u.nodes for u in units)) == set(result.bf16_nodes)  # every BF16 node can fall back
    # nearest the output first: the head's MatMul unit comes before the first convolution's
    index = {u.tensor: i for i, u in enumerate(ranking.units)}
    ops = {n.name: n.op for n in result.cleaned.node}
    first_conv = min((u for u in ranking.units if any(ops[n] == "Conv2D" for n in u.nodes)),
                     key=lambda u: [n.name for n in result.cleaned.node].index(min(u.nodes)))
    head = [u for u in ranking.units if any("head" in n and ops[n] == "MatMul" for n in u.nodes)]
    assert head and index[head[0].tensor] < index[first_conv.tensor]


def test_sensitivity_ranks_the_fragile_roundings_first(fragile):
    model, x, _, core, neighbourhood = fragile
    converter = MixedPrecision()
    plan = converter.plan_for(model)
    result = pipeline.convert_graph(model.graph_def, plan)
    ranking = sensitivity.rank(result.cleaned, result.graph_def, result.bf16_nodes, model.input_names,
                               model.output_names, [{model.input_names[0]: x[:128]}])
    assert ranking.method == "gradient" and ranking.samples == 128
    top = [u for u in ranking.units if u.nodes & core]
    rest = [u for u in ranking.units if not u.nodes & core]
    # both big activations and both big biases are the four top units, far above the rest
    assert ranking.units[:4] == sorted(top, key=lambda u: -u.score)[:4]
    assert all(u.nodes <= neighbourhood for u in ranking.units[:4])
    assert ranking.units[3].score > 100 * max(u.score for u in rest)


def test_eval_func_without_data_ranks_on_synthetic_inputs(fragile):
    model, x, y, core, neighbourhood = fragile
    converter = MixedPrecision()
    converter.model = model
    converter.eval_func = lambda m: _accuracy(m, x, y)
    optimized = converter()
    report = optimized.report["tuning"]
    assert report["sensitivity"]["samples"] == evaluation.SYNTHETIC_BATCH
    assert report["goal_met"] and core <= set(report["best"]["fp32_nodes"]) <= neighbourhood
    assert report["evaluations"] <= _bound(report["candidates"])


def test_unreachable_goal_returns_best_model_with_warning(fragile, caplog):
    model, x, y, core, _ = fragile
    # Pinning every BiasAdd to BF16 takes the fragile nodes out of the tuner's reach.
    conf = {"mixed_precision": {"op_type_wise": {"BiasAdd": {"activation": {"dtype": ["bf16"]}}}}}
    with caplog.at_level(logging.WARNING, logger="absl"):
        optimized = _converter(model, x, y, conf)()
    assert optimized is not None
    report = optimized.report["tuning"]
    assert optimized.report["goal_met"] is False and report["goal_met"] is False
    assert report["trials"] and not any(t["passed"] for t in report["trials"])
    assert not core & {n for t in report["trials"] for n in t["fp32_nodes"]}
    best = max(report["trials"], key=lambda t: t["accuracy"])
    assert report["best"]["accuracy"] == best["accuracy"]
    assert _accuracy(optimized, x, y) == pytest.approx(best["accuracy"])  # the model returned is the best one
    assert any(r.levelno == logging.WARNING and "no model met the accuracy goal" in r.getMessage()
               for r in caplog.records)


def test_max_trials_caps_the_search(fragile, caplog):
    model, x, y, _, _ = fragile
    with caplog.at_level(logging.WARNING, logger="absl"):
        optimized = _converter(model, x, y, {"tuning": {"exit_policy": {"max_trials": 1}}})()
    report = optimized.report["tuning"]
    assert report["evaluations"] == 1 and report["goal_met"] is False
    assert "max_trials (1)" in report["stopped"]
    assert "no model met the accuracy goal" in caplog.text


def test_yaml_only_flow_matches_python_flow(fragile, tmp_path):
    model, x, y, core, neighbourhood = fragile
    np.savez(tmp_path / "digits.npz", images=x, labels=y)
    conf = tmp_path / "conf.yaml"
    conf.write_text(textwrap.dedent(f"""\
        mixed_precision:
          precisions: bf16
        evaluation:
          accuracy:
            metric:
              topk: 1
            dataloader:
              batch_size: 50
              dataset:
                npz: {{path: {tmp_path / 'digits.npz'}, inputs: images, labels: labels}}
        tuning:
          accuracy_criterion:
            absolute: 0.01
            higher_is_better: true
          exit_policy: {{timeout: 0, max_trials: 20}}
          random_seed: 9
        """))
    converter = MixedPrecision(str(conf))
    converter.model = model
    optimized = converter()
    report = optimized.report["tuning"]
    assert report["criterion"]["kind"] == "absolute"
    assert report["criterion"]["target"] == pytest.approx(report["baseline"]["accuracy"] - 0.01)
    assert report["baseline"]["accuracy"] == pytest.approx(_accuracy(model, x, y))
    assert report["goal_met"] and core <= set(report["best"]["fp32_nodes"]) <= neighbourhood
    assert report["exit_policy"] == {"timeout": 0.0, "max_trials": 20}


@pytest.mark.parametrize("yaml_text,key", [
    ("tuning:\n  accuracy_criterion:\n    relative: 0.01\n    absolute: 0.01\n", "tuning.accuracy_criterion"),
    ("evaluation:\n  accuracy:\n    metric:\n      top5: {}\n", "evaluation.accuracy.metric"),
])
def test_bad_yaml_names_the_key(tmp_path, yaml_text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MixedPrecision(str(path))


def test_dataloader_without_metric_names_the_key(digits_model):
    model, x, y = digits_model
    converter = MixedPrecision()
    converter.model = model
    converter.eval_dataloader = common.DataLoader(Digits(x, y), batch_size=64)
    with pytest.raises(ConfigError, match=r"evaluation\.accuracy\.metric"):
        converter()
    converter.metric = "Accuracy"  # a metric name works in code too
    assert converter().report["tuning"]["goal_met"]


# --------------------------------------------------------------------------------------
# the pure parts: criterion and search
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,loss,higher,baseline,value,passes", [
    ("relative", 0.01, True, 0.80, 0.792, True), ("relative", 0.01, True, 0.80, 0.7919, False),
    ("absolute", 0.02, True, 0.80, 0.78, True), ("absolute", 0.02, True, 0.80, 0.7799, False),
    ("relative", 0.10, False, 2.0, 2.2, True), ("relative", 0.10, False, 2.0, 2.21, False),
    ("absolute", 0.0, False, 1.0, 1.0, True), ("relative", 0.5, True, -4.0, -6.0, True),
    ("relative", 0.5, True, -4.0, -6.1, False), ("absolute", 1.0, True, 0.5, float("nan"), False),
])
def test_criterion(kind, loss, higher, baseline, value, passes):
    criterion = evaluation.Criterion(kind, loss, higher)
    assert criterion.passes(value, baseline) is passes


def _units(order: List[str], scores: Optional[List[float]] = None) -> List[sensitivity.Unit]:
    scores = scores or [float(len(order) - i) for i in range(len(order))]
    return [sensitivity.Unit(name, frozenset({name}), s) for name, s in zip(order, scores)]


class _Oracle:
    """A monotone accuracy oracle: a set passes when it holds every critical node."""

    def __init__(self, critical: FrozenSet[str], budget: int = 10**6):
        self.critical, self.budget, self.calls = critical, budget, []

    def __call__(self, nodes: FrozenSet[str], phase: str) -> Optional[bool]:
        if len(self.calls) >= self.budget:
            return None
        self.calls.append((nodes, phase))
        return self.critical <= nodes


def _give_back_bound(n: int, critical: int) -> int:
    """Evaluations delta debugging may take to isolate ``critical`` nodes among ``n``."""
    return (2 * critical + 1) * math.ceil(math.log2(n + 1)) + 2


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), data=st.data())
def test_search_is_exact_in_one_evaluation_when_the_ranking_is_right(n, data):
    names = [f"n{i}" for i in range(n)]
    c = data.draw(st.integers(1, min(n, 5)))
    order = data.draw(st.permutations(names))
    critical = frozenset(order[:c])
    # scores: the critical units dominate; the rest share a small remainder
    scores = [100.0 - i for i in range(c)] + [1e-3] * (n - c)
    oracle = _Oracle(critical)
    found = tuning.search(_units(order, scores), oracle, error_share=0.01)
    assert found == critical and len(oracle.calls) == 1  # the prediction is right the first time
    assert tuning.give_back(sorted(found, key=order.index), oracle) == critical
    assert len(oracle.calls) <= 1 + _give_back_bound(c, c)
    assert len({calls for calls, _ in oracle.calls}) == len(oracle.calls)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 200), data=st.data())
def test_give_back_after_a_noisy_ranking_keeps_exactly_the_critical_nodes(n, data):
    names = [f"n{i}" for i in range(n)]
    order = data.draw(st.permutations(names))
    c = data.draw(st.integers(1, min(n, 4)))
    critical = frozenset(data.draw(st.lists(st.sampled_from(names), min_size=c, max_size=c, unique=True)))
    oracle = _Oracle(critical)
    found = tuning.search(_units(order), oracle, error_share=0.3)
    assert found is not None and critical <= found
    searched = len(oracle.calls)
    assert searched <= math.ceil(math.log2(n + 1)) + 2
    assert tuning.give_back([name for name in order if name in found], oracle) == critical
    assert len(oracle.calls) - searched <= _give_back_bound(len(found), c)


def test_give_back_from_everything_fp32_without_a_ranking():
    names = [f"n{i}" for i in range(64)]
    oracle = _Oracle(frozenset({"n40"}))
    assert tuning.give_back(names, oracle) == frozenset({"n40"})
    assert all(phase == "give-back" for _, phase in oracle.calls)
    assert len(oracle.calls) <= _give_back_bound(64, 1)


def test_search_and_give_back_stop_when_the_budget_is_spent_and_when_nothing_passes():
    units = _units([f"n{i}" for i in range(64)])
    early = _Oracle(frozenset({"n40"}), budget=1)
    assert tuning.search(_units([f"n{i}" for i in range(64)], [0.0] * 64), early) is None  # k=1 fails, stop
    never = _Oracle(frozenset({"absent"}))
    assert tuning.search(units, never) is None
    assert never.calls[-1][0] == frozenset(u.tensor for u in units)  # tried everything once
    assert len(never.calls) <= math.ceil(math.log2(64)) + 1
    names = [f"n{i}" for i in range(64)]
    spent = _Oracle(frozenset({"n40"}), budget=3)
    kept = tuning.give_back(names, spent)
    assert len(spent.calls) == 3 and frozenset({"n40"}) <= kept < frozenset(names)


def test_graph_a_gives_back_everything_but_the_failing_conv_within_eight_evaluations():
    """Neural Compressor's three-conv graph, an eval_func that fails only while conv2 is BF16,
    and no data (so no sensitivity estimate): the result keeps conv1 and conv3 BF16."""
    from tf_bf16.transforms import graph as g

    def conv2_is_fp32(model: Model) -> float:
        conv2 = next(n for n in model.graph_def.node if n.name == "conv2")
        return 1.0 if conv2.attr["T"].type == g.FLOAT else 0.0

    converter = MixedPrecision(target="spr", env={})
    converter.model = Model(zoo.three_conv_graph(), inputs=["input"], outputs=["final"])
    converter.eval_func = conv2_is_fp32
    optimized = converter()
    report = optimized.report["tuning"]
    assert report["goal_met"] and report["evaluations"] <= 8, report["evaluations"]
    assert report["sensitivity"]["method"] == "structure"
    precision = {n.name: n.attr["T"].type for n in optimized.graph_def.node if n.name in ("conv1", "conv2", "conv3")}
    assert precision == {"conv1": g.BFLOAT16, "conv2": g.FLOAT, "conv3": g.BFLOAT16}
    # Only conv2 and what its FP32 output makes FP32 (its BiasAdd and ReLU) are given up.
    assert set(report["best"]["fp32_nodes"]) <= {"conv2", "conv2_bias_add", "relu2"}
    assert any(t["phase"] == "give-back" and t["passed"] for t in report["trials"])
