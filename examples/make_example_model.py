"""Train the bundled example model: a small CNN on scikit-learn's 8x8 digits.

Deterministic (fixed seed, op determinism) and quick (seconds on a laptop CPU); the result
is exported as a SavedModel to ``examples/digits_cnn/`` for the demo and the tests.

    python examples/make_example_model.py [--output_dir=examples/digits_cnn] [--epochs=15]
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
import numpy as np  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))

_OUTPUT_DIR = flags.DEFINE_string("output_dir", os.path.join(_HERE, "digits_cnn"),
                                  "Where the SavedModel is written (replaced if it exists).")
_EPOCHS = flags.DEFINE_integer("epochs", 15, "Training epochs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the split, weight init and shuffling.")


def load_data(seed: int):
    """Digits scaled to [0, 1] as NHWC float32 images, split 80/20 into train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.2, random_state=seed, stratify=labels)


def build_model():
    """Conv-BN-ReLU twice, pooled, then a softmax classifier: the ops a BF16 converter cares about."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(8, 8, 1), name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def export_atomically(model, output_dir: str) -> None:
    """Export a SavedModel next to ``output_dir`` and swap it in, so a failed run leaves the old one."""
    import shutil

    parent = os.path.dirname(os.path.abspath(output_dir))
    tmp = tempfile.mkdtemp(prefix=".digits_cnn.", dir=parent)
    try:
        staged = os.path.join(tmp, "model")
        model.export(staged, verbose=False)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staged, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv) -> None:
    del argv
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(_SEED.value)
    tf.config.experimental.enable_op_determinism()
    x_train, x_test, y_train, y_test = load_data(_SEED.value)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=_EPOCHS.value, shuffle=True, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    logging.info("test accuracy %.4f on %d images", accuracy, len(x_test))
    print(f"test accuracy {accuracy:.4f} on {len(x_test)} images")
    export_atomically(model, _OUTPUT_DIR.value)
    print(f"SavedModel written to {_OUTPUT_DIR.value}")


if __name__ == "__main__":
    app.run(main)
