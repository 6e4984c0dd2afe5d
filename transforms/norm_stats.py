"""Find the reductions that compute normalization statistics (mean and variance of a tensor).

LayerNorm, RMSNorm and Keras' decomposed batch/instance norms compute ``mean(x)`` and then
``x - mean(x)`` or ``mean(x*x)``: BF16 there subtracts nearly equal numbers, so BF16Convert
keeps these reductions and what is derived from them in FP32. Spatial reductions such as
global average pooling have no such pattern and may go BF16.
"""

from __future__ import annotations

from typing import Set

from tf_bf16.transforms.graph import GraphIndex, consumers_through_identity, node_name, skip_identity

REDUCTIONS = frozenset({"Mean", "Sum"})
CENTERING_OPS = frozenset({"Sub", "SquaredDifference"})
SQUARING_OPS = frozenset({"Square"})


def normalization_statistics(index: GraphIndex) -> Set[str]:
    """Names of Mean/Sum nodes whose output centres their own input, or that reduce its square."""
    found: Set[str] = set()
    for node in index.graph_def.node:
        if node.op not in REDUCTIONS or not node.input:
            continue
        source = skip_identity(index, node.input[0])
        # mean(x) consumed by x - mean(x) or (x - mean(x))^2: a first moment used for centring.
        for consumer in consumers_through_identity(index, node.name, 0):
            if consumer.op in CENTERING_OPS and source in {skip_identity(index, s) for s in consumer.input}:
                found.add(node.name)
                break
        if node.name in found:
            continue
        # mean(x^2) / mean(x*x): a second moment (RMSNorm, variance).
        producer_name = node_name(source)  # identities already skipped
        producer = index.nodes.get(producer_name)
        if producer is None:
            continue
        if producer.op in SQUARING_OPS or (producer.op == "Mul" and len(producer.input) == 2
                                            and producer.input[0] == producer.input[1]):
            found.add(node.name)
        elif producer.op == "SquaredDifference":
            found.add(node.name)
    return found
