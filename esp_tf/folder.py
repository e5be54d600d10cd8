"""Your own images as a dataset: `--dataset=folder:<dir>`, one subfolder per class.

    <dir>/<class>/*.png|jpg|jpeg|bmp|gif             a seeded, class-balanced test split is held out
    <dir>/train/<class>/...  and  <dir>/test/<class>/...    the given splits are used as they are
                             (or val/ for test/, as ImageNette's imagenette2 archives have it)

Classes are the subfolder names, sorted (label i = the i-th name). Images are decoded by
TensorFlow (`tf.io.decode_image`), kept as uint8 and held in memory like any loaded dataset.
They must share one size, or be resized to `image_size` x `image_size` (`--image_size`; a
non-square image is first cropped to its central square, as ImageNet subsets are prepared;
area-averaging when shrinking, bilinear when growing): the size is then part of the dataset's
name (`folder:<dir>@<H>x<W>`), so experts, exports and `esp_tf.evaluate` see the same images.
Grey images become RGB when any image of the folder has colour; alpha is dropped.
A missing folder, a class without images, a file that does not decode and mixed sizes without
`--image_size` each raise FolderError naming the folder or file and the fix; nothing is written.
"""
from __future__ import annotations

import os
import re

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
PREFIX = "folder:"
TEST_FRACTION = 0.2          # held out per class when the folder has no train/ and test/ splits
SPLIT_SEED = 20231         # the held-out images depend only on this seed and the file names


class FolderError(ValueError):
    """A problem with an image folder dataset; the message names the path and the fix."""


def is_folder(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(name: str) -> tuple[str, tuple[int, int] | None]:
    """`folder:<dir>[@<H>x<W>]` -> (dir, (H, W) or None)."""
    spec = name[len(PREFIX):]
    m = re.fullmatch(r"(.*)@(\d+)x(\d+)", spec)
    if m:
        return m.group(1), (int(m.group(2)), int(m.group(3)))
    return spec, None


def name_for(directory: str, image_size: int | None) -> str:
    """The dataset name of a folder read at `image_size` (None or 0: the images' own size)."""
    directory = os.path.abspath(os.path.expanduser(directory))
    return f"{PREFIX}{directory}" + (f"@{image_size}x{image_size}" if image_size else "")


def short_name(name: str) -> str:
    """A snake_case name for exports: folder_<the folder's name>."""
    base = os.path.basename(parse(name)[0].rstrip("/")) or "root"
    return "folder_" + (re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_") or "images")


def _images_of(class_dir: str) -> list[str]:
    return sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir)
                  if f.lower().endswith(EXTENSIONS) and not f.startswith("."))


def _classes(directory: str) -> dict:
    """Class name -> image paths, for the class subfolders of `directory`."""
    names = sorted(d for d in os.listdir(directory)
                   if os.path.isdir(os.path.join(directory, d)) and not d.startswith("."))
    if len(names) < 2:
        raise FolderError(f"{directory} has {len(names)} class subfolder(s); an image folder dataset needs "
                          "one subfolder per class, at least two (<dir>/<class>/<image>.png)")
    files = {n: _images_of(os.path.join(directory, n)) for n in names}
    empty = [n for n, f in files.items() if not f]
    if empty:
        raise FolderError(f"class folder(s) {', '.join(os.path.join(directory, n) for n in empty[:5])} hold "
                          f"no images ({', '.join(EXTENSIONS)}); add images or remove the folder")
    return files


def _decode(path: str):
    import tensorflow as tf
    try:
        with open(path, "rb") as f:
            image = tf.io.decode_image(f.read(), expand_animations=False)
    except (tf.errors.OpError, OSError) as e:
        why = e.message.splitlines()[0][:150] if isinstance(e, tf.errors.OpError) else str(e)
        raise FolderError(f"cannot read the image {path} ({why}); fix or remove that file") from None
    return image.numpy()                                     # uint8 [H, W, 1|2|3|4]


def _finish(images: list, paths: list, size, channels: int) -> np.ndarray:
    """uint8 [N, H, W, channels]: colour as asked, resized to `size` (or checked to share one)."""
    import tensorflow as tf
    out = []
    for image, path in zip(images, paths):
        if image.shape[-1] in (2, 4):                        # drop alpha
            image = image[..., :-1]
        if channels == 3 and image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        if size is not None and image.shape[:2] != size:
            h, w = image.shape[:2]
            if size[0] == size[1] and h != w:                 # central square first
                side = min(h, w)
                image = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
            shrink = image.shape[0] >= size[0] and image.shape[1] >= size[1]
            image = tf.image.resize(image, size, method="area" if shrink else "bilinear")
            image = np.clip(np.round(image.numpy()), 0, 255).astype(np.uint8)
        out.append(image)
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
        by_shape = {}
        for x, p in zip(out, paths):
            by_shape.setdefault(x.shape, p)
        (s1, p1), (s2, p2) = list(by_shape.items())[:2]
        raise FolderError(f"the images differ in size ({p1} is {s1[0]}x{s1[1]}, {p2} is {s2[0]}x{s2[1]}); "
                          "pass --image_size=<pixels> to resize them all to one square size")
    return np.stack(out)


def read(name: str):
    """(train images uint8 [N, H, W, C], train labels int32, test images, test labels, class
    names) of the image folder dataset `name` (`folder:<dir>[@<H>x<W>]`)."""
    directory, size = parse(name)
    if not os.path.isdir(directory):
        raise FolderError(f"--dataset=folder:{directory}: no such folder; give a folder with one "
                          "subfolder of images per class")
    train_dir, test_dir = os.path.join(directory, "train"), os.path.join(directory, "test")
    if not os.path.isdir(test_dir) and os.path.isdir(os.path.join(directory, "val")):
        test_dir = os.path.join(directory, "val")
    if os.path.isdir(train_dir):
        train = _classes(train_dir)
        test = _classes(test_dir) if os.path.isdir(test_dir) else None
        if test is not None and sorted(test) != sorted(train):
            raise FolderError(f"{test_dir} and {train_dir} have other classes ({sorted(set(test) ^ set(train))[:5]} "
                              "in one only); give both splits the same class folders")
    else:
        train, test = _classes(directory), None
    classes = sorted(train)
    if test is None:                     # a seeded, class-balanced split of every class
        rng = np.random.default_rng(SPLIT_SEED)
        test = {}
        for c in classes:
            files = train[c]
            if len(files) < 2:
                raise FolderError(f"class folder {os.path.dirname(files[0])} has 1 image; a test image is "
                                  "held out of every class, so each needs at least 2 (or give train/ "
                                  "and test/ splits)")
            held = set(rng.choice(len(files), max(1, round(TEST_FRACTION * len(files))), replace=False))
            test[c] = [f for i, f in enumerate(files) if i in held]
            train[c] = [f for i, f in enumerate(files) if i not in held]
    paths = {split: [(f, i) for i, c in enumerate(classes) for f in files[c]]
             for split, files in (("train", train), ("test", test))}
    decoded = {split: [_decode(f) for f, _ in items] for split, items in paths.items()}
    channels = 3 if any(x.shape[-1] >= 3 for xs in decoded.values() for x in xs) else 1
    if size is None:
        sizes = {x.shape[:2] for xs in decoded.values() for x in xs}
        size = sizes.pop() if len(sizes) == 1 else None
    out = []
    for split in ("train", "test"):
        files = [f for f, _ in paths[split]]
        out += [_finish(decoded[split], files, size, channels),
                np.array([label for _, label in paths[split]], np.int32)]
    return (*out, tuple(classes))
