"""Run named GraphDef passes in order, like ``graph_transforms``' TransformGraph.

Every pass has one signature, ``Transform``: ``fn(graph_def, context) -> graph_def``, with
the precision plan on the context and facts recorded there. ``TRANSFORMS`` is the one
registry of passes by name: adding a pass is one file plus one line in ``_registry()``.
``run_transforms`` checks every requested name before running anything, then logs node
counts per step.
"""

from __future__ import annotations

import time
import types
from typing import Callable, Mapping, Sequence, Union

from absl import logging
from tensorflow.core.framework import graph_pb2

from tf_bf16.errors import GraphError
from tf_bf16.transforms.context import TransformContext

Transform = Callable[[graph_pb2.GraphDef, TransformContext], graph_pb2.GraphDef]


def _registry() -> Mapping[str, Transform]:
    """Every available pass by name; the single place to register a new one."""
    from tf_bf16.transforms.bf16_convert import bf16_convert
    from tf_bf16.transforms.fold_batch_norms import fold_batch_norms
    from tf_bf16.transforms.fold_casts import fold_casts
    from tf_bf16.transforms.fold_constants import fold_constants
    from tf_bf16.transforms.function_bodies import convert_function_bodies
    from tf_bf16.transforms.fuse_kernels import fuse_kernels
    from tf_bf16.transforms.fuse_layer_norm import fuse_layer_norm
    from tf_bf16.transforms.int8_kernels import int8_kernels
    from tf_bf16.transforms.quantize import quantize
    from tf_bf16.transforms.remove_identity import remove_identity
    from tf_bf16.transforms.residual_addn import residual_addn
    from tf_bf16.transforms.sink_reshapes import sink_reshapes
    from tf_bf16.transforms.strip_unused import strip_unused
    from tf_bf16.transforms.transpose_matmul import transpose_matmul

    return types.MappingProxyType({
        "strip_unused": strip_unused,
        "remove_identity": remove_identity,
        "fold_constants": fold_constants,
        "fold_batch_norms": fold_batch_norms,
        "sink_reshapes": sink_reshapes,
        "residual_addn": residual_addn,
        "fuse_layer_norm": fuse_layer_norm,
        "transpose_matmul": transpose_matmul,
        "quantize": quantize,
        "bf16_convert": bf16_convert,
        "fold_casts": fold_casts,
        "convert_function_bodies": convert_function_bodies,
        "int8_kernels": int8_kernels,
        "fuse_kernels": fuse_kernels,
    })


TRANSFORMS: Mapping[str, Transform] = _registry()


def check_names(names: Sequence[str], transforms: Mapping[str, Transform] = TRANSFORMS) -> None:
    """Raise GraphError naming the first unknown transform and the known ones."""
    for name in names:
        if name not in transforms:
            raise GraphError(f"unknown transform {name!r}; known transforms: {', '.join(sorted(transforms))}")


def run_transforms(graph_def: graph_pb2.GraphDef, context: TransformContext, names: Union[str, Sequence[str]],
                   transforms: Mapping[str, Transform] = TRANSFORMS) -> graph_pb2.GraphDef:
    """Apply the transforms ``names`` (looked up in ``transforms``) in order.

    Raises GraphError naming an unknown transform before any pass runs. Sets
    ``context.run`` (when unset) so passes that convert sub-graphs use the same registry.
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    check_names(names, transforms)
    if context.run is None:
        context.run = lambda g, c, n: run_transforms(g, c, n, transforms)
    for name in names:
        before = len(graph_def.node)
        start = time.perf_counter()
        graph_def = transforms[name](graph_def, context)
        logging.info("transform %-24s nodes %6d -> %6d  (%.2fs)", name, before, len(graph_def.node),
                     time.perf_counter() - start)
    return graph_def
