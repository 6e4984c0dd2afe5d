"""Configure the bazel build of the kernel library: ``python -m tf_bf16.kernels.bazel_config``.

Run it in the repository root (like bazel) with the Python whose TensorFlow and oneDNN the
library is for. ``bazel build //:_bf16_ops.so`` takes both from there, as ``build.py`` does;
their paths differ per machine, so this writes them to ``third_party/local/bazelrc`` (imported
by ``.bazelrc``, never committed) as the ``--repo_env`` values WORKSPACE reads.

With Debian's ``bazel-bootstrap`` it also points every rule repository bazel would otherwise
download at the Debian packages under ``/usr/share/bazel`` (``--override_repository``), so
that builds need no network. Debian's rules_cc is newer than its bazel (4.2.3): it loads
``use_cpp_toolchain``, which that bazel's ``@bazel_tools`` lacks, so a patched copy of it is
made in ``third_party/local/rules_cc``. Rerun after moving the checkout or the venv.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from typing import Dict, Optional, Sequence

from . import build

LOCAL_DIR = os.path.join("third_party", "local")
DEBIAN_BAZEL = "/usr/share/bazel"  # bazel-bootstrap's install base
DEBIAN_PACKAGES = "bazel-bootstrap bazel-rules-cc bazel-platforms bazel-skylib bazel-rules-java"
# Repository name -> directory under DEBIAN_BAZEL (rules_cc: patched, see patch_rules_cc).
DEBIAN_REPOSITORIES = {
    "rules_cc": "rules/cc",
    "rules_java": "rules/java",
    "platforms": "platforms",
    "bazel_skylib": "tools/skylib",
}
# The flags third_party/tensorflow.BUILD and //:_bf16_ops.so give for TF's compile flags.
TF_FLAGS_IN_BUILD = {"-D_GLIBCXX_USE_CXX11_ABI=1", "-DEIGEN_MAX_ALIGN_BYTES=64",
                     "-std=c++17", "--std=c++17"}
# Commands that read repositories (test and run inherit build's options).
COMMANDS = ("build", "query", "fetch")


def tensorflow_paths() -> Dict[str, str]:
    """TF's include directory and framework library, from tf.sysconfig (as build.py)."""
    compile_flags, link_flags = build.tensorflow_flags()
    includes = [f[2:] for f in compile_flags if f.startswith("-I")]
    unknown = [f for f in compile_flags if not f.startswith("-I") and f not in TF_FLAGS_IN_BUILD]
    if unknown:
        raise build.BuildError(f"TensorFlow asks for compile flags the bazel build lacks: "
                               f"{' '.join(unknown)} (add them to third_party/tensorflow.BUILD)")
    lib_dirs = [f[2:] for f in link_flags if f.startswith("-L")]
    libs = [f[3:] for f in link_flags if f.startswith("-l:")]
    if len(includes) != 1 or len(lib_dirs) != 1 or len(libs) != 1:
        raise build.BuildError(f"unexpected tf.sysconfig flags: {compile_flags} {link_flags}")
    return {"TF_BF16_TF_INCLUDE": includes[0],
            "TF_BF16_TF_LIBRARY": os.path.join(lib_dirs[0], libs[0])}


def onednn_paths() -> Dict[str, str]:
    onednn = build.find_onednn()
    name = "libdnnl.so" if onednn.lib_flag == "-ldnnl" else onednn.lib_flag[len("-l:"):]
    return {"TF_BF16_ONEDNN_INCLUDE": onednn.include_dir,
            "TF_BF16_ONEDNN_LIBRARY": os.path.join(onednn.lib_dir, name)}


def patch_rules_cc(source: str, target: str) -> None:
    """Copy rules_cc to ``target``, asking for the C++ toolchain type directly instead of
    through ``use_cpp_toolchain()`` (equivalent, and known to bazel 4)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, symlinks=True)
    for directory, _, files in os.walk(target):
        for name in files:
            if not name.endswith(".bzl"):
                continue
            path = os.path.join(directory, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            patched = re.sub(r',\s*"use_cpp_toolchain"', "", text)
            patched = patched.replace("use_cpp_toolchain()",
                                      '["@bazel_tools//tools/cpp:toolchain_type"]')
            if "use_cpp_toolchain" in patched:
                raise build.BuildError(f"cannot patch {path}: unexpected use_cpp_toolchain use")
            if patched != text:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(patched)


def debian_overrides(local_dir: str) -> Dict[str, str]:
    """--override_repository values for Debian's bazel; empty for any other bazel."""
    if not os.path.exists(os.path.join(DEBIAN_BAZEL, "A-server.jar")):
        return {}
    overrides = {}
    for name, subdir in DEBIAN_REPOSITORIES.items():
        path = os.path.join(DEBIAN_BAZEL, subdir)
        if not os.path.isdir(path):
            raise build.BuildError(
                f"Debian's bazel lacks {path}: apt-get install {DEBIAN_PACKAGES}")
        overrides[name] = path
    overrides["rules_cc"] = os.path.join(local_dir, "rules_cc")
    patch_rules_cc(os.path.join(DEBIAN_BAZEL, DEBIAN_REPOSITORIES["rules_cc"]),
                   overrides["rules_cc"])
    return overrides


def bazelrc(env: Dict[str, str], overrides: Dict[str, str]) -> str:
    lines = ["# Written by `python -m tf_bf16.kernels.bazel_config`: paths on this machine."]
    for command in COMMANDS:
        lines += [f"{command} --repo_env={key}={value}" for key, value in env.items()]
        lines += [f"{command} --override_repository={name}={path}"
                  for name, path in overrides.items()]
    return "\n".join(lines) + "\n"


def configure(workspace: str) -> str:
    """Write ``third_party/local/`` under ``workspace``; returns a one-line summary."""
    workspace = os.path.abspath(workspace)
    if not os.path.exists(os.path.join(workspace, "WORKSPACE")):
        raise build.BuildError(f"{workspace} has no WORKSPACE: run this in the repository root")
    env = {**tensorflow_paths(), **onednn_paths()}
    local_dir = os.path.join(workspace, LOCAL_DIR)
    os.makedirs(local_dir, exist_ok=True)
    overrides = debian_overrides(local_dir)
    for path in (*env.values(), *overrides.values()):
        if any(c.isspace() or c in "'\"\\" for c in path):  # bazelrc splits words like a shell
            raise build.BuildError(f"cannot pass a path with spaces or quotes to bazel: {path}")
    with open(os.path.join(local_dir, "bazelrc"), "w", encoding="utf-8") as f:
        f.write(bazelrc(env, overrides))
    debian = f", {len(overrides)} Debian rule repositories" if overrides else ""
    return (f"wrote {os.path.join(LOCAL_DIR, 'bazelrc')}: TensorFlow "
            f"{os.path.dirname(env['TF_BF16_TF_LIBRARY'])}, oneDNN "
            f"{os.path.dirname(env['TF_BF16_ONEDNN_LIBRARY'])}{debian}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tf_bf16.kernels.bazel_config",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default=".",
                        help="the repository root (default: the current directory)")
    args = parser.parse_args(argv)
    try:
        print(configure(args.workspace))
    except (build.BuildError, OSError) as exc:
        print(f"bazel_config: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
