"""Loader for tf_bf16's optional C++ BF16 kernels (``tf_bf16.kernels``).

The planned kernels are oneDNN-backed BF16 MatMul and Conv2D custom ops compiled into
``_bf16_ops.so`` beside this file. They are optional and not built yet: converted models use
stock TensorFlow ops, so ``load_kernels()`` returning None only means no extra speed-up.
"""

from __future__ import annotations

import os
import types
from typing import Optional

from absl import logging

LIBRARY_NAME = "_bf16_ops.so"


def library_path() -> str:
    """Where the compiled kernel library is expected: next to this file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME)


def load_kernels(path: Optional[str] = None) -> Optional[types.ModuleType]:
    """Load the custom-op library with ``tf.load_op_library``; None when it is not built.

    A library that exists but fails to load (built against another TensorFlow) is logged as
    a warning and also yields None, since every converted model runs without it.
    """
    import tensorflow as tf

    path = path or library_path()
    if not tf.io.gfile.exists(path):
        logging.debug("tf_bf16 kernels not built (%s missing); using stock TensorFlow ops", path)
        return None
    try:
        return tf.load_op_library(path)
    except (tf.errors.OpError, OSError) as exc:
        logging.warning("cannot load tf_bf16 kernels from %s: %s", path, exc)
        return None
