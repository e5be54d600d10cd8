"""Reading ANY condensed set for evaluation: our workdirs, prepared TFDS directories, TFDS names.

Why a module of its own: the evaluation CLI must score condensed sets made by esp_tf, by its
exports, or by anyone who publishes a TFDS dataset, against the real test split of their
source dataset. Three kinds are recognised, in this order:

1. a workdir of `esp_tf.train`: `synthetic.npz` (normalised float32 `images`, `labels`) and
   `flags.txt`, whose --dataset / --data_dir name the source dataset;
2. a prepared TFDS directory (holding `dataset_info.json`, or version folders that do), read
   with `tfds.builder_from_directory`, e.g. our exports (esp_tf/export.py);
3. a TFDS dataset name prepared in `data_dir` (never downloaded);
4. a published set: an `.npz` file of uint8 `pixels` [N, H, W, C], int `labels` [N] and the
   `source_dataset` name (`write_published`; the headline sets under docs/sets/ are such files).
TFDS sets provide uint8 `image` + `label` and optionally `image_normalized` (used as is); their
source dataset comes from `info.metadata['source_dataset']` unless `source_dataset` is given.
Anything else is a `UserError` that says what was looked for.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from esp_tf.workdir import UserError, parse_flags_file


@dataclasses.dataclass(frozen=True)
class CondensedSet:
    kind: str                  # "workdir", "tfds_dir", "tfds_name" or "published"
    label: str                 # default row label of the results table, e.g. "esp ipc10"
    labels: np.ndarray         # int32 [N]
    source_dataset: str        # TFDS name of the real dataset it condenses
    data_dir: str | None       # TFDS data_dir of the source dataset (None: TFDS default)
    images: np.ndarray | None = None         # normalised float32 [N,H,W,C], when stored
    pixels: np.ndarray | None = None         # uint8 [N,H,W,C], to normalise with source stats
    # Condensed with --zca: the network inputs are ZCA-whitened with a fit on the source's train
    # split minus `val_per_class` images per class; scoring needs that same fit (load_source).
    zca: bool = False
    val_per_class: int = 0

    def normalized(self, mean, std, whitening=None) -> np.ndarray:
        """Network inputs (float32): the stored ones, else the uint8 pixels normalised with the
        source statistics (or whitened with `whitening`, the source's ZCA, for a --zca set)."""
        if self.images is not None:
            return self.images
        from esp_tf import data as data_lib
        if whitening is not None:
            return data_lib.to_model(data_lib.preprocessing(mean, std, whitening), self.pixels).numpy()
        return data_lib.normalize(self.pixels, mean, std).numpy()

    def load_source(self, data_dir: str | None):
        """The source dataset as needed to score this set: its test split and statistics, and for
        a --zca set the same ZCA fit (all train images minus the run's validation split)."""
        from esp_tf import data as data_lib
        if self.zca:
            return data_lib.load(self.source_dataset, data_dir, val_per_class=self.val_per_class, zca=True)
        return data_lib.load(self.source_dataset, data_dir, max_train_per_class=1)


def _ipc(labels) -> int:
    return int(np.bincount(labels).max()) if len(labels) else 0


def _refuse_nonfinite(images, what: str) -> None:
    """A NaN/inf image would train every network into NaN: such a set is never scored or exported."""
    if images is not None and not np.all(np.isfinite(images)):
        raise UserError(f"{what} holds NaN/inf values (a diverged condensation), so it is not "
                        "evaluated or exported; condense again with a lower --inner_lr, --lr_* or --beta")


def read_synthetic(path: str):
    """(normalised float32 images, int32 labels) of a synthetic.npz; a damaged, incomplete or
    non-finite file is a UserError naming it."""
    import zipfile
    try:
        with np.load(path) as saved:
            if "images" not in saved or "labels" not in saved:
                raise UserError(f"{path} lacks 'images'/'labels' (has {list(saved)})")
            images, labels = saved["images"].astype(np.float32), saved["labels"].astype(np.int32)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:   # truncated or not an npz
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); rerun the condense phase "
                        "(--phases=condense,...), which rewrites it from the last checkpoint") from e
    _refuse_nonfinite(images, path)
    return images, labels


def _from_workdir(path, data_dir, source_dataset) -> CondensedSet:
    flags_path = os.path.join(path, "flags.txt")
    recorded = parse_flags_file(flags_path) if os.path.exists(flags_path) else {}
    source = source_dataset or recorded.get("dataset")
    if not source:
        raise UserError(f"{path} has synthetic.npz but no flags.txt naming its --dataset; "
                        "pass --source_dataset=<TFDS name>")
    images, labels = read_synthetic(os.path.join(path, "synthetic.npz"))
    label = f"{recorded.get('method', 'esp')} ipc{_ipc(labels)}"
    return CondensedSet("workdir", label, labels, source, data_dir or recorded.get("data_dir") or None,
                        images=images, zca=recorded.get("zca", "false").lower() == "true",
                        val_per_class=int(recorded.get("val_per_class", 0) or 0))


def _version_dir(path) -> str | None:
    """`path` itself if it is a prepared TFDS version folder, else its newest version folder."""
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    versions = [d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "dataset_info.json"))]
    if not versions:
        return None
    import tensorflow_datasets as tfds
    return os.path.join(path, max(versions, key=tfds.core.Version))


def _from_builder(builder, kind, data_dir, source_dataset) -> CondensedSet:
    import tensorflow_datasets as tfds
    info = builder.info
    if "train" not in info.splits:
        raise UserError(f"{info.full_name}: a condensed set is read from its 'train' split "
                        f"(splits: {sorted(info.splits)})")
    keys = info.supervised_keys if isinstance(info.supervised_keys, tuple) else ("image", "label")
    image_key, label_key = keys[0], keys[1]
    if image_key not in info.features or label_key not in info.features:
        raise UserError(f"{info.full_name} has no {image_key!r}/{label_key!r} features "
                        f"(has {list(info.features)})")
    import tensorflow as tf
    try:
        arrays = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1, shuffle_files=False))
    except tf.errors.OpError as e:      # DataLossError: a truncated or corrupt TFRecord shard
        raise UserError(f"{builder.data_dir} is damaged ({type(e).__name__}: "
                        f"{e.message.splitlines()[0][:200]}); export it again (esp_tf.train "
                        "--phases=export in its workdir)") from e
    labels = arrays[label_key].astype(np.int32)
    images = arrays["image_normalized"].astype(np.float32) if "image_normalized" in arrays else None
    _refuse_nonfinite(images, builder.data_dir)
    pixels = arrays[image_key] if images is None else None
    if pixels is not None and pixels.ndim == 3:
        pixels = pixels[..., None]
    meta = dict(info.metadata or {})
    source = source_dataset or meta.get("source_dataset")
    if not source:
        raise UserError(f"{info.full_name} does not record its source dataset "
                        "(info.metadata['source_dataset']); pass --source_dataset=<TFDS name>")
    label = f"{meta.get('method', info.name)} ipc{_ipc(labels)}"
    return CondensedSet(kind, label, labels, source, data_dir, images=images, pixels=pixels,
                        zca=bool(meta.get("zca", False)), val_per_class=int(meta.get("val_per_class", 0) or 0))


PUBLISHED_KEYS = ("pixels", "labels", "source_dataset")


def write_published(path: str, pixels, labels, source_dataset: str, *, zca: bool = False,
                    val_per_class: int = 0) -> None:
    """Writes a condensed set as a plain `.npz` anyone can read (numpy only): uint8 `pixels`
    [N, H, W, C], int32 `labels` [N], its `source_dataset`, and what scoring it needs (`zca`:
    whiten with the source's fit, made without `val_per_class` images per class)."""
    import io
    from esp_tf.workdir import atomic_write_bytes
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or len(pixels) != len(labels):
        raise ValueError(f"pixels must be uint8 [N, H, W, C] with one label each, got {pixels.dtype} "
                         f"{pixels.shape} and {len(labels)} labels")
    buf = io.BytesIO()
    np.savez_compressed(buf, pixels=pixels, labels=np.asarray(labels, np.int32),
                        source_dataset=np.array(source_dataset), zca=np.array(bool(zca)),
                        val_per_class=np.array(int(val_per_class)))
    atomic_write_bytes(path, buf.getvalue())


def _from_published(path, data_dir, source_dataset) -> CondensedSet:
    import zipfile
    try:
        with np.load(path) as saved:
            missing = [k for k in PUBLISHED_KEYS if k not in saved]
            if missing:
                raise UserError(f"{path} is not a published condensed set: it lacks {', '.join(missing)} "
                                f"(has {list(saved)}); see esp_tf.condensed.write_published")
            pixels, labels = saved["pixels"], saved["labels"].astype(np.int32)
            source = source_dataset or str(saved["source_dataset"])
            zca = bool(saved["zca"]) if "zca" in saved else False
            val = int(saved["val_per_class"]) if "val_per_class" in saved else 0
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e})") from e
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or len(pixels) != len(labels):
        raise UserError(f"{path}: pixels must be uint8 [N, H, W, C] with one label each, got "
                        f"{pixels.dtype} {pixels.shape} and {len(labels)} labels")
    label = f"{os.path.splitext(os.path.basename(path))[0]} ipc{_ipc(labels)}"
    return CondensedSet("published", label, labels, source, data_dir, pixels=pixels, zca=zca,
                        val_per_class=val)


def resolve(spec: str, data_dir: str | None = None, source_dataset: str | None = None) -> CondensedSet:
    """Reads the condensed set `spec` (a workdir, a prepared TFDS directory, a TFDS name or a
    published `.npz`). A set without images is a UserError: nothing can be trained on it."""
    cset = _resolve(spec, data_dir, source_dataset)
    if len(cset.labels) == 0:
        raise UserError(f"the condensed set {spec} holds no images; condense again (or point "
                        "--condensed at the set you meant)")
    return cset


def _resolve(spec: str, data_dir: str | None, source_dataset: str | None) -> CondensedSet:
    import tensorflow_datasets as tfds
    if os.path.isfile(spec) and spec.endswith(".npz"):
        return _from_published(spec, data_dir, source_dataset)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "synthetic.npz")):
            return _from_workdir(spec, data_dir, source_dataset)
        version_dir = _version_dir(spec)
        if version_dir is not None:
            return _from_builder(tfds.builder_from_directory(version_dir), "tfds_dir", data_dir, source_dataset)
        raise UserError(f"{spec} is a directory but neither an esp_tf workdir (synthetic.npz + "
                        "flags.txt) nor a prepared TFDS dataset (dataset_info.json)")
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    base = spec.partition(":")[0]
    if not os.path.isdir(os.path.join(root, *base.split("/"))):
        raise UserError(f"--condensed={spec!r} is not a directory, and no TFDS dataset {base!r} is "
                        f"prepared in data_dir {root!r}. Give an esp_tf workdir, a prepared TFDS "
                        "directory, or the name of a TFDS dataset in --data_dir.")
    builder = tfds.builder(spec, data_dir=root)
    if not builder.is_prepared():
        raise UserError(f"TFDS dataset {spec!r} in {root!r} is not prepared")
    return _from_builder(builder, "tfds_name", data_dir, source_dataset)
