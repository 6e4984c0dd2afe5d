"""Session fixtures shared by the whole suite: zoo models built (and frozen) once per worker.

Test modules import the builders with ``from tests import zoo``; the fixtures here cache
what those builders return so that, under ``pytest -n N`` too, each architecture is built,
exported or frozen at most once per worker process.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's own BF16 AMP pass (the baseline tests compare with) needs oneDNN on, which is
# not the default on every CPU; it must be set before TensorFlow is imported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# This machine has no avx512_bf16: the suite converts anyway (tests of the hardware gate pass
# their own environment to MixedPrecision).
os.environ.setdefault("FORCE_BF16", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import zoo  # noqa: E402


@pytest.fixture(scope="session")
def kernel_ops() -> Any:
    """tf_bf16's kernel library, loaded (built first when missing or outdated); the test is
    skipped with the build's reason where it cannot be built (no g++, no oneDNN >= 3)."""
    import tensorflow as tf
    from tf_bf16.kernels import build as kernel_build

    result = kernel_build.build_if_needed()
    if not result.ok:
        pytest.skip(f"tf_bf16 kernels cannot be built here: {result.reason}")
    try:
        return tf.load_op_library(result.path)
    except tf.errors.NotFoundError:
        # Newer than its sources but built against another TensorFlow or oneDNN: rebuild.
        result = kernel_build.build()
        if not result.ok:
            pytest.skip(f"tf_bf16 kernels cannot be built here: {result.reason}")
        return tf.load_op_library(result.path)


@pytest.fixture(scope="session")
def zoo_keras() -> Callable[[str], Any]:
    """Factory: ``zoo_keras("resnet50") -> keras.Model``, built once per session and name."""
    cache: Dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = zoo.keras_model(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_model(zoo_keras: Callable[[str], Any]) -> Callable[[str], Any]:
    """Factory: ``zoo_model("resnet50") -> tf_bf16.Model`` frozen from the cached Keras model."""
    from tf_bf16.model import Model

    cache: Dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = Model(zoo_keras(name))
        return cache[name]

    yield get
    for model in cache.values():
        model.close()


@pytest.fixture(scope="session")
def zoo_saved_model(zoo_keras: Callable[[str], Any], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """Factory: ``zoo_saved_model("bert") -> path`` of the Keras model's ``model.export`` SavedModel.

    Treat the directory as read-only: it is shared by every test of the session.
    """
    root = tmp_path_factory.mktemp("zoo_saved_models")
    cache: Dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            path = str(root / name)
            zoo_keras(name).export(path, verbose=False)
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_inputs() -> Callable[..., list]:
    """Factory: ``zoo_inputs("bert", batch=2, seed=0)`` -> feeds in input order (no model built)."""

    def get(name: str, batch: int = 2, seed: int = 0) -> list:
        return zoo.sample_inputs(name, batch=batch, seed=seed)

    return get


@pytest.fixture(scope="session")
def digits() -> Tuple[Any, Tuple[np.ndarray, np.ndarray]]:
    """The trained digits CNN and its held-out ``(x_test, y_test)``, trained once per session."""
    return zoo.digits_cnn()
