"""Reading every supported model kind into a frozen GraphDef, and writing one back atomically.

Kept apart from ``model.py`` so the Model class stays a thin value object and the
format-specific code (SavedModel, Keras, protobuf files) lives in one place.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import time
import uuid
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
from google.protobuf import message, text_format
from tensorflow.core.framework import graph_pb2

from tf_bf16 import variables as variables_lib
from tf_bf16.errors import GraphError, MalformedGraphError, ModelLoadError, ModelSaveError, UnsupportedModelError
from tf_bf16.transforms import graph as graph_lib
from tf_bf16.transforms.op_classes import STATE_OPS

# A frozen GraphDef is one protobuf message, which cannot exceed 2 GiB. A SavedModel whose
# weights and graph would not fit in one keeps its weights as variables (``tf_bf16.variables``).
MAX_PROTO_BYTES = 2 * 1024 ** 3
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
SERVE_TAG = "serve"
PREDICT_METHOD = "tensorflow/serving/predict"


@dataclasses.dataclass(frozen=True)
class TensorSpecInfo:
    """One signature entry: the graph tensor behind a signature key, its dtype and shape."""

    name: str                      # tensor in the graph, canonical ("node" or "node:k")
    dtype: str                     # numpy-style name: "float32", "int32" ...
    shape: Optional[Tuple[Optional[int], ...]]  # None when the rank is unknown


@dataclasses.dataclass(frozen=True)
class Signature:
    """A serving signature: key plus ordered inputs and outputs keyed by signature name.

    ``aliases`` are the source's other signature keys that serve the very same function
    (Keras ``export`` writes both ``serve`` and ``serving_default``); a saved SavedModel
    lists the signature under ``key`` and under each alias.
    """

    key: str
    inputs: Dict[str, TensorSpecInfo]
    outputs: Dict[str, TensorSpecInfo]
    aliases: Tuple[str, ...] = ()


@dataclasses.dataclass
class LoadedGraph:
    """What a loader produces; names are None when the source does not say.

    ``variables`` is set for a model too large to freeze: the graph then reads its weights
    through ``VarHandleOp`` nodes whose values stay in that checkpoint.
    """

    graph_def: graph_pb2.GraphDef
    input_names: Optional[List[str]]
    output_names: Optional[List[str]]
    signature: Optional[Signature]
    source_path: Optional[str]
    variables: Optional[variables_lib.Variables] = None


def load(source: Any, signature_key: str = "serving_default") -> LoadedGraph:
    """Dispatch on the kind of ``source`` and return a frozen graph with I/O names."""
    import tensorflow as tf

    if isinstance(source, (str, os.PathLike)):
        return _load_path(os.fspath(source), signature_key)
    if isinstance(source, graph_pb2.GraphDef):
        graph_def = graph_lib.copy_graph(source)
        validate_graph(graph_def, None)
        return LoadedGraph(graph_def, None, None, None, None)
    if isinstance(source, tf.Graph):
        graph_def = source.as_graph_def()
        validate_graph(graph_def, None)
        return LoadedGraph(graph_def, None, None, None, None)
    if _is_keras_model(source):
        return _freeze_keras(source, None, signature_key)
    if _is_concrete_function(source):
        return _freeze_function(source, None, signature_key, structured=False)
    if hasattr(source, "get_concrete_function"):
        try:
            fn = source.get_concrete_function()
        except Exception as exc:  # a tf.function without input_signature
            raise ModelLoadError(None, f"cannot trace {type(source).__name__} without an input_signature: {exc}")
        return _freeze_function(fn, None, signature_key, structured=False)
    raise ModelLoadError(None, f"unsupported model source of type {type(source).__name__}; expected a "
                               "SavedModel directory, .pb/.pbtxt, .keras/.h5, keras.Model, GraphDef, "
                               "tf.Graph or ConcreteFunction")


# ----------------------------------------------------------------------------- paths

def _load_path(path: str, signature_key: str) -> LoadedGraph:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise ModelLoadError(path, "no such file or directory")
    if tf.io.gfile.isdir(path):
        entries = tf.io.gfile.listdir(path)
        if not entries:
            raise ModelLoadError(path, "directory is empty; expected a SavedModel (saved_model.pb)")
        if not any(f in entries for f in SAVED_MODEL_FILES):
            raise ModelLoadError(path, "directory has no saved_model.pb, so it is not a SavedModel")
        return _load_saved_model(path, signature_key)
    lower = path.lower()
    if lower.endswith((".keras", ".h5", ".hdf5")):
        _check_keras_container(path)
        import keras
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:
            raise ModelLoadError(path, f"cannot load Keras model: {_first_line(exc)}")
        return _freeze_keras(model, path, signature_key)
    graph_def = read_graph_def(path)
    validate_graph(graph_def, path)
    if not lower.endswith(".pbtxt"):  # text GraphDefs are often written by hand, without versions
        _warn_if_unversioned(graph_def, path)
    return LoadedGraph(graph_def, None, None, None, path)


def read_graph_def(path: str) -> graph_pb2.GraphDef:
    """Parse a binary ``.pb`` (or text ``.pbtxt``) GraphDef, naming the path on failure."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    if not data:
        raise ModelLoadError(path, "file is empty")
    graph_def = graph_pb2.GraphDef()
    if path.lower().endswith(".pbtxt"):
        try:
            text_format.Parse(data.decode("utf-8"), graph_def)
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise ModelLoadError(path, f"not a valid text GraphDef: {_first_line(exc)}")
        return graph_def
    try:
        graph_def.ParseFromString(data)
    except message.DecodeError as exc:
        raise ModelLoadError(path, f"not a valid binary GraphDef (corrupt or truncated protobuf: {_first_line(exc)})")
    return graph_def


def _warn_if_unversioned(graph_def: graph_pb2.GraphDef, path: str) -> None:
    """Warn (never refuse) when a binary GraphDef file that passed validation has no ``versions`` record.

    GraphDefs built node by node (many scripts, older exporters, Neural Compressor's tests)
    lack it and TensorFlow's ``import_graph_def`` accepts them as producer 0. TensorFlow's own
    writers put ``versions`` after every node, so a file cut exactly at a node boundary lacks
    it too; a cut that breaks something (a half node, a dangling input) is refused elsewhere.
    """
    if graph_def.versions.producer == 0:
        logging.warning("tf_bf16: %s: GraphDef has no 'versions' record; reading it as TensorFlow does (producer 0). "
                        "Files written by TensorFlow always have one, so if this one was, it may be truncated.",
                        path)


def validate_graph(graph_def: graph_pb2.GraphDef, path: Optional[str]) -> None:
    """Reject empty or structurally broken graphs (e.g. a truncated file) and unregistered ops.

    Broken structure (a nameless node, a duplicate name, a dangling input, a cycle outside a
    while loop) raises MalformedGraphError naming the nodes, before TensorFlow sees the graph.
    """
    if not graph_def.node:
        raise ModelLoadError(path, "GraphDef has no nodes (empty or not a GraphDef)")
    _check_structure(graph_def, path)
    _load_kernels_for(graph_def, path)
    sigs = graph_lib.OpSignatures(graph_def)
    unknown = sorted({n.op for n in graph_def.node if sigs.op_def(n.op) is None})
    if unknown:
        raise ModelLoadError(path, f"unknown op(s) {unknown}: not registered in this TensorFlow "
                                   "and not defined in the graph's function library")


def _check_structure(graph_def: graph_pb2.GraphDef, path: Optional[str]) -> None:
    """Raise MalformedGraphError for a nameless node, a duplicate name, a dangling input or a cycle."""
    nameless = [k for k, node in enumerate(graph_def.node) if not node.name or not node.op]
    if nameless:
        raise MalformedGraphError(path, f"GraphDef node(s) at position {nameless[:5]} have no name or op "
                                        "(corrupt protobuf)")
    try:
        index = graph_lib.GraphIndex(graph_def)
    except GraphError as exc:
        raise MalformedGraphError(path, str(exc)) from exc
    dangling = index.dangling_inputs()
    if dangling:
        raise MalformedGraphError(path, f"{graph_lib.dangling_message(dangling)} (a truncated or incomplete "
                                        "GraphDef)")
    try:
        index.topological_order()
    except GraphError as exc:
        raise MalformedGraphError(path, str(exc)) from exc


def _check_keras_container(path: str) -> None:
    """Refuse a ``.keras`` file that is not a zip archive, or an ``.h5`` file that is not HDF5, by name.

    Keras itself reports such files as "File not found" or "file signature not found".
    """
    if path.lower().endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise ModelLoadError(path, "not a Keras archive (.keras files are zip archives written by "
                                       "model.save)")
        return
    import h5py

    if not h5py.is_hdf5(path):
        raise ModelLoadError(path, "not an HDF5 file (.h5/.hdf5 Keras models are HDF5 files written by "
                                   "model.save)")


def _load_kernels_for(graph_def: graph_pb2.GraphDef, path: Optional[str]) -> None:
    """Register tf_bf16's kernel ops when the graph uses them (a model converted with kernels=True)."""
    from tf_bf16 import kernels

    if not kernels.uses_kernels(graph_def):
        return
    try:
        kernels.require()
    except ModelLoadError as exc:
        raise ModelLoadError(path, f"the model uses tf_bf16's fused kernel ops, but {exc.problem}") from exc


# ----------------------------------------------------------------------------- SavedModel

def _load_saved_model(path: str, signature_key: str) -> LoadedGraph:
    """Freeze the signature, or keep its weights as variables when they would not fit in one GraphDef.

    The checkpoint's index says how large the weights are without reading them; a model that
    may be too large is then loaded without its weights, so it costs no weight memory until it
    is run or saved.
    """
    frozen = _read_frozen_saved_model(path, signature_key)
    if frozen is not None:
        return frozen
    prefix = variables_lib.checkpoint_prefix(path)
    large = variables_lib.has_checkpoint(prefix) and not _fits_in_graph_def(
        variables_lib.checkpoint_weight_bytes(prefix), path)
    loaded = _load_saved_model_object(path, skip_checkpoint=large)
    chosen, aliases, dropped = _choose_signature(loaded, path, signature_key)
    if large and _fits_in_graph_def(_function_weight_bytes(chosen), path):
        # The checkpoint is large (optimizer slots, other signatures' weights), this signature's weights are not.
        loaded = _load_saved_model_object(path, skip_checkpoint=False)
        chosen, aliases, dropped = _choose_signature(loaded, path, signature_key)
        large = False
    if dropped:
        logging.warning("%s: converting signature %r only; signature(s) %s compute something else and are "
                        "not kept (load with signature=... to convert one of them)", path, signature_key, dropped)
    if large:
        return _load_keeping_variables(loaded, chosen, path, signature_key, aliases)
    return _freeze_function(chosen, path, signature_key, structured=True, aliases=aliases)


def _fits_in_graph_def(weight_bytes: int, path: str) -> bool:
    """Whether ``weight_bytes`` frozen into the SavedModel's graph stay within ``MAX_PROTO_BYTES``."""
    graph_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in SAVED_MODEL_FILES
                      if os.path.isfile(os.path.join(path, f)))
    return weight_bytes + graph_bytes <= MAX_PROTO_BYTES


def _load_saved_model_object(path: str, skip_checkpoint: bool) -> Any:
    """``tf.saved_model.load``; with ``skip_checkpoint`` the variables stay uninitialized (no weight memory)."""
    import tensorflow as tf

    options = tf.saved_model.LoadOptions(experimental_skip_checkpoint=skip_checkpoint)
    try:
        return tf.saved_model.load(path, options=options)
    except Exception as exc:
        raise ModelLoadError(path, f"cannot load SavedModel: {_first_line(exc)}")


def _choose_signature(loaded: Any, path: str, signature_key: str) -> Tuple[Any, List[str], List[str]]:
    """The signature function to convert, the other keys serving the same function, and those that do not."""
    keys = sorted(loaded.signatures.keys())
    if signature_key not in loaded.signatures:
        raise ModelLoadError(path, f"no signature {signature_key!r}; available signatures: {keys or 'none'}")
    chosen = loaded.signatures[signature_key]
    aliases, dropped = [], []
    for key in keys:
        if key != signature_key:
            (aliases if _same_endpoint(chosen, loaded.signatures[key]) else dropped).append(key)
    return chosen, aliases, dropped


def _function_weight_bytes(fn: Any) -> int:
    """Bytes of the variables a (concrete) function reads."""
    return sum(int(v.shape.num_elements() or 0) * v.dtype.size for v in getattr(fn, "variables", ()))


def _load_keeping_variables(loaded: Any, fn: Any, path: str, signature_key: str,
                            aliases: Sequence[str]) -> LoadedGraph:
    """The signature's graph with its functions inlined and its weights left in the checkpoint.

    Captured variables become ``VarHandleOp`` nodes (their values are read only when the model
    runs or is saved), other captured tensors Consts, captured lookup tables table nodes.
    """
    import tensorflow as tf
    from tensorflow.python.framework import convert_to_constants

    prefix = variables_lib.checkpoint_prefix(path)
    specs = variables_lib.function_variables(fn, variables_lib.checkpointed_variables(loaded, prefix), path)
    try:
        # The inlining convert_variables_to_constants_v2 does before it freezes, with its defaults.
        graph_def = convert_to_constants._run_inline_graph_optimization(  # pylint: disable=protected-access
            fn, lower_control_flow=True, aggressive_inlining=False)
    except Exception as exc:
        raise UnsupportedModelError(path, f"cannot inline the signature's functions: {_first_line(exc)}")
    graph_def, bound = variables_lib.bind_captures(graph_def, specs, variables_lib.captured_constants(fn))
    graph_def = _embed_lookup_tables(graph_def, fn, path)
    in_tensors = [t for t in fn.inputs if t.dtype != tf.resource]
    result = _loaded_from_function(graph_def, in_tensors, list(fn.outputs), fn, path, signature_key,
                                   structured=True, aliases=aliases)
    result.variables = variables_lib.Variables(prefix, bound)
    logging.info("%s: weights take %s, too large to freeze into one GraphDef; keeping them as %d variables",
                 path, variables_lib.format_bytes(result.variables.nbytes), len(bound))
    return result


_INIT_COLLECTIONS = ("saved_model_main_op", "legacy_init_op", "main_op", "table_initializer")


def _read_frozen_saved_model(path: str, signature_key: str) -> Optional[LoadedGraph]:
    """Read a SavedModel whose ``serve`` graph is already frozen straight from ``saved_model.pb``.

    That is what ``write_saved_model`` writes (and TF1 exports of frozen graphs): no object
    graph, no variables, no init ops. Reading the MetaGraphDef keeps the saved graph exactly
    and skips tracing. Returns None for anything else (TF2 or variable-holding SavedModels),
    which then load through ``tf.saved_model.load`` and are frozen.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    pb_path = os.path.join(path, "saved_model.pb")
    if not tf.io.gfile.exists(pb_path) or tf.io.gfile.exists(os.path.join(path, "variables", "variables.index")):
        return None
    with tf.io.gfile.GFile(pb_path, "rb") as f:
        data = f.read()
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(data)
    except message.DecodeError as exc:
        raise ModelLoadError(path, f"saved_model.pb is corrupt or truncated: {_first_line(exc)}")
    metas = [m for m in saved.meta_graphs if SERVE_TAG in m.meta_info_def.tags]
    if len(metas) != 1:
        return None
    meta = metas[0]
    if (meta.object_graph_def.nodes or meta.HasField("saver_def") or meta.meta_info_def.stripped_default_attrs
            or any(c in meta.collection_def for c in _INIT_COLLECTIONS)
            or any(n.op in STATE_OPS for n in meta.graph_def.node)):
        return None
    sig_defs = {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}
    if signature_key not in sig_defs:
        raise ModelLoadError(path, f"no signature {signature_key!r}; available signatures: {sorted(sig_defs) or 'none'}")
    sig_def = sig_defs[signature_key]
    tensors = list(sig_def.inputs.values()) + list(sig_def.outputs.values())
    if any(info.WhichOneof("encoding") != "name" for info in tensors):
        return None  # sparse or composite signature tensors: let TensorFlow decode them

    def info(value: Any) -> TensorSpecInfo:
        shape = value.tensor_shape
        dims = None if shape.unknown_rank else tuple(None if d.size < 0 else int(d.size) for d in shape.dim)
        return TensorSpecInfo(graph_lib.canonical_tensor(value.name), tf.as_dtype(value.dtype).name, dims)

    inputs = {k: info(sig_def.inputs[k]) for k in sorted(sig_def.inputs)}
    outputs = {k: info(sig_def.outputs[k]) for k in sorted(sig_def.outputs)}
    aliases = [k for k in sorted(sig_defs) if k != signature_key and sig_defs[k] == sig_def]
    dropped = [k for k in sorted(sig_defs) if k != signature_key and k not in aliases]
    if dropped:
        logging.warning("%s: converting signature %r only; signature(s) %s compute something else and are "
                        "not kept (load with signature=... to convert one of them)", path, signature_key, dropped)
    input_names = [graph_lib.node_name(spec.name) for spec in inputs.values()]
    output_names = [spec.name for spec in outputs.values()]
    validate_graph(meta.graph_def, path)
    check_names(meta.graph_def, input_names, output_names, path)
    keep = graph_lib.reachable_from(graph_lib.GraphIndex(meta.graph_def), output_names + input_names)
    graph_def = graph_lib.rebuild(meta.graph_def, [n for n in meta.graph_def.node if n.name in keep])
    for node in graph_def.node:  # the SavedModel writer adds these; they go stale once a pass edits the graph
        if "_output_shapes" in node.attr:
            del node.attr["_output_shapes"]
    signature = Signature(signature_key, inputs, outputs, tuple(aliases))
    return LoadedGraph(graph_def, input_names, output_names, signature, path)


def _io_specs(fn: Any) -> Tuple[Any, Any]:
    """Comparable (inputs, outputs) of a signature function: key -> (dtype, shape)."""
    import tensorflow as tf

    def spec(t: Any) -> Tuple[str, Any]:
        return t.dtype.name, _shape_tuple(tf.TensorShape(t.shape))

    args, kwargs = fn.structured_input_signature
    inputs = ([spec(a) for a in tf.nest.flatten(args)], {k: spec(v) for k, v in kwargs.items()})
    outputs = fn.structured_outputs
    if isinstance(outputs, dict):
        return inputs, {k: spec(v) for k, v in outputs.items()}
    return inputs, [spec(v) for v in tf.nest.flatten(outputs)]


def _same_endpoint(a: Any, b: Any) -> bool:
    """Whether two signature functions compute the same thing: equal specs and equal graphs.

    Graph attributes starting with ``_`` (user-specified names, ids) are ignored.
    """
    if _io_specs(a) != _io_specs(b):
        return False

    def stripped(fn: Any) -> bytes:
        graph_def = fn.graph.as_graph_def()
        for node in graph_def.node:
            for key in [k for k in node.attr if k.startswith("_")]:
                del node.attr[key]
        return graph_def.SerializeToString(deterministic=True)

    return stripped(a) == stripped(b)


# ----------------------------------------------------------------------------- freezing

def _is_keras_model(obj: Any) -> bool:
    try:
        import keras
    except ImportError:  # pragma: no cover - keras ships with TF
        return False
    return isinstance(obj, keras.Model)


def _is_concrete_function(obj: Any) -> bool:
    return hasattr(obj, "structured_input_signature") and hasattr(obj, "graph") and hasattr(obj, "inputs")


def _freeze_keras(model: Any, path: Optional[str], signature_key: str) -> LoadedGraph:
    import tensorflow as tf

    weight_bytes = sum(int(w.numpy().nbytes) for w in model.weights)
    if weight_bytes > MAX_PROTO_BYTES:
        raise UnsupportedModelError(path, f"Keras model weights take {weight_bytes / 1024 ** 3:.2f} GiB; a frozen "
                                          "GraphDef is limited to 2 GiB; export the model as a SavedModel "
                                          "(model.export(directory)) and convert that directory, which keeps the "
                                          "weights as variables")
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError):
        inputs = []
    if not inputs:
        raise ModelLoadError(path, "Keras model has no defined inputs (build or call it on data first)")
    names = [_keras_input_name(t, i) for i, t in enumerate(inputs)]
    specs = [tf.TensorSpec(t.shape, t.dtype, name=n) for t, n in zip(inputs, names)]

    def serve(*args):
        return model(list(args) if len(args) > 1 else args[0], training=False)

    fn = tf.function(serve).get_concrete_function(*specs)
    return _freeze_function(fn, path, signature_key, structured=False, input_keys=names)


def _keras_input_name(tensor: Any, index: int) -> str:
    name = getattr(tensor, "name", "") or f"input_{index}"
    return name.split(":")[0]


def _freeze_function(fn: Any, path: Optional[str], signature_key: str, structured: bool,
                     input_keys: Optional[Sequence[str]] = None, aliases: Sequence[str] = ()) -> LoadedGraph:
    """Inline variables as constants and record the function's signature."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    var_bytes = _function_weight_bytes(fn)
    if var_bytes > MAX_PROTO_BYTES:
        raise UnsupportedModelError(path, f"weights take {var_bytes / 1024 ** 3:.2f} GiB; a frozen GraphDef is "
                                          "limited to 2 GiB; save the model as a SavedModel (tf.saved_model.save) "
                                          "and convert that directory, which keeps the weights as variables")
    try:
        frozen = convert_variables_to_constants_v2(fn)
    except Exception as exc:
        raise UnsupportedModelError(path, f"cannot freeze the model's variables: {_first_line(exc)}")
    graph_def = frozen.graph.as_graph_def()
    graph_def = _embed_lookup_tables(graph_def, fn, path)
    if graph_def.ByteSize() > MAX_PROTO_BYTES:  # pragma: no cover - guarded above
        raise UnsupportedModelError(path, "frozen graph exceeds the 2 GiB protobuf limit")
    in_tensors = [t for t in frozen.inputs if t.dtype != tf.resource]
    return _loaded_from_function(graph_def, in_tensors, list(frozen.outputs), fn, path, signature_key, structured,
                                 input_keys, aliases)


def _loaded_from_function(graph_def: graph_pb2.GraphDef, in_tensors: Sequence[Any], out_tensors: Sequence[Any],
                          fn: Any, path: Optional[str], signature_key: str, structured: bool,
                          input_keys: Optional[Sequence[str]] = None, aliases: Sequence[str] = ()) -> LoadedGraph:
    """``graph_def`` (``fn`` frozen or inlined) with ``fn``'s signature keys on its input and output tensors."""
    import tensorflow as tf

    input_names = [t.op.name for t in in_tensors]
    flat_specs = [s for s in tf.nest.flatten(fn.structured_input_signature) if isinstance(s, tf.TensorSpec)]
    if structured and isinstance(fn.structured_input_signature[1], dict) and fn.structured_input_signature[1]:
        keys = sorted(fn.structured_input_signature[1].keys())
    elif input_keys is not None:
        keys = list(input_keys)
    else:
        keys = [s.name or n for s, n in zip(flat_specs, input_names)] or input_names
    if len(keys) != len(in_tensors):
        keys = input_names
    sig_inputs = {k: TensorSpecInfo(t.op.name, t.dtype.name, _shape_tuple(t.shape))
                  for k, t in zip(keys, in_tensors)}

    # The frozen function keeps only a flat output list (in tf.nest.flatten order of the
    # original structure, i.e. dict keys sorted), so the keys come from the original.
    structure = fn.structured_outputs
    flat = list(out_tensors)
    if (isinstance(structure, dict) and len(structure) == len(flat)
            and len(tf.nest.flatten(structure)) == len(flat) and all(isinstance(k, str) for k in structure)):
        out_items = list(zip(sorted(structure), flat))
    else:
        out_items = [("output_0" if len(flat) == 1 else f"output_{i}", t) for i, t in enumerate(flat)]
    sig_outputs = {k: TensorSpecInfo(graph_lib.canonical_tensor(t.name), t.dtype.name, _shape_tuple(t.shape))
                   for k, t in out_items}
    output_names = [spec.name for spec in sig_outputs.values()]
    signature = Signature(signature_key, sig_inputs, sig_outputs, tuple(aliases))
    return LoadedGraph(graph_def, input_names, output_names, signature, path)


# Table ops that only read a table, with the attrs naming its key and value dtypes (None: no dtypes).
_TABLE_READERS = {"LookupTableFindV2": ("Tin", "Tout"), "LookupTableExportV2": ("Tkeys", "Tvalues"),
                  "LookupTableSizeV2": None}
# Ops that carry a table handle on unchanged (lowered cond/while frames, identities).
_HANDLE_FORWARDERS = frozenset({"Identity", "IdentityN", "Enter", "Exit", "Switch", "Merge", "NextIteration"})


def _embed_lookup_tables(graph_def: graph_pb2.GraphDef, fn: Any, path: Optional[str]) -> graph_pb2.GraphDef:
    """Put the lookup tables a frozen function reads through captured handles into the graph itself.

    ``convert_variables_to_constants_v2`` inlines variables only: a captured table handle (a
    ``tf.lookup.StaticHashTable`` of a SavedModel or ``tf.Module``) stays a resource Placeholder
    that nothing feeds, so the frozen graph, and every SavedModel or .pb written from it, fails
    to run ("depends on a placeholder which is not an input"). Here each captured handle that only
    table readers use becomes a ``HashTableV2`` node of the same name plus an ``InitializeTableV2``
    from Consts holding the table's current contents; the handle's direct consumers wait for it
    (control input; ``remove_identity`` moves such inputs onto the consumers it rewires). The graph
    then needs no separate init op: re-running ``InitializeTableV2`` on a table it already filled
    only compares sizes. Tables that are written (insert, remove, import) or are not plain
    key -> scalar maps (dense hash tables, tables of tensors) are refused by name: a snapshot of
    them would compute something else.
    """
    import tensorflow as tf
    from tensorflow.python.framework import tensor_util
    from tensorflow.python.ops import gen_lookup_ops

    resource = tf.resource.as_datatype_enum
    handles = [n for n in graph_def.node if n.op == "Placeholder" and n.attr["dtype"].type == resource]
    if not handles:
        return graph_def
    captured = {internal.op.name: external for external, internal in fn.graph.captures}
    index = graph_lib.GraphIndex(graph_def)
    extra = []
    for node in handles:
        if node.name not in captured or not index.has_consumers(node.name):
            continue
        readers, stack, seen = [], [(node.name, None)], set()
        while stack:   # the ops that use the table, past identities and lowered control flow
            src = stack.pop()
            if src in seen:
                continue
            seen.add(src)
            for consumer, i in index.consumers(*src):
                if consumer.op in _HANDLE_FORWARDERS:
                    stack.append((consumer.name, i if consumer.op == "IdentityN" else None))
                else:
                    readers.append(consumer)
        if not readers or not all(r.op.startswith(("LookupTable", "InitializeTable")) for r in readers):
            logging.warning("%s: resource input %r is used by %s, not only by lookup-table reads; it is left as "
                            "a placeholder the frozen graph cannot run without", path, node.name,
                            sorted({r.op for r in readers}))
            continue
        writers = sorted(f"{r.name} ({r.op})" for r in readers if r.op not in _TABLE_READERS)
        if writers:
            raise UnsupportedModelError(path, f"lookup table {node.name!r} is modified by {writers[:3]}; tf_bf16 "
                                              "freezes tables as read-only snapshots")
        dtypes = {tuple(r.attr[a].type for a in _TABLE_READERS[r.op]) for r in readers if _TABLE_READERS[r.op]}
        if len(dtypes) != 1:
            raise UnsupportedModelError(path, f"cannot tell the key and value dtypes of lookup table {node.name!r} "
                                              f"from its readers {sorted({r.op for r in readers})}")
        (key_dtype, value_dtype), = dtypes
        handle = captured[node.name]
        try:
            keys, values = gen_lookup_ops.lookup_table_export_v2(handle, Tkeys=key_dtype, Tvalues=value_dtype)
            size = int(gen_lookup_ops.lookup_table_size_v2(handle))
        except Exception as exc:
            raise UnsupportedModelError(path, f"cannot read the contents of lookup table {node.name!r}: "
                                              f"{_first_line(exc)}") from exc
        if keys.shape.rank != 1 or values.shape.rank != 1 or int(keys.shape[0]) != size:
            # A dense hash table exports its empty buckets too; a table of tensors has rank-2 values.
            raise UnsupportedModelError(path, f"lookup table {node.name!r} is not a plain key -> scalar table "
                                              f"(exports {tuple(keys.shape)} keys, {tuple(values.shape)} values for "
                                              f"{size} entries); tf_bf16 can freeze only those")
        names = {n.name for n in graph_def.node} | {n.name for n in extra}
        key_name = graph_lib.unique_name(names, f"{node.name}/keys")
        value_name = graph_lib.unique_name(names | {key_name}, f"{node.name}/values")
        init_name = graph_lib.unique_name(names | {key_name, value_name}, f"{node.name}/table_init")
        for const_name, tensor, dtype in ((key_name, keys, key_dtype), (value_name, values, value_dtype)):
            const = graph_lib.make_node("Const", const_name, device=node.device)
            const.attr["dtype"].type = dtype
            const.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(tensor.numpy(), dtype=tf.as_dtype(dtype)))
            extra.append(const)
        init = graph_lib.make_node("InitializeTableV2", init_name, [node.name, key_name, value_name],
                                   device=node.device)
        init.attr["Tkey"].type, init.attr["Tval"].type = key_dtype, value_dtype
        extra.append(init)
        for consumer, _ in index.consumers(node.name):
            if f"^{init_name}" not in consumer.input:
                consumer.input.append(f"^{init_name}")
        # Same name, so every reader stays wired; private to its graph (no shared_name).
        name, device = node.name, node.device
        node.Clear()
        node.name, node.op, node.device = name, "HashTableV2", device
        node.attr["key_dtype"].type, node.attr["value_dtype"].type = key_dtype, value_dtype
        node.attr["container"].s, node.attr["shared_name"].s = b"", b""
        node.attr["use_node_name_sharing"].b = False
    graph_def.node.extend(extra)
    return graph_def


def _shape_tuple(shape: Any) -> Optional[Tuple[Optional[int], ...]]:
    if shape is None or shape.rank is None:
        return None
    return tuple(shape.as_list())


# ----------------------------------------------------------------------------- bare graphs

def infer_inputs(graph_def: graph_pb2.GraphDef) -> List[str]:
    """Placeholders, in graph order: the feeds of a bare GraphDef."""
    return [n.name for n in graph_def.node if n.op == "Placeholder"]


def infer_outputs(graph_def: graph_pb2.GraphDef) -> List[str]:
    """Nodes nothing consumes (excluding Const, NoOp and Placeholders): the fetches."""
    index = graph_lib.GraphIndex(graph_def)
    skip = {"Const", "NoOp", "Placeholder", "Assert", "SaveV2", "RestoreV2"}
    return [n.name for n in graph_def.node if n.op not in skip and not index.has_consumers(n.name)]


def check_names(graph_def: graph_pb2.GraphDef, inputs: Sequence[str], outputs: Sequence[str],
                path: Optional[str]) -> None:
    """Every named input and output must exist in the graph."""
    names = {n.name for n in graph_def.node}
    for kind, items in (("input", inputs), ("output", outputs)):
        missing = [x for x in items if graph_lib.node_name(x) not in names]
        if missing:
            raise ModelLoadError(path, f"{kind}(s) {missing} not found in the graph")
    if not outputs:
        raise ModelLoadError(path, "could not find any output; pass outputs=[...]")


def synthesize_signature(graph_def: graph_pb2.GraphDef, inputs: Sequence[str], outputs: Sequence[str],
                         key: str) -> Any:
    """A signature for a bare graph: keys are the node names, dtypes/shapes from the graph."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")

    def info(name: str) -> TensorSpecInfo:
        node, port, _ = graph_lib.parse_input(name)
        t = graph.get_tensor_by_name(f"{node}:{port}")
        return TensorSpecInfo(graph_lib.tensor_name(node, port), t.dtype.name, _shape_tuple(t.shape))

    def sig_key(name: str) -> str:
        return name.replace(":", "_").replace("/", "_")

    return Signature(key, {sig_key(n): info(n) for n in inputs}, {sig_key(n): info(n) for n in outputs})


# ----------------------------------------------------------------------------- writing

TEMP_MARK = ".tmp-"     # .NAME.tmp-HOST-PID-TAG beside NAME: a save in progress, or an interrupted one
BACKUP_MARK = ".old-"   # .NAME.old-HOST-PID-TAG: the previous NAME while a SavedModel directory is swapped
STALE_AFTER_S = 3600    # a temp nobody has written to for this long belongs to an interrupted save
_TEMP_SUFFIX = re.compile(r"(?:(?P<host>.+)-(?P<pid>\d+)-)?[0-9a-f]{8}")  # legacy temps have the tag only


def write_frozen(graph_def: graph_pb2.GraphDef, path: str, text: bool = False) -> None:
    """Write a GraphDef (binary, or text when ``text``) to ``path`` atomically, with a versions record."""
    versioned = with_versions(graph_def)

    def write(tmp: str) -> None:
        if text:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text_format.MessageToString(versioned))
        else:
            with open(tmp, "wb") as f:
                f.write(versioned.SerializeToString())

    write_atomically(path, write)


def write_text_atomically(path: str, text: str) -> None:
    """Write a small text file (a report) atomically, so a reader never sees half of it."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomically(path, write)


def write_atomically(path: str, write: Callable[[str], None], what: str = "cannot write") -> None:
    """Have ``write(tmp)`` make a file or directory at a fresh hidden temp beside ``path``, then move it there.

    The one place tf_bf16 writes outputs: ``path`` is never seen half-written, the temp is
    removed on any failure (Ctrl-C included), temps that earlier interrupted saves to ``path``
    left behind are removed first, and a replaced directory's backup once the new one is in place.
    Failures raise ModelSaveError naming ``path``.
    """
    target = os.path.abspath(path)
    parent, base = os.path.split(target)
    if not os.path.isdir(parent):
        raise ModelSaveError(path, f"output directory {parent} does not exist")
    remove_stale_temps(target, TEMP_MARK)
    tmp = _temp_path(target, TEMP_MARK)
    try:
        write(tmp)
        _move_into_place(tmp, target)
    except BaseException as exc:
        _remove_path(tmp)
        if isinstance(exc, ModelSaveError) or not isinstance(exc, Exception):
            raise
        raise ModelSaveError(path, f"{what}: {_first_line(exc)}") from exc
    remove_stale_temps(target, BACKUP_MARK)


def remove_stale_temps(path: str, mark: str = TEMP_MARK) -> List[str]:
    """Remove what interrupted saves to ``path`` left beside it (``mark``: temps or backups); return them.

    A concurrent writer's live temp is kept: only a temp whose writing process (on this host)
    is gone, or one nobody has written to for ``STALE_AFTER_S`` seconds, is removed.
    """
    parent, base = os.path.split(os.path.abspath(path))
    prefix = f".{base}{mark}"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _TEMP_SUFFIX.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        temp = os.path.join(parent, name)
        if match and _is_stale(temp, match.group("host"), match.group("pid")):
            _remove_path(temp)
            logging.info("removed %s, left behind by an interrupted save", temp)
            removed.append(temp)
    return removed


def _temp_path(target: str, mark: str) -> str:
    """A fresh hidden name beside ``target`` that says which host and process writes it."""
    parent, base = os.path.split(target)
    return os.path.join(parent, f".{base}{mark}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _is_stale(temp: str, host: Optional[str], pid: Optional[str]) -> bool:
    """Whether ``temp`` is an interrupted save's: its writer on this host is gone, or it has long been idle."""
    if host == socket.gethostname() and pid is not None and not _process_alive(int(pid)):
        return True
    return time.time() - _last_write(temp) > STALE_AFTER_S


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to another user
        return True
    return True


def _last_write(temp: str) -> float:
    """Newest modification time of ``temp`` or anything under it (now, if it vanished meanwhile)."""
    try:
        newest = os.lstat(temp).st_mtime
        for root, dirs, files in os.walk(temp):
            for name in dirs + files:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    except OSError:
        return time.time()
    return newest


def _move_into_place(tmp: str, target: str) -> None:
    """Rename ``tmp`` to ``target``: atomically for a file, through a hidden backup for a directory."""
    if not os.path.isdir(tmp):
        os.replace(tmp, target)
        return
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    backup = _temp_path(target, BACKUP_MARK)
    os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _remove_path(path: str) -> None:
    """Remove a file or directory tree if it exists; never raise."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.remove(path)
    except OSError:
        pass


def with_versions(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """``graph_def`` when it has a versions record, else a copy stamped with one TensorFlow loads back.

    Hand-built GraphDefs have none (producer 0). The stamp is this TensorFlow's GraphDef version,
    lowered below the version that removed any op the graph uses, since TensorFlow refuses an
    op at a producer at or past its removal.
    """
    import tensorflow as tf

    if graph_def.versions.producer > 0:
        return graph_def
    out = graph_lib.copy_graph(graph_def)
    out.versions.producer = _newest_producer_for(out)
    out.versions.min_consumer = tf.version.GRAPH_DEF_VERSION_MIN_CONSUMER
    return out


def _newest_producer_for(graph_def: graph_pb2.GraphDef) -> int:
    """This TensorFlow's GraphDef version, or one less than the earliest removal of an op the graph uses."""
    import tensorflow as tf
    from tensorflow.python.framework import op_def_registry

    ops = {n.op for n in graph_def.node} | {n.op for f in graph_def.library.function for n in f.node_def}
    producer = tf.version.GRAPH_DEF_VERSION
    for op in ops:
        op_def = op_def_registry.get(op)
        if op_def is not None and op_def.HasField("deprecation"):
            producer = min(producer, op_def.deprecation.version - 1)
    return producer


KERNELS_NOTE = "tf_bf16_kernels.txt"   # in assets.extra/ of a SavedModel that uses the kernel ops


def _record_kernel_requirement(graph_def: graph_pb2.GraphDef, saved_model_dir: str) -> None:
    """Say in ``assets.extra/`` that the SavedModel needs tf_bf16's kernel library to load."""
    import tensorflow as tf

    from tf_bf16 import kernels

    if not kernels.uses_kernels(graph_def):
        return
    extra = os.path.join(saved_model_dir, "assets.extra")
    tf.io.gfile.makedirs(extra)
    with tf.io.gfile.GFile(os.path.join(extra, KERNELS_NOTE), "w") as f:
        f.write("This SavedModel uses tf_bf16's fused kernel ops (TfBf16*). Before loading it, run\n"
                "    import tf_bf16.kernels; tf_bf16.kernels.require()\n"
                "(tf_bf16.Model does this itself); build the library with: python -m tf_bf16.kernels.build\n")


def write_saved_model(graph_def: graph_pb2.GraphDef, signature: Any, path: str) -> None:
    """Write a SavedModel (tag ``serve``) whose signature keys, names, dtypes and shapes are ``signature``'s.

    The graph holds only constants, so the SavedModel has an empty variables folder; it is
    built in a hidden sibling temp directory (``write_atomically``) and replaces ``path`` only at the end.
    """
    import tensorflow as tf

    _check_saved_model_target(path)
    versioned = with_versions(graph_def)
    sig_def = _signature_def(signature)
    keys = (signature.key,) + tuple(getattr(signature, "aliases", ()))

    def write(tmp: str) -> None:
        graph = tf.Graph()
        with graph.as_default():
            tf.graph_util.import_graph_def(versioned, name="")
            with tf.compat.v1.Session(graph=graph) as sess:
                builder = tf.compat.v1.saved_model.Builder(tmp)
                builder.add_meta_graph_and_variables(sess, [SERVE_TAG], signature_def_map={k: sig_def for k in keys},
                                                     strip_default_attrs=False)
                builder.save()
        _record_kernel_requirement(graph_def, tmp)

    write_atomically(path, write, "cannot write SavedModel")


def write_saved_model_with_variables(graph_def: graph_pb2.GraphDef, signature: Any,
                                     variables: variables_lib.Variables, path: str,
                                     keep: Sequence[str] = ()) -> variables_lib.Variables:
    """Write a SavedModel (tag ``serve``) whose weights are ``variables``, for a model too large to freeze.

    FP32 variables read only through Casts to BF16 become BF16 variables (``fold_read_casts``;
    ``keep`` names nodes that must stay, the graph's inputs and outputs); the checkpoint is
    streamed from the source one variable at a time (``write_checkpoint``). The SavedModel is a
    TF1-style one (graph, Saver, ``variables`` collection) that ``tf.saved_model.load``, TF Serving
    and ``tf.compat.v1.saved_model.load`` all read. Returns the variables as written.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    _check_saved_model_target(path)
    folded, written = variables_lib.fold_read_casts(with_versions(graph_def), variables.present_in(graph_def), keep)
    meta = variables_lib.meta_graph_with_variables(folded, written)
    meta.meta_info_def.tags.append(SERVE_TAG)
    sig_def = _signature_def(signature)
    for key in (signature.key,) + tuple(getattr(signature, "aliases", ())):
        meta.signature_def[key].CopyFrom(sig_def)
    saved = saved_model_pb2.SavedModel(saved_model_schema_version=1)
    saved.meta_graphs.add().CopyFrom(meta)

    def write(tmp: str) -> None:
        tf.io.gfile.makedirs(os.path.join(tmp, "variables"))
        variables_lib.write_checkpoint(written, variables_lib.checkpoint_prefix(tmp))
        with open(os.path.join(tmp, "saved_model.pb"), "wb") as f:
            f.write(saved.SerializeToString())
        _record_kernel_requirement(folded, tmp)

    write_atomically(path, write, "cannot write SavedModel")
    return written


def _check_saved_model_target(path: str) -> None:
    """Refuse to replace a file, or a non-empty directory that is not a SavedModel, with a SavedModel."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ModelSaveError(path, "exists and is not a directory")
    if os.path.isdir(path):
        entries = os.listdir(path)
        if entries and not any(f in entries for f in SAVED_MODEL_FILES):
            raise ModelSaveError(path, "is a non-empty directory that is not a SavedModel; refusing to replace it")


def _signature_def(signature: Any) -> Any:
    """The SignatureDef (predict method) of a tf_bf16 Signature."""
    from tensorflow.core.protobuf import meta_graph_pb2

    sig_def = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
    for k, spec in signature.inputs.items():
        sig_def.inputs[k].CopyFrom(_tensor_info(spec))
    for k, spec in signature.outputs.items():
        sig_def.outputs[k].CopyFrom(_tensor_info(spec))
    return sig_def


def _tensor_info(spec: TensorSpecInfo) -> Any:
    """A signature entry as a TensorInfo: ``node:port`` name, dtype enum and shape (-1 for unknown dims)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2

    node, port, _ = graph_lib.parse_input(spec.name)
    info = meta_graph_pb2.TensorInfo(name=f"{node}:{port}", dtype=tf.as_dtype(spec.dtype).as_datatype_enum)
    if spec.shape is None:
        info.tensor_shape.unknown_rank = True
    else:
        for d in spec.shape:
            info.tensor_shape.dim.add(size=-1 if d is None else d)
    return info


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
