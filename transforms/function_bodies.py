"""convert_function_bodies: convert the bodies of a graph's library functions (cond/while
branches, PartitionedCall).

TensorFlow's AMP pass leaves function bodies untouched. Here each monomorphic FunctionDef is
turned into a GraphDef, run through the passes named by ``context.body_transforms`` with its
arguments and return values as FP32 borders (so every caller stays valid), and turned back
into a FunctionDef with the same signature. Polymorphic functions (signature type attrs) are
left as they are; every function gets a ``FunctionReport`` in ``context.functions``.
"""

from __future__ import annotations

from typing import Dict

from tensorflow.core.framework import function_pb2, graph_pb2, node_def_pb2
from tensorflow.python.framework import function_def_to_graph

from tf_bf16.errors import GraphError
from tf_bf16.transforms import graph as g
from tf_bf16.transforms.context import FunctionReport, TransformContext


def convert_function_bodies(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """A copy of ``graph_def`` whose library functions went through ``context.body_transforms``."""
    if not graph_def.library.function or not context.body_transforms:
        return graph_def
    if context.run is None:
        raise GraphError("convert_function_bodies runs other passes on each body: call it through "
                         "tf_bf16.transforms.driver.run_transforms")
    out = g.copy_graph(graph_def)
    reports: Dict[str, FunctionReport] = context.functions
    for i, fdef in enumerate(graph_def.library.function):
        name = fdef.signature.name
        if fdef.signature.attr:
            reports[name] = FunctionReport(False, "polymorphic function (type attrs): body not converted")
            continue
        try:
            body, flat_names = function_def_to_graph.function_def_to_graph_def(fdef)
        except Exception as exc:  # an op this TensorFlow cannot describe
            reports[name] = FunctionReport(False, f"body cannot be read: {str(exc).splitlines()[0][:120]}")
            continue
        body.library.CopyFrom(graph_def.library)
        args = [a.name for a in fdef.signature.input_arg]
        rets = [g.canonical_tensor(flat_names[fdef.ret[o.name]]) for o in fdef.signature.output_arg]
        sub = context.for_body(args, rets)
        converted = context.run(body, sub, context.body_transforms)
        new_fdef = _to_function_def(fdef, converted, set(args))
        out.library.function[i].CopyFrom(new_fdef)
        reports[name] = FunctionReport(True, "", len(sub.bf16_nodes()),
                                       sum(1 for n in converted.node if n.op == "Cast"), sub.fp32_reasons())
    return out


def _to_function_def(original: function_pb2.FunctionDef, body: graph_pb2.GraphDef, args: set) -> function_pb2.FunctionDef:
    """Rebuild ``original`` with ``body``'s nodes, writing inputs in FunctionDef form."""
    sigs = g.OpSignatures(body)
    nodes = {n.name: n for n in body.node}
    out = function_pb2.FunctionDef()
    out.CopyFrom(original)
    del out.node_def[:]
    for node in body.node:
        if node.name in args and node.op == "Placeholder":
            continue
        copy = node_def_pb2.NodeDef()
        copy.CopyFrom(node)
        for k, spec in enumerate(node.input):
            src, port, control = g.parse_input(spec)
            if control:
                continue
            if src in args and nodes[src].op == "Placeholder":
                copy.input[k] = src
            else:
                copy.input[k] = _nested_name(nodes[src], port, sigs)
        out.node_def.append(copy)
    return out


def _nested_name(node: node_def_pb2.NodeDef, port: int, sigs: g.OpSignatures) -> str:
    """FunctionDef spelling ``node:output_arg:index`` of flat output ``port`` of ``node``."""
    op_def = sigs.op_def(node.op)
    seen = 0
    for arg in op_def.output_arg:
        if arg.number_attr:
            count = node.attr[arg.number_attr].i
        elif arg.type_list_attr:
            count = len(node.attr[arg.type_list_attr].list.type)
        else:
            count = 1
        if port < seen + count:
            return f"{node.name}:{arg.name}:{port - seen}"
        seen += count
    raise GraphError(f"{node.name} ({node.op}) has no output {port}")
