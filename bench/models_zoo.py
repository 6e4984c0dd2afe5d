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
    """``tests.zoo.make_trained_like``: constant-initialised weights made random (see there)."""
    return zoo().make_trained_like(model, seed=seed)


def sample_inputs(keras_model: Any, batch: int, seed: int = 0) -> List[np.ndarray]:
    """Random feeds for ``keras_model`` in input order (token ids below its vocabulary)."""
    return zoo().sample_inputs(keras_model, batch=batch, seed=seed)
