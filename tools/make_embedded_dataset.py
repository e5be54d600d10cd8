#!/usr/bin/env python
"""Build the embedded ``fashion_mnist_mini`` subset shipped inside the esp_tf package.

Why: tests and quick demos need a real (not synthetic) dataset that is available with no
network and no external data directory. This script takes, from the prepared TFDS
``fashion_mnist`` (3.0.1), the first 300 train and the first 200 test images of every class in
TFDS stored order and writes them to a compressed ``.npz`` next to the builder
(``esp_tf/datasets/fashion_mnist_mini/fashion_mnist_mini.npz``).

The output is deterministic: TFDS stored order is fixed, no shuffling is involved, and the
npz holds only uint8 images ``[N, 28, 28, 1]`` and int64 labels ``[N]`` (arrays
``train_images``, ``train_labels``, ``test_images``, ``test_labels``), kept in stored order.

Usage (from the repo root)::

    python tools/make_embedded_dataset.py [--data_dir ../shared/data/tfds] [--out PATH]
"""
import argparse
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "tfds"
DEFAULT_OUT = REPO / "esp_tf" / "datasets" / "fashion_mnist_mini" / "fashion_mnist_mini.npz"
SOURCE = "fashion_mnist:3.0.1"
NUM_CLASSES = 10
PER_CLASS = {"train": 300, "test": 200}


def first_per_class(images: np.ndarray, labels: np.ndarray, per_class: int):
    """Keep the first ``per_class`` examples of each class, preserving the original order."""
    keep = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} examples, need {per_class}")
        keep[idx[:per_class]] = True
    return images[keep], labels[keep]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR),
                        help="TFDS data_dir holding fashion_mnist/3.0.1 (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output .npz (default: %(default)s)")
    args = parser.parse_args(argv)

    if not (pathlib.Path(args.data_dir) / "fashion_mnist" / "3.0.1").is_dir():
        parser.error(f"fashion_mnist/3.0.1 not found under --data_dir {args.data_dir}")

    import tensorflow_datasets as tfds  # imported late: slow, and only needed here

    arrays = {}
    for split, per_class in PER_CLASS.items():
        images, labels = tfds.as_numpy(tfds.load(
            SOURCE, split=split, data_dir=args.data_dir, download=False,
            as_supervised=True, batch_size=-1, shuffle_files=False))
        images, labels = first_per_class(images, labels, per_class)
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1), images.shape
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.astype(np.int64)
        print(f"{split}: {len(labels)} examples, counts {np.bincount(labels).tolist()}")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
