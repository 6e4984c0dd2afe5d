"""The benchmark models: thin wrappers over ``tests/zoo.py`` (the one source of the builders).

``tests`` is not an installed package, so the repository root is put on ``sys.path`` when
``tests.zoo`` is first needed.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, List

import numpy as np

from bench.common import tests_module

MODELS = ("resnet50", "mobilenetv2", "bert_base")
# BERT-base sizes (hidden, heads, intermediate, sequence length); the layer count is a flag.
BERT_BASE = {"hidden": 768, "heads": 12, "intermediate": 3072, "seq_len": 128}


def zoo() -> ModuleType:
    """``tests.zoo``, importable from a checkout that is not installed."""
    return tests_module("zoo")


def build(name: str, bert_layers: int = 4, bert_vocab: int = 30522, trained_like: bool = True) -> Any:
    """A fresh Keras model (weights=None, fixed seed) by benchmark name; see ``make_trained_like``."""
    z = zoo()
    if name == "bert_base":
        model = z.bert_like(num_layers=bert_layers, vocab=bert_vocab, **BERT_BASE)
    elif name in ("resnet50", "mobilenetv2"):
        model = z.keras_model(name)
    else:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}")
    if trained_like:
        make_trained_like(model)
    return model


def make_trained_like(model: Any, seed: int = 1) -> int:
    """Give constant-initialised weights (biases, BatchNorm/LayerNorm parameters and statistics) seeded
    random values near their initial ones; returns how many variables changed.

    Straight after ``weights=None`` initialisation every bias is 0 and every BatchNorm is
    x * 1/sqrt(1+eps) + 0, so TensorFlow's Grappler deletes those nodes as ``x + 0`` and folds
    the scale into the filter: the FP32 ResNet50 then runs 52 bare Conv2D with no BiasAdd, which
    no trained model allows, and fusions such as ``_FusedConv2D`` never show up.
    """
    rng = np.random.default_rng(seed)
    changed = 0
    for weight in model.weights:
        value = np.asarray(weight.numpy())
        if not value.size or not np.issubdtype(value.dtype, np.floating):
            continue
        first = float(value.flat[0])
        if first not in (0.0, 1.0) or not np.all(value == first):
            continue
        if first == 0.0:
            new = rng.normal(0.0, 0.05, value.shape)
        else:
            new = rng.uniform(0.5, 1.5, value.shape)
        weight.assign(new.astype(value.dtype))
        changed += 1
    return changed


def sample_inputs(keras_model: Any, batch: int, seed: int = 0) -> List[np.ndarray]:
    """Random feeds for ``keras_model`` in input order (token ids below its vocabulary)."""
    return zoo().sample_inputs(keras_model, batch=batch, seed=seed)
