"""Error types tf_bf16 raises: one base class so callers can catch everything we raise."""

from __future__ import annotations

from typing import Optional


class TfBf16Error(Exception):
    """Base class of every error tf_bf16 raises on purpose."""


class ModelLoadError(TfBf16Error):
    """A model could not be read; the message names the path and the problem."""

    def __init__(self, path: Optional[str], problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class ModelSaveError(TfBf16Error):
    """A model could not be written; nothing partial is left at the destination."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ModelTooLargeError(ModelSaveError):
    """A model whose weights exceed protobuf's 2 GiB limit was asked for as one protobuf (a frozen .pb);
    the message says to write a SavedModel directory instead."""


class UnsupportedModelError(ModelLoadError):
    """The model uses something tf_bf16 cannot convert (control flow, >2 GB of weights...)."""


class ConfigError(TfBf16Error):
    """A YAML/dict config key or value is invalid; the message names the key and allowed values."""


class InputError(TfBf16Error, ValueError):
    """Bad data or arguments given to tf_bf16 in code: a feed, a batch, a DataLoader or metric
    argument. Also a ValueError, as Python raises for bad arguments."""


class EvaluationError(TfBf16Error):
    """The user's evaluation (eval_func or metric) returned something tuning cannot use."""


class UnsupportedHardwareError(TfBf16Error):
    """BF16 was asked for on a CPU or TensorFlow build that cannot run it fast."""


class GraphError(TfBf16Error, ValueError):
    """A GraphDef is malformed or a pass cannot apply to it (dangling input, duplicate name,
    cycle, outputs not in the graph); also a ValueError, as TensorFlow raises for bad graphs."""


class MalformedGraphError(GraphError, ModelLoadError):
    """A model's GraphDef is structurally broken (dangling input, duplicate name, cycle, nameless
    node): a GraphError that, being a ModelLoadError too, names the model's path."""
