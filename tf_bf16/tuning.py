"""Accuracy-aware tuning: the most-BF16 model that meets the accuracy criterion, in few evaluations.

``tune(spec, model, plan, result)`` is called by ``MixedPrecision`` after the full BF16
conversion when evaluation components are set; ``spec`` (``tf_bf16.evaluation``) says how a
model is scored, what passes and when to stop. It evaluates the FP32 baseline once, then:

1. trial 1 is the full BF16 conversion; if it meets the criterion, that is the answer;
2. otherwise the fallback candidates are ranked: by a first-order sensitivity estimate (one
   FP32 and one BF16 run on a few batches, ``tf_bf16.sensitivity``) when there is data, else
   by graph structure (nearest the outputs first);
3. a passing fallback set is found: with an estimate, the cumulative sets ``S_k`` (top-k
   units forced FP32) starting at the smallest one predicted to remove enough error, then
   galloping upward; without one, every candidate FP32 (the FP32 model itself);
4. delta debugging gives nodes of that set back to BF16 in halves, least sensitive first,
   while the criterion holds, so the result keeps only the nodes that must be FP32.

Neural Compressor's op-wise search evaluates one single-op fallback per trial (as many
trials as BF16 ops before accumulating); this search needs a few times log2 of that. Trials
never repeat a configuration (they are keyed by the resulting BF16 node set), the exit
policy (``timeout`` seconds for the whole search, 0 = no time limit; ``max_trials``) is
respected, and when no model meets the goal the best one found is returned with
``goal_met`` False and a warning, never None.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

from absl import logging

from tf_bf16 import pipeline, report as report_lib, sensitivity
from tf_bf16.errors import EvaluationError
from tf_bf16.evaluation import Criterion, EvaluationSpec, Evaluator, synthetic_feeds
from tf_bf16.model import Model
from tf_bf16.transforms.plan import BF16, FP32, INT8, PrecisionPlan

# The first guess falls back the top units until the unexplained share of the output error
# is at most allowed_loss / full_bf16_loss, clipped to this range.
MIN_ERROR_SHARE, MAX_ERROR_SHARE = 0.01, 0.5


# --------------------------------------------------------------------------------------
# the search over ranked fallback units (pure: no TensorFlow, testable on its own)
# --------------------------------------------------------------------------------------

# evaluate(fp32 node set, phase) -> True (passes) / False (fails) / None (budget spent: stop)
EvaluateFn = Callable[[FrozenSet[str], str], Optional[bool]]


def prefix_sets(units: Sequence[sensitivity.Unit]) -> List[FrozenSet[str]]:
    """Distinct growing fallback sets: S_1 = top unit's nodes, S_k adds the next unit that adds nodes."""
    sets: List[FrozenSet[str]] = []
    current: FrozenSet[str] = frozenset()
    for unit in units:
        grown = current | unit.nodes
        if grown != current:
            sets.append(grown)
            current = grown
    return sets


def predicted_index(units: Sequence[sensitivity.Unit], sets: Sequence[FrozenSet[str]], error_share: float) -> int:
    """1-based index of the smallest set whose units leave at most ``error_share`` of the total score."""
    weights = [max(u.score, 0.0) for u in units]
    total = sum(weights)
    if not sets or total <= 0:
        return 1
    for k, nodes in enumerate(sets, start=1):
        covered = sum(w for u, w in zip(units, weights) if u.nodes <= nodes)
        if 1.0 - covered / total <= error_share:
            return k
    return len(sets)


def search(units: Sequence[sensitivity.Unit], evaluate: EvaluateFn,
           error_share: float = MIN_ERROR_SHARE) -> Optional[FrozenSet[str]]:
    """The first passing fallback set over ranked units (None if none passed or the budget ran out).

    The predicted prefix first, then doubling the prefix until one passes.
    """
    sets = prefix_sets(units)
    if not sets:
        return None
    m = len(sets)
    k = min(max(predicted_index(units, sets, error_share), 1), m)
    phase = "predict"
    while True:
        outcome = evaluate(sets[k - 1], phase)
        if outcome is None:
            return None
        if outcome:
            return sets[k - 1]
        if k == m:
            return None
        k, phase = min(m, max(k + 1, 2 * k)), "expand"


def give_back(fallback: Sequence[str], evaluate: EvaluateFn) -> FrozenSet[str]:
    """Delta debugging: return nodes of a passing FP32 set to BF16 in halves while the goal holds.

    ``fallback`` is ordered most sensitive first; at each granularity the least sensitive
    chunk is offered back first. A chunk that can go back leaves the set; when no chunk can,
    the chunks are halved, down to single nodes. With ``c`` nodes that must stay FP32 this
    takes about ``2 c log2(len(fallback))`` evaluations. Returns the smallest set that
    passed (``fallback`` itself when nothing could go back or the budget ran out).
    """
    kept = list(fallback)
    seen: Dict[FrozenSet[str], bool] = {}
    n = 2
    while kept:
        n = min(n, len(kept))
        size = math.ceil(len(kept) / n)
        chunks = [kept[i:i + size] for i in range(0, len(kept), size)]
        for chunk in reversed(chunks):
            trial = frozenset(kept) - frozenset(chunk)
            if any(trial <= failed for failed, ok in seen.items() if not ok):
                continue   # a superset already failed: keeping fewer FP32 nodes fails too
            outcome = seen[trial] = evaluate(trial, "give-back")
            if outcome is None:
                return frozenset(kept)
            if outcome:
                back = set(chunk)
                kept = [name for name in kept if name not in back]
                n = max(n - 1, 2)
                break
        else:
            if size == 1:
                break
            n = min(2 * n, len(kept))
    return frozenset(kept)


def ranked_nodes(units: Sequence[sensitivity.Unit], candidates: Iterable[str]) -> List[str]:
    """Candidate nodes, most sensitive first: in the order their first (highest-ranked) unit names them."""
    allowed = set(candidates)
    order: Dict[str, None] = {}
    for unit in units:
        for name in sorted(unit.nodes):
            if name in allowed:
                order.setdefault(name, None)
    order.update({name: None for name in sorted(allowed)})   # nodes no unit names go last
    return list(order)


# --------------------------------------------------------------------------------------
# trials
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Trial:
    """One evaluated configuration."""

    number: int
    phase: str
    accuracy: float
    passed: bool
    bf16_share: float
    bf16_count: int
    fp32_nodes: Tuple[str, ...]       # nodes BF16 in the full conversion that this trial keeps FP32
    seconds: float
    elapsed: float
    error: str = ""

    def to_dict(self) -> Dict[str, Any]:
        out = {"trial": self.number, "phase": self.phase, "accuracy": self.accuracy, "passed": self.passed,
               "bf16_share": self.bf16_share, "bf16_nodes": self.bf16_count, "fp32_nodes": list(self.fp32_nodes),
               "seconds": round(self.seconds, 4), "elapsed": round(self.elapsed, 3)}
        if self.error:
            out["error"] = self.error
        return out


class _Tuner:
    """Runs trials for one ``tune`` call: conversion, caching, budget, bookkeeping and logging."""

    def __init__(self, model: Model, plan: PrecisionPlan, full: pipeline.ConversionResult, evaluator: Evaluator,
                 criterion: Criterion, baseline: float, max_trials: int, timeout: float, start: float,
                 kernels: bool = False):
        self.model = model
        self.kernels = kernels
        self.plan = plan
        self.full = full
        self.evaluator = evaluator
        self.criterion = criterion
        self.baseline = baseline
        self.max_trials = max_trials
        self.timeout = timeout
        self.start = start
        self.trials: List[Trial] = []
        self.cache: Dict[FrozenSet[str], Trial] = {}
        self.best: Optional[Trial] = None
        self.best_result: Optional[pipeline.ConversionResult] = None
        self.stopped = ""

    def budget_left(self) -> bool:
        """Whether another trial fits the exit policy (the first trial always runs)."""
        if len(self.trials) >= self.max_trials:
            self.stopped = f"max_trials ({self.max_trials}) reached"
            return False
        if self.trials and self.timeout > 0 and time.perf_counter() - self.start >= self.timeout:
            self.stopped = f"timeout ({self.timeout:g} s) reached"
            return False
        return True

    def run_trial(self, result: pipeline.ConversionResult, phase: str) -> Optional[Trial]:
        """Evaluate a conversion unless an identical one was evaluated; None when the budget is spent."""
        key = frozenset(result.bf16_nodes)
        if key in self.cache:
            return self.cache[key]
        if not self.budget_left():
            return None
        t0 = time.perf_counter()
        accuracy, error = _score(self.evaluator, self.model, result.graph_def, len(self.trials) + 1)
        summary = report_lib.build_report(self.model.graph_def, result.graph_def, {})["summary"]
        trial = Trial(number=len(self.trials) + 1, phase=phase, accuracy=accuracy,
                      passed=self.criterion.passes(accuracy, self.baseline), bf16_share=summary["bf16_share"],
                      bf16_count=len(key), fp32_nodes=tuple(sorted(self.full.bf16_nodes - key)),
                      seconds=time.perf_counter() - t0, elapsed=time.perf_counter() - self.start, error=error)
        self.trials.append(trial)
        self.cache[key] = trial
        if self._better(trial):
            self.best, self.best_result = trial, result
        self._log(trial)
        return trial

    def evaluate_set(self, fp32_nodes: FrozenSet[str], phase: str) -> Optional[bool]:
        """The search's callback: convert with ``fp32_nodes`` forced FP32 and evaluate."""
        result = pipeline.convert_cleaned(self.full.cleaned, self.plan.with_fp32(sorted(fp32_nodes)), self.kernels)
        trial = self.run_trial(result, phase)
        return None if trial is None else trial.passed

    def passed_any(self) -> bool:
        """Whether some trial so far met the goal."""
        return self.best is not None and self.best.passed

    def _better(self, trial: Trial) -> bool:
        best = self.best
        if best is None:
            return True
        if trial.passed != best.passed:
            return trial.passed
        if trial.passed:   # both pass: the most BF16 wins, then accuracy
            if trial.bf16_count != best.bf16_count:
                return trial.bf16_count > best.bf16_count
            return self.criterion.better(trial.accuracy, best.accuracy)
        if self.criterion.better(trial.accuracy, best.accuracy):
            return True
        return trial.accuracy == best.accuracy and trial.bf16_count > best.bf16_count

    def _log(self, trial: Trial) -> None:
        op = ">=" if self.criterion.higher_is_better else "<="
        logging.info("tf_bf16 tuning: trial %d/%d [%s] accuracy %.4f (target %s %.4f, baseline %.4f) %s | "
                     "BF16 share %.1f%% | %d node(s) FP32 | %.2fs, elapsed %.1fs",
                     trial.number, self.max_trials, trial.phase, trial.accuracy, op,
                     self.criterion.target(self.baseline), self.baseline, "PASS" if trial.passed else "fail",
                     100 * trial.bf16_share, len(trial.fp32_nodes), trial.seconds, trial.elapsed)


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------

def tune(spec: EvaluationSpec, model: Model, plan: PrecisionPlan, result: pipeline.ConversionResult,
         base_report: Optional[Mapping[str, Any]] = None, kernels: bool = False) -> Model:
    """Accuracy-aware fallback search from the full BF16 ``result``, scored as ``spec`` says;
    returns the chosen model.

    ``base_report`` (the full conversion's report) supplies extra report keys (target, timings);
    ``kernels`` re-runs each trial's conversion with the kernel rewrite, as ``result`` was made.
    """
    start = time.perf_counter()
    extra = _extra(base_report)
    if spec.performance_only:
        return _untuned(model, result, extra)
    evaluator, criterion = spec.evaluator, spec.criterion
    baseline, baseline_seconds = _baseline(evaluator, model)
    logging.info("tf_bf16 tuning: FP32 baseline %.4f (%.2fs); criterion %s %g -> target %s %.4f",
                 baseline, baseline_seconds, criterion.kind, criterion.tolerable_loss,
                 ">=" if criterion.higher_is_better else "<=", criterion.target(baseline))
    tuner = _Tuner(model, plan, result, evaluator, criterion, baseline, spec.max_trials, spec.timeout, start,
                   kernels)
    first = tuner.run_trial(result, "full")
    ranking: Optional[sensitivity.Ranking] = None
    if first is not None and not first.passed:
        forced_bf16 = {n for n in result.bf16_nodes if plan.node_precisions.get(n) == BF16}
        forced_bf16 |= {n.name for n in result.cleaned.node if plan.op_type_precisions.get(n.op) == BF16}
        candidates = result.bf16_nodes - forced_bf16
        feeds = evaluator.sample_feeds(model.input_names)
        if not feeds:
            feeds = synthetic_feeds(model, spec.random_seed)
        ranking = sensitivity.rank(result.cleaned, result.graph_def, result.bf16_nodes, model.input_names,
                                   model.output_names, feeds, candidates)
        order = ranked_nodes(ranking.units, candidates)
        if ranking.method == "gradient":
            full_loss = criterion.loss(first.accuracy, baseline)
            allowed = abs(criterion.target(baseline) - baseline)
            share = allowed / full_loss if full_loss > 0 and math.isfinite(full_loss) else MIN_ERROR_SHARE
            share = min(max(share, MIN_ERROR_SHARE), MAX_ERROR_SHARE)
            found = search(ranking.units, tuner.evaluate_set, error_share=share)
        else:
            # No estimate to go by: start from every candidate FP32 (the FP32 model, which meets
            # the goal) and let delta debugging give nodes back.
            found = frozenset(order)
        if found is not None:
            give_back([name for name in order if name in found], tuner.evaluate_set)
            if not tuner.passed_any():
                tuner.evaluate_set(found, "fallback")
    return _finish(tuner, model, result, ranking, baseline, baseline_seconds, criterion, extra, len(result.bf16_nodes))


def _score(evaluator: Evaluator, model: Model, graph_def: Any, number: int) -> Tuple[float, str]:
    """(accuracy, error text) of ``model`` run as ``graph_def``; a candidate that fails to run is a
    failed trial (NaN), not a crash."""
    candidate = model.with_graph_def(graph_def)
    try:
        return evaluator(candidate), ""
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
        logging.warning("tf_bf16 tuning: evaluating trial %d failed: %s", number, error)
        return float("nan"), error
    finally:
        candidate.close()


def _extra(base_report: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The conversion report's keys a tuned report keeps (target, timings ...)."""
    return {k: v for k, v in (base_report or {}).items() if k not in ("summary", "op_types", "fp32_nodes", "int8")}


def _untuned(model: Model, result: pipeline.ConversionResult, extra: Dict[str, Any]) -> Model:
    """``exit_policy.performance_only``: the conversion as it is, no evaluation at all."""
    logging.info("tf_bf16 tuning: exit_policy.performance_only is set; no accuracy evaluation")
    report = report_lib.build_report(model.graph_def, result.graph_def, result.fp32_reasons, extra,
                                     int8_nodes=result.int8_nodes or None)
    report["tuning"] = {"skipped": "tuning.exit_policy.performance_only"}
    return model.with_graph_def(result.graph_def, report)


def _baseline(evaluator: Evaluator, model: Model) -> Tuple[float, float]:
    """(FP32 accuracy, seconds it took); EvaluationError when it is not a finite number."""
    t0 = time.perf_counter()
    baseline = evaluator(model)
    if not math.isfinite(baseline):
        raise EvaluationError(f"the FP32 baseline evaluated to {baseline}; the evaluation must return a finite number")
    return baseline, time.perf_counter() - t0


def _finish(tuner: _Tuner, model: Model, full: pipeline.ConversionResult, ranking: Optional[sensitivity.Ranking],
            baseline: float, baseline_seconds: float, criterion: Criterion, extra: Dict[str, Any],
            candidates: int) -> Model:
    """Build the best model's report, log the statistics table and warn when the goal is not met."""
    best, best_result = tuner.best, tuner.best_result or full
    goal_met = bool(best is not None and best.passed)
    reasons = dict(best_result.fp32_reasons)
    fallen = set(best.fp32_nodes) if best is not None else set()
    for name in fallen:
        reasons[name] = "accuracy tuning fell it back to FP32"
    report = report_lib.build_report(model.graph_def, best_result.graph_def, reasons, extra)
    policy = {"timeout": tuner.timeout, "max_trials": tuner.max_trials}
    tuning = {
        "baseline": {"accuracy": baseline, "seconds": round(baseline_seconds, 4)},
        "criterion": criterion.to_dict(baseline),
        "exit_policy": policy,
        "candidates": candidates,
        "trials": [t.to_dict() for t in tuner.trials],
        "best": best.to_dict() if best is not None else None,
        "goal_met": goal_met,
        "evaluations": len(tuner.trials),
        "stopped": tuner.stopped or ("goal met" if goal_met else "search exhausted"),
        "sensitivity": ranking.to_dict() if ranking is not None else None,
        "seconds": round(time.perf_counter() - tuner.start, 3),
    }
    report["tuning"] = tuning
    report["goal_met"] = goal_met
    for line in format_table(tuning).splitlines():
        logging.info(line)
    if not goal_met:
        logging.warning(
            "tf_bf16 tuning: no model met the accuracy goal (%s %g, target %s %.4f, baseline %.4f) within the "
            "exit policy (%s); returning the best model found: trial %s, accuracy %s, BF16 share %s. "
            "report['goal_met'] is False.",
            criterion.kind, criterion.tolerable_loss, ">=" if criterion.higher_is_better else "<=",
            criterion.target(baseline), baseline, tuning["stopped"],
            best.number if best else "-", f"{best.accuracy:.4f}" if best else "-",
            f"{100 * best.bf16_share:.1f}%" if best else "-")
    return model.with_graph_def(best_result.graph_def, report)


def format_table(tuning: Mapping[str, Any]) -> str:
    """The "Tune Result Statistics" table: baseline, every trial and the best one."""
    header = f"{'Info Type':<16}{'Accuracy':>12}{'BF16 share':>12}{'FP32 nodes':>12}{'Passed':>8}{'Seconds':>9}  Phase"
    lines = ["Tune Result Statistics", header, "-" * len(header)]
    base = tuning["baseline"]
    lines.append(f"{'Baseline (FP32)':<16}{base['accuracy']:>12.4f}{'0.0%':>12}{'all':>12}{'-':>8}"
                 f"{base['seconds']:>9.2f}")

    def row(label: str, t: Mapping[str, Any]) -> str:
        return (f"{label:<16}{t['accuracy']:>12.4f}{100 * t['bf16_share']:>11.1f}%{len(t['fp32_nodes']):>12}"
                f"{'yes' if t['passed'] else 'no':>8}{t['seconds']:>9.2f}  {t['phase']}")

    for t in tuning["trials"]:
        lines.append(row(f"Tune {t['trial']} result", t))
    if tuning.get("best"):
        lines.append(row(f"Best (tune {tuning['best']['trial']})", tuning["best"]))
    lines.append(f"goal met: {tuning['goal_met']}; {tuning['evaluations']} evaluation(s) besides the baseline "
                 f"({tuning['stopped']}); target {'>=' if tuning['criterion']['higher_is_better'] else '<='} "
                 f"{tuning['criterion']['target']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# three dtypes: INT8 -> BF16 -> FP32
# --------------------------------------------------------------------------------------

CONTRACTIONS = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul"})


@dataclasses.dataclass
class Int8Trial:
    """One evaluated INT8/BF16 configuration: the first ``fallback`` ranked INT8 ops run in BF16."""

    number: int
    phase: str
    accuracy: float
    passed: bool
    fallback: int
    dtypes: Dict[str, str]            # every candidate op -> "int8" / "bf16" (or "fp32", int8_fallback) in this trial
    seconds: float
    elapsed: float
    error: str = ""

    def to_dict(self) -> Dict[str, Any]:
        out = {"trial": self.number, "phase": self.phase, "accuracy": self.accuracy, "passed": self.passed,
               "bf16_fallback": self.fallback, "int8_ops": sum(1 for d in self.dtypes.values() if d == "int8"),
               "dtypes": dict(self.dtypes), "seconds": round(self.seconds, 4), "elapsed": round(self.elapsed, 3)}
        if self.error:
            out["error"] = self.error
        return out


def int8_candidates(cleaned: Any, plan: PrecisionPlan, result: pipeline.ConversionResult) -> List[str]:
    """The contractions the INT8 stage quantized that the user did not force to INT8 (tuning may move them)."""
    ops = {n.name: n.op for n in cleaned.node}
    return sorted(n for n in result.int8_nodes
                  if ops.get(n) in CONTRACTIONS and plan.forced(n, ops[n]) != INT8)


def int8_fallback(plan: PrecisionPlan, name: str, op: str) -> str:
    """The precision tuning gives an INT8 op back to: BF16, or FP32 where the plan allows the node no BF16."""
    return BF16 if BF16 in plan.allowed(name, op) else FP32


def tune_quantized(spec: EvaluationSpec, model: Model, cleaned: Any, plan: PrecisionPlan,
                   result: pipeline.ConversionResult, base_report: Optional[Mapping[str, Any]] = None,
                   kernels: bool = False) -> Model:
    """Accuracy-aware search over INT8 -> BF16 -> FP32 from the full INT8 ``result`` (``plan`` carries
    the calibrated ranges); returns the chosen model.

    Trial 1 is the full INT8+BF16 conversion. If it fails, the INT8 ops are ranked by their
    quantization noise (``int8_sensitivity``) and trial 2 runs them all in BF16; if even that
    fails, the BF16 -> FP32 search (``tune``) takes over from it. Otherwise a bisection finds
    the fewest most-sensitive ops to give back to BF16 (to FP32 for a node the config limits
    to int8/fp32, ``int8_fallback``): at most ceil(log2 N) + 2 evaluations
    besides the baseline for N candidate ops. Each trial records every candidate's dtype.
    """
    from tf_bf16 import int8_sensitivity

    start = time.perf_counter()
    extra = _extra(base_report)
    if spec.performance_only:
        return _untuned(model, result, extra)
    evaluator, criterion = spec.evaluator, spec.criterion
    baseline, baseline_seconds = _baseline(evaluator, model)
    candidates = int8_candidates(cleaned, plan, result)
    feeds = evaluator.sample_feeds(model.input_names) or synthetic_feeds(model, spec.random_seed)
    scores = int8_sensitivity.int8_noise(cleaned, plan.quantization.ranges if plan.quantization else {},
                                         candidates, model.input_names, feeds)
    ranked = sorted(candidates, key=lambda n: (-scores.get(n, 0.0), n))
    tuner = _Int8Search(model, cleaned, plan, ranked, evaluator, criterion, baseline, spec, kernels, start)
    tuner.evaluate(0, "full int8", result)
    if not tuner.passed(0) and ranked:
        if tuner.evaluate(len(ranked), "all bf16") is False:
            logging.info("tf_bf16 tuning: every INT8 op in BF16 still misses the goal; searching BF16 -> FP32")
            # The plain BF16 plan (no INT8 stage, no forced BF16) lets tune() move any node to FP32.
            bf16_plan = dataclasses.replace(plan, quantization=None)
            bf16_result = pipeline.convert_cleaned(cleaned, bf16_plan, kernels)
            tuned = tune(spec, model, bf16_plan, bf16_result, base_report, kernels)
            tuned.report.setdefault("tuning", {})["int8"] = tuner.summary(scores, None)
            return tuned
        low, high = 0, len(ranked)
        while high - low > 1:
            middle = (low + high) // 2
            outcome = tuner.evaluate(middle, "bisect")
            if outcome is None:
                break
            low, high = (low, middle) if outcome else (middle, high)
    return tuner.finish(scores, baseline_seconds, extra)


class _Int8Search:
    """Trials of one ``tune_quantized`` call: conversion per fallback count, budget, bookkeeping."""

    def __init__(self, model: Model, cleaned: Any, plan: PrecisionPlan, ranked: Sequence[str], evaluator: Evaluator,
                 criterion: Criterion, baseline: float, spec: EvaluationSpec, kernels: bool, start: float):
        self.model, self.cleaned, self.plan, self.ranked = model, cleaned, plan, list(ranked)
        ops = {n.name: n.op for n in cleaned.node}
        self.fallbacks = {name: int8_fallback(plan, name, ops.get(name, "")) for name in self.ranked}
        self.evaluator, self.criterion, self.baseline = evaluator, criterion, baseline
        self.max_trials, self.timeout, self.kernels, self.start = spec.max_trials, spec.timeout, kernels, start
        self.trials: List[Int8Trial] = []
        self.results: Dict[int, pipeline.ConversionResult] = {}
        self.outcomes: Dict[int, bool] = {}
        self.stopped = ""

    def plan_for(self, fallback: int) -> PrecisionPlan:
        """The plan with the ``fallback`` most sensitive INT8 ops forced to BF16 (or FP32, ``int8_fallback``)."""
        forced = dict(self.plan.node_precisions)
        forced.update({name: self.fallbacks[name] for name in self.ranked[:fallback]})
        return dataclasses.replace(self.plan, node_precisions=forced)

    def passed(self, fallback: int) -> bool:
        return self.outcomes.get(fallback, False)

    def evaluate(self, fallback: int, phase: str, result: Optional[pipeline.ConversionResult] = None) -> Optional[bool]:
        """Convert (unless given) and evaluate one configuration; None when the exit policy stops the search."""
        if fallback in self.outcomes:
            return self.outcomes[fallback]
        if self.trials and (len(self.trials) >= self.max_trials or
                            (self.timeout > 0 and time.perf_counter() - self.start >= self.timeout)):
            self.stopped = "max_trials reached" if len(self.trials) >= self.max_trials else "timeout reached"
            return None
        t0 = time.perf_counter()
        if result is None:
            result = pipeline.convert_cleaned(self.cleaned, self.plan_for(fallback), self.kernels)
        accuracy, error = _score(self.evaluator, self.model, result.graph_def, len(self.trials) + 1)
        passed = self.criterion.passes(accuracy, self.baseline)
        dtypes = {name: (self.fallbacks[name] if i < fallback else INT8) for i, name in enumerate(self.ranked)}
        trial = Int8Trial(len(self.trials) + 1, phase, accuracy, passed, fallback, dtypes,
                          time.perf_counter() - t0, time.perf_counter() - self.start, error)
        self.trials.append(trial)
        self.results[fallback] = result
        self.outcomes[fallback] = passed
        logging.info("tf_bf16 tuning: trial %d [%s] accuracy %.4f (target %.4f, baseline %.4f) %s | "
                     "%d of %d INT8 op(s) in BF16 | %.2fs", trial.number, phase, accuracy,
                     self.criterion.target(self.baseline), self.baseline, "PASS" if passed else "fail",
                     fallback, len(self.ranked), trial.seconds)
        return passed

    def best(self) -> int:
        """The passing trial with the fewest BF16 fallbacks, else the most accurate one."""
        passing = [t for t in self.trials if t.passed]
        if passing:
            return min(passing, key=lambda t: t.fallback).fallback
        scored = [t for t in self.trials if math.isfinite(t.accuracy)] or self.trials
        best = scored[0]
        for t in scored[1:]:
            if self.criterion.better(t.accuracy, best.accuracy):
                best = t
        return best.fallback

    def summary(self, scores: Mapping[str, float], best: Optional[int]) -> Dict[str, Any]:
        return {"candidates": len(self.ranked), "ranking": [{"node": n, "noise": round(scores.get(n, 0.0), 8)}
                                                           for n in self.ranked[:20]],
                "trials": [t.to_dict() for t in self.trials], "best_fallback": best}

    def finish(self, scores: Mapping[str, float], baseline_seconds: float, extra: Dict[str, Any]) -> Model:
        """The chosen model with its report: the trial table shows every candidate's dtype per trial."""
        fallback = self.best()
        best = next(t for t in self.trials if t.fallback == fallback)
        result = self.results[fallback]
        reasons = dict(result.fp32_reasons)
        report = report_lib.build_report(self.model.graph_def, result.graph_def, reasons, extra,
                                         int8_nodes=result.int8_nodes)
        goal_met = best.passed
        report["tuning"] = {
            "baseline": {"accuracy": self.baseline, "seconds": round(baseline_seconds, 4)},
            "criterion": self.criterion.to_dict(self.baseline),
            "exit_policy": {"timeout": self.timeout, "max_trials": self.max_trials},
            "int8": self.summary(scores, fallback),
            "best": best.to_dict(),
            "goal_met": goal_met,
            "evaluations": len(self.trials),
            "stopped": self.stopped or ("goal met" if goal_met else "search exhausted"),
            "seconds": round(time.perf_counter() - self.start, 3),
        }
        report["goal_met"] = goal_met
        for line in format_int8_table(report["tuning"]).splitlines():
            logging.info(line)
        if not goal_met:
            logging.warning("tf_bf16 tuning: no INT8/BF16 model met the accuracy goal (target %.4f, baseline %.4f); "
                            "returning the most accurate one (trial %d, accuracy %.4f). report['goal_met'] is False.",
                            self.criterion.target(self.baseline), self.baseline, best.number, best.accuracy)
        return self.model.with_graph_def(result.graph_def, report)


def format_int8_table(tuning: Mapping[str, Any]) -> str:
    """The trial table: accuracy per trial and each candidate op's dtype (I = INT8, B = BF16, F = FP32)."""
    trials = tuning["int8"]["trials"]
    names = list(trials[0]["dtypes"]) if trials else []
    marks_by_dtype = {INT8: "I", BF16: "B", FP32: "F"}
    header = f"{'Trial':<8}{'Accuracy':>10}{'Passed':>8}{'BF16':>6}  " + " ".join(f"op{i}" for i in range(len(names)))
    lines = ["Tune Result Statistics (INT8 -> BF16)", header, "-" * len(header),
             f"{'FP32':<8}{tuning['baseline']['accuracy']:>10.4f}{'-':>8}{'-':>6}"]
    for t in trials:
        marks = " ".join(f"{marks_by_dtype[t['dtypes'][n]]:>3}" for n in names)
        lines.append(f"{t['trial']:<8}{t['accuracy']:>10.4f}{'yes' if t['passed'] else 'no':>8}"
                     f"{t['bf16_fallback']:>6}  {marks}")
    lines.extend(f"op{i} = {name}" for i, name in enumerate(names))
    return "\n".join(lines)
