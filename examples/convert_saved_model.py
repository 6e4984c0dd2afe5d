"""Convert a SavedModel (or frozen .pb / Keras file) to mixed BF16/FP32 and report what changed.

Copy this into a pipeline and adjust: it is the whole job in a few lines of tf_bf16's API.

  python examples/convert_saved_model.py --input_model=examples/digits_cnn \
      --output_model=/tmp/digits_bf16 [--config=conf.yaml] [--target=spr] [--report=report.json]
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from tf_bf16 import MixedPrecision, Model

FLAGS = flags.FLAGS
flags.DEFINE_string("input_model", None, "SavedModel directory, frozen .pb/.pbtxt or .keras/.h5 file.")
flags.DEFINE_string("output_model", None, "Where to write: a directory (SavedModel) or a .pb file.")
flags.DEFINE_string("config", None, "Optional YAML config (Neural Compressor layout).")
flags.DEFINE_string("target", None, "Deployment CPU when converting elsewhere: spr, cpx or avx512_bf16.")
flags.DEFINE_string("report", None, "Optional path for the JSON report.")
flags.mark_flags_as_required(["input_model", "output_model"])


def main(argv) -> None:
    del argv
    converter = MixedPrecision(FLAGS.config, target=FLAGS.target)
    converter.precisions = "bf16"
    converter.model = FLAGS.input_model
    optimized = converter()
    optimized.save(FLAGS.output_model)
    if FLAGS.report:
        with open(FLAGS.report, "w") as f:
            json.dump(optimized.report, f, indent=2, default=str)
    summary = optimized.report["summary"]
    logging.info("wrote %s: %d nodes, %.1f%% of compute nodes BF16, %d Casts",
                 FLAGS.output_model, summary["nodes_after"], 100 * summary["bf16_share"], summary["casts_after"])
    # Reload what was written, as a deployment would.
    reloaded = Model(FLAGS.output_model)
    logging.info("reloaded: inputs %s outputs %s", reloaded.input_names, reloaded.output_names)


if __name__ == "__main__":
    app.run(main)
