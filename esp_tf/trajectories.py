"""The on-disk store of expert trajectories: one TFRecord file per expert plus `metadata.json`.

An expert trajectory is a float32 array [S, P]: S = epochs + 1 snapshots (the initialisation and
the weights after every epoch) of a flat parameter vector of P floats. Experts are trained once and
reused by many condensation runs, so the store must (a) refuse to mix trajectories of a different
model, dataset or parameter layout, (b) never leave a half-written file that looks complete (a
killed generation run resumes from `completed()`), and (c) turn corruption into an actionable error.

Layout of a directory:
    metadata.json            TrajectoryMeta.to_json(), written atomically
    expert_00000.tfrecord    record i = tf.train.Example{theta: bytes, epoch: i, expert: k}
    ...
`theta` holds `tf.io.serialize_tensor` of the float32 vector: bytes are ~40x faster to write than a
FloatList (measured with TF 2.21) and TFRecord's per-record CRCs detect corruption on read.
"""
import dataclasses
import json
import math
import os
import re
import time

import numpy as np
import tensorflow as tf
from absl import logging

from esp_tf import fs, workdir as wd

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
_EXPERT_RE = re.compile(r"^expert_(\d{5,})\.tfrecord$")   # final files only; temp files start with "."
_REGENERATE = "delete it and rerun expert generation (it is resumable: finished experts are kept)"
_FEATURES = {
    "theta": tf.io.FixedLenFeature([], tf.string),
    "epoch": tf.io.FixedLenFeature([], tf.int64),
    "expert": tf.io.FixedLenFeature([], tf.int64),
}


class TrajectoryError(ValueError):
    """A trajectory store problem the user can fix; the message names the file and what to do."""


def _plain_json(value, what):
    """`value` as JSON would give it back (tuples -> lists), so equality survives a round trip."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TrajectoryError(f"TrajectoryMeta.{what} must be JSON-serializable: {e}") from None


@dataclasses.dataclass(frozen=True)
class TrajectoryMeta:
    """What a set of trajectories was trained on; compared before any trajectory is reused."""
    model: str                   # e.g. "convnet"
    model_config: dict           # e.g. {"width": 128, "depth": 3, "norm": "instancenorm", ...}
    dataset: str                 # e.g. "cifar10"
    input_shape: tuple           # (H, W, C)
    num_classes: int
    layout: tuple                # ((name, shape), ...) of the flattened parameters, in order
    epochs: int                  # snapshots per expert = epochs + 1
    train_config: dict = dataclasses.field(default_factory=dict)   # the recipe: lr, batch, dsa, seed...
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        # Normalise containers so that from_json(to_json(m)) == m (JSON has no tuples).
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        fix("input_shape", tuple(int(d) for d in self.input_shape))
        fix("layout", tuple((str(n), tuple(int(d) for d in s)) for n, s in self.layout))
        fix("model_config", _plain_json(dict(self.model_config), "model_config"))
        fix("train_config", _plain_json(dict(self.train_config), "train_config"))
        fix("num_classes", int(self.num_classes))
        fix("epochs", int(self.epochs))
        fix("format_version", int(self.format_version))
        if self.epochs < 0 or any(d < 0 for _, s in self.layout for d in s):
            raise TrajectoryError(f"TrajectoryMeta: epochs and layout dims must be >= 0: {self}")

    @property
    def num_params(self) -> int:
        """P, the length of the flat parameter vector."""
        return sum(math.prod(shape) for _, shape in self.layout)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrajectoryMeta":
        """Inverse of to_json; unknown keys are ignored (format_version is what gets checked)."""
        try:
            d = json.loads(text)
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ValueError, AttributeError) as e:
            raise TrajectoryError(f"invalid trajectory metadata: {e}") from None


_CHECKED = ("model", "model_config", "dataset", "input_shape", "num_classes", "layout",
            "format_version")


_warned_unknown = set()     # stores already warned about (one warning per store and process)


def _mismatches(found: TrajectoryMeta, expected: TrajectoryMeta, fields=_CHECKED, where="") -> list:
    problems = [f"{f}: found {getattr(found, f)!r}, expected {getattr(expected, f)!r}"
                for f in fields if getattr(found, f) != getattr(expected, f)]
    return problems + _recipe_mismatches(found, expected, where)


def _recipe_mismatches(found: TrajectoryMeta, expected: TrajectoryMeta, where: str) -> list:
    """Differing training-recipe fields (train_config). A field the store does not record (stores
    written before the recipe was checked lack some) is unknown: accepted, with one warning."""
    problems, unknown = [], []
    for key, want in sorted(expected.train_config.items()):
        if key not in found.train_config:
            unknown.append(key)
        elif found.train_config[key] != want:
            problems.append(f"train_config.{key}: found {found.train_config[key]!r}, expected {want!r}")
    if unknown and where not in _warned_unknown:
        _warned_unknown.add(where)
        logging.warning("expert store %s does not record the recipe field(s) %s: reused as is, "
                        "assuming they match this run", where or "<unknown>", ", ".join(unknown))
    return problems


def _raise_incompatible(problems, where):
    raise TrajectoryError(
        f"expert trajectories in {where or '<unknown>'} do not match this run: "
        + "; ".join(problems)
        + ". They are kept: use another --experts_dir for this run's experts, or the settings "
        "(--expert_*, --seed, model, dataset) that trained these.")


def check_compatible(found: TrajectoryMeta, expected: TrajectoryMeta, *,
                     min_epochs: int | None = None, where: str = "") -> None:
    """Raises TrajectoryError listing every mismatched field (train_config: the fields recorded)."""
    problems = _mismatches(found, expected, where=where)
    if min_epochs is not None and found.epochs < min_epochs:
        problems.append(f"epochs: found {found.epochs}, need at least {min_epochs} "
                        f"(request fewer snapshots or regenerate with more epochs)")
    if problems:
        _raise_incompatible(problems, where)


def _example(theta: np.ndarray, epoch: int, expert: int) -> bytes:
    blob = tf.io.serialize_tensor(theta).numpy()
    return tf.train.Example(features=tf.train.Features(feature={
        "theta": tf.train.Feature(bytes_list=tf.train.BytesList(value=[blob])),
        "epoch": tf.train.Feature(int64_list=tf.train.Int64List(value=[epoch])),
        "expert": tf.train.Feature(int64_list=tf.train.Int64List(value=[expert])),
    })).SerializeToString()


def _parse(record):
    d = tf.io.parse_single_example(record, _FEATURES)
    return tf.io.parse_tensor(d["theta"], tf.float32), d["epoch"], d["expert"]


class TrajectoryStore:
    """A directory of expert trajectories; safe to resume and to share between worker processes.

    `directory` is a local path or a filesystem URL (gs://bucket/experts, s3://..., ram://...;
    every access goes through `esp_tf.fs`). Each file is written under a hidden temp name and
    renamed (`workdir.atomic_write`): on an object store the rename is a copy + delete, the
    expert file still appears whole or not at all, and `completed()` never lists a temp name."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.meta_path = f"{self.directory.rstrip('/')}/{METADATA_FILE}"

    def initialize(self, meta: TrajectoryMeta) -> None:
        """Creates the directory with `meta`, or checks an existing one (epochs must match too)."""
        if fs.exists(self.meta_path):
            found = self.read_meta()
            problems = _mismatches(found, meta, _CHECKED + ("epochs",), where=self.meta_path)
            if problems:
                _raise_incompatible(problems, self.meta_path)
            return
        fs.makedirs(self.directory)
        if self.completed() and not fs.exists(self.meta_path):   # not a worker that just wrote it
            raise TrajectoryError(
                f"{self.directory} holds expert files but no {METADATA_FILE}, so nothing says what "
                f"they were trained on; delete the directory or use another --experts_dir.")
        wd.atomic_write_text(self.meta_path, meta.to_json())

    def read_meta(self) -> TrajectoryMeta:
        if not fs.exists(self.meta_path):
            raise TrajectoryError(
                f"{self.meta_path} not found: {self.directory} is not an expert directory; "
                f"generate the experts first or point --experts_dir at an existing one.")
        try:
            with fs.open(self.meta_path, "rb") as f:
                return TrajectoryMeta.from_json(f.read().decode("utf-8"))
        except (TrajectoryError, UnicodeDecodeError) as e:
            raise TrajectoryError(f"{self.meta_path} is unreadable ({e}); {_REGENERATE}.") from None

    def expert_path(self, k: int) -> str:
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise TrajectoryError(f"expert index must be a non-negative int, got {k!r}")
        return f"{self.directory.rstrip('/')}/expert_{int(k):05d}.tfrecord"

    def expert_lock(self, k: int):
        """An exclusive lock on training expert k (a context manager): processes that share a
        local store (two runs with one --experts_dir) never train the same expert at once; the
        second waits, then finds it done. A lock file per expert (hidden), released by the kernel
        when its process dies. Bucket stores have no file locks: a no-op there."""
        import contextlib
        import fcntl
        if fs.is_url(self.directory):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def held():
            with open(f"{self.directory.rstrip('/')}/.expert_{int(k):05d}.lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        return held()

    def completed(self) -> list[int]:
        """Sorted indices of finished experts (final names only; temp files are ignored)."""
        if not fs.isdir(self.directory):
            return []
        return sorted(int(m.group(1)) for m in map(_EXPERT_RE.match, fs.listdir(self.directory))
                      if m)

    def write(self, k: int, snapshots: np.ndarray) -> str:
        """Atomically stores expert k's [epochs + 1, P] float32 trajectory; returns the path."""
        meta, path = self.read_meta(), self.expert_path(k)
        want = (meta.epochs + 1, meta.num_params)
        if not isinstance(snapshots, np.ndarray) or snapshots.dtype != np.float32:
            raise TrajectoryError(f"{path}: snapshots must be a float32 numpy array, got "
                                  f"{getattr(snapshots, 'dtype', type(snapshots))}")
        if snapshots.shape != want:
            raise TrajectoryError(f"{path}: snapshots have shape {snapshots.shape}, expected "
                                  f"{want} = (epochs + 1, num_params) from {self.meta_path}")

        def write_records(tmp):
            writer = tf.io.TFRecordWriter(tmp)
            try:
                for epoch, theta in enumerate(snapshots):          # theta: [P]
                    writer.write(_example(theta, epoch, int(k)))
                writer.flush()
            finally:
                writer.close()
        try:
            self._atomic_write(os.path.basename(path), write_records)
        except (OSError, tf.errors.OpError) as e:      # e.g. a full disk (ResourceExhausted, ENOSPC)
            why = (e.strerror or str(e)) if isinstance(e, OSError) else type(e).__name__ + ": " + e.message
            raise TrajectoryError(f"could not write {path} ({why}); no partial file was left. Free "
                                  f"disk space (or point --experts_dir at another disk) and rerun: "
                                  f"finished experts are kept.") from e
        return path

    def read(self, k: int, num_snapshots: int | None = None) -> np.ndarray:
        """Expert k's trajectory [S, P] float32, or its first `num_snapshots` rows only."""
        meta, path = self.read_meta(), self.expert_path(k)
        total = meta.epochs + 1
        n = total if num_snapshots is None else int(num_snapshots)
        if not 1 <= n <= total:
            raise TrajectoryError(f"{path}: asked for {n} snapshots, the experts in "
                                  f"{self.directory} have {total} (epochs={meta.epochs})")
        out = np.empty((n, meta.num_params), np.float32)
        self._read_into(k, out, meta, check_end=n == total)
        return out

    def read_range(self, k: int, start: int, n: int) -> np.ndarray:
        """Snapshots start .. start+n-1 of expert k, [n, P] float32: what one condensation
        iteration reads (segments.StoreSource). Records before `start` are skipped unparsed."""
        meta, path = self.read_meta(), self.expert_path(k)
        if not (0 <= start and 1 <= n and start + n <= meta.epochs + 1):
            raise TrajectoryError(f"{path}: snapshots {start}..{start + n - 1} asked for, the experts in "
                                  f"{self.directory} have {meta.epochs + 1}")
        out = np.empty((n, meta.num_params), np.float32)
        self._read_into(k, out, meta, check_end=False, start=start)
        return out

    def load(self, expected: TrajectoryMeta, *, num_snapshots: int,
             max_experts: int | None = None) -> np.ndarray:
        """The first `max_experts` finished experts (in index order) as [K, num_snapshots, P]."""
        start = time.perf_counter()
        if num_snapshots < 1:
            raise TrajectoryError(f"num_snapshots must be >= 1, got {num_snapshots}")
        meta = self.read_meta()
        check_compatible(meta, expected, min_epochs=num_snapshots - 1, where=self.meta_path)
        ks = self.completed()[:max_experts]
        if not ks:
            raise TrajectoryError(f"no expert trajectories in {self.directory}: generate them "
                                  f"first (expert generation writes expert_*.tfrecord there).")
        out = np.empty((len(ks), num_snapshots, meta.num_params), np.float32)   # [K, S, P]
        for i, k in enumerate(ks):
            self._read_into(k, out[i], meta, check_end=num_snapshots == meta.epochs + 1)
        logging.info("Loaded %d experts x %d snapshots x %d params (%.1f MB) from %s in %.2fs",
                     len(ks), num_snapshots, meta.num_params, out.nbytes / 1e6, self.directory,
                     time.perf_counter() - start)
        return out

    def _read_into(self, k, out, meta, check_end, start: int = 0):
        """Fills out [n, P] with records start .. start+n-1 of expert k's file, verifying every
        record read; stops after them (check_end: and checks that no record follows)."""
        path, n = self.expert_path(k), out.shape[0]
        if not fs.exists(path):
            raise TrajectoryError(f"{path} not found: expert {k} was not generated yet; "
                                  f"rerun expert generation (it is resumable).")
        count = 0
        try:
            ds = tf.data.TFRecordDataset(path).skip(start).map(_parse)
            for theta, epoch, expert in (ds if check_end else ds.take(n)):
                if count >= n:
                    raise TrajectoryError(f"more than {n} records, metadata says epochs="
                                          f"{meta.epochs}")
                if int(epoch) != start + count or int(expert) != k:
                    raise TrajectoryError(f"record {start + count} has epoch {int(epoch)}, expert "
                                          f"{int(expert)}; expected epoch {start + count}, expert {k}")
                if theta.shape != (meta.num_params,):
                    raise TrajectoryError(f"record {count} has shape {theta.shape}, expected "
                                          f"({meta.num_params},) = num_params")
                out[count] = theta.numpy()
                count += 1
        except (TrajectoryError, tf.errors.OpError) as e:
            why = wd.error_text(e, limit=10_000) if isinstance(e, tf.errors.OpError) else str(e)
            raise TrajectoryError(f"{path} is corrupt or does not match {self.meta_path} "
                                  f"({why}); {_REGENERATE}.") from None
        if count < n:
            raise TrajectoryError(f"{path} has {count} records, expected {n} (truncated?); "
                                  f"{_REGENERATE}.")

    def _atomic_write(self, name, write_fn):
        """Runs write_fn(tmp) on a temp file in the directory, then renames it to `name`
        (workdir.atomic_write): completed() never counts a file from a crashed or killed writer."""
        wd.atomic_write(f"{self.directory.rstrip('/')}/{name}", write_fn)
