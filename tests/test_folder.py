"""Your own images: --dataset=folder:<dir> (esp_tf/folder.py), from files made here."""

import numpy as np
import pytest
from PIL import Image

from conftest import run_python
from esp_tf import data as data_lib, folder

COLOURS = {"cat": (200, 40, 40), "dog": (40, 40, 200), "owl": (40, 200, 40)}


def _make(root, per_class=5, size=(20, 24), split=None, grey=False):
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        d = root / (split or "") / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.normal(0, 20, (*size, 3)) + colour).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(pixels).convert("L") if grey else Image.fromarray(pixels)
            image.save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_a_folder_loads_with_sorted_classes_and_a_seeded_class_balanced_test_split(tmp_path):
    root = _make(tmp_path / "pets")
    real = data_lib.load(f"folder:{root}")
    assert real.class_names == ("cat", "dog", "owl") and real.image_shape == (20, 24, 3)
    assert list(real.train_counts) == [4, 4, 4] and list(np.bincount(real.test_labels)) == [1, 1, 1]
    again = data_lib.load(f"folder:{root}")
    np.testing.assert_array_equal(real.test_images, again.test_images)
    red = real.train_images[real.train_labels == 0].mean(axis=(0, 1, 2))
    assert red[0] > 150 and red[2] < 90                    # class 0 is the red "cat" folder
    small = data_lib.load(folder.name_for(str(root), 16))   # resized: the size is in the name
    assert small.image_shape == (16, 16, 3) and small.name.endswith("@16x16")


def test_given_train_and_test_splits_are_used_and_grey_folders_stay_one_channel(tmp_path):
    root = _make(tmp_path / "g", per_class=3, split="train", grey=True)
    _make(root, per_class=2, split="test", grey=True)
    real = data_lib.load(f"folder:{root}")
    assert real.image_shape == (20, 24, 1) and len(real.train_labels) == 9 and len(real.test_labels) == 6


@pytest.mark.parametrize("damage,match", [
    ("missing", "no such folder"),
    ("empty_class", "hold no images"),
    ("unreadable", "cannot read the image"),
    ("mixed_sizes", "pass --image_size"),
    ("one_class", "at least two"),
])
def test_bad_folders_are_one_clear_error_naming_the_path(tmp_path, damage, match):
    root = _make(tmp_path / "pets")
    if damage == "missing":
        root = tmp_path / "nope"
    elif damage == "empty_class":
        (root / "empty").mkdir()
    elif damage == "unreadable":
        (root / "dog" / "broken.png").write_bytes(b"not an image")
    elif damage == "mixed_sizes":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "owl" / "tiny.png")
    elif damage == "one_class":
        root = tmp_path / "one"
        (root / "only").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "only" / "a.png")
    with pytest.raises(folder.FolderError, match=match):
        data_lib.load(f"folder:{root}")


TINY = ["--num_experts=1", "--expert_epochs=2", "--max_start_epoch=1", "--segment_length=2", "--iterations=2",
        "--inner_steps=1", "--real_per_class=2", "--eval_epochs=2", "--eval_runs=1", "--width=4", "--depth=2",
        "--baselines=", "--eval_arch=convnet_tiny", "--accept_weak_experts"]


def test_a_folder_condenses_end_to_end_and_tfds_load_reads_the_result(tmp_path):
    import tensorflow_datasets as tfds
    root = _make(tmp_path / "pets", size=(20, 24))
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(root / "owl" / "big.png")   # another size
    work = tmp_path / "w"
    out = run_python(["-m", "esp_tf.train", f"--dataset=folder:{root}", "--image_size=16",
                      f"--workdir={work}"] + TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    ds, info = tfds.load("esp_folder_pets_ipc1", data_dir=str(work / "tfds"), split="train", with_info=True)
    images = [x["image"].numpy() for x in ds]
    assert images[0].shape == (16, 16, 3) and info.features["label"].names == ["cat", "dog", "owl"]
    assert info.metadata["source_dataset"] == f"folder:{root}@16x16"
    bad = run_python(["-m", "esp_tf.train", f"--dataset=folder:{tmp_path / 'nope'}",
                      f"--workdir={tmp_path / 'w2'}"] + TINY)
    assert bad.returncode == 2 and "no such folder" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "w2" / "flags.txt").exists()


def test_a_val_split_is_the_test_split_and_non_square_images_are_centre_cropped_before_resizing(tmp_path):
    root = _make(tmp_path / "nette", per_class=2, size=(20, 40), split="train")
    _make(root, per_class=1, size=(20, 40), split="val")
    for name in COLOURS:                     # a marker in the side bands only: cropped away
        for p in (root / "train" / name).iterdir():
            pixels = np.array(Image.open(p))
            pixels[:, :10] = 255
            Image.fromarray(pixels).save(p)
    real = data_lib.load(folder.name_for(str(root), 10))
    assert len(real.test_labels) == 3 and real.image_shape == (10, 10, 3)
    assert real.train_images.max() < 250                     # the white band was outside the square
