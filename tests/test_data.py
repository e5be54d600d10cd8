"""Tests for esp_tf.data and the embedded fashion_mnist_mini dataset (all offline)."""
import collections
import socket
import sys
import time

import numpy as np
import pytest

from conftest import REPO
import tensorflow as tf
import tensorflow_datasets as tfds

from esp_tf import data

NPZ = REPO / "esp_tf" / "datasets" / "fashion_mnist_mini" / "fashion_mnist_mini.npz"
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Any attempt to open a network connection fails loudly instead of hanging."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"test tried to use the network: {args}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def mini(mini_dir):
    return data.load("fashion_mnist_mini", mini_dir)


@pytest.fixture(scope="module")
def sampler(mini):
    return data.ClassBalancedSampler(mini)


def _class_of_image(real):
    """Map image bytes -> set of classes it appears in (train split)."""
    table = collections.defaultdict(set)
    for image, label in zip(real.train_images, real.train_labels):
        table[image.tobytes()].add(int(label))
    return table


def _assert_images_belong_to_labels(images_u8, labels, real):
    table = _class_of_image(real)
    for image, label in zip(np.asarray(images_u8), np.asarray(labels)):
        assert int(label) in table.get(image.tobytes(), set()), "image not a train image of its class"


def test_embedded_dataset_prepares_offline_with_ten_balanced_classes(tmp_path, monkeypatch):
    import socket
    import esp_tf.datasets  # noqa: F401  (registers the builder)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    # Any connection attempt fails the test (TFDS would otherwise retry the network for minutes).
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    builder = tfds.builder("fashion_mnist_mini", data_dir=str(tmp_path))
    train, test = tfds.as_numpy(tfds.load("fashion_mnist_mini", data_dir=str(tmp_path),
                                          split=["train", "test"], as_supervised=True,
                                          batch_size=-1))
    assert builder.info.version == "1.0.0"
    assert tuple(builder.info.features["label"].names) == FASHION_NAMES
    assert builder.info.supervised_keys == ("image", "label")
    for (images, labels), per_class in ((train, 300), (test, 200)):
        assert images.shape == (10 * per_class, 28, 28, 1) and images.dtype == np.uint8
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
    shipped = np.load(NPZ)
    np.testing.assert_array_equal(train[0], shipped["train_images"])
    np.testing.assert_array_equal(test[1], shipped["test_labels"])


def test_embedded_package_files_are_small_and_licensed():
    folder = NPZ.parent
    assert NPZ.stat().st_size < 2.5e6
    assert "Copyright 2017 Zalando SE" in (folder / "LICENSE").read_text()
    assert "MIT" in (folder / "LICENSE").read_text()


def test_load_returns_class_sorted_data_with_known_normalisation(mini):
    shipped = np.load(NPZ)
    assert mini.num_classes == 10 and mini.class_names == FASHION_NAMES
    assert mini.image_shape == (28, 28, 1)
    assert mini.train_images.dtype == np.uint8 and mini.train_labels.dtype == np.int32
    assert mini.test_labels.dtype == np.int32
    assert np.all(np.diff(mini.train_labels) >= 0)
    assert mini.train_counts.tolist() == [300] * 10
    # Stable sort: within a class, the stored (npz) order is kept.
    order = np.argsort(shipped["train_labels"], kind="stable")
    np.testing.assert_array_equal(mini.train_images, shipped["train_images"][order])
    np.testing.assert_allclose(mini.mean, [0.2861]) and np.testing.assert_allclose(mini.std, [0.3530])
    assert mini.mean.dtype == np.float32 and mini.std.dtype == np.float32


def test_max_per_class_keeps_the_first_examples_of_each_class(mini, mini_dir):
    small = data.load("fashion_mnist_mini", mini_dir, max_train_per_class=7, max_test_per_class=3)
    assert small.train_counts.tolist() == [7] * 10
    assert np.bincount(small.test_labels).tolist() == [3] * 10
    for c in range(10):
        np.testing.assert_array_equal(small.train_images[small.train_labels == c],
                                      mini.train_images[mini.train_labels == c][:7])
    with pytest.raises(ValueError, match="max_train_per_class"):
        data.load("fashion_mnist_mini", mini_dir, max_train_per_class=0)


def test_missing_dataset_fails_fast_naming_data_dir_and_present_datasets(tmp_path):
    (tmp_path / "some_other_ds").mkdir()
    start = time.time()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("cifar10", str(tmp_path))
    assert time.time() - start < 5
    message = str(info.value)
    assert "cifar10" in message and str(tmp_path) in message
    assert "some_other_ds" in message and "tfds build cifar10" in message


def test_missing_dataset_in_default_data_dir_names_tfds_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path)):
        data.load("mnist")


def test_tfds_own_not_found_errors_are_wrapped(tmp_path):
    (tmp_path / "cifar10").mkdir()  # folder exists but holds no prepared version
    (tmp_path / "not_a_registered_ds").mkdir()
    start = time.time()
    for name in ("cifar10", "not_a_registered_ds"):
        with pytest.raises(data.DatasetNotFoundError, match=name):
            data.load(name, str(tmp_path))
    assert time.time() - start < 5


def test_unprepared_version_is_reported(mini_dir):
    with pytest.raises(data.DatasetNotFoundError, match="version 9.9.9"):
        data.load("fashion_mnist_mini:9.9.9", mini_dir)  # TFDS error, wrapped


def test_normalize_denormalize_round_trip_is_exact_on_uint8():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    for mean, std in data._KNOWN_NORMALIZATION.values():
        images = np.repeat(pixels, len(mean), axis=-1)
        x = data.normalize(images, mean, std)
        assert x.dtype == tf.float32
        np.testing.assert_allclose(x.numpy()[0, 0, 0], (0 / 255 - np.array(mean)) / np.array(std),
                                   rtol=1e-6)
        back = data.denormalize(x, mean, std)
        assert back.dtype == tf.uint8
        np.testing.assert_array_equal(back.numpy(), images)
    assert data.denormalize(tf.constant([1e3, -1e3]), [0.5], [0.5]).numpy().tolist() == [255, 0]


def test_sampler_returns_per_class_images_of_each_class_without_repeats(mini, sampler):
    images, labels = sampler.sample(tf.constant([3, 4], tf.int64), 6)
    assert images.shape == (60, 28, 28, 1) and images.dtype == tf.float32
    assert labels.dtype == tf.int32 and labels.numpy().tolist() == np.repeat(range(10), 6).tolist()
    pixels = data.denormalize(images, mini.mean, mini.std).numpy()
    _assert_images_belong_to_labels(pixels, labels, mini)
    assert len({p.tobytes() for p in pixels}) == 60  # without replacement (classes have 300)


def test_sampler_same_seed_same_batch_different_seed_different_batch(sampler):
    a, _ = sampler.sample(tf.constant([1, 2]), 5)
    b, _ = sampler.sample(tf.constant([1, 2]), 5)
    c, _ = sampler.sample(tf.constant([1, 3]), 5)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


def test_sampler_cycles_a_random_permutation_when_a_class_is_too_small():
    images = np.arange(7, dtype=np.uint8).reshape(7, 1, 1, 1)
    real = data.RealData("tiny", images, np.array([0, 0, 1, 1, 1, 1, 1], np.int32),
                         images, np.zeros(7, np.int32), ("a", "b"),
                         np.zeros(1, np.float32), np.ones(1, np.float32))
    x, labels = data.ClassBalancedSampler(real).sample(tf.constant([0, 7]), 4)
    values = data.denormalize(x, real.mean, real.std).numpy().ravel().tolist()
    assert labels.numpy().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sorted(values[:4]) == [0, 0, 1, 1]  # 2 images, each exactly twice
    assert len(set(values[4:])) == 4 and set(values[4:]) <= {2, 3, 4, 5, 6}


def test_sampler_traces_once_in_tf_function_and_picks_the_eager_images(mini, sampler):
    fn = tf.function(lambda seed: sampler.sample(seed, 3))
    for s in range(3):
        seed = tf.constant([s, 11])
        graph, eager = fn(seed)[0], sampler.sample(seed, 3)[0]
        # Same images; the float arithmetic may differ by an ulp once graph-optimised.
        np.testing.assert_allclose(graph.numpy(), eager.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(data.denormalize(graph, mini.mean, mini.std),
                                      data.denormalize(eager, mini.mean, mini.std))
    assert fn.experimental_get_tracing_count() == 1


def test_sampler_compiles_with_xla_and_stays_valid_and_deterministic(mini, sampler):
    # XLA's stateless RNG is a different stream from the TF kernels on CPU, so a jit-compiled
    # batch differs from the eager one for the same seed; it is valid and deterministic.
    fn = tf.function(lambda seed: sampler.sample(seed, 4), jit_compile=True)
    images, labels = fn(tf.constant([5, 6]))
    again, _ = fn(tf.constant([5, 6]))
    other, _ = fn(tf.constant([5, 7]))
    np.testing.assert_array_equal(images.numpy(), again.numpy())
    assert not np.array_equal(images.numpy(), other.numpy())
    pixels = data.denormalize(images, mini.mean, mini.std).numpy()
    _assert_images_belong_to_labels(pixels, labels, mini)
    assert len({p.tobytes() for p in pixels}) == 40


def test_random_subset_is_distinct_class_major_and_deterministic(mini, sampler):
    images, labels = sampler.random_subset(seed=1, per_class=20)
    assert images.dtype == np.uint8 and labels.dtype == np.int32 and images.shape == (200, 28, 28, 1)
    assert labels.tolist() == np.repeat(range(10), 20).tolist()
    _assert_images_belong_to_labels(images, labels, mini)
    assert len({im.tobytes() for im in images}) == 200
    np.testing.assert_array_equal(images, sampler.random_subset(seed=1, per_class=20)[0])
    assert not np.array_equal(images, sampler.random_subset(seed=2, per_class=20)[0])
    with pytest.raises(ValueError, match="per_class=301"):
        sampler.random_subset(seed=0, per_class=301)


def test_train_dataset_covers_each_train_image_exactly_once_per_epoch(mini):
    batches = list(data.train_dataset(mini, batch_size=256, seed=0))
    assert [len(y) for _, y in batches] == [256] * 11 + [3000 - 11 * 256]
    x = np.concatenate([data.denormalize(b, mini.mean, mini.std).numpy() for b, _ in batches])
    y = np.concatenate([l.numpy() for _, l in batches])
    assert batches[0][0].dtype == tf.float32 and y.dtype == np.int32
    got = sorted(zip((im.tobytes() for im in x), y.tolist()))
    want = sorted(zip((im.tobytes() for im in mini.train_images), mini.train_labels.tolist()))
    assert got == want
    assert not np.array_equal(y, mini.train_labels)  # shuffled
    again = np.concatenate([l.numpy() for _, l in data.train_dataset(mini, 256, seed=0)])
    other = np.concatenate([l.numpy() for _, l in data.train_dataset(mini, 256, seed=1)])
    np.testing.assert_array_equal(y, again)
    assert not np.array_equal(y, other)


def test_test_dataset_is_the_normalised_test_split_in_order(mini):
    batches = list(data.test_dataset(mini, batch_size=300))
    assert len(batches) == 7 and len(batches[-1][1]) == 200
    x = np.concatenate([data.denormalize(b, mini.mean, mini.std).numpy() for b, _ in batches])
    np.testing.assert_array_equal(x, mini.test_images)
    np.testing.assert_array_equal(np.concatenate([l for _, l in batches]), mini.test_labels)


@pytest.mark.slow
def test_cifar10_loads_from_shared_data_dir(shared_tfds_dir):
    real = data.load("cifar10:3.0.2", shared_tfds_dir)
    assert real.image_shape == (32, 32, 3) and real.train_counts.tolist() == [5000] * 10
    assert np.bincount(real.test_labels).tolist() == [1000] * 10
    assert real.class_names[0] == "airplane" and real.class_names[-1] == "truck"
    np.testing.assert_allclose(real.mean, [0.4914, 0.4822, 0.4465])
    np.testing.assert_allclose(real.std, [0.2023, 0.1994, 0.2010])
    assert np.all(np.diff(real.train_labels) >= 0)
    images, labels = data.ClassBalancedSampler(real).sample(tf.constant([0, 1]), 2)
    assert images.shape == (20, 32, 32, 3)
    _assert_images_belong_to_labels(data.denormalize(images, real.mean, real.std), labels, real)


@pytest.mark.slow
def test_embedded_npz_is_reproduced_by_its_build_script(shared_tfds_dir, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import make_embedded_dataset
    finally:
        sys.path.remove(str(REPO / "tools"))
    out = tmp_path / "mini.npz"
    assert make_embedded_dataset.main(["--data_dir", shared_tfds_dir, "--out", str(out)]) == 0
    rebuilt, shipped = np.load(out), np.load(NPZ)
    assert sorted(rebuilt.files) == sorted(shipped.files)
    for key in shipped.files:
        np.testing.assert_array_equal(rebuilt[key], shipped[key])


def test_pixel_range_is_0_and_255_normalised_and_rounding_is_not_counted_as_outside():
    from conftest import fake_real
    real = fake_real(2, 4, 1, per_class=2)                       # mean 0.5, std 0.25
    lo, hi = data.pixel_range(real)
    np.testing.assert_allclose([lo[0], hi[0]], [-2.0, 2.0])
    x = data.normalize(real.train_images, real.mean, real.std).numpy()
    assert data.fraction_outside_pixel_range(x, real) == 0
    step = 1.0 / 255.0 / 0.25                                    # one gray level, normalised
    assert data.fraction_outside_pixel_range(np.array([2.0 + 0.4 * step, -2.0 - 0.4 * step]), real) == 0
    assert data.fraction_outside_pixel_range(np.array([2.0 + step, 0.0, -2.0 - step, 1.0]), real) == 0.5


def test_validation_split_is_class_balanced_disjoint_from_train_and_fixed(mini, mini_dir):
    held = data.load("fashion_mnist_mini", mini_dir, val_per_class=7)
    assert np.array_equal(np.bincount(held.val_labels), np.full(10, 7))
    assert len(held.train_labels) + len(held.val_labels) == len(mini.train_labels)
    assert np.all(np.diff(held.train_labels) >= 0) and np.all(np.diff(held.val_labels) >= 0)
    # every image ends up in exactly one of the two splits (as multisets of raw bytes)
    as_rows = lambda x: sorted(map(bytes, x.reshape(len(x), -1)))
    assert as_rows(np.concatenate([held.train_images, held.val_images])) == as_rows(mini.train_images)
    again = data.load("fashion_mnist_mini", mini_dir, val_per_class=7)
    assert np.array_equal(again.val_images, held.val_images)       # fixed seed: same split each time
    assert held.train_identity != mini.train_identity == "fashion_mnist_mini"
    assert len(mini.val_labels) == 0 and data.val_dataset(mini) is None
    with pytest.raises(ValueError, match="val_per_class"):
        data.load("fashion_mnist_mini", mini_dir, val_per_class=300)  # 300 per class: none left


def test_processes_started_together_on_a_fresh_machine_all_get_the_embedded_dataset(tmp_path):
    """Cluster workers start at once; preparing the embedded set must not fail in all but one
    (TFDS alone fails the loser with 'Cannot rename ... already exists')."""
    import subprocess
    import sys
    code = ("from esp_tf import data; d = data.load('fashion_mnist_mini', %r); "
            "print('ok', len(d.train_labels))" % str(tmp_path / "tfds"))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.startswith("ok 3000"), err[-2000:]
