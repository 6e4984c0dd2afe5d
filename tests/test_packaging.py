"""setup.py's declared requirements: the TensorFlow range the suite covers and an [intel] extra that imports.

setup.py is run with ``setuptools.setup`` replaced, so the test reads exactly the keyword
arguments pip would get, without building or installing anything.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any, Dict, List, Tuple
from unittest import mock

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def run_setup(monkeypatch: pytest.MonkeyPatch, no_tf: bool = False) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """setup.py's arguments to ``setuptools.setup`` and its module globals."""
    monkeypatch.chdir(REPO)
    if no_tf:
        monkeypatch.setenv("TF_BF16_NO_TF_DEPENDENCY", "1")
    else:
        monkeypatch.delenv("TF_BF16_NO_TF_DEPENDENCY", raising=False)
    with mock.patch("setuptools.setup") as setup:
        module = runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    return setup.call_args.kwargs, module


def setup_kwargs(monkeypatch: pytest.MonkeyPatch, no_tf: bool = False) -> Dict[str, Any]:
    """The keyword arguments setup.py passes to ``setuptools.setup``."""
    return run_setup(monkeypatch, no_tf)[0]


def by_name(requirements: List[str]) -> Dict[str, Requirement]:
    parsed = [Requirement(r) for r in requirements]
    return {r.name.lower().replace("_", "-"): r for r in parsed}


def test_intel_extra_pins_what_intel_tensorflow_2_14_needs(monkeypatch):
    intel = by_name(setup_kwargs(monkeypatch)["extras_require"]["intel"])
    assert set(intel) == {"intel-tensorflow-avx512", "numpy"}
    # Built against NumPy 1.x: with NumPy 2 its import fails ("_ARRAY_API not found").
    assert "1.26.4" in intel["numpy"].specifier and "2.0.0" not in intel["numpy"].specifier
    assert "2.14.0" in intel["intel-tensorflow-avx512"].specifier
    assert "2.13.0" not in intel["intel-tensorflow-avx512"].specifier


def test_tensorflow_range_is_the_tested_one(monkeypatch):
    kwargs, module = run_setup(monkeypatch)
    tensorflow = by_name(kwargs["install_requires"])["tensorflow"]
    assert "2.21.0" in tensorflow.specifier        # what the suite runs on
    assert "2.22.0" not in tensorflow.specifier    # not tested yet
    # intel-tensorflow-avx512 2.14 installs the same `tensorflow` package: a stock 2.14 must not
    # satisfy the requirement too, or pip would install both into one site-packages.
    assert "2.14.1" not in tensorflow.specifier and "2.15.1" not in tensorflow.specifier
    cpu = by_name(kwargs["extras_require"]["cpu"])["tensorflow-cpu"]
    assert cpu.specifier == tensorflow.specifier
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert module["TENSORFLOW"] in readme, "README states a different TensorFlow range"


def test_no_tf_switch_leaves_tensorflow_out(monkeypatch):
    requires = by_name(setup_kwargs(monkeypatch, no_tf=True)["install_requires"])
    assert "tensorflow" not in requires and "numpy" in requires
