"""The CLI prints only tf_bf16's lines: TensorFlow's start-up noise is hidden unless --verbose.

The subprocess tests run ``python -m tf_bf16`` as a user would, without TF_CPP_MIN_LOG_LEVEL or
CUDA_VISIBLE_DEVICES, and with TF_ENABLE_ONEDNN_OPTS=1 so that TensorFlow has its oneDNN
notice to print too. The in-process tests check that only ``run`` (the CLI process) changes
the environment, and only for the run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

from tf_bf16 import cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits_cnn"
QUIET_VARS = ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")

# What TensorFlow 2.x writes at start-up: CUDA stub and cuInit probing, the oneDNN notice,
# absl's pre-init warning, cpu_feature_guard, and any glog-style line (2.21's "I0000 00:00:..."
# or 2.14's "2024-01-01 00:00:00.0: I tensorflow/...").
_NOISE = re.compile(r"cuda|cuInit|oneDNN custom operations|absl::InitializeLog|cpu_feature_guard"
                    r"|^[IWEF]\d{4} |^\d{4}-\d\d-\d\d [\d:.]+: [IWEF] ", re.I | re.M)
# tf_bf16's own stderr lines: report warnings, its absl warnings, and its error line.
_OWN_STDERR = re.compile(r"^(warning: |WARNING:absl:tf_bf16|tf-bf16: )")


def user_env(**extra: str) -> Dict[str, str]:
    """This process's environment without the variables the CLI sets, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_VARS}
    env.update(TF_ENABLE_ONEDNN_OPTS="1", FORCE_BF16="1", **extra)
    return env


def run_module(*args: str, env: Dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tf_bf16", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def nonblank(text: str) -> List[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("command, expected", [
    ("inspect", "nodes:"),
    ("convert", "Mixed Precision Statistics"),
])
def test_cli_prints_only_its_own_lines(tmp_path, command, expected):
    args = [command, f"--input_model={EXAMPLE}"]
    if command == "convert":
        args.append(f"--output_model={tmp_path / 'out'}")
    result = run_module(*args, env=user_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert not _NOISE.search(result.stdout), result.stdout
    assert not _NOISE.search(result.stderr), result.stderr
    stray = [line for line in nonblank(result.stderr) if not _OWN_STDERR.match(line)]
    assert stray == [], result.stderr


def test_verbose_shows_tensorflow_start_up(tmp_path):
    result = run_module("inspect", f"--input_model={EXAMPLE}", "--verbose", env=user_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "oneDNN custom operations are on" in result.stderr
    assert "nodes:" in result.stdout


def test_failed_tensorflow_import_replays_what_it_wrote(tmp_path):
    """A TensorFlow that cannot import (wrong NumPy, wrong CPU): its own words, then one error line."""
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(textwrap.dedent("""\
        import os
        os.write(2, b"fake C++ start-up line\\n")
        raise ImportError("numpy.core.multiarray failed to import")
        """))
    env = user_env(PYTHONPATH=os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")])))
    result = run_module("inspect", f"--input_model={EXAMPLE}", env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = nonblank(result.stderr)
    assert lines[0] == "fake C++ start-up line", result.stderr
    assert lines[-1] == "tf-bf16: error: ImportError: numpy.core.multiarray failed to import " \
                        "(rerun with --verbose for the traceback)", result.stderr


def test_run_restores_the_environment_and_import_leaves_it_alone():
    """``import tf_bf16`` sets nothing; a whole in-process ``run`` removes what it set."""
    script = textwrap.dedent(f"""\
        import os
        import tf_bf16, tf_bf16.cli
        names = {QUIET_VARS!r}
        assert not [name for name in names if name in os.environ]
        assert tf_bf16.cli.run(["inspect", "--input_model={EXAMPLE}"]) == 0
        leaked = [name for name in names if name in os.environ]
        assert not leaked, leaked
        print("environment ok")
        """)
    result = subprocess.run([sys.executable, "-c", script], env=user_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "environment ok" in result.stdout


def _no_flags(fv) -> None:
    """The probe command has only the shared --verbose."""


def _probe_command(seen: Dict[str, object]) -> cli.Command:
    """A subcommand that records the quiet variables as the command sees them."""
    def main(fv) -> int:
        seen.update({name: os.environ.get(name) for name in QUIET_VARS})
        return cli.EXIT_OK

    return cli.Command("probe", "record the environment", _no_flags, main)


@pytest.mark.parametrize("args, expected", [
    (["probe"], {"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}),
    (["probe", "--verbose"], {"TF_CPP_MIN_LOG_LEVEL": None, "CUDA_VISIBLE_DEVICES": ""}),
])
def test_quiet_environment_is_set_for_the_command_only(monkeypatch, args, expected):
    for name in QUIET_VARS:
        monkeypatch.delenv(name, raising=False)
    seen: Dict[str, object] = {}
    assert cli.dispatch(args, {"probe": _probe_command(seen)}, process=cli.quiet_environment) == cli.EXIT_OK
    assert seen == expected
    assert not any(name in os.environ for name in QUIET_VARS)


def test_user_settings_win_and_dispatch_alone_changes_nothing(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    seen: Dict[str, object] = {}
    commands = {"probe": _probe_command(seen)}
    assert cli.dispatch(["probe"], commands, process=cli.quiet_environment) == cli.EXIT_OK
    assert seen == {"TF_CPP_MIN_LOG_LEVEL": "0", "CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cli.dispatch(["probe"], commands) == cli.EXIT_OK
    assert seen == {"TF_CPP_MIN_LOG_LEVEL": None, "CUDA_VISIBLE_DEVICES": None}


def test_stderr_fd_capture_drops_on_success_and_replays_on_failure(capfd):
    with cli.stderr_fd_captured():
        os.write(2, b"dropped\n")
    with pytest.raises(RuntimeError):
        with cli.stderr_fd_captured():
            os.write(2, b"replayed\n")
            raise RuntimeError("import failed")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "dropped" not in err
    assert err.index("replayed") < err.index("after")
