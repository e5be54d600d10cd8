"""TFDS builder for ``fashion_mnist_mini``: 300 train + 200 test images per Fashion-MNIST class.

Why: esp_tf needs a real default dataset that works offline, with no external data directory,
for tests and quick runs. The images ship inside the package as ``fashion_mnist_mini.npz``
(built by ``tools/make_embedded_dataset.py``); this builder only converts that file into TFDS
records, so preparing it never touches the network or the TFDS download manager.
"""
import pathlib

import numpy as np
import tensorflow_datasets as tfds

NPZ_PATH = pathlib.Path(__file__).resolve().parent / "fashion_mnist_mini.npz"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_DESCRIPTION = """\
A small, class-balanced subset of Fashion-MNIST (Zalando Research): the first 300 train and the
first 200 test images of each of the 10 classes, in the stored order of TFDS fashion_mnist 3.0.1
(3,000 train / 2,000 test 28x28 grayscale images). Shipped with esp_tf so that it loads offline.
"""

_CITATION = """\
@article{xiao2017fashionmnist,
  author = {Han Xiao and Kashif Rasul and Roland Vollgraf},
  title = {Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  journal = {arXiv preprint arXiv:1708.07747},
  year = {2017},
}
"""


class FashionMnistMini(tfds.core.GeneratorBasedBuilder):
    """Offline builder reading the npz shipped next to this module."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First 300 train / 200 test images per class of fashion_mnist 3.0.1."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
            supervised_keys=("image", "label"),
            # Keep the npz order (itself fashion_mnist's stored order) instead of hashing keys.
            disable_shuffling=True,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            citation=_CITATION,
            license="MIT (Copyright 2017 Zalando SE); see LICENSE in this folder",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local: the download manager is deliberately unused
        if not NPZ_PATH.is_file():
            raise FileNotFoundError(
                f"embedded data file {NPZ_PATH} is missing: the esp_tf install is incomplete "
                "(regenerate it with tools/make_embedded_dataset.py)")
        with np.load(NPZ_PATH) as arrays:
            data = {k: arrays[k] for k in arrays.files}
        return {
            split: self._generate_examples(data[f"{split}_images"], data[f"{split}_labels"])
            for split in ("train", "test")
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}
