"""Large models: weights kept as resource variables in a checkpoint, never frozen into Consts.

A frozen GraphDef is one protobuf message (at most 2 GiB), so a SavedModel with more weights
than that is converted with its weights left where they are: the graph reads each one through
a ``VarHandleOp`` -> ``ReadVariableOp``, the passes convert the graph as usual (a variable read
by BF16 ops gets a Cast), and saving folds those Casts into BF16 variables and streams the
checkpoint one variable at a time (read, cast, write a shard, merge the shards), so memory never
holds more than one variable's FP32 and BF16 copies besides what TensorFlow itself takes.

Everything here works on GraphDefs and checkpoint files; ``model_io`` decides when to use it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from tf_bf16.errors import UnsupportedModelError
from tf_bf16.transforms import graph as graph_lib
from tf_bf16.transforms.op_classes import IDENTITY_OPS

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"   # TF2 checkpoints: the object graph, not a weight
VARIABLE_ATTRIBUTE = "VARIABLE_VALUE"
SHARDS_DIR = "shards.tmp"                           # per-variable checkpoints before the merge


@dataclasses.dataclass(frozen=True)
class VariableSpec:
    """One variable the graph reads: its ``VarHandleOp`` node, source checkpoint key, dtype and shape."""

    node: str                        # also its key in a checkpoint tf_bf16 writes
    key: str                         # its key in the source checkpoint
    dtype: str                       # numpy-style name of the graph's dtype ("float32", "bfloat16")
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the variable's value takes in ``dtype``."""
        import tensorflow as tf

        count = 1
        for d in self.shape:
            count *= d
        return count * tf.as_dtype(self.dtype).size


@dataclasses.dataclass(frozen=True)
class Variables:
    """The variables of a graph and the checkpoint (prefix) that holds their source values."""

    checkpoint: str
    specs: Tuple[VariableSpec, ...]

    @property
    def nbytes(self) -> int:
        """Bytes all variables take in their graph dtypes."""
        return sum(spec.nbytes for spec in self.specs)

    def present_in(self, graph_def: graph_pb2.GraphDef) -> "Variables":
        """Only the variables whose handle node is still in ``graph_def`` (passes may drop unused ones)."""
        names = {n.name for n in graph_def.node}
        return dataclasses.replace(self, specs=tuple(s for s in self.specs if s.node in names))


def format_bytes(count: int) -> str:
    """``count`` bytes as a short human figure: ``2 GiB``, ``2.25 GiB``, ``1 KiB``."""
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.2f}".rstrip("0").rstrip(".") + f" {unit}"


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_prefix(saved_model_dir: str) -> str:
    """The variables checkpoint prefix of a SavedModel directory."""
    return os.path.join(saved_model_dir, "variables", "variables")


def has_checkpoint(prefix: str) -> bool:
    """Whether a TF2-format checkpoint (``prefix.index``) exists."""
    import tensorflow as tf

    return tf.io.gfile.exists(prefix + ".index")


def checkpoint_weight_bytes(prefix: str) -> int:
    """Bytes of every numeric tensor in the checkpoint, read from its index alone (no values loaded)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    total = 0
    for key, dtype in reader.get_variable_to_dtype_map().items():
        if dtype == tf.string or key == OBJECT_GRAPH_KEY:
            continue
        count = 1
        for d in shapes[key]:
            count *= int(d)
        total += count * dtype.size
    return total


def checkpointed_variables(root: Any, prefix: str) -> Dict[int, Tuple[str, Any]]:
    """``id(variable.handle)`` -> (checkpoint key, variable) for every variable of a loaded SavedModel ``root``.

    TF2 checkpoints record their object graph: it is walked from the root alongside the loaded
    objects, child by child name, so each variable meets the key it was saved under. TF1
    checkpoints have no object graph; their keys are the variables' names.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(prefix)
    if not reader.has_tensor(OBJECT_GRAPH_KEY):
        variables = getattr(root, "variables", None) or []
        keys = set(reader.get_variable_to_shape_map())
        return {id(v.handle): (v.name.split(":")[0], v) for v in variables if v.name.split(":")[0] in keys}
    object_graph = trackable_object_graph_pb2.TrackableObjectGraph()
    object_graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
    out: Dict[int, Tuple[str, Any]] = {}
    stack: List[Tuple[int, Any]] = [(0, root)]
    seen: Set[int] = set()
    while stack:
        node_id, obj = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        node = object_graph.nodes[node_id]
        for attribute in node.attributes:
            if attribute.name == VARIABLE_ATTRIBUTE and hasattr(obj, "handle"):
                out[id(obj.handle)] = (attribute.checkpoint_key, obj)
        if not node.children:
            continue
        try:
            children = tf.train.TrackableView.children(obj)
        except Exception:  # an object that cannot list its children holds no variable we can name
            continue
        for ref in node.children:
            if ref.local_name in children:
                stack.append((ref.node_id, children[ref.local_name]))
    return out


def function_variables(fn: Any, checkpointed: Mapping[int, Tuple[str, Any]],
                       path: Optional[str]) -> Dict[str, VariableSpec]:
    """Placeholder name in ``fn``'s graph -> the variable it captures, for every captured variable.

    Other captured resources (lookup tables) are left to the caller. A variable of the function
    that the checkpoint does not hold raises UnsupportedModelError: its value could not be kept.
    """
    import tensorflow as tf

    own = {id(v.handle): v for v in getattr(fn.graph, "variables", ())}
    out: Dict[str, VariableSpec] = {}
    for external, internal in fn.graph.captures:
        if internal.dtype != tf.resource:
            continue
        if id(external) not in checkpointed:
            if id(external) in own:
                raise UnsupportedModelError(path, f"the signature reads variable {own[id(external)].name} "
                                                  f"({internal.op.name}), which the SavedModel's checkpoint lacks")
            continue
        key, variable = checkpointed[id(external)]
        if not variable.shape.is_fully_defined():
            raise UnsupportedModelError(path, f"variable {variable.name} has no fixed shape ({variable.shape})")
        out[internal.op.name] = VariableSpec(internal.op.name, key, variable.dtype.name,
                                             tuple(int(d) for d in variable.shape))
    return out


# ----------------------------------------------------------------------------- graphs

def captured_constants(fn: Any) -> Dict[str, Any]:
    """Placeholder name in ``fn``'s graph -> value, for every captured tensor that is not a resource."""
    import tensorflow as tf

    return {internal.op.name: external.numpy() for external, internal in fn.graph.captures
            if internal.dtype != tf.resource and hasattr(external, "numpy")}


def bind_captures(graph_def: graph_pb2.GraphDef, specs: Mapping[str, VariableSpec],
                  constants: Mapping[str, Any]) -> Tuple[graph_pb2.GraphDef, Tuple[VariableSpec, ...]]:
    """``graph_def`` with its capture Placeholders made ``VarHandleOp``s (``specs``) or Consts (``constants``).

    Each handle is renamed after its checkpoint key (``w1`` for ``w1/.ATTRIBUTES/VARIABLE_VALUE``)
    rather than TensorFlow's ``unknown_N``, and its ``shared_name`` is that name, so the graph is
    complete on its own: import it, ``restore`` the checkpoint into the handles, run it. Returns
    the graph and the specs under their new node names.
    """
    out = graph_lib.copy_graph(graph_def)
    used = {n.name for n in out.node}
    renamed: Dict[str, str] = {}
    bound = []
    for node in out.node:
        if node.op != "Placeholder":
            continue
        if node.name in specs:
            name = graph_lib.unique_name(used, _node_name_for(specs[node.name].key))
            used.add(name)
            renamed[node.name] = name
            spec = dataclasses.replace(specs[node.name], node=name)
            node.CopyFrom(_var_handle_node(spec, node.device))
            bound.append(spec)
        elif node.name in constants:
            node.CopyFrom(graph_lib.make_const(node.name, constants[node.name], device=node.device))
    for node in out.node:
        for i, spec_in in enumerate(node.input):
            name, port, control = graph_lib.parse_input(spec_in)
            if name in renamed:
                node.input[i] = f"^{renamed[name]}" if control else graph_lib.tensor_name(renamed[name], port)
        if "_class" in node.attr:  # colocation with a renamed handle: "loc:@unknown" -> "loc:@w1"
            groups = node.attr["_class"].list.s
            for i, group in enumerate(groups):
                target = group.decode("utf-8", "replace")[len("loc:@"):]
                if group.startswith(b"loc:@") and target in renamed:
                    groups[i] = f"loc:@{renamed[target]}".encode()
    return out, tuple(bound)


def _node_name_for(key: str) -> str:
    """A valid node name from a checkpoint key: its object path, other characters made ``_``."""
    path = key.split("/.ATTRIBUTES/")[0]
    name = re.sub(r"[^A-Za-z0-9_./-]", "_", path).strip("/") or "variable"
    return name if re.match(r"[A-Za-z0-9.]", name) else f"v{name}"


def _var_handle_node(spec: VariableSpec, device: str) -> node_def_pb2.NodeDef:
    """A VarHandleOp NodeDef for ``spec`` with every attribute TensorFlow's OpDef defaults (built by TF)."""
    import tensorflow as tf

    with tf.Graph().as_default() as scratch:
        tf.raw_ops.VarHandleOp(dtype=tf.as_dtype(spec.dtype), shape=list(spec.shape), shared_name=spec.node,
                               name="handle")
    node = node_def_pb2.NodeDef()
    node.CopyFrom(scratch.as_graph_def().node[0])
    node.name = spec.node
    node.device = device
    return node


def fold_read_casts(graph_def: graph_pb2.GraphDef, variables: Variables,
                    keep: Iterable[str] = ()) -> Tuple[graph_pb2.GraphDef, Variables]:
    """Turn every FP32 variable whose reads all feed Casts to BF16 into a BF16 variable; drop those Casts.

    The BF16 value is what the Casts computed at run time, so the graph's results do not change;
    the checkpoint then holds half the bytes and no Cast runs. Reads through Identity chains
    count; a variable read by anything else (an FP32 op, ``ResourceGather``), or whose read or
    Cast is a node in ``keep`` (graph inputs and outputs), stays FP32.
    """
    out = graph_lib.copy_graph(graph_def)
    index = graph_lib.GraphIndex(out)
    keep = {graph_lib.node_name(k) for k in keep}
    removed: Dict[str, str] = {}       # Cast name -> the read that replaces it
    specs = []
    for spec in variables.specs:
        plan = _read_casts(index, spec, keep) if spec.dtype == "float32" else None
        if plan is None:
            specs.append(spec)
            continue
        reads, casts = plan
        index[spec.node].attr["dtype"].type = types_pb2.DT_BFLOAT16
        for read in reads:
            read.attr["dtype"].type = types_pb2.DT_BFLOAT16
        for cast in casts:
            removed[cast.name] = cast.input[0]
        specs.append(dataclasses.replace(spec, dtype="bfloat16"))
    if not removed:
        return out, variables
    for node in out.node:
        for i, spec_in in enumerate(node.input):
            name, port, control = graph_lib.parse_input(spec_in)
            if name in removed:
                read = graph_lib.node_name(removed[name])
                node.input[i] = f"^{read}" if control else read
    kept = [n for n in out.node if n.name not in removed]
    return graph_lib.rebuild(out, kept), dataclasses.replace(variables, specs=tuple(specs))


def _read_casts(index: graph_lib.GraphIndex, spec: VariableSpec,
                keep: Set[str]) -> Optional[Tuple[List[node_def_pb2.NodeDef], List[node_def_pb2.NodeDef]]]:
    """(reads, Casts) when every use of the variable is a read whose every data consumer is a Cast to BF16."""
    if spec.node not in index:
        return None
    reads, casts, stack = [], [], [spec.node]
    while stack:
        name = stack.pop()
        for consumer, _ in index.consumers(name, 0):
            if consumer.op in IDENTITY_OPS and consumer.attr["T"].type == types_pb2.DT_RESOURCE:
                stack.append(consumer.name)
            elif consumer.op == "ReadVariableOp" and consumer.name not in keep:
                reads.append(consumer)
            else:
                return None
    for read in reads:
        consumers = [c for c, _ in index.consumers(read.name, 0)]
        if not consumers:
            return None
        for cast in consumers:
            if (cast.op != "Cast" or cast.name in keep or cast.attr["DstT"].type != types_pb2.DT_BFLOAT16
                    or cast.attr["Truncate"].b):
                return None
            casts.append(cast)
    return (reads, casts) if reads else None


# ----------------------------------------------------------------------------- values

def restore(session: Any, variables: Variables) -> None:
    """Assign each variable of ``session``'s graph its checkpoint value, one variable per run.

    One at a time, so memory holds the variables plus one value in flight; a value is cast when
    the graph's dtype differs from the checkpoint's (a graph already folded to BF16).
    """
    import tensorflow as tf

    stored = _stored_dtypes(variables.checkpoint)
    graph = session.graph
    with graph.as_default(), tf.name_scope("tf_bf16_restore"):
        prefix = tf.constant(variables.checkpoint)
        assigns = []
        for spec in variables.specs:
            handle = graph.get_tensor_by_name(f"{spec.node}:0")
            value = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[spec.key], shape_and_slices=[""],
                                         dtypes=[stored[spec.key]])[0]
            if value.dtype != tf.as_dtype(spec.dtype):
                value = tf.cast(value, spec.dtype)
            assigns.append(tf.raw_ops.AssignVariableOp(resource=handle, value=value))
    for assign in assigns:
        session.run(assign)


def write_checkpoint(variables: Variables, prefix: str) -> None:
    """Write ``variables`` in their graph dtypes as a checkpoint at ``prefix``, keyed by handle node name.

    Node names are the keys a TF1 Saver uses, which is what ``meta_graph_with_variables`` writes.
    Streams: each variable is read from the source checkpoint, cast if its graph dtype differs,
    written as its own shard and released before the next one; the shards are then merged into
    one checkpoint (``prefix.index`` + ``prefix.data-0000k-of-0000n``) without copying data.
    """
    import tensorflow as tf

    stored = _stored_dtypes(variables.checkpoint)
    shard_dir = os.path.join(os.path.dirname(prefix), SHARDS_DIR)
    shards = []
    with tf.device("/CPU:0"):
        for i, spec in enumerate(variables.specs):
            value = tf.raw_ops.RestoreV2(prefix=variables.checkpoint, tensor_names=[spec.key],
                                         shape_and_slices=[""], dtypes=[stored[spec.key]])[0]
            if value.dtype != tf.as_dtype(spec.dtype):
                value = tf.cast(value, spec.dtype)
            shard = os.path.join(shard_dir, f"part-{i:05d}")
            tf.raw_ops.SaveV2(prefix=shard, tensor_names=[spec.node], shape_and_slices=[""], tensors=[value])
            del value
            shards.append(shard)
        tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=shards, destination_prefix=prefix, delete_old_dirs=True)
    if tf.io.gfile.exists(shard_dir):
        tf.io.gfile.rmtree(shard_dir)


def _stored_dtypes(prefix: str) -> Dict[str, Any]:
    """Checkpoint key -> the dtype its value is stored in."""
    import tensorflow as tf

    return tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()


# ----------------------------------------------------------------------------- SavedModel graphs

def meta_graph_with_variables(graph_def: graph_pb2.GraphDef, variables: Variables) -> Any:
    """A MetaGraphDef of ``graph_def`` whose handles are variables a SavedModel loader restores.

    Each handle gets what TensorFlow's loaders expect of a resource variable (a read snapshot,
    an initializer, an entry in the ``variables`` collection), and a V2 Saver whose restore op
    reads each from the checkpoint key that is its node name (``write_checkpoint`` writes them).
    """
    import tensorflow as tf
    from tensorflow.core.framework import variable_pb2

    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
        by_name = {}
        for spec in variables.specs:
            handle = graph.get_tensor_by_name(f"{spec.node}:0")
            scope = graph.unique_name(f"{spec.node}/variable", mark_as_used=True)
            with tf.name_scope(scope + "/"):
                snapshot = tf.raw_ops.ReadVariableOp(resource=handle, dtype=handle.op.get_attr("dtype"), name="Read")
                initial = tf.zeros(spec.shape, spec.dtype, name="zeros")
                initializer = tf.raw_ops.AssignVariableOp(resource=handle, value=initial, name="Assign")
            proto = variable_pb2.VariableDef(variable_name=handle.name, initializer_name=initializer.name,
                                             snapshot_name=snapshot.name, initial_value_name=initial.name,
                                             is_resource=True, trainable=False)
            variable = tf.compat.v1.Variable(variable_def=proto, use_resource=True)
            tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES, variable)
            by_name[spec.node] = variable
        saver = tf.compat.v1.train.Saver(var_list=by_name, write_version=tf.compat.v1.train.SaverDef.V2,
                                         allow_empty=True)
        return tf.compat.v1.train.export_meta_graph(graph=graph, saver_def=saver.as_saver_def(),
                                                    clear_devices=False, strip_default_attrs=False)

