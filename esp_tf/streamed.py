"""Real data larger than memory: a class-sorted uint8 cache on disk, memory-mapped.

Why this design: every consumer of real data (the class-balanced real batch of L_DM, expert
training, evaluation, the random and herding baselines) draws images by index from class-sorted
arrays (`data.RealData`). The cache holds exactly those arrays, written in one streamed pass over
the TFDS split, and `RealData` then holds read-only `np.memmap` views of them instead of arrays in
memory. So a streamed run draws the same images as a run with the arrays in memory, and makes
the same synthetic set (`tests/test_streamed.py`), resumes at any update (the draw of update n is
a pure function of the seed and n, which the state of a `tf.data` shuffle buffer would not be),
and the operating system pages the images in and out as the draws need them. Nothing here
holds a whole split: labels (4 bytes per image) are read first, then images in chunks of
`CHUNK`.

Layout of a cache folder (`<cache_dir>/<dataset>-<key>/`): ``train.u8``, ``val.u8``, ``test.u8``
(raw uint8 [N, H, W, C]), their labels as ``.npy``, and ``meta.json`` last (written once the
arrays are complete; a folder without it is unfinished and is written again). The key is a hash
of what decides the arrays (dataset, version, per-class limits, validation split), so several
runs share one cache. The cache must be on a local disk (a memory map needs one).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
from absl import logging

from esp_tf import choices, data as data_lib

CHUNK = data_lib.STATS_CHUNK   # images per read: the in-memory statistics' chunk, so they are equal
FORMAT = 1
MODES = choices.REAL_DATA


class StreamError(ValueError):
    """Real data cannot be streamed as asked (the cache's folder, the dataset's images); the
    message names the fix."""
# auto streams when the uint8 splits exceed this share of the machine's memory: the in-memory
# path keeps about 2 copies of the train split and a float32 copy of the test split.
AUTO_SHARE = 1 / 8


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def split_bytes(builder, image_key: str, splits: tuple) -> int | None:
    """uint8 bytes of `splits` from the dataset's metadata (None: images of varying size)."""
    shape = builder.info.features[image_key].shape
    if shape is None or any(d is None for d in shape):
        return None
    per_image = int(np.prod(shape))
    return sum(builder.info.splits[s].num_examples for s in splits) * per_image


def choose(mode: str, nbytes: int | None) -> bool:
    """Whether to stream: `mode` 'stream' / 'memory', or 'auto' by size against this machine."""
    if mode not in MODES:
        raise ValueError(f"real_data must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "stream"
    return nbytes is not None and nbytes > AUTO_SHARE * physical_memory()


def _read_labels(builder, split: str, image_key: str, label_key: str) -> np.ndarray:
    """The split's labels in stored order, without decoding a single image."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: tf.cast(ex[label_key], tf.int32)).batch(65536)
    return np.concatenate([b for b in tfds.as_numpy(ds)] or [np.zeros(0, np.int32)])


def _chunks(builder, split: str, image_key: str, label_key: str):
    """(uint8 images [n, H, W, C], int32 labels) chunks of CHUNK images, in stored order."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32))).batch(CHUNK).prefetch(2)
    for images, labels in tfds.as_numpy(ds):
        if images.ndim == 3:
            images = images[..., None]
        yield images, labels


def placement(labels: np.ndarray, limit: int | None, val_per_class: int):
    """Where each stored image goes: (array index [N]: 0 train, 1 val, -1 dropped; position [N]).

    The same order `data.load` makes in memory: a stable sort by class, the first `limit`
    of each class, then `data.validation_mask` on those."""
    order = data_lib.first_per_class_order(labels, limit)
    target, position = np.full(len(labels), -1, np.int64), np.zeros(len(labels), np.int64)
    is_val = (data_lib.validation_mask(labels[order], val_per_class) if val_per_class
              else np.zeros(len(order), bool))
    for index, rows in enumerate((order[~is_val], order[is_val])):
        target[rows], position[rows] = index, np.arange(len(rows))
    return target, position


def _write_split(builder, split, keys, labels, target, position, paths, image_shape, stats):
    """One streamed pass over `split`: image i goes to row position[i] of array target[i]."""
    size = int(np.prod(image_shape))
    files = [open(p, "wb") for p in paths]
    try:
        for f, n in zip(files, [int(np.sum(target == i)) for i in range(len(paths))]):
            f.truncate(n * size)
        seen = 0
        for images, chunk_labels in _chunks(builder, split, *keys):
            if tuple(images.shape[1:]) != tuple(image_shape):
                raise ValueError(f"{split}: an image of shape {images.shape[1:]} among {image_shape}")
            n = len(chunk_labels)
            if not np.array_equal(chunk_labels, labels[seen:seen + n]):
                raise ValueError(f"{split}: the labels changed between two reads of the split")
            if stats is not None:                     # data._channel_stats, chunk by chunk
                data_lib.channel_sums(images, stats)
            for j in np.flatnonzero(target[seen:seen + n] >= 0):
                i = seen + j
                os.pwrite(files[target[i]].fileno(), images[j].tobytes(), int(position[i]) * size)
            seen += n
        if seen != len(labels):
            raise ValueError(f"{split}: {seen} images read, {len(labels)} labels")
    finally:
        for f in files:
            f.close()


def cache_key(full_name: str, limits: tuple, val_per_class: int, val_seed: int, test_split: str) -> dict:
    return {"format": FORMAT, "dataset": full_name, "max_train_per_class": limits[0],
            "max_test_per_class": limits[1], "val_per_class": val_per_class, "val_seed": val_seed,
            "test_split": test_split}


def folder_for(cache_dir: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{key['dataset'].replace('/', '_')}-{digest}")


def _open(folder: str, meta: dict):
    shape = tuple(meta["image_shape"])
    out = {}
    for name in ("train", "val", "test"):
        labels = np.load(os.path.join(folder, f"{name}_labels.npy"))
        path = os.path.join(folder, f"{name}.u8")
        expected = len(labels) * int(np.prod(shape))
        if os.path.getsize(path) != expected:
            raise ValueError(f"{path} holds {os.path.getsize(path)} bytes, {expected} expected")
        images = (np.memmap(path, np.uint8, "r", shape=(len(labels), *shape)) if len(labels)
                  else np.zeros((0, *shape), np.uint8))
        out[name] = (images, labels.astype(np.int32))
    return out


def load(builder, keys: tuple, test_split: str, cache_dir: str, *, limits: tuple, val_per_class: int,
         val_seed: int, need_stats: bool):
    """The class-sorted arrays of `builder` as memory maps of a cache in `cache_dir` (written in
    one streamed pass when it is missing): ({'train'|'val'|'test': (images, labels)}, stats
    (mean, std) of the whole train split or None, folder)."""
    if "://" in cache_dir:
        raise StreamError(f"the streamed-data cache needs a local directory (a memory map cannot "
                         f"live in {cache_dir}); pass --real_cache_dir=<local dir>")
    key = cache_key(builder.info.full_name, limits, val_per_class, val_seed, test_split)
    folder = folder_for(cache_dir, key)
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("key") != key:
                raise ValueError("it was written for other settings")
            arrays = _open(folder, meta)
            stats = (np.asarray(meta["stats"][0], np.float32), np.asarray(meta["stats"][1], np.float32)) \
                if meta.get("stats") else None
            if need_stats and stats is None:
                raise ValueError("it has no channel statistics")
            logging.info("streamed data: reading the cache %s", folder)
            return arrays, stats, folder
        except (ValueError, OSError, KeyError, TypeError) as e:   # never delete: move aside, rewrite
            from esp_tf.workdir import aside_name
            aside = aside_name(folder)
            os.replace(folder, aside)
            logging.warning("streamed-data cache %s is unusable (%s); moved to %s, writing it again",
                            folder, e, aside)
    return _build(builder, keys, test_split, folder, key, limits, val_per_class, need_stats)


def _build(builder, keys, test_split, folder, key, limits, val_per_class, need_stats):
    from esp_tf.workdir import say
    shape = tuple(int(d) for d in builder.info.features[keys[0]].shape)
    shape = shape + (1,) if len(shape) == 2 else shape
    partial = f"{folder}.partial-{os.getpid()}"
    try:
        os.makedirs(partial, exist_ok=True)
    except OSError as e:
        raise StreamError(f"cannot write the streamed-data cache in {os.path.dirname(folder)} "
                         f"({e.strerror}); pass --real_cache_dir=<a writable local dir>") from e
    say(f"streamed data: writing the class-sorted cache of {builder.info.full_name} to {folder} "
        "(once; later runs read it)")
    stats = None
    for split, limit, val in (("train", limits[0], val_per_class), (test_split, limits[1], 0)):
        labels = _read_labels(builder, split, *keys)
        target, position = placement(labels, limit, val)
        names = ("train", "val") if split == "train" else ("test",)
        sums = [np.zeros(shape[-1]), np.zeros(shape[-1])] if (split == "train" and need_stats) else None
        _write_split(builder, split, keys, labels, target, position,
                     [os.path.join(partial, f"{n}.u8") for n in names], shape, sums)
        for index, n in enumerate(names):
            rows = np.flatnonzero(target == index)
            sorted_labels = np.empty(len(rows), np.int32)
            sorted_labels[position[rows]] = labels[rows]
            np.save(os.path.join(partial, f"{n}_labels.npy"), sorted_labels)
        if split != "train":
            continue
        if sums is not None:
            stats = data_lib.channel_stats(sums, len(labels) * shape[0] * shape[1])
        if val_per_class == 0:                 # an empty val array keeps the layout uniform
            np.save(os.path.join(partial, "val_labels.npy"), np.zeros(0, np.int32))
            open(os.path.join(partial, "val.u8"), "wb").close()
    meta = {"key": key, "image_shape": list(shape),
            "stats": [stats[0].tolist(), stats[1].tolist()] if stats else None}
    with open(os.path.join(partial, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.rename(partial, folder)
    except OSError:                            # another process finished the same cache first
        if not os.path.exists(os.path.join(folder, "meta.json")):
            raise
        shutil.rmtree(partial, ignore_errors=True)   # our own unfinished copy, not a result
    return _open(folder, meta), stats, folder
