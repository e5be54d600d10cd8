"""Expert segments for condensation: drawn per iteration, read from the store only when needed.

Each iteration of ESP (and TM) uses one segment, snapshots t .. t+T of expert k, with (k, t)
drawn from the run's seed and the iteration (`draw`). The paper's 1,000 experts do not fit in
memory (CIFAR-10 IPC 50: 1,000 x 42 snapshots x 320,010 floats = 54 GB), and one iteration
needs one segment, so a `StoreSource` reads that segment from the expert's file
(`TrajectoryStore.read_range`) and a `Reader` reads the next iteration's segment in a
background thread while the current one is used: memory holds two segments, whatever the
number of experts. An in-memory array [K, S, P] (`ArraySource`) serves tests and tools.
The draws are those `subspace.select_segment` makes, so both sources give the same segments.
"""
from __future__ import annotations

import concurrent.futures

import numpy as np
import tensorflow as tf


def draw(seed, num_experts: int, max_start: int):
    """(expert k, start epoch t) of a segment, from `seed` [2]: k ~ U{0..K-1}, t ~ U{0..max_start-1}
    (exclusive, as MTT's max_start_epoch). Stateless: the same seed gives the same draw."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    k = tf.random.stateless_uniform([], seeds[0], 0, num_experts, dtype=tf.int32)
    t = tf.random.stateless_uniform([], seeds[1], 0, max_start, dtype=tf.int32)
    return k, t


class ArraySource:
    """Segments of trajectories held in memory, [K, S, P]."""

    def __init__(self, trajectories):
        self.trajectories = np.asarray(trajectories, np.float32)
        self.num_experts, self.num_snapshots = (int(d) for d in self.trajectories.shape[:2])

    def segment(self, k: int, t: int, n: int) -> np.ndarray:
        return self.trajectories[k, t:t + n]


class StoreSource:
    """Segments read from a `TrajectoryStore`, one expert file at a time. Checks up front that
    the store matches `expected` (model, dataset, recipe) with at least `num_snapshots`
    snapshots and holds every expert 0..num_experts-1."""

    def __init__(self, store, expected, num_experts: int, num_snapshots: int):
        from esp_tf.trajectories import TrajectoryError, check_compatible
        check_compatible(store.read_meta(), expected, min_epochs=num_snapshots - 1, where=store.meta_path)
        missing = sorted(set(range(num_experts)) - set(store.completed()))
        if missing:      # e.g. an expert file deleted while another expert was training
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise TrajectoryError(f"--num_experts={num_experts} but {len(missing)} of them are not in "
                                  f"{store.directory} (expert {shown}); rerun the same command: the "
                                  "experts phase trains only the missing ones")
        self.store, self.num_experts, self.num_snapshots = store, num_experts, num_snapshots

    def segment(self, k: int, t: int, n: int) -> np.ndarray:
        return self.store.read_range(k, t, n)


def as_source(trajectories):
    """A source of segments: `trajectories` itself if it is one, else an in-memory ArraySource."""
    return trajectories if hasattr(trajectories, "segment") else ArraySource(trajectories)


class Reader:
    """`reader.get(it)` -> (segment [T+1, P] float32, k, t) of iteration `it` of the run with
    `seed`; reading iteration it+1's segment starts in a background thread as soon as it's is
    returned, so the update rarely waits for the disk."""

    def __init__(self, source, seed: int, length: int, max_start: int):
        self.source, self.seed, self.length = source, seed, length
        self._draw = tf.function(lambda s: draw(s, source.num_experts, max_start))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._ahead = None           # (iteration, future) being read

    def where(self, it: int) -> tuple[int, int]:
        k, t = self._draw(tf.constant([self.seed, it], tf.int64))
        return int(k), int(t)

    def _read(self, it: int):
        k, t = self.where(it)
        return self.source.segment(k, t, self.length + 1), k, t

    def get(self, it: int):
        if self._ahead is not None and self._ahead[0] == it:
            out = self._ahead[1].result()
        else:
            out = self._read(it)
        self._ahead = (it + 1, self._pool.submit(self._read, it + 1))
        return out
