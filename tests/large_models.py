"""SavedModels with variables, built at test time (weights are generated, never stored).

``build_mlp`` writes a TF2 SavedModel of a three-layer MLP whose weights are ``tf.Variable``s
made by tiling one seeded random block, so even 2+ GiB of weights cost one copy in memory and
a few seconds. The reference output of the FP32 model for a fixed input is saved beside it
(``reference.npz``), so a test never has to load the FP32 model again to compare.
``build_in_subprocess`` runs the build in a child process, so its memory is returned at once.

Default sizes: 4096 -> 65536 -> 4096 -> 16384, i.e. 604M float32 weights (2.25 GiB, over
protobuf's 2 GiB limit for one GraphDef).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

BLOCK = 256            # the random block every weight matrix tiles
REFERENCE = "reference.npz"


@dataclasses.dataclass(frozen=True)
class MlpDims:
    """Layer widths: x[batch, width] -> hidden -> width -> out."""

    width: int = 4096
    hidden: int = 65536
    out: int = 16384

    @property
    def weight_bytes(self) -> int:
        """Bytes of float32 weights (three matrices and one bias)."""
        return 4 * (self.width * self.hidden * 2 + self.width * self.out + self.hidden)


SMALL = MlpDims(width=256, hidden=512, out=256)   # 1.25 MB: for tests that lower the size limit


def _tiled(shape: Tuple[int, int], seed: int):
    """A ``shape`` float32 tensor tiling one seeded BLOCK x BLOCK normal block, scaled by 1/sqrt(rows)."""
    import tensorflow as tf

    rows, cols = shape
    block = tf.random.stateless_normal([BLOCK, BLOCK], seed=[seed, 7]) / float(np.sqrt(rows))
    return tf.tile(block, [rows // BLOCK, cols // BLOCK])


def build_mlp(path: str, dims: MlpDims = MlpDims(), seed: int = 0, batch: int = 2) -> Dict[str, object]:
    """Write the MLP SavedModel to ``path`` (signature ``serving_default``: x -> {"y"}) and its reference."""
    import tensorflow as tf

    class Mlp(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="mlp")
            self.w1 = tf.Variable(_tiled((dims.width, dims.hidden), seed), name="w1")
            self.b1 = tf.Variable(tf.fill([dims.hidden], 0.01), name="b1")
            self.w2 = tf.Variable(_tiled((dims.hidden, dims.width), seed + 1), name="w2")
            self.w3 = tf.Variable(_tiled((dims.width, dims.out), seed + 2), name="w3")
            spec = tf.TensorSpec([None, dims.width], tf.float32, name="x")
            self.serve = tf.function(self._serve, input_signature=[spec])

        def _serve(self, x):
            h = tf.nn.relu(tf.matmul(x, self.w1) + self.b1)
            return {"y": tf.matmul(tf.matmul(h, self.w2), self.w3)}

    model = Mlp()
    tf.saved_model.save(model, path, signatures={"serving_default": model.serve})
    x = np.random.default_rng(seed).normal(size=(batch, dims.width)).astype(np.float32)
    y = model.serve(tf.constant(x))["y"].numpy()
    np.savez(reference_path(path), x=x, y=y)
    return {"path": path, "weight_bytes": dims.weight_bytes}


def reference_path(saved_model: str) -> str:
    """Where ``build_mlp`` puts the FP32 reference (beside the SavedModel, not inside it)."""
    return f"{os.path.abspath(saved_model).rstrip(os.sep)}.{REFERENCE}"


def load_reference(saved_model: str) -> Tuple[np.ndarray, np.ndarray]:
    """(x, y) that ``build_mlp`` recorded for ``saved_model``."""
    data = np.load(reference_path(saved_model))
    return data["x"], data["y"]


def build_in_subprocess(path: str, dims: MlpDims = MlpDims(), seed: int = 0, timeout_s: float = 600) -> None:
    """``build_mlp`` in a child Python, so the weights' memory goes back as soon as it is written."""
    root = str(Path(__file__).resolve().parents[1])
    code = ("import json, sys\n"
            "from tests.large_models import MlpDims, build_mlp\n"
            "build_mlp(sys.argv[1], MlpDims(**json.loads(sys.argv[2])), int(sys.argv[3]))\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code, path, json.dumps(dataclasses.asdict(dims)), str(seed)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"building {path} failed:\n{result.stderr[-3000:]}")


@dataclasses.dataclass(frozen=True)
class Measured:
    """A finished child process: exit code, output, peak resident memory and wall time."""

    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int
    seconds: float


def run_measured(command: Sequence[str], env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                 timeout_s: float = 600) -> Measured:
    """Run ``command`` and report its own peak RSS (``wait4``'s ru_maxrss of that child, not of others)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(list(command), stdout=out, stderr=err, env=dict(env or os.environ), cwd=cwd)
        deadline = start + timeout_s
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        return Measured(child.returncode, out.read(), err.read(), usage.ru_maxrss * 1024, seconds)


def cli_command(*args: str) -> List[str]:
    """``python -m tf_bf16 ARGS`` with this interpreter."""
    return [sys.executable, "-m", "tf_bf16", *args]


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
