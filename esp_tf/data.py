"""Real-data access for esp_tf: loading, normalisation, class-balanced sampling, input pipelines.

Why one module: it is the only place that talks to TensorFlow Datasets (TFDS), so the offline
rules live here. Non-embedded datasets are read with ``download=False`` after checking
that their folder exists, because a missing dataset would otherwise make TFDS retry the network
for minutes. ``load(..., download=True)`` (the CLI's default, as ``tfds.load``) downloads a missing
one through TFDS, but first probes the network with a short timeout, so an offline machine gets
an error within seconds. The embedded ``fashion_mnist_mini`` ships inside the package and is
prepared locally. Everything downstream gets a :class:`RealData` with class-sorted uint8 numpy arrays.
"""
import contextlib
import dataclasses
import io
import os
import socket
import threading

import numpy as np
import tensorflow as tf
from absl import logging

EMBEDDED_DATASETS = ("fashion_mnist_mini",)
# The validation split is drawn with this fixed seed, not the run's --seed: runs with different
# seeds (and the experts they share) then hold out the same images.
VAL_SEED = 0

# Per-channel (mean, std) in [0, 1] pixel units; other datasets get statistics of their train set.
_MNIST = ((0.1307,), (0.3081,))
_FASHION = ((0.2861,), (0.3530,))
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_KNOWN_NORMALIZATION = {
    "mnist": _MNIST,
    "fashion_mnist": _FASHION,
    "fashion_mnist_mini": _FASHION,
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


class DatasetNotFoundError(ValueError):
    """The requested dataset is not prepared in the TFDS data_dir (nothing is ever downloaded)."""


@dataclasses.dataclass(frozen=True)
class RealData:
    """A fully loaded image-classification dataset; train arrays are stably sorted by class."""

    name: str
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray  # uint8 [M, H, W, C]
    test_labels: np.ndarray  # int32 [M]
    class_names: tuple
    mean: np.ndarray  # float32 [C], [0, 1] pixel units
    std: np.ndarray  # float32 [C]
    # A class-balanced validation split carved out of the training data (see `load`); empty
    # unless asked for. Train arrays then exclude it, so experts and condensation never see it.
    val_images: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 1, 1, 1), np.uint8))
    val_labels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int32))
    # ZCA whitening fitted on the train arrays (load(..., zca=True)); None: per-channel mean/std.
    whitening: "Whitening | None" = None

    @property
    def image_shape(self) -> tuple:
        return tuple(int(d) for d in self.train_images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def val_per_class(self) -> int:
        return len(self.val_labels) // max(1, self.num_classes)

    @property
    def train_identity(self) -> str:
        """What the train arrays are: the dataset name, plus the held-out validation split if any
        (experts trained on one are not interchangeable with experts trained on the other)."""
        name = self.name
        if len(self.val_labels):
            name = f"{name} minus val {self.val_per_class}/class (seed {VAL_SEED})"
        if self.whitening is not None:      # experts of whitened inputs fit no other inputs
            name = f"{name}, ZCA eps {self.whitening.eps:g}"
        return name

    @property
    def streamed(self) -> bool:
        """Whether the train images are memory-mapped from a cache on disk (load(real_data=))."""
        return isinstance(self.train_images, np.memmap)

    @property
    def train_counts(self) -> np.ndarray:
        return np.bincount(self.train_labels, minlength=self.num_classes)


@dataclasses.dataclass(frozen=True)
class Whitening:
    """ZCA whitening of flattened images in [0, 1] units: ``z = (x - mean) @ matrix``.

    Fitted on the training images as MTT does for CIFAR: cov = Xc^T Xc / (n - 1) = U S U^T,
    ``matrix = U diag((S + eps)^-1/2) U^T`` with eps = 0.1, and the exact ``inverse`` (U diag((S +
    eps)^1/2) U^T), so whitened images convert back to pixels (exports, PNG grids) without loss.
    Whitened inputs replace the per-channel mean/std normalisation; synthetic images then live
    in the whitened space, which has no per-channel pixel box (so renders are not clipped).
    """

    mean: np.ndarray      # float32 [D], D = H * W * C
    matrix: np.ndarray    # float32 [D, D], symmetric
    inverse: np.ndarray   # float32 [D, D]
    eps: float = 0.1


def fit_whitening(images: np.ndarray, eps: float = 0.1, chunk: int = 2048) -> Whitening:
    """ZCA of uint8 images [N, H, W, C] (see :class:`Whitening`); the covariance is accumulated
    over chunks in float64, so memory stays at one D x D matrix plus a chunk."""
    if eps <= 0:
        raise ValueError(f"ZCA eps must be > 0, got {eps}")
    n = len(images)
    if n < 2:
        raise ValueError(f"ZCA needs at least 2 training images, got {n}")
    d = int(np.prod(images.shape[1:]))
    total, gram = np.zeros(d), np.zeros((d, d))
    for start in range(0, n, chunk):
        x = images[start:start + chunk].reshape(-1, d).astype(np.float32) / 255.0
        total += x.sum(axis=0, dtype=np.float64)
        gram += (x.T @ x).astype(np.float64)   # float32 products, float64 sum over chunks
    mean = total / n
    cov = (gram - n * np.outer(mean, mean)) / (n - 1)
    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, 0.0) + eps
    matrix = (vectors * values ** -0.5) @ vectors.T
    inverse = (vectors * values ** 0.5) @ vectors.T
    return Whitening(mean.astype(np.float32), matrix.astype(np.float32), inverse.astype(np.float32), eps)


def _split_name(name: str) -> tuple:
    """``'cifar10/config:3.0.2'`` -> (``'cifar10/config'``, ``'3.0.2'``); version may be None."""
    base, _, version = name.partition(":")
    return base, (version or None)


def _known_normalization(base: str):
    dataset = base.split("/")[0]
    if dataset in _KNOWN_NORMALIZATION:
        return _KNOWN_NORMALIZATION[dataset]
    if "imagenet" in dataset or dataset in ("imagenette", "imagewoof"):
        return _IMAGENET
    return None


def _default_data_dir() -> str:
    """TFDS's default data_dir, read at call time: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _present_datasets(data_dir: str) -> list:
    if not tf.io.gfile.isdir(data_dir):
        return []
    return sorted(d.rstrip("/") for d in tf.io.gfile.listdir(data_dir)
                  if tf.io.gfile.isdir(os.path.join(data_dir, d))
                  and not d.startswith((".", "downloads", "esp_tf_cache")))   # TFDS's and streamed.py's


def _not_found(name: str, data_dir: str, reason: str) -> DatasetNotFoundError:
    present = _present_datasets(data_dir)
    holds = ("does not exist" if not tf.io.gfile.isdir(data_dir) else
             f"holds: {', '.join(present) if present else '(no datasets)'}")
    return DatasetNotFoundError(
        f"dataset {name!r} is not available: {reason}. Searched data_dir {data_dir!r}, which "
        f"{holds}. Fix: pass the TFDS "
        f"data_dir that holds it (--data_dir / data_dir=), or prepare it on a machine with "
        f"network with `tfds build {name.partition(':')[0].split('/')[0]} --data_dir <dir>` and "
        f"copy the folder over. Embedded datasets that need no data_dir: "
        f"{', '.join(EMBEDDED_DATASETS)}.")


def _check_prepared(name: str, data_dir: str) -> None:
    """Fail fast if the dataset (and the requested config/version) folder does not exist."""
    base, version = _split_name(name)
    path = os.path.join(data_dir, *base.split("/"))
    if not tf.io.gfile.isdir(path):
        raise _not_found(name, data_dir, f"no folder {path!r}")
    if version and "*" not in version and not tf.io.gfile.isdir(os.path.join(path, version)):
        have = ", ".join(sorted(tf.io.gfile.listdir(path))) or "none"
        raise _not_found(name, data_dir, f"version {version} is not prepared (versions: {have})")


# TFDS downloads from its GCS bucket and the datasets' own hosts; this one answering on HTTPS
# within seconds tells a machine with network from an offline one.
PROBE_HOST = ("storage.googleapis.com", 443)


def network_reachable(address=PROBE_HOST, timeout: float = 3.0) -> bool:
    """True when a TCP connection to `address` opens within `timeout` seconds. Run in a thread
    joined with a deadline, so a hanging DNS lookup cannot stall the caller either."""
    ok = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(ok)


def _download_and_prepare(name: str, data_dir: str):
    """Downloads and prepares a registered TFDS dataset into data_dir, as tfds.load does."""
    import tensorflow_datasets as tfds
    try:
        tfds.builder_cls(_split_name(name)[0].split("/")[0])      # an unknown name: no network
    except tfds.core.registered.DatasetNotFoundError as e:
        raise _not_found(name, data_dir, str(e).split("\n")[0]) from e
    if not network_reachable():
        raise _not_found(name, data_dir, f"it is not prepared and the network cannot be reached "
                         f"({PROBE_HOST[0]}:{PROBE_HOST[1]} did not answer) to download it")
    logging.warning("downloading and preparing %s into %s through TFDS (once; may take a while)",
                    name, data_dir)
    tfds.enable_progress_bar()
    try:
        tfds.builder(name, data_dir=data_dir).download_and_prepare()
    finally:
        tfds.disable_progress_bar()


def _prepare_embedded(name: str, data_dir: str):
    """Prepares the embedded dataset in data_dir under an exclusive file lock: processes started
    together on a fresh machine (e.g. the workers of a cluster run) would otherwise race, and
    TFDS fails in the loser ("Cannot rename ... already exists"). Whoever gets the lock second
    finds the data prepared and reads it."""
    import fcntl
    import tensorflow_datasets as tfds
    remote = "://" in data_dir                   # a bucket has no file locks: prepare unguarded
    if not remote:
        os.makedirs(data_dir, exist_ok=True)
    with (contextlib.nullcontext() if remote else
          open(os.path.join(data_dir, f".{name.split('/')[0].split(':')[0]}.prepare.lock"), "a")) as lock:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            if not builder.is_prepared():
                logging.warning("preparing the embedded dataset %s in %s (from the package; no download)",
                                name, builder.data_dir)
                with contextlib.redirect_stdout(io.StringIO()):   # TFDS prints "Downloading and preparing"
                    builder.download_and_prepare(
                        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
            return tfds.builder(name, data_dir=data_dir)
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _get_builder(name: str, data_dir: str, embedded: bool):
    import tensorflow_datasets as tfds  # late import: slow, and only needed when loading

    if embedded:
        import esp_tf.datasets  # noqa: F401  (registers the builder)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if embedded and not builder.is_prepared():
            builder = _prepare_embedded(name, data_dir)
        elif not builder.is_prepared():
            raise _not_found(name, data_dir, f"no prepared data in {builder.data_dir!r}")
    # TFDS raises its own DatasetNotFoundError for unknown names, AssertionError for missing
    # data or unknown versions.
    except (tfds.core.registered.DatasetNotFoundError, AssertionError) as e:
        raise _not_found(name, data_dir, str(e).split("\n")[0]) from e
    except DatasetNotFoundError:
        raise
    except Exception as e:       # a damaged dataset_info.json / features.json (a protobuf ParseError...)
        raise _damaged(name, os.path.join(data_dir, name.split(":")[0]), e) from e
    return builder


def _damaged(name: str, where: str, e: Exception) -> DatasetNotFoundError:
    from esp_tf.workdir import error_text
    return DatasetNotFoundError(
        f"the prepared dataset {name} in {where} is damaged ({error_text(e)}); move that "
        "folder aside and prepare it again (rerun with --download, or `tfds build`; the embedded "
        "default is prepared again from the package)")


def _feature_keys(builder) -> tuple:
    """(image key, label key): the supervised_keys if they are two names, else image/label."""
    keys = builder.info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        return keys
    return "image", "label"


def _read_split(builder, split: str):
    """Whole split as numpy (image uint8 [N,H,W,C], label int32 [N])."""
    import tensorflow_datasets as tfds

    image_key, label_key = _feature_keys(builder)
    features = builder.info.features
    if image_key not in features or label_key not in features:
        raise ValueError(f"{builder.info.full_name} is not an image-classification dataset "
                         f"(needs features {image_key!r} and {label_key!r}, has {list(features)})")
    try:
        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    except tf.errors.OpError as e:          # a truncated or corrupt TFRecord shard (DataLossError)
        raise _damaged(builder.info.full_name, builder.data_dir, e) from e
    images, labels = arrays[image_key], arrays[label_key].astype(np.int32)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{builder.info.full_name}/{split}: expected uint8 images [N,H,W,C], "
                         f"got {images.dtype} {images.shape}")
    return images, labels


def first_per_class_order(labels, limit) -> np.ndarray:
    """Indices that stably sort `labels` by class, keeping the first `limit` of each class in
    stored order (None: all). The order `load` keeps, in memory or streamed."""
    order = np.argsort(labels, kind="stable")
    if limit is not None:
        rank = np.arange(len(order)) - np.searchsorted(labels[order], labels[order])
        order = order[rank < limit]
    return order


def _first_per_class(images, labels, limit):
    """Stable sort by class; keep the first ``limit`` examples of each class (None: all)."""
    order = first_per_class_order(labels, limit)
    return images[order], labels[order]


STATS_CHUNK = 4096     # images per chunk of the channel sums (streamed.py reads in chunks of this)


def channel_sums(images: np.ndarray, sums=None) -> list:
    """Adds the per-channel sums of values and of squares (in [0, 1] units, float64) of uint8
    `images` to `sums` ([2 x [C]] or None: new); `channel_stats` of the totals."""
    if sums is None:
        sums = [np.zeros(images.shape[-1]), np.zeros(images.shape[-1])]
    x = images.astype(np.float64) / 255.0
    sums[0][:] += x.sum(axis=(0, 1, 2))
    sums[1][:] += np.square(x).sum(axis=(0, 1, 2))
    return sums


def channel_stats(sums, count: float):
    """Per-channel (mean, std) float32 from `channel_sums` totals over `count` pixels per channel."""
    mean = sums[0] / count
    return mean.astype(np.float32), np.sqrt(np.maximum(sums[1] / count - mean**2, 0)).astype(np.float32)


def _channel_stats(images: np.ndarray):
    """Per-channel mean/std in [0,1] units, accumulated in float64 chunks to bound memory."""
    sums = channel_sums(images[:0])
    for start in range(0, len(images), STATS_CHUNK):
        sums = channel_sums(images[start:start + STATS_CHUNK], sums)
    return channel_stats(sums, images.size / images.shape[-1])


def validation_mask(labels, per_class: int, seed: int = VAL_SEED) -> np.ndarray:
    """bool [N]: which images of class-sorted `labels` go to the validation split, `per_class`
    random ones of every class (the draw depends only on `seed` and the labels)."""
    counts = np.bincount(labels)
    if per_class >= counts.min():
        raise ValueError(f"val_per_class={per_class} leaves no training images in the smallest "
                         f"class ({counts.min()} images); use fewer")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), bool)
    for c in range(len(counts)):
        members = np.flatnonzero(labels == c)
        is_val[rng.choice(members, per_class, replace=False)] = True
    return is_val


def split_validation(images, labels, per_class: int, seed: int = VAL_SEED):
    """Class-sorted (train, val) arrays: `per_class` random images of every class go to val.

    Both outputs stay stably sorted by class; the draw depends only on `seed` and the input.
    """
    is_val = validation_mask(labels, per_class, seed)
    return (images[~is_val], labels[~is_val]), (images[is_val], labels[is_val])


def load(name: str, data_dir: str | None = None, *, max_train_per_class: int | None = None,
         max_test_per_class: int | None = None, val_per_class: int = 0,
         download: bool = False, zca: bool = False, real_data: str = "auto",
         cache_dir: str | None = None) -> RealData:
    """Load a TFDS image-classification dataset into memory, or memory-mapped from a cache on
    disk (``real_data``, below); the network is used only with ``download=True``, to download
    and prepare a missing non-embedded dataset.

    ``name`` may carry TFDS config/version syntax (``'cifar10:3.0.2'``). ``max_*_per_class``
    keep the first examples of each class in TFDS stored order. ``val_per_class`` > 0 carves a
    class-balanced validation split (seeded by VAL_SEED) out of those training images: the
    returned train arrays exclude it, and hyper-parameters are chosen on it, never on test.
    ``zca`` fits ZCA whitening (:class:`Whitening`) on those train arrays (validation excluded):
    every consumer then converts images with :func:`to_model` / :func:`to_pixels`.
    ``real_data``: 'memory' reads the splits whole; 'stream' writes them once, in one pass of
    chunks, to a class-sorted uint8 cache under ``cache_dir`` and returns read-only memory maps
    of it (`esp_tf.streamed`: the same arrays, never held whole; default ``<data_dir>/esp_tf_cache``);
    'auto' streams when the splits exceed 1/8 of this machine's memory. Raises DatasetNotFoundError
    when a non-embedded dataset is not prepared under ``data_dir`` (default: TFDS default).
    """
    from esp_tf import streamed
    if real_data not in streamed.MODES:
        raise ValueError(f"real_data must be one of {', '.join(streamed.MODES)}, got {real_data!r}")
    for arg, value in (("max_train_per_class", max_train_per_class),
                       ("max_test_per_class", max_test_per_class)):
        if value is not None and value < 1:
            raise ValueError(f"{arg} must be None or >= 1, got {value}")
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
    from esp_tf import folder
    if folder.is_folder(name):           # your own images: folder:<dir>[@HxW] (esp_tf/folder.py)
        train_images, train_labels, test_images, test_labels, names = folder.read(name)
        return _assemble(name, train_images, train_labels, test_images, test_labels, names, None,
                         max_train_per_class, max_test_per_class, val_per_class, zca, f"folder {name[7:]}")
    base, _ = _split_name(name)
    embedded = base.split("/")[0] in EMBEDDED_DATASETS
    data_dir = os.fspath(data_dir) if data_dir is not None else _default_data_dir()
    try:
        if not embedded:
            _check_prepared(name, data_dir)
        builder = _get_builder(name, data_dir, embedded)
    except DatasetNotFoundError:      # not prepared (no folder, or an unfinished one)
        if embedded or not download:
            raise
        _download_and_prepare(name, data_dir)
        builder = _get_builder(name, data_dir, embedded)
    splits = builder.info.splits
    if "train" not in splits:
        raise ValueError(f"{name}: no 'train' split (splits: {sorted(splits)})")
    test_split = "test" if "test" in splits else "validation" if "validation" in splits else None
    if test_split is None:
        raise ValueError(f"{name}: neither a 'test' nor a 'validation' split (splits: {sorted(splits)})")
    if test_split != "test":
        logging.info("%s has no 'test' split: using 'validation' as test data", name)

    keys = _feature_keys(builder)
    if streamed.choose(real_data, streamed.split_bytes(builder, keys[0], ("train", test_split))):
        return _load_streamed(name, builder, keys, test_split, cache_dir or os.path.join(data_dir, "esp_tf_cache"),
                              max_train_per_class,
                              max_test_per_class, val_per_class, zca)
    train_images, train_labels = _read_split(builder, "train")
    test_images, test_labels = _read_split(builder, test_split)
    label = builder.info.features[_feature_keys(builder)[1]]
    num_classes = getattr(label, "num_classes", None) or int(train_labels.max()) + 1
    names = getattr(label, "names", None) or [str(i) for i in range(num_classes)]
    return _assemble(name, train_images, train_labels, test_images, test_labels, names,
                     _known_normalization(base), max_train_per_class, max_test_per_class, val_per_class,
                     zca, f"{builder.data_dir} ({test_split} as test)")


def _load_streamed(name, builder, keys, test_split, cache_dir, max_train_per_class, max_test_per_class,
                   val_per_class, zca) -> RealData:
    """`load` through a memory-mapped class-sorted cache (esp_tf.streamed): the same RealData."""
    from esp_tf import streamed
    features = builder.info.features
    if keys[0] not in features or keys[1] not in features:
        raise ValueError(f"{builder.info.full_name} is not an image-classification dataset "
                         f"(needs features {keys[0]!r} and {keys[1]!r}, has {list(features)})")
    if features[keys[0]].np_dtype != np.uint8 or streamed.split_bytes(builder, keys[0], ()) is None:
        raise streamed.StreamError(
            f"{builder.info.full_name}: streamed real data needs uint8 images of one size, the dataset "
            f"has {np.dtype(features[keys[0]].np_dtype).name} images of shape {features[keys[0]].shape}; "
            "pass --real_data=memory")
    known = _known_normalization(_split_name(name)[0])
    cache_dir = os.fspath(cache_dir)
    try:
        arrays, stats, folder = streamed.load(
            builder, keys, test_split, cache_dir, limits=(max_train_per_class, max_test_per_class),
            val_per_class=val_per_class, val_seed=VAL_SEED, need_stats=known is None)
    except tf.errors.OpError as e:          # a truncated or corrupt TFRecord shard (DataLossError)
        raise _damaged(builder.info.full_name, builder.data_dir, e) from e
    mean, std = (np.asarray(known[0], np.float32), np.asarray(known[1], np.float32)) if known else stats
    label = features[keys[1]]
    train, val, test = arrays["train"], arrays["val"], arrays["test"]
    num_classes = getattr(label, "num_classes", None) or int(train[1].max()) + 1
    names = getattr(label, "names", None) or [str(i) for i in range(num_classes)]
    extra = {"val_images": val[0], "val_labels": val[1]} if val_per_class else {}
    if zca:
        extra["whitening"] = fit_whitening(train[0])
    data = RealData(name, train[0], train[1], test[0], test[1], tuple(str(n) for n in names),
                    mean, std, **extra)
    logging.info("streamed %s from %s (cache %s): train %d, val %d, test %d, %d classes, images %s",
                 name, builder.data_dir, folder, len(data.train_labels), len(data.val_labels),
                 len(data.test_labels), data.num_classes, data.image_shape)
    return data


def _assemble(name, train_images, train_labels, test_images, test_labels, names, known,
              max_train_per_class, max_test_per_class, val_per_class, zca, source) -> RealData:
    """RealData from whole splits: normalisation (`known` (mean, std), else the train split's),
    per-class limits, the validation split and ZCA, as `load` documents."""
    mean, std = (np.asarray(known[0], np.float32), np.asarray(known[1], np.float32)) if known \
        else _channel_stats(train_images)
    if mean.shape != (train_images.shape[-1],):
        raise ValueError(f"{name}: normalisation has {mean.shape[0]} channels, images have "
                         f"{train_images.shape[-1]}")
    train_images, train_labels = _first_per_class(train_images, train_labels, max_train_per_class)
    test_images, test_labels = _first_per_class(test_images, test_labels, max_test_per_class)
    val = {}
    if val_per_class:
        (train_images, train_labels), (val["val_images"], val["val_labels"]) = split_validation(
            train_images, train_labels, val_per_class)
    if zca:
        val["whitening"] = fit_whitening(train_images)
    data = RealData(name, train_images, train_labels, test_images, test_labels,
                    tuple(str(n) for n in names), mean, std, **val)
    logging.info("loaded %s from %s: train %d, val %d, test %d, %d classes, images %s",
                 name, source, len(train_labels), len(data.val_labels), len(test_labels),
                 data.num_classes, data.image_shape)
    return data


def normalize(images, mean, std) -> tf.Tensor:
    """uint8 (or float in 0..255) pixels -> float32 ``(x / 255 - mean) / std``, per channel."""
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def preprocessing(mean, std, whitening=None):
    """What :func:`to_model` / :func:`to_pixel_values` read of a dataset (its per-channel
    statistics and ZCA), for callers that hold those without a RealData (SavedModels, sets
    read back for scoring)."""
    import types
    return types.SimpleNamespace(mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32),
                                 whitening=whitening)


def to_model_array(data: RealData, images, chunk: int = 4096) -> np.ndarray:
    """:func:`to_model` of a whole uint8 array as numpy, converted `chunk` images at a time (a
    whitened CIFAR-10 train split is one 45,000 x 3,072 product otherwise)."""
    return np.concatenate([to_model(data, images[i:i + chunk]).numpy() for i in range(0, len(images), chunk)])


def to_model(data: RealData, images) -> tf.Tensor:
    """uint8 (or float 0..255) pixels [N, H, W, C] -> the network's float32 inputs for `data`:
    :func:`normalize` with its per-channel statistics, or its ZCA whitening when it has one."""
    w = data.whitening
    if w is None:
        return normalize(images, data.mean, data.std)
    x = tf.cast(images, tf.float32) / 255.0
    shape = tf.shape(x)
    flat = tf.reshape(x, [shape[0], -1]) - tf.constant(w.mean)
    return tf.reshape(tf.matmul(flat, tf.constant(w.matrix)), shape)


def to_pixel_values(data: RealData, x) -> tf.Tensor:
    """Inverse of :func:`to_model` before rounding: float32 pixel values, 0..255 for real images."""
    w = data.whitening
    x = tf.cast(x, tf.float32)
    if w is None:
        return _unnormalize(x, data.mean, data.std)
    shape = tf.shape(x)
    flat = tf.matmul(tf.reshape(x, [shape[0], -1]), tf.constant(w.inverse)) + tf.constant(w.mean)
    return tf.reshape(flat, shape) * 255.0


def to_pixels(data: RealData, x) -> tf.Tensor:
    """Inverse of :func:`to_model`: network inputs -> uint8 pixels, rounded and clipped."""
    return _to_uint8(to_pixel_values(data, x))


def stratified_subset(labels, size: int) -> np.ndarray:
    """Indices of about `size` examples with the classes in their split proportions. Test
    splits may be stored sorted by class (RealData's are), so a prefix would hold one or two
    classes only."""
    step = max(1, len(labels) // size)
    return np.argsort(np.asarray(labels), kind="stable")[::step][:size]


def pixel_range(data: RealData) -> tuple:
    """(lo, hi) float32 [C]: pixel values 0 and 255 in the normalised units of `data`."""
    if data.whitening is not None:
        raise ValueError(f"{data.name} is ZCA-whitened: its inputs have no per-channel pixel range "
                         "to clip to (use --noclip_pixels with --zca)")
    mean, std = np.asarray(data.mean, np.float32), np.asarray(data.std, np.float32)
    return (0.0 - mean) / std, (1.0 - mean) / std


def fraction_outside_pixel_range(images, data: RealData) -> float:
    """Share of the values of normalised `images` that no uint8 pixel of `data` can take
    (beyond 0..255 by more than the half gray level that rounding absorbs)."""
    values = np.asarray(to_pixel_values(data, np.asarray(images, np.float32)))
    return float(np.mean((values < -0.5) | (values > 255.5)))


def denormalize(x, mean, std) -> tf.Tensor:
    """Inverse of :func:`normalize`: float32 normalised -> uint8, rounded and clipped to 0..255."""
    return _to_uint8(_unnormalize(x, mean, std))


def _unnormalize(x, mean, std) -> tf.Tensor:
    """Float pixel values 0..255 of per-channel normalised `x` (unrounded, unclipped)."""
    return (tf.cast(x, tf.float32) * tf.constant(std, tf.float32) + tf.constant(mean, tf.float32)) * 255.0


def _to_uint8(values) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(values), 0.0, 255.0), tf.uint8)


class ClassBalancedSampler:
    """Draws class-balanced batches of real images with pure, traceable TF ops.

    Sampling choice: each call ranks every image of a class by a stateless random key and takes
    the first ``per_class`` of that random permutation, i.e. sampling WITHOUT replacement. If a
    class has fewer images than ``per_class`` the permutation is cycled, so every image appears
    floor or ceil(per_class / count) times (the only case with repeats). Output shape is fixed.
    """

    def __init__(self, data: RealData):
        counts = data.train_counts
        if counts.min() == 0:
            raise ValueError(f"{data.name}: classes without train images: "
                             f"{np.flatnonzero(counts == 0).tolist()}")
        if np.any(np.diff(data.train_labels) < 0):
            raise ValueError(f"{data.name}: train data must be sorted by class (use data.load)")
        self._data = data
        if data.streamed:         # gathered per draw from the memory map (host), see _read_rows
            self._images = None
        elif data.whitening is None:
            self._images = tf.constant(data.train_images)  # uint8, class-sorted; normalised per draw
        else:   # whitened once here: per draw, the D x D product would add ~20 % to a DM forward
            self._images = tf.constant(to_model_array(data, data.train_images))
        self._counts = tf.constant(counts, tf.int32)
        self._offsets = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]), tf.int32)
        self._max_count = int(counts.max())
        self.num_classes = data.num_classes
        self.image_shape = data.image_shape

    def sample(self, seed, per_class: int, part: tuple | None = None):
        """Normalised float32 images [C*per_class, H, W, Ch] (class-major) and int32 labels.

        ``seed`` is a shape-[2] int32/int64 tensor (stateless RNG); ``per_class`` a Python int.
        ``part=(i, n)`` (Python ints) returns only block i of n equal blocks of every class's
        draw, per_class/n images per class: the n parts of one seed are together exactly the
        full draw, so data-parallel replicas share one real batch without gathering it whole.
        """
        if not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"per_class must be a Python int >= 1, got {per_class!r}")
        if part is not None and (per_class % part[1] or not 0 <= part[0] < part[1]):
            raise ValueError(f"{per_class} real images per class do not split into {part[1]} equal "
                             f"parts: make --real_per_class a multiple of the replicas ({part[1]})")
        c = self.num_classes
        # int keys from a fixed algorithm: XLA's float stateless_uniform and its auto-selected
        # algorithm differ from the CPU kernel's, int Philox draws agree, so a --jit_compile
        # step samples the same real images as a plain one
        keys = tf.random.stateless_uniform([c, self._max_count], seed=seed, minval=0, maxval=2**31 - 1,
                                           dtype=tf.int32, alg="philox")
        valid = tf.range(self._max_count)[None, :] < self._counts[:, None]
        keys = tf.where(valid, keys, -1)  # padding ranks after every real image
        k = min(per_class, self._max_count)
        _, ranked = tf.math.top_k(keys, k=k)  # [C, k] distinct random positions per class
        cols = tf.math.floormod(tf.range(per_class)[None, :], self._counts[:, None])
        local = tf.gather(ranked, cols, batch_dims=1)  # cycle only when count < per_class
        if part is not None:                           # [C, per_class / n] block of the draw
            size = per_class // part[1]
            local, per_class = local[:, part[0] * size:(part[0] + 1) * size], size
        index = tf.reshape(local + self._offsets[:, None], [-1])
        if self._images is None:                       # streamed: the same rows, read from disk
            images = to_model(self._data, _read_rows(self._data.train_images, index))
        else:
            images = tf.gather(self._images, index)
            if self._data.whitening is None:
                images = to_model(self._data, images)
        labels = tf.repeat(tf.range(c, dtype=tf.int32), per_class)
        return images, labels

    def class_rows(self, c, start, size: int):
        """Images [size, H, W, Ch] (normalised float32) of class c (an int32 scalar tensor), its
        images start .. start+size-1 in stored order, and a float32 mask [size]: 1 on the class's
        images, 0 past its last one (whose image fills those rows). For whole-class means."""
        index = start + tf.range(size)
        mask = tf.cast(index < self._counts[c], tf.float32)
        index = self._offsets[c] + tf.minimum(index, self._counts[c] - 1)
        if self._images is None:                       # streamed: read from the memory map
            return to_model(self._data, _read_rows(self._data.train_images, index)), mask
        images = tf.gather(self._images, index)
        if self._data.whitening is None:
            images = to_model(self._data, images)
        return images, mask

    @property
    def class_counts(self) -> tf.Tensor:
        """Train images per class [C] (int32)."""
        return self._counts

    @property
    def max_class_count(self) -> int:
        return self._max_count

    def random_subset(self, seed: int, per_class: int):
        """``per_class`` distinct real images of every class (uint8, int32 labels), class-major."""
        counts = self._data.train_counts
        if per_class > counts.min():
            raise ValueError(f"random_subset: per_class={per_class} but the smallest class of "
                             f"{self._data.name} has {counts.min()} train images")
        rng = np.random.default_rng(seed)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        index = np.concatenate([off + rng.choice(n, per_class, replace=False)
                                for off, n in zip(offsets, counts)])
        return self._data.train_images[index], self._data.train_labels[index].astype(np.int32)


def train_dataset(data: RealData, batch_size: int, seed: int) -> tf.data.Dataset:
    """One epoch of (normalised float32 images, int32 labels) batches in a seeded random order.

    The permutation comes from ``numpy.random.default_rng(seed)``, so the order is the same on
    every iteration of the returned dataset: pass a new seed per epoch for a new order.
    """
    order = np.random.default_rng(seed).permutation(len(data.train_labels))
    if data.streamed:           # the same batches, each read from the memory map when needed
        return _read_batches(data.train_images, data.train_labels, order, batch_size, data)
    return _batches(data.train_images[order], data.train_labels[order], batch_size, data)


def test_dataset(data: RealData, batch_size: int = 500) -> tf.data.Dataset:
    """The test split as normalised batches, in order (no shuffling)."""
    return _batches(data.test_images, data.test_labels, batch_size, data)


def val_dataset(data: RealData, batch_size: int = 500) -> tf.data.Dataset | None:
    """The held-out validation split as normalised batches, or None when there is none."""
    return _batches(data.val_images, data.val_labels, batch_size, data) if len(data.val_labels) else None


def _batches(images, labels, batch_size, data):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, np.memmap):
        return _read_batches(images, labels, np.arange(len(labels)), batch_size, data)
    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    return ds.batch(batch_size).map(lambda x, y: (to_model(data, x), y),
                                    num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def _read_rows(images: np.ndarray, index) -> tf.Tensor:
    """uint8 rows `index` of a (memory-mapped) array, read on the host when the graph runs.
    A host read cannot be XLA-compiled: streamed data and --jit_compile do not go together."""
    rows = tf.numpy_function(lambda i: np.asarray(images[np.asarray(i)]), [index], tf.uint8, stateful=False)
    rows.set_shape([None, *images.shape[1:]])
    return rows


def _read_batches(images, labels, order, batch_size, data):
    """Batches of rows `order` of a memory-mapped split, read ahead in the background."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = tf.constant(np.asarray(labels, np.int32))
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(order, np.int64)).batch(batch_size)
    return ds.map(lambda i: (to_model(data, _read_rows(images, i)), tf.gather(labels, i)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
