"""`tf_bf16.Model`: one wrapper for every model kind tf_bf16 reads and writes.

Any source (SavedModel directory, frozen ``.pb``/``.pbtxt``, Keras file or object, GraphDef,
``tf.Graph``, ConcreteFunction) becomes a frozen GraphDef plus the names, dtypes and shapes of
its inputs and outputs, so every pass works on one representation and the result can be
saved back with the source's signature intact.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from tf_bf16 import model_io, variables as variables_lib
from tf_bf16.errors import InputError, ModelSaveError, ModelTooLargeError
from tf_bf16.model_io import Signature
from tf_bf16.transforms import graph as graph_lib

Feeds = Union[Mapping[str, Any], Sequence[Any]]


class Model:
    """A frozen TensorFlow model with named inputs and outputs.

    ``Model(source, inputs=None, outputs=None, signature="serving_default")`` accepts the
    same kinds ``MixedPrecision.model`` does. ``run`` executes it; ``save`` writes a frozen
    ``.pb``/``.pbtxt`` or a SavedModel whose signature equals the source's.

    A SavedModel whose weights exceed protobuf's 2 GiB limit keeps them as variables
    (``variables`` is then set: the graph reads them through ``VarHandleOp`` nodes); such a
    model runs and saves as a SavedModel, never as a ``.pb``.
    """

    def __init__(self, source: Any, inputs: Optional[Sequence[str]] = None,
                 outputs: Optional[Sequence[str]] = None, signature: str = "serving_default"):
        if isinstance(source, Model):
            loaded = model_io.LoadedGraph(source.graph_def, list(source.input_names),
                                          list(source.output_names), source.signature, source.source_path,
                                          source.variables)
        else:
            loaded = model_io.load(source, signature)
        graph_def = loaded.graph_def
        input_names = [graph_lib.node_name(n) for n in inputs] if inputs else loaded.input_names
        output_names = [graph_lib.canonical_tensor(n) for n in outputs] if outputs else loaded.output_names
        if input_names is None:
            input_names = model_io.infer_inputs(graph_def)
        if output_names is None:
            output_names = model_io.infer_outputs(graph_def)
        model_io.check_names(graph_def, input_names, output_names, loaded.source_path)
        self._graph_def = graph_def
        self.input_names: List[str] = list(input_names)
        self.output_names: List[str] = list(output_names)
        self.source_path: Optional[str] = loaded.source_path
        self.variables: Optional[variables_lib.Variables] = loaded.variables
        sig = loaded.signature
        if sig is not None and (inputs or outputs):
            sig = None  # user-chosen I/O no longer matches the source signature
        self.signature: Signature = sig or model_io.synthesize_signature(
            graph_def, self.input_names, self.output_names, signature)
        self.report: Dict[str, Any] = {}
        self._session = None

    # ------------------------------------------------------------------ graph

    @property
    def graph_def(self):
        """The frozen GraphDef (treat as read-only; use ``with_graph_def`` to replace it)."""
        return self._graph_def

    def with_graph_def(self, graph_def, report: Optional[Dict[str, Any]] = None) -> "Model":
        """A new Model with ``graph_def`` and this model's inputs, outputs and signature."""
        other = Model.__new__(Model)
        other._graph_def = graph_def
        other.input_names = list(self.input_names)
        other.output_names = list(self.output_names)
        other.source_path = self.source_path
        other.variables = self.variables
        other.signature = self.signature
        other.report = dict(report or {})
        other._session = None
        return other

    # ------------------------------------------------------------------ run

    def _ensure_session(self, session_config=None):
        if self._session is None:
            import tensorflow as tf

            from tf_bf16 import kernels
            if kernels.uses_kernels(self._graph_def):
                kernels.require()
            graph = tf.Graph()
            with graph.as_default():
                tf.graph_util.import_graph_def(self._graph_def, name="")
            self._session = tf.compat.v1.Session(graph=graph, config=session_config)
            if self.variables is not None:
                variables_lib.restore(self._session, self.variables.present_in(self._graph_def))
        return self._session

    def run(self, feeds: Feeds, session_config=None) -> List[np.ndarray]:
        """Execute the graph: feeds by input name (dict) or in input order (list)."""
        if isinstance(feeds, Mapping):
            unknown = sorted(set(feeds) - set(self.input_names))
            if unknown:
                raise InputError(f"unknown input name(s) {unknown}; inputs are {self.input_names}")
            missing = [n for n in self.input_names if n not in feeds]
            if missing:
                raise InputError(f"missing feed(s) for input(s) {missing}")
            ordered = [feeds[n] for n in self.input_names]
        else:
            ordered = list(feeds)
            if len(ordered) != len(self.input_names):
                raise InputError(f"expected {len(self.input_names)} input(s) {self.input_names}, got {len(ordered)}")
        session = self._ensure_session(session_config)
        feed_dict = {graph_lib.tf_tensor_name(n): v for n, v in zip(self.input_names, ordered)}
        return list(session.run([graph_lib.tf_tensor_name(n) for n in self.output_names], feed_dict=feed_dict))

    __call__ = run

    def close(self) -> None:
        """Release the cached TensorFlow session."""
        if self._session is not None:
            self._session.close()
            self._session = None

    # ------------------------------------------------------------------ save

    def check_save_path(self, path: Union[str, os.PathLike]) -> None:
        """Raise what ``save(path)`` would refuse up front (the input itself; a ``.pb`` of a model too large
        for one), so a caller can fail before converting."""
        path = os.fspath(path)
        if self.source_path and _same_or_inside(path, self.source_path):
            raise ModelSaveError(path, "refusing to overwrite the input model; choose another output path")
        if self.variables is not None and (path.endswith(".pb") or path.endswith(".pbtxt")):
            raise ModelTooLargeError(path, _too_large_for_pb(self.variables, path))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write atomically: ``*.pb`` binary GraphDef, ``*.pbtxt`` text, anything else a SavedModel.

        A model with ``variables`` (weights over protobuf's 2 GiB limit) saves only as a SavedModel;
        asking for a ``.pb``/``.pbtxt`` raises ModelTooLargeError before anything is written.
        """
        path = os.fspath(path)
        self.check_save_path(path)
        frozen = path.endswith(".pb") or path.endswith(".pbtxt")
        if self.variables is not None:
            written = model_io.write_saved_model_with_variables(self._graph_def, self.signature, self.variables,
                                                                path, keep=self.input_names + self.output_names)
            self.report["variables"] = {  # what the SavedModel holds: its weights stayed variables
                "count": len(written.specs), "bf16": sum(s.dtype == "bfloat16" for s in written.specs),
                "bytes": written.nbytes, "source_bytes": self.variables.nbytes}
        elif frozen:
            model_io.write_frozen(self._graph_def, path, text=path.endswith(".pbtxt"))
        else:
            model_io.write_saved_model(self._graph_def, self.signature, path)

    def __repr__(self) -> str:
        return (f"Model({len(self._graph_def.node)} nodes, inputs={self.input_names}, "
                f"outputs={self.output_names})")


def _too_large_for_pb(variables: variables_lib.Variables, path: str) -> str:
    """Why a model with weights kept as variables cannot be a frozen GraphDef, and what to write instead."""
    stem = path[:-len(".pbtxt")] if path.endswith(".pbtxt") else path[:-len(".pb")]
    return (f"the model's weights take {variables_lib.format_bytes(variables.nbytes)}, over protobuf's "
            f"{variables_lib.format_bytes(model_io.MAX_PROTO_BYTES)} limit for one GraphDef, so they cannot be "
            f"frozen into a .pb/.pbtxt file; write a SavedModel directory instead (an output path without .pb, "
            f"e.g. {stem or 'model'}_savedmodel), which keeps the weights as variables")


def _same_or_inside(path: str, source: str) -> bool:
    """True when ``path`` is ``source`` itself (through links too) or lies inside it."""
    target, origin = os.path.realpath(path), os.path.realpath(source)
    return target == origin or target.startswith(origin.rstrip(os.sep) + os.sep)
