"""Neural Compressor's experimental API names: ``from tf_bf16.experimental import MixedPrecision, Quantization, common``.

Code written for ``neural_compressor.experimental`` runs by changing only the import.
"""

from __future__ import annotations

from tf_bf16 import common  # noqa: F401 (re-export)
from tf_bf16.mixed_precision import MixedPrecision  # noqa: F401 (re-export)
from tf_bf16.quantization import Quantization  # noqa: F401 (re-export)

__all__ = ["MixedPrecision", "Quantization", "common"]
