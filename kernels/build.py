"""Compile tf_bf16's oneDNN custom ops (``kernels/*.cc``) into ``_bf16_ops.so``.

Usage: ``python -m tf_bf16.kernels.build [--output PATH] [--if-needed]``; it prints one line
and exits 0 when the library was built (or is up to date), 1 with the reason when it cannot
be built. From Python, ``build()`` returns a :class:`BuildResult` and never raises for a
missing toolchain.

Needs g++ (or ``$CXX``), TensorFlow (for ``tf.sysconfig`` flags) and oneDNN >= 3.0 built with
the OpenMP CPU runtime. oneDNN is looked up in ``$TF_BF16_ONEDNN_ROOT`` (``include/`` and
``lib/`` under it), then in this Python's prefix, where the PyPI wheels
``onednn-devel-cpu-gomp`` / ``onednn-cpu-gomp`` install it, then in ``/usr`` (Debian's
``libdnnl-dev``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence, Tuple

from . import library_path

KERNELS_DIR = os.path.dirname(os.path.abspath(__file__))
ONEDNN_ROOT_ENV = "TF_BF16_ONEDNN_ROOT"
ONEDNN_HINT = "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0"
MIN_ONEDNN_MAJOR = 3
# Libraries are compiled to a hidden temporary beside the target, then renamed over it.
# Ending in .so keeps a temporary left by a killed build out of git (.gitignore has *.so).
TEMP_PREFIX = ".tmp-tf_bf16-kernels-"

# Hidden visibility and -Bsymbolic: TensorFlow exports weak dnnl:: C++ wrappers of its own
# oneDNN; ours must never bind to those (nor export theirs). -fopenmp for the conversion
# loops and omp_set_num_threads, matching oneDNN's OpenMP runtime.
CXX_FLAGS = ["-shared", "-fPIC", "-O2", "-fopenmp", "-fvisibility=hidden",
             "-fvisibility-inlines-hidden", "-Wno-deprecated-declarations"]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    ok: bool
    path: Optional[str]  # the library, when ok
    reason: str  # one line: what happened, or why it could not be built
    seconds: float
    log: str = ""  # compiler errors, when compiling failed

    def __str__(self) -> str:
        if self.ok:
            return f"tf_bf16 kernels: {self.reason}: {self.path} ({self.seconds:.1f} s)"
        return f"tf_bf16 kernels not built: {self.reason}"


@dataclasses.dataclass(frozen=True)
class OneDnn:
    include_dir: str
    lib_dir: str
    lib_flag: str  # -ldnnl, or -l:libdnnl.so.3 when only the runtime name exists
    version: Tuple[int, int, int]


class BuildError(Exception):
    """A reason the library cannot be built here (shown to the user as is)."""


def sources() -> List[str]:
    return sorted(glob.glob(os.path.join(KERNELS_DIR, "*.cc")))


def _inputs() -> List[str]:
    """Every file whose change makes a built library outdated."""
    return sources() + sorted(glob.glob(os.path.join(KERNELS_DIR, "*.h"))) + [
        os.path.abspath(__file__)]


def is_up_to_date(path: Optional[str] = None) -> bool:
    """True when ``path`` exists and is newer than every source, header and this script."""
    path = path or library_path()
    if not os.path.exists(path):
        return False
    built = os.path.getmtime(path)
    return all(os.path.getmtime(f) <= built for f in _inputs())


def find_compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BuildError("no C++ compiler (install g++ or set $CXX)")
    return cxx


def tensorflow_flags() -> Tuple[List[str], List[str]]:
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise BuildError(f"cannot import tensorflow: {exc}") from exc
    return list(tf.sysconfig.get_compile_flags()), list(tf.sysconfig.get_link_flags())


def _onednn_candidates() -> List[Tuple[str, List[str]]]:
    """(include dir, lib dirs) pairs, most specific first."""
    candidates = []
    root = os.environ.get(ONEDNN_ROOT_ENV)
    if root:
        candidates.append((os.path.join(root, "include"),
                           [os.path.join(root, "lib"), os.path.join(root, "lib64")]))
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        candidates.append((os.path.join(prefix, "include"), [os.path.join(prefix, "lib")]))
    candidates.append(("/usr/include", ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]))
    return candidates


def _read_defines(header: str) -> dict:
    with open(header, encoding="utf-8", errors="replace") as f:
        return dict(re.findall(r"^#define\s+(\w+)\s+(\S+)", f.read(), re.M))


def _find_library(lib_dirs: Sequence[str]) -> Optional[Tuple[str, str]]:
    for lib_dir in lib_dirs:
        if os.path.exists(os.path.join(lib_dir, "libdnnl.so")):
            return lib_dir, "-ldnnl"
        runtime = sorted(glob.glob(os.path.join(lib_dir, "libdnnl.so.[0-9]")))
        if runtime:
            return lib_dir, "-l:" + os.path.basename(runtime[-1])
    return None


def find_onednn() -> OneDnn:
    """The first usable oneDNN; BuildError explains why none is (the best reason found)."""
    problems = []
    for include_dir, lib_dirs in _onednn_candidates():
        header_dir = os.path.join(include_dir, "oneapi", "dnnl")
        if not os.path.exists(os.path.join(header_dir, "dnnl.hpp")):
            continue
        defines = _read_defines(os.path.join(header_dir, "dnnl_version.h"))
        version = tuple(int(defines.get(f"DNNL_VERSION_{part}", "0"))
                        for part in ("MAJOR", "MINOR", "PATCH"))
        runtime = _read_defines(os.path.join(header_dir, "dnnl_config.h")).get(
            "DNNL_CPU_RUNTIME", "?")
        found = f"oneDNN {'.'.join(map(str, version))} in {header_dir}"
        if version[0] < MIN_ONEDNN_MAJOR:
            problems.append(f"{found} is older than {MIN_ONEDNN_MAJOR}.0")
        elif runtime != "DNNL_RUNTIME_OMP":
            # The kernels size oneDNN's thread team with omp_set_num_threads; a SYCL build
            # (PyPI 'onednn' 2024+) has no CPU engine at all without a SYCL CPU device.
            problems.append(f"{found} has CPU runtime {runtime}, not OpenMP")
        else:
            library = _find_library(lib_dirs)
            if library is None:
                problems.append(f"{found} has no libdnnl.so in {', '.join(lib_dirs)}")
            else:
                return OneDnn(include_dir, library[0], library[1], version)
    if not problems:
        raise BuildError(f"no oneDNN headers (oneapi/dnnl/dnnl.hpp) found; {ONEDNN_HINT}")
    raise BuildError("; ".join(problems) + f"; {ONEDNN_HINT}")


def compile_command(cxx: str, onednn: OneDnn, tf_compile: Sequence[str],
                    tf_link: Sequence[str], output: str) -> List[str]:
    # oneDNN's include dir goes first so no other dnnl.hpp on the path can shadow it.
    return ([cxx, *CXX_FLAGS, f"-I{onednn.include_dir}", f"-I{KERNELS_DIR}", *tf_compile,
             *sources(), "-o", output, f"-L{onednn.lib_dir}", onednn.lib_flag,
             f"-Wl,-rpath,{onednn.lib_dir}", *tf_link, "-Wl,-Bsymbolic"])


def _compiler_message(stderr: str, limit: int = 2000) -> str:
    """The first compiler errors (the tail of g++ output is usually consequential noise)."""
    errors = [line for line in stderr.splitlines() if "error" in line]
    text = "\n".join(errors) if errors else stderr.strip()
    return text[:limit]


def _remove_stale_temps(directory: str) -> None:
    """Delete temporaries of builds killed over an hour ago (a build takes under a minute)."""
    cutoff = time.time() - 3600
    for path in glob.glob(os.path.join(directory, TEMP_PREFIX + "*.so")):
        try:
            if os.path.getmtime(path) < cutoff:
                os.unlink(path)
        except OSError:
            pass  # another build removed it first


def build(output_path: Optional[str] = None) -> BuildResult:
    """Compile every kernels/*.cc in one g++ call; write ``output_path`` atomically.

    The library is compiled to a temporary file beside the target and renamed over it, so
    a reader (or a concurrent build) never sees a half-written library.
    """
    start = time.monotonic()
    output = os.path.abspath(output_path or library_path())

    def failed(reason: str, log: str = "") -> BuildResult:
        return BuildResult(False, None, reason, time.monotonic() - start, log)

    try:
        cxx = find_compiler()
        onednn = find_onednn()
        tf_compile, tf_link = tensorflow_flags()
    except BuildError as exc:
        return failed(str(exc))
    if not sources():
        return failed(f"no .cc sources in {KERNELS_DIR}")

    out_dir = os.path.dirname(output)
    try:
        os.makedirs(out_dir, exist_ok=True)
        _remove_stale_temps(out_dir)
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".so", dir=out_dir)
        os.close(fd)
    except OSError as exc:
        return failed(f"cannot write to {out_dir}: {exc}")
    try:
        command = compile_command(cxx, onednn, tf_compile, tf_link, temp)
        compile_started = time.time()
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            log = _compiler_message(proc.stderr)
            first = log.splitlines()[0] if log else "no output"
            return failed(f"{os.path.basename(cxx)} failed (exit {proc.returncode}): {first}",
                          log)
        os.chmod(temp, 0o755)
        # Dated when the sources were read, so is_up_to_date() sees an edit made mid-build.
        os.utime(temp, (compile_started, compile_started))
        os.replace(temp, output)
    except OSError as exc:
        return failed(f"cannot run {cxx} or write {output}: {exc}")
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    version = ".".join(map(str, onednn.version))
    return BuildResult(True, output, f"built against oneDNN {version}",
                       time.monotonic() - start)


def build_if_needed(output_path: Optional[str] = None) -> BuildResult:
    """build(), unless the library exists and is newer than all its sources."""
    output = os.path.abspath(output_path or library_path())
    if is_up_to_date(output):
        return BuildResult(True, output, "up to date", 0.0)
    return build(output)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tf_bf16.kernels.build",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None,
                        help=f"where to write the library (default: {library_path()})")
    parser.add_argument("--if-needed", action="store_true",
                        help="do nothing when the library is newer than its sources")
    args = parser.parse_args(argv)
    result = (build_if_needed if args.if_needed else build)(args.output)
    print(result)
    if result.log:
        print(result.log, file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
