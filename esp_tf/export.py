"""Exports of a condensed dataset: a class-per-row image grid, PNG files and a prepared TFDS dataset.

The condensed set is tiny (IPC images per class), so everything here works on in-memory numpy
arrays. The TFDS export must be readable by people who never install esp_tf: a fresh process
can ``tfds.load(name, data_dir=..., as_supervised=True)`` it or open it with
``tfds.builder_from_directory``. That works because everything a reader needs (features,
``supervised_keys``, label names, the metadata dict) is written into the prepared directory
itself; no builder class has to be importable at read time.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.dataset_builders import adhoc_builder

from esp_tf import fs, workdir as wd

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def image_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, pad: int = 2,
               max_per_class: int | None = None) -> np.ndarray:
    """Tile ``images`` into one row per class, each class's images left to right in input order.

    Rows are ``0..num_classes-1`` even if a class has no images (its row stays blank), so row
    ``k`` always shows class ``k``. Columns = the largest per-class count (capped by
    ``max_per_class``). Background and the ``pad``-pixel gutters are 255 (white).
    Returns uint8 ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]``.
    """
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N,H,W,C] with C in (1,3); got {images.dtype} "
                         f"{images.shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if num_classes < 1 or pad < 0 or (max_per_class is not None and max_per_class < 1):
        raise ValueError("need num_classes >= 1, pad >= 0 and max_per_class >= 1 (or None)")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}")
    _, h, w, c = images.shape
    rows = [np.flatnonzero(labels == k) for k in range(num_classes)]
    if max_per_class is not None:
        rows = [r[:max_per_class] for r in rows]
    cols = max(1, max(len(r) for r in rows))
    grid = np.full((num_classes * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for k, idx in enumerate(rows):
        y = pad + k * (h + pad)
        for j, i in enumerate(idx):
            x = pad + j * (w + pad)
            grid[y:y + h, x:x + w] = images[i]
    return grid


def save_png(image: np.ndarray, path: str) -> str:
    """Write a uint8 ``HxWxC`` (or ``HxW``) image as PNG and return ``path``.

    Written to a temp file in the target directory and renamed (``workdir.atomic_write``) so a
    reader never sees a truncated PNG; parent directories are created; ``path`` may be a URL.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be uint8 HxWxC with C in (1,3,4); got {image.dtype} "
                         f"{image.shape}")
    path = fs.absolute(path)
    wd.atomic_write_bytes(path, tf.io.encode_png(image).numpy())   # with the umask's permissions
    return path


def _json_default(obj):
    """Let numpy scalars/arrays (e.g. an accuracy as np.float32) into the metadata JSON."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON-serialisable")


class _CondensedBuilder(adhoc_builder.AdhocBuilder, skip_registration=True):
    """An ad-hoc builder whose DatasetInfo also carries supervised keys and a metadata dict.

    The stock ``AdhocBuilder`` (used by ``store_as_tfds_dataset``) never sets
    ``supervised_keys``, which is why its datasets refuse ``as_supervised=True`` (checked
    with tensorflow-datasets 4.9.10). The keys are serialised into ``dataset_info.json`` and the ``MetadataDict`` into
    ``metadata.json``; read-only builders restore both, so readers need no esp_tf code.
    """

    def __init__(self, *, metadata: dict, **kwargs):
        self._esp_metadata = metadata
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description,
            features=self._feature_spec,
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(self._esp_metadata),
        )


def _check_export_args(name, images, labels, class_names, images_normalized):
    """Validate shapes/dtypes up front, so a bad call fails before anything touches disk."""
    if not _NAME_RE.match(name):
        raise ValueError(f"name must be snake_case ([a-z][a-z0-9_]*) for tfds.load; got {name!r}")
    if name in tfds.list_builders(with_community_datasets=False):
        # tfds.load would read our files through the registered class's own DatasetInfo.
        raise ValueError(f"{name!r} is a registered TFDS dataset; pick another name")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N,H,W,C], C in (1,3); got {images.dtype} "
                         f"{images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},); got {labels.shape}")
    if not class_names or any(not isinstance(n, str) or not n or "\n" in n for n in class_names):
        raise ValueError("class_names must be non-empty single-line strings")
    if len(set(class_names)) != len(class_names):
        raise ValueError("class_names must be unique")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names)})")
    if images_normalized is not None and images_normalized.shape != images.shape:
        raise ValueError(f"images_normalized shape {images_normalized.shape} != images shape "
                         f"{images.shape}")


def export_tfds(*, name: str, data_dir: str, images: np.ndarray, labels: np.ndarray,
                class_names: list[str], metadata: dict, images_normalized: np.ndarray | None = None,
                version: str = "1.0.0") -> str:
    """Write the condensed set as a prepared TFDS dataset; return ``data_dir/name/version``.

    Features: ``image`` (PNG-encoded uint8, lossless and viewable), ``label``
    (``ClassLabel(names=class_names)``) and optionally ``image_normalized`` (float32, what the
    model was trained on). A single ``train`` split keeps the input order (shuffling disabled).
    ``metadata`` (made JSON-safe; numpy scalars become Python numbers) is readable as
    ``info.metadata`` and is also echoed in ``info.description`` for humans.

    The dataset is prepared in a hidden staging directory inside ``data_dir`` and renamed into
    place, so a crash never leaves a half-written dataset; an existing export of the same
    name/version is moved aside, replaced, and only then deleted. ``data_dir`` may be a
    filesystem URL (gs://...): there the moves copy file by file (`fs.move_tree`), so a run
    killed mid-copy can leave a partial export, which the next export replaces.
    """
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    class_names = list(class_names)
    if images_normalized is not None:
        images_normalized = np.asarray(images_normalized, dtype=np.float32)
    _check_export_args(name, images, labels, class_names, images_normalized)
    meta = json.loads(json.dumps(metadata, default=_json_default))
    if not isinstance(meta, dict):
        raise TypeError("metadata must be a dict")
    version = str(tfds.core.Version(version))

    shape = tuple(int(d) for d in images.shape[1:])
    features = {
        "image": tfds.features.Image(shape=shape, dtype=np.uint8, encoding_format="png"),
        "label": tfds.features.ClassLabel(names=class_names),
    }
    if images_normalized is not None:
        features["image_normalized"] = tfds.features.Tensor(shape=shape, dtype=np.float32)

    def examples():
        for i in range(images.shape[0]):
            ex = {"image": images[i], "label": labels[i]}
            if images_normalized is not None:
                ex["image_normalized"] = images_normalized[i]
            yield i, ex

    data_dir = fs.absolute(data_dir).rstrip("/")
    final = f"{data_dir}/{name}/{version}"
    fs.makedirs(os.path.dirname(final))
    staging = f"{data_dir}/.{name}-staging-{uuid.uuid4().hex[:12]}"
    fs.makedirs(staging)
    try:
        builder = _CondensedBuilder(
            name=name, version=version, data_dir=staging,
            features=tfds.features.FeaturesDict(features),
            split_datasets={"train": examples()},
            description=("Condensed dataset exported by esp_tf. Metadata (also in "
                         "info.metadata): " + json.dumps(meta, sort_keys=True)),
            metadata=meta)
        with contextlib.redirect_stdout(io.StringIO()):   # TFDS prints "Downloading and preparing"
            builder.download_and_prepare(download_dir=os.path.join(staging, "downloads"))
        built = f"{staging}/{name}/{version}"
        if not fs.exists(f"{built}/dataset_info.json"):
            raise RuntimeError(f"TFDS did not produce {built}/dataset_info.json")
        old = None
        if fs.exists(final):
            old = f"{staging}/previous"
            fs.move_tree(final, old)
        try:
            fs.move_tree(built, final)
        except BaseException:
            if old is not None:  # put the previous export back rather than leave nothing
                fs.move_tree(old, final)
            raise
    finally:
        if fs.exists(staging):
            fs.rmtree(staging)
    return final


def plot_curves(metrics_jsonl: str, path: str) -> str:
    """PNG of the condensation curves in metrics.jsonl (loss terms, student CE) vs iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = wd.read_jsonl(metrics_jsonl, required=("iteration",))     # damaged lines skipped, with a warning
    if not rows:
        raise ValueError(f"{metrics_jsonl} holds no metrics")
    panels = [(k, t) for k, t in (("loss", "outer loss"), ("dm", "L_DM"), ("proj", "L_proj (L1)"),
                                  ("pull", "pull of beta*L_proj vs L_DM"), ("ce", "student CE on synthetic set"))
              if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 3.2))
    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        shown = [r for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([r["iteration"] for r in shown], [r[key] for r in shown])
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    wd.atomic_write_bytes(path, buf.getvalue())
    plt.close(fig)
    return path
