"""Reading a config is bounded: file size, YAML alias expansion, nesting, and error-message length.

The hostile inputs (alias bombs, a 50 MB file, a 10 MB string) are made at test time. File
loads run in a subprocess that reports the load's wall time and peak RSS; the RSS is compared
with a baseline subprocess that imports the same modules and loads nothing.
"""

from __future__ import annotations

import json
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
from hypothesis import given, settings, strategies as st

from tests.test_cli import EXAMPLE, REPO, assert_one_error_line, run_cli
from tf_bf16 import config as config_lib, evaluation
from tf_bf16.config import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES, load_config, preview
from tf_bf16.errors import ConfigError, EvaluationError

SECONDS = 2.0                  # the most one refused load may take
RSS_GROWTH = 200 * 1024 ** 2   # the most one refused load may add to peak RSS, in bytes
SHORT = 300                    # the most characters an error message about a huge value may have
HEADROOM = 2 * 1024 ** 3       # address space a measured load may add before it fails (a regression can't hog RAM)


# ------------------------------------------------------------------ hostile inputs

def _bomb_items(levels: int = 9, width: int = 9) -> List[str]:
    """Flow items ``&a ["x", ...]``, ``&b [*a, ...]``, ...: the last expands to width**levels strings."""
    names = string.ascii_lowercase[:levels]
    items = [f"&{names[0]} [" + ", ".join(['"x"'] * width) + "]"]
    for previous, name in zip(names, names[1:]):
        items.append(f"&{name} [" + ", ".join([f"*{previous}"] * width) + "]")
    return items


def bomb_under_model_name() -> str:
    return "model:\n  name: [" + ", ".join(_bomb_items()) + "]\n"


def bomb_at_top_level() -> str:
    return "".join(f"{item.split()[0][1:]}: {item}\n" for item in _bomb_items())


def bomb_under_postprocess() -> str:
    """Free-form data that validation accepts as it is: nothing but the loader stands in the way."""
    return "evaluation:\n  accuracy:\n    postprocess:\n      bomb: [" + ", ".join(_bomb_items()) + "]\n"


def fifty_megabytes() -> str:
    """A 50 MB config whose one problem (besides its size) is an unknown key."""
    row = "  - " + "x" * 95 + "\n"
    return "no_such_key:\n" + row * (50 * 1024 ** 2 // len(row))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ measured loads in a subprocess

_LOAD = """
import json, resource, sys, time
import tensorflow as tf
from tf_bf16 import config

def cap_address_space(headroom):
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))

cap_address_space(int(sys.argv[2]))
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
outcome, start = "not loaded", time.perf_counter()
if sys.argv[1]:
    try:
        config.load_config(sys.argv[1])
        outcome = "loaded"
    except config.ConfigError as e:
        outcome = "ConfigError: " + str(e)
    except MemoryError:
        outcome = "MemoryError"
seconds = time.perf_counter() - start
print(json.dumps({"outcome": outcome, "seconds": seconds, "peak_before": peak_before,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure_load(path: str) -> Dict[str, Any]:
    """Outcome, seconds and peak RSS (bytes, also before the load) of ``load_config(path)`` in a fresh
    process whose address space may grow by HEADROOM at most; "" loads nothing."""
    result = subprocess.run([sys.executable, "-c", _LOAD, path, str(HEADROOM)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline_rss() -> int:
    """Peak RSS of a process that imports TensorFlow and tf_bf16.config and loads nothing."""
    return measure_load("")["peak_rss"]


@pytest.mark.parametrize("make, fragment", [
    (bomb_under_model_name, "alias bomb"),
    (bomb_at_top_level, "alias bomb"),
    (bomb_under_postprocess, "alias bomb"),
    (fifty_megabytes, f"the limit is {MAX_CONFIG_BYTES:,} bytes"),
])
def test_hostile_config_file_is_refused_fast_and_small(tmp_path, baseline_rss, make: Callable[[], str],
                                                       fragment: str):
    path = _write(tmp_path, "hostile.yaml", make())
    measured = measure_load(str(path))
    assert measured["outcome"].startswith("ConfigError: "), measured["outcome"][:300]
    assert fragment in measured["outcome"] and str(path) in measured["outcome"]
    assert measured["seconds"] < SECONDS, measured
    # TensorFlow's import peak varies by tens of MB between processes: the larger baseline counts.
    assert measured["peak_rss"] - max(baseline_rss, measured["peak_before"]) < RSS_GROWTH, (measured, baseline_rss)


def test_fifty_megabyte_message_gives_the_size_and_the_limit(tmp_path):
    path = _write(tmp_path, "big.yaml", fifty_megabytes())
    message = str(pytest.raises(ConfigError, load_config, str(path)).value)
    assert f"is {path.stat().st_size:,} bytes" in message and f"{MAX_CONFIG_BYTES:,}" in message


# ------------------------------------------------------------------ the CLI

def _files(root: Path) -> Dict[str, bytes]:
    """Every file under ``root`` (or ``root`` itself) by relative path, with its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("make, fragment", [
    (bomb_under_model_name, "YAML aliases expand to more than"),
    (fifty_megabytes, f"the limit is {MAX_CONFIG_BYTES:,} bytes"),
])
def test_cli_convert_refuses_hostile_config_and_touches_nothing(tmp_path, make: Callable[[], str], fragment: str):
    work = tmp_path / "work"
    work.mkdir()
    conf = _write(work, "bomb.yaml", make())
    model_before, conf_before = _files(EXAMPLE), conf.read_bytes()
    out = work / "out"
    result = run_cli("convert", f"--input_model={EXAMPLE}", f"--output_model={out}", f"--config={conf}",
                     "--target=spr", cwd=work)
    line = assert_one_error_line(result, 1, str(conf), fragment)
    assert len(line) < SHORT, line
    assert _files(EXAMPLE) == model_before and conf.read_bytes() == conf_before
    assert sorted(p.name for p in work.iterdir()) == ["bomb.yaml"]  # no output, no hidden .out.tmp-*


# ------------------------------------------------------------------ limits on files, in process

@pytest.mark.parametrize("text, fragment", [
    ("a: " + "[" * (MAX_CONFIG_DEPTH + 1) + "]" * (MAX_CONFIG_DEPTH + 1) + "\n", "nest more than"),
    ("a: &a [*a]\n", "alias inside its own anchor"),
    ("a: &a {b: *a}\n", "alias inside its own anchor"),
    ("model: {name: " + "9" * 5000 + "}\n", "a value cannot be read"),
    ("model: {name: 2001-13-45}\n", "a value cannot be read"),
], ids=["too deep", "list in itself", "mapping in itself", "5000-digit int", "bad date"])
def test_yaml_past_a_limit_is_one_short_config_error(tmp_path, text: str, fragment: str):
    path = _write(tmp_path, "c.yaml", text)
    start = time.perf_counter()
    message = str(pytest.raises(ConfigError, load_config, str(path)).value)
    assert time.perf_counter() - start < SECONDS
    assert fragment in message and str(path) in message and len(message) < SHORT, message


def test_too_many_values_stop_the_parse_at_the_limit(tmp_path):
    text = "a: [" + ",".join(["0"] * (MAX_CONFIG_BYTES // 2 - 4)) + "]\n"  # 1 MiB, 500k values
    path = _write(tmp_path, "c.yaml", text)
    message = str(pytest.raises(ConfigError, load_config, str(path)).value)
    assert f"more than {MAX_CONFIG_VALUES:,} values" in message and len(message) < SHORT, message
    column = int(message.split("column ")[1].split(":")[0])
    assert column < 2 * MAX_CONFIG_VALUES + 10  # parsing stopped at the limit, 80% of the file unread


def test_nesting_is_accepted_up_to_the_limit_and_refused_past_it(tmp_path):
    def postprocess(lists: int) -> str:  # the top level is depth 0, postprocess's value 3, its "deep" value 4
        return ("evaluation:\n  accuracy:\n    postprocess:\n      deep: " + "[" * lists + "x" + "]" * lists + "\n")

    at_limit = MAX_CONFIG_DEPTH - 4  # lists at depths 4..31, "x" at MAX_CONFIG_DEPTH
    path = _write(tmp_path, "c.yaml", postprocess(at_limit))
    assert "deep" in load_config(str(path)).evaluation.accuracy.postprocess
    path.write_text(postprocess(at_limit + 1))
    assert "nest more than" in str(pytest.raises(ConfigError, load_config, str(path)).value)


def test_a_config_just_under_the_size_limit_loads(tmp_path):
    text = "model:\n  name: net\n"
    path = _write(tmp_path, "c.yaml", text + "#" * (MAX_CONFIG_BYTES - len(text) - 1) + "\n")
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(str(path)).model.name == "net"
    path.write_text(path.read_text() + "\n")
    assert "bytes; the limit is" in str(pytest.raises(ConfigError, load_config, str(path)).value)


def test_duplicate_huge_key_is_shown_short(tmp_path):
    key = "k" * 500_000
    path = _write(tmp_path, "c.yaml", f"? {key}\n: 1\n? {key}\n: 2\n")  # explicit keys: no 1024-character limit
    message = str(pytest.raises(ConfigError, load_config, str(path)).value)
    assert "duplicate key 'kkk" in message and len(message) < SHORT


_FALLBACK = """
import sys
sys.modules["yaml._yaml"] = None  # PyYAML built without libyaml
import time
import tensorflow
from tf_bf16 import config
assert config._EventParser is config._PythonParser
for path in sys.argv[1:]:
    start = time.perf_counter()
    try:
        config.load_config(path)
        print("loaded", path)
    except config.ConfigError as e:
        print(f"{time.perf_counter() - start:.2f}", e)
"""


def test_the_pure_python_yaml_parser_keeps_the_limits(tmp_path):
    deep = "a: " + "[" * 2000 + "]" * 2000 + "\n"  # past Python's recursion limit in PyYAML's composer
    paths = [_write(tmp_path, f"{i}.yaml", text) for i, text in
             enumerate([bomb_under_model_name(), deep, "model: {name: net}\n"])]
    result = subprocess.run([sys.executable, "-c", _FALLBACK] + [str(p) for p in paths], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "YAML aliases expand to more than" in lines[0] and float(lines[0].split()[0]) < SECONDS, lines
    assert "nest more than" in lines[1] and "line 1" in lines[1], lines
    assert lines[2] == f"loaded {paths[2]}"


# ------------------------------------------------------------------ huge values given in code

def _nested_lists(levels: int = 9, width: int = 9) -> List[Any]:
    """A list that shares itself: small in memory, width**levels items when walked."""
    value: List[Any] = ["x"] * width
    for _ in range(levels - 1):
        value = [value] * width
    return value


def _cycle() -> List[Any]:
    value: List[Any] = []
    value.append(value)
    return value


def _deep(levels: int) -> Dict[str, Any]:
    value: Dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


def _tfrecord(label: str, features: int) -> Dict[str, Any]:
    spec = {"path": "x", "label": label,
            "features": {f"feature_{i}_" + "f" * 500: {"dtype": "float32"} for i in range(features)}}
    return {"evaluation": {"accuracy": {"dataloader": {"dataset": {"tfrecord": spec}}}}}


_HUGE_SOURCES = {  # made when a test runs, not at collection
    "10MB name": (lambda: {"model": {"name": "x" * 10_000_000}},
                  "config key 'model.name': expected at most 4,096 characters"),
    "1M-item name": (lambda: {"model": {"name": list(range(1_000_000))}}, f"more than {MAX_CONFIG_VALUES:,} values"),
    "50k-item name": (lambda: {"model": {"name": list(range(50_000))}},
                      "config key 'model.name': expected a non-empty string; got [0, 1,"),
    "5000-digit name": (lambda: {"model": {"name": 10 ** 5000}}, "config key 'model.name': expected a non-empty"),
    "10MB seed": (lambda: {"tuning": {"random_seed": "7" * 10_000_000}},
                  "config key 'tuning.random_seed': expected an integer"),
    "10MB choice": (lambda: {"device": "c" * 10_000_000}, "config key 'device': 'ccc"),
    "10MB key": (lambda: {"k" * 10_000_000: 1}, "unknown config key 'kkk"),
    "10MB node name": (lambda: {"mixed_precision": {"op_wise": {"n" * 10_000_000: {"weight": {"dtype": "int8"}}}}},
                       "config key 'mixed_precision.op_wise.nnn"),
    "tuple node name": (lambda: {"mixed_precision": {"op_wise": {("n" * 1000,): {}}}}, "got key ('nnn"),
    "10MB metric": (lambda: {"evaluation": {"accuracy": {"metric": {"m" * 10_000_000: {}}}}}, "unknown metric 'mmm"),
    "10k long features": (lambda: _tfrecord("z" * 4000, 10_000), "allowed values: feature_0_fff"),
    "shared lists": (lambda: {"model": {"name": _nested_lists()}}, f"more than {MAX_CONFIG_VALUES:,} values"),
    "shared postprocess": (lambda: {"evaluation": {"accuracy": {"postprocess": {"bomb": _nested_lists()}}}},
                           f"more than {MAX_CONFIG_VALUES:,} values"),
    "cycle": (lambda: {"model": {"name": _cycle()}}, f"more than {MAX_CONFIG_DEPTH} levels deep"),
    "deep": (lambda: {"evaluation": {"accuracy": {"postprocess": _deep(MAX_CONFIG_DEPTH + 1)}}}, "levels deep"),
}


@pytest.mark.parametrize("case", list(_HUGE_SOURCES))
def test_a_huge_value_gives_a_short_error_quickly(case: str):
    make, fragment = _HUGE_SOURCES[case]
    source = make()
    start = time.perf_counter()
    message = str(pytest.raises(ConfigError, load_config, source).value)
    assert time.perf_counter() - start < SECONDS
    assert fragment in message and len(message) < SHORT and "\n" not in message, message[:1000]


def test_a_huge_metric_given_in_code_is_refused():
    message = str(pytest.raises(ConfigError, config_lib.parse_metric, {"topk": _nested_lists()}).value)
    assert "'evaluation.accuracy.metric'" in message and len(message) < SHORT


def test_a_large_legitimate_config_validates_quickly():
    op_wise = {f"block_{i}/Conv2D": {"activation": {"dtype": ["fp32"]}} for i in range(10_000)}
    start = time.perf_counter()
    conf = load_config({"mixed_precision": {"op_wise": op_wise}})
    assert time.perf_counter() - start < SECONDS
    assert len(conf.node_precisions()) == 10_000


# ------------------------------------------------------------------ the one preview helper

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
    st.text(alphabet=string.ascii_letters + string.digits + " _-", max_size=120)
_DATA = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=6) | st.tuples(inner) |
                     st.tuples(inner, inner) | st.dictionaries(st.text(string.ascii_letters, max_size=8), inner,
                                                               max_size=4), max_leaves=40)


@given(_DATA)
@settings(max_examples=200, deadline=None)
def test_preview_is_the_repr_cut_to_80_characters(value: Any):
    text = repr(value)
    assert preview(value) == (text if len(text) <= 80 else text[:77] + "...")


_HUGE_VALUES = {  # made when a test runs, not at collection
    "10MB string": lambda: "x" * 10_000_000,
    "1M-item list": lambda: list(range(1_000_000)),
    "1M-entry dict": lambda: {i: i for i in range(1_000_000)},
    "shared lists": _nested_lists,
    "cycle": _cycle,
    "100k-deep dict": lambda: _deep(100_000),
    "5000-digit int": lambda: 10 ** 5000,
}


@pytest.mark.parametrize("case", list(_HUGE_VALUES))
def test_preview_of_a_huge_value_is_short_and_fast(case: str):
    value = _HUGE_VALUES[case]()
    start = time.perf_counter()
    shown = preview(value)
    assert time.perf_counter() - start < 0.1
    assert 0 < len(shown) <= 80, shown


def test_evaluation_errors_use_the_same_preview():
    assert evaluation._preview is config_lib.preview
    evaluator = evaluation.Evaluator(eval_func=lambda model: list(range(1_000_000)))
    message = str(pytest.raises(EvaluationError, evaluator, None).value)
    assert "[0, 1, 2" in message and "..." in message and len(message) < SHORT
