"""User-facing evaluation components: ``DataLoader`` plus the metrics, under one import.

``from tf_bf16 import common`` gives ``common.DataLoader``, ``common.Metric`` and the built-in
metrics (``common.TopK`` ...), the names Neural Compressor's experimental API uses, so code
written for it runs by changing the import.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tf_bf16.errors import InputError
from tf_bf16.metrics import (F1, MAE, METRICS, MSE, RMSE, Accuracy, Metric, TopK,  # noqa: F401 (re-exports)
                             create_metric, is_metric)

__all__ = ["DataLoader", "Metric", "TopK", "Accuracy", "MSE", "RMSE", "MAE", "F1", "METRICS", "create_metric",
           "is_metric", "default_collate", "is_map_dataset", "batches", "model_feeds"]

LAST_BATCH = ("rollover", "discard")  # what DataLoader does with a short final batch (also the config's choices)

Batch = Tuple[Any, Any]


def _to_numpy(value: Any) -> Any:
    """Tensors (anything with ``.numpy()``) to numpy, recursively through lists, tuples and dicts."""
    if isinstance(value, Mapping):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    if hasattr(value, "numpy") and callable(value.numpy):
        return value.numpy()
    return value


def default_collate(samples: Sequence[Any]) -> Any:
    """Stack samples along a new first axis, keeping their structure (array, tuple/list, dict, None)."""
    first = samples[0]
    if first is None:
        if any(s is not None for s in samples):
            raise InputError("some samples have a label and some have None")
        return None
    if isinstance(first, Mapping):
        return {k: default_collate([s[k] for s in samples]) for k in first}
    if isinstance(first, (list, tuple)):
        if any(len(s) != len(first) for s in samples):
            raise InputError("samples have different numbers of inputs")
        return type(first)(default_collate([s[i] for s in samples]) for i in range(len(first)))
    return np.stack([np.asarray(s) for s in samples])


def is_map_dataset(dataset: Any) -> bool:
    """True for a dataset indexed by sample (``__getitem__`` and ``__len__``), not a stream of batches."""
    return callable(getattr(dataset, "__getitem__", None)) and callable(getattr(dataset, "__len__", None)) \
        and not isinstance(dataset, (str, bytes, Mapping))


class DataLoader:
    """Batches of ``(inputs, labels)`` from a map-style dataset (batched here) or an iterable of batches.

    A sample is ``(input, label)``; input is an array, a tuple/list in model-input order or a
    dict by input name. ``last_batch``: "rollover" keeps a short final batch, "discard" drops
    it. ``shuffle`` uses one ``seed``-ed permutation on every pass, so tuning trials see the same data.
    """

    def __init__(self, dataset: Any, batch_size: int = 1, collate_fn: Optional[Callable[[List[Any]], Any]] = None,
                 last_batch: str = "rollover", shuffle: bool = False, seed: Optional[int] = None,
                 **unused: Any):
        if dataset is None:
            raise InputError("DataLoader: dataset is None")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"DataLoader: batch_size must be an integer >= 1, got {batch_size!r}")
        if last_batch not in LAST_BATCH:
            raise InputError(f"DataLoader: last_batch must be one of {', '.join(LAST_BATCH)}, got {last_batch!r}")
        if unused.get("distributed"):
            raise InputError("DataLoader: distributed evaluation is not supported")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn or default_collate
        self.last_batch = last_batch
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.batched = not is_map_dataset(dataset)

    def _order(self) -> np.ndarray:
        n = len(self.dataset)
        if self.shuffle:
            return np.random.default_rng(self.seed).permutation(n)
        return np.arange(n)

    def __iter__(self) -> Iterator[Batch]:
        if self.batched:
            for item in self.dataset:
                yield _split_batch(_to_numpy(item))
            return
        order = self._order()
        stop = len(order) - len(order) % self.batch_size if self.last_batch == "discard" else len(order)
        for start in range(0, stop, self.batch_size):
            samples = [_split_sample(self.dataset[int(i)], int(i)) for i in order[start:start + self.batch_size]]
            inputs = self.collate_fn([s[0] for s in samples])
            labels = self.collate_fn([s[1] for s in samples])
            yield _to_numpy(inputs), _to_numpy(labels)

    def __len__(self) -> int:
        """Number of batches per pass (only for map-style datasets)."""
        if self.batched:
            return len(self.dataset)
        n = len(self.dataset)
        if self.last_batch == "discard":
            return n // self.batch_size
        return -(-n // self.batch_size)

    def __repr__(self) -> str:
        kind = "batches" if self.batched else f"{len(self.dataset)} samples"
        return f"DataLoader({kind}, batch_size={self.batch_size}, last_batch={self.last_batch!r})"


def _split_sample(sample: Any, index: int) -> Batch:
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        return sample[0], sample[1]
    raise InputError(f"dataset[{index}] must be an (input, label) pair, got {type(sample).__name__}"
                    f"{' of length ' + str(len(sample)) if isinstance(sample, (tuple, list)) else ''}; "
                    f"use label None for unlabeled data")


def _split_batch(item: Any) -> Batch:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, (tuple, list)) and len(item) == 1:
        return item[0], None
    if isinstance(item, np.ndarray) or isinstance(item, Mapping):
        return item, None
    raise InputError(f"a batch must be an (inputs, labels) pair, got {type(item).__name__}"
                    f"{' of length ' + str(len(item)) if isinstance(item, (tuple, list)) else ''}")


def batches(loader: Any) -> Iterator[Batch]:
    """Iterate ``(inputs, labels)`` from a DataLoader, a map-style dataset (batch 1) or any iterable of batches."""
    if isinstance(loader, DataLoader):
        return iter(loader)
    if is_map_dataset(loader) and not _looks_batched(loader):
        return iter(DataLoader(loader))
    return iter(DataLoader(_Batches(loader)))


def _looks_batched(obj: Any) -> bool:
    """A plain list/tuple of (inputs, labels) pairs is a list of batches, not a dataset of samples."""
    return isinstance(obj, (list, tuple))


class _Batches:
    """An iterable with no ``__getitem__``, so DataLoader passes its items through as batches."""

    def __init__(self, items: Any):
        self._items = items

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)


def model_feeds(inputs: Any, input_names: Sequence[str]) -> dict:
    """A batch's inputs as ``{input name: array}``: from one array, a list/tuple in input order, or a dict."""
    names = list(input_names)
    if isinstance(inputs, Mapping):
        by_node = {str(k).split(":")[0]: v for k, v in inputs.items()}
        missing = [n for n in names if n not in by_node]
        if missing:
            raise InputError(f"batch inputs {sorted(by_node)} miss model input(s) {missing}")
        return {n: np.asarray(by_node[n]) for n in names}
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != len(names):
            raise InputError(f"a batch has {len(inputs)} inputs but the model takes {len(names)}: {names}")
        return {n: np.asarray(v) for n, v in zip(names, inputs)}
    if len(names) != 1:
        raise InputError(f"a batch has one input array but the model takes {len(names)}: {names}; "
                         f"yield a tuple in input order or a dict keyed by input name")
    return {names[0]: np.asarray(inputs)}
