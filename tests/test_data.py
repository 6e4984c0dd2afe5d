"""Tests for common.DataLoader and the YAML dataloaders of tf_bf16.data (dummy, npz, TFRecord)."""

from __future__ import annotations

import numpy as np
import pytest

from tf_bf16 import common, config as config_lib, data
from tf_bf16.errors import ConfigError, InputError


class Samples:
    """A user dataset: ``__getitem__`` -> (input, label), ``__len__``."""

    def __init__(self, n: int, two_inputs: bool = False, as_dict: bool = False):
        self.x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
        self.y = np.arange(n) % 4
        self.two_inputs, self.as_dict = two_inputs, as_dict

    def __getitem__(self, i):
        if self.as_dict:
            return {"a": self.x[i], "b": self.x[i] * 2}, self.y[i]
        if self.two_inputs:
            return (self.x[i], -self.x[i]), self.y[i]
        return self.x[i], self.y[i]

    def __len__(self):
        return len(self.x)


def _loader_config(dataset: dict, **kwargs) -> config_lib.DataLoaderConfig:
    raw = {"evaluation": {"accuracy": {"dataloader": {"dataset": dataset, **kwargs}}}}
    return config_lib.load_config(raw).evaluation.accuracy.dataloader


def test_batches_of_a_user_dataset_cover_every_sample_once():
    ds = Samples(10)
    loader = common.DataLoader(ds, batch_size=4)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [4, 4, 2]  # rollover keeps the short last batch
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), ds.x)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), ds.y)


def test_discard_drops_the_short_batch_and_shuffle_is_repeatable():
    loader = common.DataLoader(Samples(10), batch_size=4, last_batch="discard", shuffle=True, seed=7)
    first = [y.tolist() for _, y in loader]
    second = [y.tolist() for _, y in loader]
    assert len(loader) == 2 and [len(b) for b in first] == [4, 4]
    assert first == second  # the same permutation every pass: tuning trials see the same data
    ids = [x[:, 0] // 3 for x, _ in loader]
    assert sorted(np.concatenate(ids).tolist()) != list(range(8))  # shuffled, not the first 8 in order
    other = [y.tolist() for _, y in common.DataLoader(Samples(10), 4, shuffle=True, seed=8)]
    assert other != first


def test_multi_input_samples_keep_their_structure():
    x, y = next(iter(common.DataLoader(Samples(5, two_inputs=True), batch_size=5)))
    assert isinstance(x, tuple) and len(x) == 2
    np.testing.assert_array_equal(x[1], -x[0])
    feeds = common.model_feeds(x, ["in0", "in1"])
    assert list(feeds) == ["in0", "in1"]
    d, _ = next(iter(common.DataLoader(Samples(5, as_dict=True), batch_size=2)))
    assert set(d) == {"a", "b"} and d["a"].shape == (2, 3)
    np.testing.assert_array_equal(common.model_feeds(d, ["b", "a"])["b"], d["b"])
    with pytest.raises(InputError, match="miss model input"):
        common.model_feeds(d, ["a", "c"])
    with pytest.raises(ValueError, match="takes 3"):
        common.model_feeds(x, ["p", "q", "r"])


def test_iterables_of_batches_pass_through():
    batches = [(np.ones((2, 3)), np.array([0, 1])), (np.zeros((1, 3)), np.array([2]))]
    loader = common.DataLoader(iter(batches))
    got = list(loader)
    assert len(got) == 2 and got[1][1].tolist() == [2]
    # a list given as converter.eval_dataloader is a list of batches
    assert [y.tolist() for _, y in common.batches(batches)] == [[0, 1], [2]]


def test_tf_data_dataset_batches_become_numpy():
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((np.arange(6, dtype=np.float32), np.arange(6))).batch(4)
    got = list(common.DataLoader(ds))
    assert [type(x) for x, _ in got] == [np.ndarray, np.ndarray]
    assert got[0][0].tolist() == [0, 1, 2, 3] and got[1][1].tolist() == [4, 5]


def test_bad_loader_arguments_and_samples():
    with pytest.raises(ValueError, match="batch_size"):
        common.DataLoader(Samples(3), batch_size=0)
    with pytest.raises(ValueError, match="last_batch"):
        common.DataLoader(Samples(3), last_batch="keep")

    class NoLabels:
        def __getitem__(self, i):
            return np.zeros(3)

        def __len__(self):
            return 2

    with pytest.raises(InputError, match=r"dataset\[0\] must be an \(input, label\) pair"):
        list(common.DataLoader(NoLabels()))


def test_dummy_dataloader_from_yaml_spec():
    spec = _loader_config({"dummy": {"shape": [[10, 4], [10, 2]], "low": [0.0, 5], "high": [1.0, 9],
                                     "dtype": ["float32", "int32"], "label": True}}, batch_size=4)
    loader = data.create_dataloader(spec, seed=3)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    floats = np.concatenate([b[0][0] for b in batches])
    ints = np.concatenate([b[0][1] for b in batches])
    assert floats.dtype == np.float32 and floats.shape == (10, 4) and 0 <= floats.min() and floats.max() < 1
    assert ints.dtype == np.int32 and 5 <= ints.min() and ints.max() < 9
    assert np.all(np.concatenate([b[1] for b in batches]) == 0)
    again = np.concatenate([b[0][0] for b in data.create_dataloader(spec, seed=3)])
    np.testing.assert_array_equal(floats, again)  # seeded: every evaluation sees the same data
    other = np.concatenate([b[0][0] for b in data.create_dataloader(spec, seed=4)])
    assert not np.array_equal(floats, other)


def test_dummy_without_labels_and_sample_count_mismatch():
    spec = _loader_config({"dummy": {"shape": [3, 2, 2]}})
    x, y = next(iter(data.create_dataloader(spec)))
    assert x.shape == (1, 2, 2) and y is None
    bad = _loader_config({"dummy": {"shape": [[4, 2], [5, 2]]}})
    with pytest.raises(ConfigError, match=r"evaluation\.accuracy\.dataloader\.dataset\.dummy\.shape"):
        data.create_dataloader(bad)


def test_npz_dataloader(tmp_path):
    path = tmp_path / "eval.npz"
    rng = np.random.default_rng(0)
    x, z, y = rng.random((7, 3)), rng.random((7, 1)), np.arange(7)
    np.savez(path, images=x, extra=z, labels=y)
    spec = _loader_config({"npz": {"path": str(path), "inputs": ["images", "extra"], "labels": "labels"}},
                          batch_size=3)
    batches = list(data.create_dataloader(spec))
    np.testing.assert_allclose(np.concatenate([b[0][0] for b in batches]), x)
    np.testing.assert_allclose(np.concatenate([b[0][1] for b in batches]), z)
    assert np.concatenate([b[1] for b in batches]).tolist() == list(range(7))


@pytest.mark.parametrize("dataset,key,fragment", [
    ({"npz": {"path": "MISSING"}}, "npz.path", "does not exist"),
    ({"npz": {"path": "FILE", "inputs": "pixels"}}, "npz.inputs", "'pixels' is not in"),
    ({"npz": {"path": "FILE", "inputs": "x", "labels": "target"}}, "npz.labels", "'target' is not in"),
])
def test_npz_errors_name_the_key(tmp_path, dataset, key, fragment):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 2)), y=np.zeros(2))
    dataset = {"npz": {k: (str(tmp_path / "missing.npz") if v == "MISSING" else str(path) if v == "FILE" else v)
                       for k, v in dataset["npz"].items()}}
    with pytest.raises(ConfigError, match=rf"'evaluation\.accuracy\.dataloader\.dataset\.{key}'.*{fragment}"):
        data.create_dataloader(_loader_config(dataset))


def _write_tfrecord(path, images, labels):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for image, label in zip(images, labels):
            example = tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(float_list=tf.train.FloatList(value=image.reshape(-1).tolist())),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }))
            writer.write(example.SerializeToString())


def test_tfrecord_dataloader(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.random((5, 2, 3)).astype(np.float32)
    labels = np.array([3, 1, 4, 1, 5])
    _write_tfrecord(tmp_path / "part-0.tfrecord", images[:3], labels[:3])
    _write_tfrecord(tmp_path / "part-1.tfrecord", images[3:], labels[3:])
    spec = _loader_config({"tfrecord": {"path": str(tmp_path / "part-*.tfrecord"),
                                        "features": {"image": {"shape": [2, 3], "dtype": "float32"},
                                                     "label": {"dtype": "int64"}},
                                        "label": "label"}}, batch_size=2)
    batches = list(data.create_dataloader(spec))
    np.testing.assert_allclose(np.concatenate([b[0] for b in batches]), images)
    assert np.concatenate([b[1] for b in batches]).tolist() == labels.tolist()
    bad_shape = _loader_config({"tfrecord": {"path": str(tmp_path / "part-*.tfrecord"),
                                             "features": {"image": {"shape": [4], "dtype": "float32"}}}})
    with pytest.raises(ConfigError, match=r"dataset\.tfrecord\.features.*do not match"):
        data.create_dataloader(bad_shape)
    nothing = _loader_config({"tfrecord": {"path": str(tmp_path / "none-*.tfrecord"),
                                           "features": {"image": {"shape": [2, 3], "dtype": "float32"}}}})
    with pytest.raises(ConfigError, match=r"dataset\.tfrecord\.path.*no file matches"):
        data.create_dataloader(nothing)
