"""tf_bf16: convert TensorFlow models to mixed BF16/FP32 (and INT8) for Intel Xeon CPU inference.

Public names are imported lazily (PEP 562), so ``import tf_bf16`` stays cheap, does not
import TensorFlow, and works while optional parts of the package are still missing.
"""

from __future__ import annotations

import importlib
from typing import Any, List

__version__ = "0.1.0"

# public name -> (module, attribute in it; None = the module itself)
_LAZY_EXPORTS = {
    "Model": ("tf_bf16.model", "Model"),
    "MixedPrecision": ("tf_bf16.mixed_precision", "MixedPrecision"),
    "Quantization": ("tf_bf16.quantization", "Quantization"),
    "common": ("tf_bf16.common", None),
    "errors": ("tf_bf16.errors", None),
}

__all__ = sorted(_LAZY_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name on first use; unknown names raise AttributeError as usual."""
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module 'tf_bf16' has no attribute {name!r}")
    module_name, attr = _LAZY_EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> List[str]:
    return list(__all__)
