"""Fuzz: on seeded random float graphs tf_bf16 is never much less accurate than TensorFlow's AMP.

Per graph (``tests/random_graphs.py``): the conversion succeeds or raises a tf_bf16 error,
the result runs, input/output names and dtypes are kept, and the error against FP32 is at
most max(1.25 x TF AMP's error on the same graph, 1e-2). ``bench/fuzz.py`` runs the same
check on thousands of graphs and reports the distribution.
"""

from __future__ import annotations

import pytest

from tests import random_graphs

GRAPHS = 200
CHUNK = 25


@pytest.mark.parametrize("first", range(0, GRAPHS, CHUNK))
def test_random_graphs_convert_run_and_stay_as_accurate_as_tf_amp(first):
    failures, refused, ran = [], [], 0
    for seed in range(first, first + CHUNK):
        case = random_graphs.random_graph(seed)
        result = random_graphs.compare(case)
        if result.status == "refused":
            refused.append((seed, result.detail))   # a tf_bf16 error naming the problem is allowed
            continue
        if result.status == "ok":
            ran += 1
        if result.failed:
            failures.append(result.to_dict())
    assert not failures, failures
    assert ran >= CHUNK // 2, f"only {ran} of {CHUNK} graphs ran; refused: {refused}"


KERNEL_GRAPHS = 100


@pytest.mark.parametrize("first", range(0, KERNEL_GRAPHS, CHUNK))
def test_random_graphs_with_fused_kernels_stay_as_accurate_as_tf_amp(first):
    """The same check with kernels=True: fused kernel ops (where the library builds) round less, never more."""
    from tf_bf16.kernels import build as kernel_build

    built = kernel_build.build_if_needed()
    if not built.ok:
        pytest.skip(f"tf_bf16 kernels cannot be built here: {built.reason}")
    failures, fused = [], 0
    for seed in range(first, first + CHUNK):
        result = random_graphs.compare(random_graphs.random_graph(seed), kernels=True)
        assert result.status != "refused" or "kernel" not in result.detail, result.detail
        fused += result.status == "ok"
        if result.failed:
            failures.append(result.to_dict())
    assert not failures, failures
    assert fused >= CHUNK // 2
