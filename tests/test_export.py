"""Properties of esp_tf.export: grid layout, lossless PNGs, and a TFDS export that a fresh
process without esp_tf can read back byte-exact (tfds.load as_supervised and
builder_from_directory), replacing previous exports cleanly."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from esp_tf import export

CLASS_NAMES = ["tee", "trouser", "pullover"]
METADATA = {"source": "fashion_mnist", "method": "esp", "ipc": 2, "accuracy": np.float32(0.5),
            "flags": {"lr": 0.01, "zca": False, "seeds": [0, 1]}}
METADATA_JSON = {"source": "fashion_mnist", "method": "esp", "ipc": 2, "accuracy": 0.5,
                 "flags": {"lr": 0.01, "zca": False, "seeds": [0, 1]}}


def _toy(n=6, h=5, w=4, c=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    labels = np.array([2, 0, 1, 0, 2, 1][:n])
    normalized = (images.astype(np.float32) - 127.5) / 63.7 + np.float32(1e-7)
    return images, labels, normalized


# ---------------------------------------------------------------- image_grid
@pytest.mark.parametrize("channels", [1, 3])
def test_grid_rows_are_classes_in_input_order_with_white_padding(channels):
    h, w, pad = 3, 2, 2
    labels = np.array([1, 0, 1, 1, 0])          # class 2 has no images: blank row
    images = np.stack([np.full((h, w, channels), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = export.image_grid(images, labels, num_classes=3, pad=pad)
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * (h + pad) + pad, 3 * (w + pad) + pad, channels)
    expected = {0: [1, 4], 1: [0, 2, 3], 2: []}  # image indices per row, in input order
    mask = np.ones(grid.shape[:2], bool)         # True where no image was placed
    for row, idx in expected.items():
        for col in range(3):
            y, x = pad + row * (h + pad), pad + col * (w + pad)
            cell = grid[y:y + h, x:x + w]
            want = images[idx[col]] if col < len(idx) else np.full_like(cell, 255)
            np.testing.assert_array_equal(cell, want)
            mask[y:y + h, x:x + w] = col >= len(idx)
    assert np.all(grid[mask] == 255)


def test_grid_max_per_class_truncates_columns():
    images = np.stack([np.full((2, 2, 1), i, np.uint8) for i in range(6)])
    labels = np.array([0, 0, 0, 1, 1, 1])
    grid = export.image_grid(images, labels, num_classes=2, pad=1, max_per_class=2)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 4, 0] == 1 and grid[4, 4, 0] == 4


def test_grid_rejects_labels_outside_num_classes():
    with pytest.raises(ValueError):
        export.image_grid(np.zeros((2, 2, 2, 1), np.uint8), np.array([0, 3]), num_classes=3)


# ---------------------------------------------------------------- save_png
@pytest.mark.parametrize("channels", [1, 3])
def test_save_png_round_trips_exactly_and_leaves_no_temp_files(tmp_path, channels):
    image = np.random.default_rng(1).integers(0, 256, (7, 9, channels), dtype=np.uint8)
    path = tmp_path / "a" / "b" / "grid.png"
    assert export.save_png(np.zeros_like(image), str(path)) == str(path)
    export.save_png(image, str(path))  # overwrite in place
    decoded = tf.io.decode_png(tf.io.read_file(str(path)), channels=channels).numpy()
    np.testing.assert_array_equal(decoded, image)
    assert os.listdir(path.parent) == ["grid.png"]


# ---------------------------------------------------------------- export_tfds
_READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow_datasets as tfds
    data_dir, path, out = sys.argv[1:4]
    ds, info = tfds.load("esp_toy", data_dir=data_dir, split="train", as_supervised=True,
                         download=False, with_info=True)
    pairs = list(tfds.as_numpy(ds))
    builder = tfds.builder_from_directory(path)
    rows = list(tfds.as_numpy(builder.as_dataset(split="train")))
    np.savez(out + ".npz",
             sup_images=np.stack([x for x, _ in pairs]), sup_labels=np.array([y for _, y in pairs]),
             sup_dtype=str(pairs[0][0].dtype),
             images=np.stack([r["image"] for r in rows]), labels=np.array([r["label"] for r in rows]),
             normalized=np.stack([r["image_normalized"] for r in rows]))
    with open(out + ".json", "w") as f:
        json.dump({"load_names": info.features["label"].names, "load_metadata": dict(info.metadata),
                   "names": builder.info.features["label"].names,
                   "metadata": dict(builder.info.metadata),
                   "supervised_keys": list(builder.info.supervised_keys),
                   "esp_tf_imported": any(m.startswith("esp_tf") for m in sys.modules)}, f)
""")


def test_export_reads_back_byte_exact_in_fresh_process_without_esp_tf(tmp_path):
    images, labels, normalized = _toy()
    data_dir = tmp_path / "tfds"
    path = export.export_tfds(name="esp_toy", data_dir=str(data_dir), images=images,
                              labels=labels, class_names=CLASS_NAMES, metadata=METADATA,
                              images_normalized=normalized)
    assert path == str(data_dir / "esp_toy" / "1.0.0")
    assert sorted(os.listdir(data_dir)) == ["esp_toy"]  # no staging directory left behind
    out = str(tmp_path / "read")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", _READER, str(data_dir), path, out],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out + ".npz")
    with open(out + ".json") as f:
        info = json.load(f)
    assert not info["esp_tf_imported"]
    assert str(got["sup_dtype"]) == "uint8"
    np.testing.assert_array_equal(got["sup_images"], images)   # tfds.load as_supervised, in order
    np.testing.assert_array_equal(got["sup_labels"], labels)
    np.testing.assert_array_equal(got["images"], images)       # builder_from_directory
    np.testing.assert_array_equal(got["labels"], labels)
    assert got["normalized"].dtype == np.float32
    assert got["normalized"].tobytes() == normalized.tobytes()
    assert info["load_names"] == info["names"] == CLASS_NAMES
    assert info["load_metadata"] == info["metadata"] == METADATA_JSON
    assert info["supervised_keys"] == ["image", "label"]


def _read(path):
    builder = tfds.builder_from_directory(path)
    rows = list(tfds.as_numpy(builder.as_dataset(split="train")))
    return builder.info, np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows])


def test_reexport_same_name_replaces_previous_export_entirely(tmp_path):
    data_dir = str(tmp_path)
    images, labels, normalized = _toy()
    export.export_tfds(name="esp_toy", data_dir=data_dir, images=images, labels=labels,
                       class_names=CLASS_NAMES, metadata={"run": 1}, images_normalized=normalized)
    images2, labels2, _ = _toy(n=4, h=6, w=6, c=1, seed=3)
    path = export.export_tfds(name="esp_toy", data_dir=data_dir, images=images2, labels=labels2,
                              class_names=["x", "y", "z"], metadata={"run": 2})
    info, got_images, got_labels = _read(path)
    np.testing.assert_array_equal(got_images, images2)
    np.testing.assert_array_equal(got_labels, labels2)
    assert "image_normalized" not in info.features
    assert info.features["label"].names == ["x", "y", "z"]
    assert dict(info.metadata) == {"run": 2}
    assert sorted(os.listdir(tmp_path)) == ["esp_toy"]
    assert sorted(os.listdir(tmp_path / "esp_toy")) == ["1.0.0"]


def test_failed_export_keeps_previous_export_and_leaves_no_debris(tmp_path, monkeypatch):
    data_dir = str(tmp_path)
    images, labels, _ = _toy()
    path = export.export_tfds(name="esp_toy", data_dir=data_dir, images=images, labels=labels,
                              class_names=CLASS_NAMES, metadata={"run": 1})

    def broken(self, ds):
        yield next(iter(ds))
        raise RuntimeError("disk full")

    monkeypatch.setattr(export._CondensedBuilder, "_generate_examples_iterator", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_tfds(name="esp_toy", data_dir=data_dir, images=images[:2], labels=labels[:2],
                           class_names=CLASS_NAMES, metadata={"run": 2})
    info, got_images, _ = _read(path)
    np.testing.assert_array_equal(got_images, images)
    assert dict(info.metadata) == {"run": 1}
    assert sorted(os.listdir(tmp_path)) == ["esp_toy"]


@pytest.mark.parametrize("bad", [{"name": "Esp-Toy"}, {"name": "mnist"},
                                 {"metadata": {"f": object()}}, {"labels": np.array([0, 5])}])
def test_invalid_export_arguments_fail_before_writing(tmp_path, bad):
    kwargs = dict(name="esp_toy", data_dir=str(tmp_path / "d"), images=np.zeros((2, 2, 2, 1),
                  np.uint8), labels=np.array([0, 1]), class_names=CLASS_NAMES, metadata={})
    kwargs.update(bad)
    with pytest.raises((ValueError, TypeError)):
        export.export_tfds(**kwargs)
    assert not (tmp_path / "d").exists()
