"""Run named GraphDef passes in order, like ``graph_transforms``' TransformGraph.

``TRANSFORMS`` is the one registry of available passes (name -> ``fn(graph_def, plan)``);
adding a pass means adding one line to ``_registry()``. ``run_transforms`` validates every
requested name before running anything, then logs node counts per step.
"""

from __future__ import annotations

import time
import types
from typing import Callable, Mapping, Sequence, Union

from absl import logging
from tensorflow.core.framework import graph_pb2

from tf_bf16.transforms.plan import PrecisionPlan

Transform = Callable[[graph_pb2.GraphDef, PrecisionPlan], graph_pb2.GraphDef]


def _registry() -> Mapping[str, Transform]:
    """Every available pass by name; the single place to register a new one."""
    from tf_bf16.transforms.fold_batch_norms import fold_batch_norms
    from tf_bf16.transforms.fold_constants import fold_constants
    from tf_bf16.transforms.remove_identity import remove_identity
    from tf_bf16.transforms.strip_unused import strip_unused

    return types.MappingProxyType({
        "strip_unused": strip_unused,
        "remove_identity": remove_identity,
        "fold_constants": fold_constants,
        "fold_batch_norms": fold_batch_norms,
    })


TRANSFORMS: Mapping[str, Transform] = _registry()

# Generic clean-up run before the precision stages; strip again at the end to drop what
# folding left unreferenced.
DEFAULT_CLEANUP = ("strip_unused", "remove_identity", "fold_constants", "fold_batch_norms", "strip_unused")


def run_transforms(graph_def: graph_pb2.GraphDef, plan: PrecisionPlan,
                   names: Union[str, Sequence[str]] = DEFAULT_CLEANUP,
                   transforms: Mapping[str, Transform] = TRANSFORMS) -> graph_pb2.GraphDef:
    """Apply the transforms ``names`` (looked up in ``transforms``) in order.

    Raises ValueError naming the unknown transform and the known ones before any pass runs.
    """
    if isinstance(names, str):
        names = (names,)
    for name in names:
        if name not in transforms:
            raise ValueError(f"unknown transform {name!r}; known transforms: {', '.join(sorted(transforms))}")
    for name in names:
        before = len(graph_def.node)
        start = time.perf_counter()
        graph_def = transforms[name](graph_def, plan)
        logging.info("transform %-18s nodes %6d -> %6d  (%.2fs)", name, before, len(graph_def.node),
                     time.perf_counter() - start)
    return graph_def
