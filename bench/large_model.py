"""Large-model conversion: peak memory of SavedModel -> SavedModel for weights over protobuf's 2 GiB limit.

Builds (in a child process, in a temporary folder) the MLP SavedModel of ``tests/large_models.py``
with 2.25 GiB of float32 weights by default, then runs ``python -m tf_bf16 convert`` on it in a
child process whose own peak RSS (``wait4``'s ru_maxrss) is measured, and prints one JSON line:

* ``weight_bytes``: the source's float32 weights; ``output_weight_bytes``: the BF16 checkpoint written;
* ``peak_rss_bytes`` and ``peak_over_weights`` (the issue's target: under 3);
* ``seconds``: the conversion's wall time (TensorFlow start-up included);
* ``pb_refusal_seconds``: how long the refusal of a ``.pb`` output takes, nothing written;
* ``max_rel_err``: max |bf16 - fp32| / max |fp32| of the converted SavedModel (``tf.saved_model.load``)
  against the FP32 model's own output, on a batch of 2 (with ``--check``).

Weights are generated at run time and deleted afterwards (``--keep_dir`` keeps them).

    python -m bench.large_model                      # 2.25 GiB: needs ~8 GiB of disk, ~6 GiB of RAM
    python -m bench.large_model --hidden=16384       # a smaller (0.75 GiB) run
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, Sequence

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("width", 4096, "Input/middle width of the MLP (a multiple of 256).")
flags.DEFINE_integer("hidden", 65536, "Hidden width of the MLP (a multiple of 256).")
flags.DEFINE_integer("out_dim", 16384, "Output width of the MLP (a multiple of 256).")
flags.DEFINE_bool("check", True, "Load the converted SavedModel and compare it with the FP32 reference.")
flags.DEFINE_string("keep_dir", None, "Build and convert here and keep the files (default: a temp dir, removed).")
flags.DEFINE_string("out", None, "Also write the JSON line to this file.")

_CHECK = """
import json, sys
import numpy as np, tensorflow as tf
data = np.load(sys.argv[2])
loaded = tf.saved_model.load(sys.argv[1])
y = loaded.signatures["serving_default"](x=tf.constant(data["x"]))["y"].numpy()
ref = data["y"].astype(np.float64)
print(json.dumps(float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))))
"""


def _dir_bytes(path: str) -> int:
    """Bytes of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def measure(workdir: str, dims: Any, check: bool) -> Dict[str, Any]:
    """Build, refuse a .pb, convert to a SavedModel and (``check``) compare; the record's fields."""
    large_models = common.tests_module("large_models")
    source, target = os.path.join(workdir, "fp32"), os.path.join(workdir, "bf16")
    large_models.build_in_subprocess(source, dims)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    root = common.repo_root()
    refused = large_models.run_measured(large_models.cli_command(
        "convert", f"--input_model={source}", f"--output_model={target}.pb", "--target=spr"), env=env, cwd=root)
    if refused.returncode != 1 or os.path.exists(f"{target}.pb"):
        raise RuntimeError(f"the .pb output was not refused cleanly:\n{refused.stderr[-2000:]}")
    done = large_models.run_measured(large_models.cli_command(
        "convert", f"--input_model={source}", f"--output_model={target}", "--target=spr"), env=env, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"conversion failed:\n{done.stderr[-3000:]}")
    record: Dict[str, Any] = {
        "bench": "large_model", "dims": [dims.width, dims.hidden, dims.width, dims.out],
        "weight_bytes": dims.weight_bytes, "output_weight_bytes": _dir_bytes(os.path.join(target, "variables")),
        "peak_rss_bytes": done.peak_rss_bytes, "peak_over_weights": round(done.peak_rss_bytes / dims.weight_bytes, 3),
        "seconds": round(done.seconds, 2), "pb_refusal_seconds": round(refused.seconds, 2),
        "pb_refusal_peak_rss_bytes": refused.peak_rss_bytes,
    }
    if check:
        result = subprocess.run([sys.executable, "-c", _CHECK, target, large_models.reference_path(source)],
                                env=env, cwd=root, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"loading the converted SavedModel failed:\n{result.stderr[-3000:]}")
        record["max_rel_err"] = round(json.loads(result.stdout.strip().splitlines()[-1]), 5)
    return record


def main(argv: Sequence[str]) -> None:
    del argv
    common.configure_env()
    large_models = common.tests_module("large_models")
    dims = large_models.MlpDims(width=FLAGS.width, hidden=FLAGS.hidden, out=FLAGS.out_dim)
    workdir = FLAGS.keep_dir or tempfile.mkdtemp(prefix="tf_bf16_large_model_")
    os.makedirs(workdir, exist_ok=True)
    try:
        record = measure(workdir, dims, FLAGS.check)
    finally:
        if not FLAGS.keep_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    host = {k: v for k, v in common.host_info().fields().items() if k != "note"}
    with common.JsonLines(FLAGS.out) as out:
        out.emit({**record, **host})


if __name__ == "__main__":
    app.run(main)
