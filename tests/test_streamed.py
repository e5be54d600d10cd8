"""Real data streamed from a memory-mapped cache (esp_tf/streamed.py) against the same data in memory."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import tiny_net
from esp_tf import data, streamed


class EspTfStreamTest(tfds.core.GeneratorBasedBuilder):
    """A dataset made here: 3 classes of random 8x8 RGB images in shuffled stored order, of a
    name with no known normalisation (the channel statistics come from its train split)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3)),
                                                 "label": tfds.features.ClassLabel(num_classes=3)}),
            supervised_keys=("image", "label"), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 5000), "test": self._generate_examples(1, 40)}

    def _generate_examples(self, seed, n):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 3, n)
        for i in range(n):
            # class-dependent brightness, so the draws of a class are recognisable
            image = rng.integers(0, 80, (8, 8, 3)) + 80 * labels[i]
            yield i, {"image": image.astype(np.uint8), "label": int(labels[i])}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("esp_tf_stream_test", data_dir=path).download_and_prepare()
    data.load("fashion_mnist_mini", path)            # prepares the embedded dataset there too
    return path


def _never_whole(monkeypatch):
    """Reading a whole split fails the test: streamed loading reads chunks only."""
    def whole(*a, **k):
        raise AssertionError("a whole split was read into memory")
    monkeypatch.setattr(data, "_read_split", whole)


def _same(a, b):
    for field in ("train_images", "train_labels", "val_images", "val_labels", "test_images",
                  "test_labels", "mean", "std"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.class_names == b.class_names and a.train_identity == b.train_identity


@pytest.mark.parametrize("name, kw", [
    ("esp_tf_stream_test", {}),
    ("esp_tf_stream_test", {"val_per_class": 30, "max_train_per_class": 900, "max_test_per_class": 7}),
    ("fashion_mnist_mini", {"val_per_class": 20}),
])
def test_streamed_arrays_equal_the_arrays_in_memory_and_no_split_is_read_whole(
        name, kw, data_dir, tmp_path, monkeypatch):
    whole = data.load(name, data_dir, **kw)
    _never_whole(monkeypatch)
    streamed_data = data.load(name, data_dir, real_data="stream", cache_dir=str(tmp_path), **kw)
    assert streamed_data.streamed and not whole.streamed
    assert isinstance(streamed_data.test_images, np.memmap)
    _same(whole, streamed_data)


def test_the_cache_is_written_once_then_read_and_a_damaged_one_is_moved_aside(data_dir, tmp_path, monkeypatch):
    whole = data.load("esp_tf_stream_test", data_dir)
    first = data.load("esp_tf_stream_test", data_dir, real_data="stream", cache_dir=str(tmp_path))
    folder = os.path.dirname(first.train_images.filename)
    monkeypatch.setattr(streamed, "_write_split", lambda *a, **k: pytest.fail("cache written twice"))
    _same(whole, data.load("esp_tf_stream_test", data_dir, real_data="stream", cache_dir=str(tmp_path)))
    monkeypatch.undo()
    del first                   # no live map of the file we damage (reading one past its end: SIGBUS)
    with open(os.path.join(folder, "train.u8"), "r+b") as f:   # truncated, as by a full disk
        f.truncate(100)
    _same(whole, data.load("esp_tf_stream_test", data_dir, real_data="stream", cache_dir=str(tmp_path)))
    aside = [p for p in os.listdir(tmp_path) if ".bad-" in p]
    assert len(aside) == 1 and os.path.getsize(tmp_path / aside[0] / "train.u8") == 100   # kept, not deleted
    with open(os.path.join(folder, "meta.json")) as f:
        assert json.load(f)["key"]["dataset"].startswith("esp_tf_stream_test")


def test_other_settings_get_their_own_cache(data_dir, tmp_path):
    a = data.load("esp_tf_stream_test", data_dir, real_data="stream", cache_dir=str(tmp_path))
    b = data.load("esp_tf_stream_test", data_dir, real_data="stream", cache_dir=str(tmp_path), val_per_class=5)
    assert os.path.dirname(a.train_images.filename) != os.path.dirname(b.train_images.filename)
    assert len(b.train_labels) == len(a.train_labels) - 15


def test_auto_streams_only_what_exceeds_its_share_of_memory(monkeypatch):
    assert not streamed.choose("auto", 10 << 20) and streamed.choose("stream", 1)
    monkeypatch.setattr(streamed, "physical_memory", lambda: 64 << 20)
    assert streamed.choose("auto", 10 << 20) and not streamed.choose("memory", 10 << 20)
    with pytest.raises(ValueError, match="real_data must be one of"):
        streamed.choose("disk", 1)


def test_sampler_train_and_test_batches_are_the_same_from_the_memory_map(data_dir, tmp_path):
    whole = data.load("esp_tf_stream_test", data_dir, val_per_class=10)
    mapped = data.load("esp_tf_stream_test", data_dir, real_data="stream", cache_dir=str(tmp_path),
                       val_per_class=10)
    seed = tf.constant([3, 4], tf.int64)
    a, b = data.ClassBalancedSampler(whole), data.ClassBalancedSampler(mapped)
    for part in (None, (1, 2)):
        for run in (lambda f: f, tf.function):          # eagerly, and in a graph as the steps do
            xa, ya = run(lambda s, p=part: a.sample(s, 8, p))(seed)
            xb, yb = run(lambda s, p=part: b.sample(s, 8, p))(seed)
            np.testing.assert_array_equal(xa.numpy(), xb.numpy())
            np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    np.testing.assert_array_equal(a.random_subset(1, 4)[0], b.random_subset(1, 4)[0])
    for make in (lambda d: data.train_dataset(d, 64, seed=5), lambda d: data.test_dataset(d, 16),
                 lambda d: data.val_dataset(d, 7)):
        got, want = list(make(mapped)), list(make(whole))
        assert len(got) == len(want)
        for (x1, y1), (x2, y2) in zip(got, want):
            np.testing.assert_array_equal(x1.numpy(), x2.numpy())
            np.testing.assert_array_equal(y1.numpy(), y2.numpy())


@pytest.mark.parametrize("method", ["dm", "esp"])
def test_a_streamed_condensation_makes_the_same_set_as_one_in_memory(method, data_dir, tmp_path):
    from esp_tf import condense, experts, methods
    whole = data.load("esp_tf_stream_test", data_dir, max_train_per_class=200)
    mapped = data.load("esp_tf_stream_test", data_dir, max_train_per_class=200, real_data="stream",
                       cache_dir=str(tmp_path / "cache"))
    trajectories = None
    if methods.get(method).needs_trajectories:     # experts trained on each: equal too
        config = experts.ExpertConfig(epochs=2, batch_size=64, lr=0.01)
        runs = [np.stack(experts.train_expert(tiny_net(8, 3, 3), d, config, seed=0)[0]) for d in (whole, mapped)]
        np.testing.assert_array_equal(runs[0], runs[1])
        trajectories = runs[0][None]
    config = methods.get(method).Config(real_per_class=16)
    sets = []
    for name, real in (("whole", whole), ("mapped", mapped)):
        s = condense.CondenseSettings(workdir=str(tmp_path / name), method=method, method_config=config,
                                      ipc=2, iterations=3, max_start_epoch=1, segment_length=1, ckpt_every=2)
        sets.append(condense.run(real, tiny_net(8, 3, 3), trajectories, s)[0])
    np.testing.assert_allclose(sets[0], sets[1], rtol=0, atol=1e-6)


def test_the_command_line_streams_and_a_run_resumes_with_the_data_in_memory(data_dir, tmp_path):
    """--real_data changes where the images live, not the run: a streamed run makes the set a run
    with the data in memory makes, and its workdir resumes under --real_data=memory."""
    import contextlib
    import io
    from esp_tf import cli, pipeline
    tiny = dict(data_dir=data_dir, download=False, method="dm", iterations=3, real_per_class=4, ipc=1,
                eval_epochs=2, eval_runs=1, width=8, depth=2, log_every=1, ckpt_every=1, baselines=[],
                phases=["condense", "evaluate"], real_cache_dir=str(tmp_path / "cache"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pipeline.run(cli.settings(real_data="stream", **tiny), str(tmp_path / "a"))
        pipeline.run(cli.settings(real_data="memory", **tiny), str(tmp_path / "b"))
        before = (tmp_path / "a" / "eval.json").read_text()
        pipeline.run(cli.settings(real_data="memory", **tiny), str(tmp_path / "a"))   # no refusal
    assert "streamed from" in printed.getvalue() and "already in eval.json" in printed.getvalue()
    assert (tmp_path / "a" / "eval.json").read_text() == before
    a, b = (np.load(tmp_path / w / "synthetic.npz") for w in "ab")
    np.testing.assert_allclose(a["images"], b["images"], rtol=0, atol=1e-6)


def test_a_cache_that_cannot_be_written_is_one_line_naming_the_flag(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for where, words in ((blocker / "cache", "--real_cache_dir"), ("gs://bucket/cache", "local")):
        with pytest.raises(streamed.StreamError, match=words):
            data.load("esp_tf_stream_test", data_dir, real_data="stream", cache_dir=str(where))
    assert blocker.read_text() == "not a folder"


def test_a_dataset_whose_images_cannot_be_streamed_is_one_line_with_the_fix(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(streamed, "split_bytes", lambda *a: None)       # images of varying size
    with pytest.raises(streamed.StreamError, match="--real_data=memory"):
        data.load("esp_tf_stream_test", data_dir, real_data="stream", cache_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())                                 # nothing written
    assert not data.load("esp_tf_stream_test", data_dir, cache_dir=str(tmp_path)).streamed   # auto: memory
