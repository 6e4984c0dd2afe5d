"""`make demo`: convert the bundled digits CNN to BF16+FP32 and compare it with the FP32 model.

On a CPU without avx512_bf16/AMX the conversion targets Sapphire Rapids (``--target=spr``),
as a build machine would; the comparison still runs here, through TensorFlow's slower Eigen
BF16 kernels.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from absl import app, flags

from tf_bf16 import MixedPrecision, Model
from tf_bf16.capability import detect_cpu_features
from tf_bf16.report import format_report

FLAGS = flags.FLAGS
flags.DEFINE_string("input_model", os.path.join(os.path.dirname(__file__), "digits_cnn"), "Model to convert.")
flags.DEFINE_integer("samples", 256, "How many digits images to compare on.")


def _digits(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits
    images = load_digits().images[:n].astype(np.float32) / 16.0
    return images[..., None]


def main(argv) -> None:
    del argv
    cpu = detect_cpu_features()
    target = None if cpu.bf16_native else "spr"
    fp32 = Model(FLAGS.input_model)
    converter = MixedPrecision(target=target)
    converter.model = fp32
    bf16 = converter()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = os.path.join(tmp, "digits_bf16")
        bf16.save(out_dir)
        reloaded = Model(out_dir)
        x = _digits(FLAGS.samples)
        ref, = fp32.run([x])
        got, = reloaded.run([x])
    print(f"converted {FLAGS.input_model} for {target or 'this CPU'} ({cpu.model_name})")
    print(format_report(bf16.report))
    agree = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    print(f"FP32 vs BF16 on {len(x)} digits: max abs diff {np.abs(ref - got).max():.3g}, "
          f"predictions agree {agree:.1%}")


if __name__ == "__main__":
    app.run(main)
