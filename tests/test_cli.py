"""End-to-end tests of the ``tf-bf16`` command line, run as a user would: in a subprocess.

Errors must be one ``tf-bf16: error: ...`` line on stderr with a non-zero exit and no
traceback; ``--verbose`` adds the traceback. No TensorFlow start-up lines either
(``tests/test_quiet_cli.py`` checks that without any log level set).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits_cnn"


def run_cli(*args: str, cwd: Path = REPO, executable: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, with the log level ``make`` exports (TF_CPP_MIN_LOG_LEVEL=2)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    command = (executable or [sys.executable, "-m", "tf_bf16"]) + list(args)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def cli_stderr_lines(stderr: str) -> List[str]:
    """Non-empty stderr lines: all the CLI's own, since TensorFlow's start-up is kept quiet."""
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_error_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    lines = cli_stderr_lines(result.stderr)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tf-bf16: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def corrupt_pb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corrupt") / "x.pb"
    path.write_bytes(random.Random(1234).randbytes(4096))
    return path


def test_inspect_example_prints_histogram_and_io(tmp_path):
    result = run_cli("inspect", f"--input_model={EXAMPLE}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert cli_stderr_lines(result.stderr) == []
    out = result.stdout
    for expected in ("Conv2D", "MatMul", "Softmax", "float32", "image", "nodes:", "inputs (1):", "outputs (1):"):
        assert expected in out, expected
    assert re.search(r"^\s+image\s+float32\s+\[\?, 8, 8, 1\]", out, re.M), out
    assert re.search(r"^\s+Conv2D\s+2\s+yes\s+float32 x2$", out, re.M), out


def test_inspect_json_is_consistent():
    result = run_cli("inspect", f"--input_model={EXAMPLE}", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["source"] == str(EXAMPLE)
    assert summary["signature"] == "serving_default"
    assert [e["name"] for e in summary["inputs"]] == ["image"]
    assert summary["inputs"][0]["shape"] == [None, 8, 8, 1]
    assert summary["outputs"][0]["shape"] == [None, 10]
    assert summary["ops"]["Conv2D"] == {"count": 2, "dtypes": {"float32": 2}, "bf16_kernel": True}
    assert sum(op["count"] for op in summary["ops"].values()) == summary["node_count"]
    assert sum(summary["dtypes"].values()) == summary["node_count"]
    assert 0 < summary["bf16_candidates"] <= summary["node_count"]


def test_inspect_with_explicit_inputs_and_outputs():
    result = run_cli("inspect", f"--input_model={EXAMPLE}", "--inputs=image", "--outputs=Identity", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [e["name"] for e in summary["inputs"]] == ["image"]
    assert [e["name"] for e in summary["outputs"]] == ["Identity"]


def test_missing_path_is_one_line(tmp_path):
    missing = tmp_path / "no_such_model"
    assert_one_error_line(run_cli("inspect", f"--input_model={missing}"), 1, str(missing))


def test_corrupt_pb_is_one_line(corrupt_pb):
    assert_one_error_line(run_cli("inspect", f"--input_model={corrupt_pb}"), 1, str(corrupt_pb))


def test_unknown_flag_is_usage_error():
    line = assert_one_error_line(run_cli("inspect", f"--input_model={EXAMPLE}", "--no_such_flag=1"), 2,
                                 "no_such_flag")
    assert "inspect" in line


def test_unknown_subcommand_is_usage_error():
    assert_one_error_line(run_cli("frobnicate", f"--input_model={EXAMPLE}"), 2, "frobnicate", "inspect")


@pytest.mark.parametrize("args, fragment", [
    ((), "no command"),
    (("inspect",), "--input_model"),
    (("inspect", f"--input_model={EXAMPLE}", "stray"), "stray"),
])
def test_other_usage_errors(args, fragment):
    assert_one_error_line(run_cli(*args), 2, fragment)


def test_verbose_shows_traceback(corrupt_pb):
    result = run_cli("inspect", f"--input_model={corrupt_pb}", "--verbose")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert cli_stderr_lines(result.stderr)[-1].startswith(f"tf-bf16: error: {corrupt_pb}")


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "inspect" in result.stdout
    sub = run_cli("inspect", "--help")
    assert sub.returncode == 0
    assert "--input_model" in sub.stdout


def test_console_script_matches_module(tmp_path):
    script = Path(sys.executable).with_name("tf-bf16")
    if not script.exists():
        pytest.skip("tf-bf16 console script not installed in this environment")
    result = run_cli("frobnicate", executable=[str(script)], cwd=tmp_path)
    assert_one_error_line(result, 2, "frobnicate")


def test_convert_writes_model_and_report(tmp_path):
    out_dir, report = tmp_path / "digits_bf16", tmp_path / "report.json"
    result = run_cli("convert", f"--input_model={EXAMPLE}", f"--output_model={out_dir}", f"--report={report}",
                     "--target=spr")
    assert result.returncode == 0, result.stderr
    assert "Mixed Precision Statistics" in result.stdout and f"wrote {out_dir}" in result.stdout
    data = json.loads(report.read_text())
    assert data["op_types"]["Conv2D"]["bf16"] == data["op_types"]["Conv2D"]["total"] == 2
    assert data["summary"]["casts_after"] == 2 and data["target"] == "spr"
    # The written SavedModel reloads with BF16 weights inside and the same signature.
    inspect = run_cli("inspect", f"--input_model={out_dir}", "--json")
    summary = json.loads(inspect.stdout)
    assert summary["ops"]["Conv2D"]["dtypes"] == {"bfloat16": 2}
    assert [e["name"] for e in summary["inputs"]] == ["image"]


def test_convert_refuses_without_bf16_hardware(tmp_path):
    with open("/proc/cpuinfo") as f:
        if "avx512_bf16" in f.read():
            pytest.skip("this CPU has avx512_bf16")
    env = {k: v for k, v in os.environ.items() if k != "FORCE_BF16"}
    command = [sys.executable, "-m", "tf_bf16", "convert", f"--input_model={EXAMPLE}",
               f"--output_model={tmp_path / 'out'}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert_one_error_line(result, 1, "avx512_bf16", "FORCE_BF16")
    assert not (tmp_path / "out").exists()


def test_transform_runs_named_passes_as_convert_does(tmp_path):
    """`transform` with the pipeline's pass list writes the very graph `convert` writes."""
    from tf_bf16 import pipeline

    names = pipeline.CLEAN_UP + pipeline.BF16 + pipeline.CAST_FOLDING
    by_transform, by_convert, report = tmp_path / "t.pb", tmp_path / "c.pb", tmp_path / "r.json"
    result = run_cli("transform", f"--input_model={EXAMPLE}", f"--output_model={by_transform}",
                     f"--transforms={','.join(names)}", f"--report={report}")
    assert result.returncode == 0, result.stderr
    assert run_cli("convert", f"--input_model={EXAMPLE}", f"--output_model={by_convert}",
                   "--target=spr").returncode == 0
    from tensorflow.core.framework import graph_pb2

    def read(path):
        return graph_pb2.GraphDef.FromString(path.read_bytes())

    assert read(by_transform) == read(by_convert)
    data = json.loads(report.read_text())
    assert data["transforms"] == list(names) and data["op_types"]["Conv2D"]["bf16"] == 2
    # Clean-up alone: fewer nodes, nothing in BF16.
    cleaned = tmp_path / "cleaned.pbtxt"
    result = run_cli("transform", f"--input_model={EXAMPLE}", f"--output_model={cleaned}",
                     "--transforms=strip_unused,remove_identity,fold_constants")
    assert result.returncode == 0, result.stderr
    assert "DT_BFLOAT16" not in cleaned.read_text() and "op: \"Conv2D\"" in cleaned.read_text()


def test_transform_unknown_name_lists_known_passes(tmp_path):
    out = tmp_path / "out.pb"
    result = run_cli("transform", f"--input_model={EXAMPLE}", f"--output_model={out}",
                     "--transforms=strip_unused,no_such_pass")
    assert_one_error_line(result, 1, "'no_such_pass'", "bf16_convert", "fold_casts")
    assert not out.exists()
    assert_one_error_line(run_cli("transform", f"--input_model={EXAMPLE}", f"--output_model={out}"), 2,
                          "--transforms")


def test_convert_takes_outputs_from_the_yaml_config(tmp_path):
    """YAML model.outputs names the outputs on the CLI path too; --outputs beats it."""
    from tf_bf16.model import Model

    source = Model(str(EXAMPLE))
    hidden = next(n.name for n in source.graph_def.node if n.op == "Relu")
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"model:\n  outputs: [{hidden}]\n")
    out = tmp_path / "out.pb"
    result = run_cli("convert", f"--input_model={EXAMPLE}", f"--output_model={out}", f"--config={conf}",
                     "--target=spr")
    assert result.returncode == 0, result.stderr
    assert Model(str(out)).output_names == [hidden]
    flagged = tmp_path / "flagged.pb"
    result = run_cli("convert", f"--input_model={EXAMPLE}", f"--output_model={flagged}", f"--config={conf}",
                     f"--outputs={','.join(source.output_names)}", "--target=spr")
    assert result.returncode == 0, result.stderr
    assert Model(str(flagged)).output_names == list(source.output_names)
