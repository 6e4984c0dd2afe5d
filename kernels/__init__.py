"""Loader for tf_bf16's optional C++ BF16 kernels (``tf_bf16.kernels``).

The kernels are oneDNN-backed fused Conv2D and MatMul custom ops (``TfBf16Conv2D``,
``TfBf16MatMul``) compiled into ``_bf16_ops.so`` beside this file by ``build.py``
(``python -m tf_bf16.kernels.build``). They are optional: a model converted without
``kernels=True`` uses stock TensorFlow ops only, so ``load_kernels()`` returning None means
no extra speed-up. A graph that does use them needs ``require()`` (``tf_bf16.Model`` calls it).
"""

from __future__ import annotations

import os
import types
from typing import Optional

from absl import logging

LIBRARY_NAME = "_bf16_ops.so"
OP_PREFIX = "TfBf16"   # every op type the library registers starts with this


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


def uses_kernels(graph_def) -> bool:
    """Whether ``graph_def`` contains an op of this library (so it cannot run without it)."""
    return any(node.op.startswith(OP_PREFIX) for node in graph_def.node)


def require(path: Optional[str] = None) -> types.ModuleType:
    """The loaded library; a ``ModelLoadError`` naming the library path when it cannot be loaded."""
    from tf_bf16.errors import ModelLoadError

    module = load_kernels(path)
    if module is None:
        raise ModelLoadError(path or library_path(), "the graph uses tf_bf16's fused kernel ops (TfBf16*), but the "
                             "kernel library is not built or does not load; build it with "
                             "'python -m tf_bf16.kernels.build'")
    return module
