"""Datasets built from YAML dataloader specs: ``dummy`` (random), ``npz`` files and TFRecord files.

``create_dataloader(config.DataLoaderConfig, seed)`` returns a ``common.DataLoader``. Every
dataset here is map-style (``__getitem__``/``__len__``) and holds its samples in memory,
which suits evaluation sets; a sample is ``(input, label)`` where ``input`` is one array or
a tuple of arrays in model-input order and ``label`` may be None. Problems (missing file,
missing key, mismatched sample counts) raise ``ConfigError`` naming the config key.
"""

from __future__ import annotations

import io
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from tf_bf16 import config as config_lib
from tf_bf16.common import DataLoader
from tf_bf16.errors import ConfigError, InputError

DEFAULT_KEY = "evaluation.accuracy.dataloader"


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"config key '{key}': {message}")


class ArrayDataset:
    """Samples ``i`` of parallel arrays: inputs (one or several) and optional labels."""

    def __init__(self, inputs: Sequence[np.ndarray], labels: Optional[np.ndarray] = None):
        if not inputs:
            raise InputError("ArrayDataset needs at least one input array")
        counts = {len(a) for a in inputs} | ({len(labels)} if labels is not None else set())
        if len(counts) != 1:
            raise InputError(f"inputs and labels have different sample counts: {sorted(counts)}")
        self.inputs = list(inputs)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.inputs[0])

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        sample = self.inputs[0][index] if len(self.inputs) == 1 else tuple(a[index] for a in self.inputs)
        return sample, None if self.labels is None else self.labels[index]


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import tensorflow as tf
        return np.dtype(tf.bfloat16.as_numpy_dtype)
    return np.dtype(name)


def dummy_dataset(spec: config_lib.DummyDatasetConfig, seed: int, key: str = DEFAULT_KEY + ".dataset") -> ArrayDataset:
    """Seeded random samples per input ``shape`` (first dim = sample count), uniform in [low, high).

    Labels, when ``label`` is true, are int64 zeros of ``label_shape``, as in Neural Compressor.
    """
    key = key + ".dummy"
    counts = {shape[0] for shape in spec.shape}
    if len(counts) != 1:
        raise _fail(key + ".shape", f"every input needs the same first dimension (the number of samples), "
                                    f"got {[s[0] for s in spec.shape]}")
    rng = np.random.default_rng(seed)
    arrays = []
    for shape, low, high, dtype in zip(spec.shape, spec.low, spec.high, spec.dtype):
        np_dtype = _numpy_dtype(dtype)
        if dtype == "bool":
            arrays.append(rng.random(shape) < 0.5)
        elif np.issubdtype(np_dtype, np.integer):
            lo, hi = int(np.ceil(low)), int(np.ceil(high))
            values = rng.integers(lo, hi, size=shape) if hi > lo else np.full(shape, lo)
            arrays.append(values.astype(np_dtype))
        else:
            arrays.append(rng.uniform(low, high, size=shape).astype(np.float32).astype(np_dtype))
    n = counts.pop()
    labels = np.zeros((n,) + tuple(spec.label_shape), dtype=np.int64) if spec.label else None
    return ArrayDataset(arrays, labels)


def _read_bytes(path: str, key: str) -> bytes:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise _fail(key, f"file '{path}' does not exist")
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def npz_dataset(spec: config_lib.NpzDatasetConfig, key: str = DEFAULT_KEY + ".dataset") -> ArrayDataset:
    """Samples from a ``.npz`` file: arrays ``inputs`` (in model-input order) and ``labels``."""
    key = key + ".npz"
    try:
        archive = np.load(io.BytesIO(_read_bytes(spec.path, key + ".path")), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise _fail(key + ".path", f"'{spec.path}' is not a readable .npz file: {e}") from e
    available = ", ".join(sorted(archive.files)) or "none"
    for name in spec.inputs:
        if name not in archive.files:
            raise _fail(key + ".inputs", f"array {name!r} is not in '{spec.path}'; arrays there: {available}")
    if spec.labels is not None and spec.labels not in archive.files:
        raise _fail(key + ".labels", f"array {spec.labels!r} is not in '{spec.path}'; arrays there: {available} "
                                     f"(set labels: null for unlabeled data)")
    inputs = [archive[name] for name in spec.inputs]
    labels = archive[spec.labels] if spec.labels is not None else None
    try:
        return ArrayDataset(inputs, labels)
    except ValueError as e:
        raise _fail(key, str(e)) from e


def tfrecord_dataset(spec: config_lib.TFRecordDatasetConfig, key: str = DEFAULT_KEY + ".dataset") -> ArrayDataset:
    """Samples parsed from ``tf.train.Example`` records with fixed-length features."""
    import tensorflow as tf

    key = key + ".tfrecord"
    files: List[str] = []
    for pattern in spec.path:
        matched = sorted(tf.io.gfile.glob(pattern))
        if not matched:
            raise _fail(key + ".path", f"no file matches '{pattern}'")
        files.extend(matched)
    features = {name: tf.io.FixedLenFeature(list(f.shape), tf.as_dtype(f.dtype)) for name, f in spec.features.items()}
    columns = {name: [] for name in features}
    try:
        for record in tf.data.TFRecordDataset(files):
            parsed = tf.io.parse_single_example(record, features)
            for name in features:
                columns[name].append(parsed[name].numpy())
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
        raise _fail(key + ".features", f"records in {files} do not match the feature spec: "
                                       f"{getattr(e, 'message', e)}") from e
    if not columns[next(iter(columns))]:
        raise _fail(key + ".path", f"no records in {files}")
    inputs = [np.stack(columns[name]) for name in spec.inputs]
    labels = np.stack(columns[spec.label]) if spec.label is not None else None
    return ArrayDataset(inputs, labels)


def create_dataset(spec: Any, seed: int, key: str = DEFAULT_KEY + ".dataset") -> ArrayDataset:
    """The dataset a validated dataset config describes."""
    if isinstance(spec, config_lib.DummyDatasetConfig):
        return dummy_dataset(spec, seed, key)
    if isinstance(spec, config_lib.NpzDatasetConfig):
        return npz_dataset(spec, key)
    if isinstance(spec, config_lib.TFRecordDatasetConfig):
        return tfrecord_dataset(spec, key)
    raise _fail(key, f"unsupported dataset config {type(spec).__name__}")


def create_dataloader(spec: config_lib.DataLoaderConfig, seed: int = config_lib.DEFAULT_RANDOM_SEED,
                      key: str = DEFAULT_KEY, dataset: Any = None) -> DataLoader:
    """A DataLoader over ``spec.dataset`` (or over ``dataset`` given in code) with the spec's batching."""
    if dataset is None:
        if spec.dataset is None:
            raise _fail(key + ".dataset", "is required: give dummy, npz or tfrecord (or set converter.eval_dataloader)")
        dataset = create_dataset(spec.dataset, seed, key + ".dataset")
    return DataLoader(dataset, batch_size=spec.batch_size, last_batch=spec.last_batch,
                      shuffle=spec.shuffle, seed=seed)
