r"""Writes a small image-folder dataset (PNG files, one subfolder per class, train/ and test/)
from a prepared TFDS dataset: test data for `--dataset=folder:<dir>`, and the 64x64 benchmark
(BENCHMARKS.md, "Larger images").

    python tools/make_image_folder.py --dataset=cifar10 --data_dir=../shared/data/tfds \
        --train_per_class=100 --test_per_class=50 --out=runs/folders/cifar10_sub

The first images of each class in TFDS order are taken (the same files every time).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

flags.DEFINE_string("dataset", "cifar10", "A prepared TFDS image-classification dataset.")
flags.DEFINE_string("data_dir", None, "Its TFDS data_dir.")
flags.DEFINE_integer("train_per_class", 100, "Training images per class.")
flags.DEFINE_integer("test_per_class", 50, "Test images per class.")
flags.DEFINE_string("out", None, "The folder to write (must not exist yet: nothing is overwritten).")
FLAGS = flags.FLAGS


def main(argv):
    if not FLAGS.out:
        sys.exit("usage: make_image_folder.py --dataset=... --out=<new folder>")
    if os.path.exists(FLAGS.out):
        sys.exit(f"error: {FLAGS.out} exists; give a new folder (nothing is overwritten)")
    from PIL import Image
    from esp_tf import data as data_lib
    real = data_lib.load(FLAGS.dataset, FLAGS.data_dir, max_train_per_class=FLAGS.train_per_class,
                         max_test_per_class=FLAGS.test_per_class)
    names = [n.replace("/", "_") for n in real.class_names]
    for split, images, labels in (("train", real.train_images, real.train_labels),
                                  ("test", real.test_images, real.test_labels)):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(FLAGS.out, split, names[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
                os.path.join(folder, f"{i:06d}.png"))
    print(f"{FLAGS.out}: {len(real.train_labels)} train and {len(real.test_labels)} test images of "
          f"{real.num_classes} classes, {real.image_shape}")


if __name__ == "__main__":
    app.run(main)
