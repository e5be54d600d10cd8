r"""Real data in memory against real data streamed from the memory-mapped cache (--real_data).

    python tools/stream_bench.py --data_dir=../shared/data/tfds            # CIFAR-10, ~5 min on 2 cores
    python tools/stream_bench.py --data_dir=... --dataset=fashion_mnist --updates=5

Loads the dataset both ways (`data.load(real_data='memory' | 'stream')`; the streamed cache goes
to a temporary folder unless --cache_dir, so its one-time write is timed too), then times, one
way after the other in this one process, the parts of a run that read real data:

  DM update    `methods.dm.DMStep` on ConvNet-3 (pixels, IPC 10, DSA, --real_per_class real
               images per class per update): the median of --updates warm updates;
  input only   `data.train_dataset` batches of 256 (what expert training reads), images/s
               over --batches batches, no training;
  expert       `experts.train_expert`'s SGD step on those batches (batch 256, DSA), images/s;
  test pass    `experts.test_accuracy` over the whole test split (a forward per batch).

Prints a table and ends with the line `streamed / memory time, DM update: x; expert: y`.
Timings on a shared machine vary: compare the two columns of one run.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

flags.DEFINE_string("data_dir", None, "TFDS data_dir holding --dataset.")
flags.DEFINE_string("dataset", "cifar10", "TFDS dataset.")
flags.DEFINE_string("cache_dir", None, "Streamed-data cache; default: a temporary folder (its write is timed).")
flags.DEFINE_integer("updates", 10, "Warm DM updates timed per way.")
flags.DEFINE_integer("real_per_class", 256, "Real images per class per DM update (DM's default 256).")
flags.DEFINE_integer("batches", 40, "Batches of 256 for the input and expert rows.")
FLAGS = flags.FLAGS


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(real) -> dict:
    import keras
    import tensorflow as tf
    from esp_tf import data, experts, models, synthetic
    from esp_tf.methods import dm
    net = models.FlatModel(models.build("convnet3", real.image_shape, real.num_classes))
    out = {}
    x, _ = data.ClassBalancedSampler(real).random_subset(0, 10)
    syn = synthetic.PixelSynthetic(real.num_classes, 10, real.image_shape, init="real",
                                   real_images=data.to_model(real, x).numpy())
    step = dm.DMStep(net, syn, {name: keras.optimizers.SGD(1.0, momentum=0.5) for name in syn.variable_groups()},
                     data.ClassBalancedSampler(real), dm.DMConfig(real_per_class=FLAGS.real_per_class))
    step([0, 0])                                                    # trace
    times = [_timed(lambda n=n: step([0, n + 1])["loss"].numpy())[1] for n in range(FLAGS.updates)]
    out["DM update (s)"] = statistics.median(times)

    def input_only():
        n = 0
        for x, _ in data.train_dataset(real, 256, seed=1).take(FLAGS.batches):
            n += int(x.shape[0])
        return n
    n, t = _timed(input_only)
    out["input only (img/s)"] = n / t
    config = experts.ExpertConfig(batch_size=256)
    trainer = experts._Trainer(net, config)
    theta = net.init(tf.constant([0, 0], tf.int64))
    velocity = tf.zeros_like(theta)
    batches = data.train_dataset(real, 256, seed=2).take(FLAGS.batches + 1)
    it = iter(batches)
    x, y = next(it)
    theta, velocity, _ = trainer.step(theta, velocity, x, y, tf.constant([0, 0], tf.int64))   # trace

    def train():
        nonlocal theta, velocity
        n = 0
        for i, (x, y) in enumerate(it):
            theta, velocity, loss = trainer.step(theta, velocity, x, y, tf.constant([1, i], tf.int64))
            n += int(x.shape[0])
        float(loss)
        return n
    n, t = _timed(train)
    out["expert (img/s)"] = n / t
    _, t = _timed(lambda: experts.test_accuracy(net, theta, real))
    out["test pass (s)"] = t
    return out


def main(argv):
    del argv
    from esp_tf import data
    if not FLAGS.data_dir:
        raise SystemExit("--data_dir is required (the TFDS folder holding --dataset)")
    rows = {}
    whole, t_mem = _timed(lambda: data.load(FLAGS.dataset, FLAGS.data_dir, real_data="memory"))
    with tempfile.TemporaryDirectory() as tmp:
        cache = FLAGS.cache_dir or tmp
        mapped, t_first = _timed(lambda: data.load(FLAGS.dataset, FLAGS.data_dir, real_data="stream",
                                                   cache_dir=cache))
        _, t_again = _timed(lambda: data.load(FLAGS.dataset, FLAGS.data_dir, real_data="stream",
                                              cache_dir=cache))
        rows["load (s)"] = (t_mem, t_again)
        print(f"{FLAGS.dataset}: {len(whole.train_labels)} train / {len(whole.test_labels)} test images "
              f"{whole.image_shape}; streamed cache written in {t_first:.1f} s (once), read in {t_again:.2f} s; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        results = [measure(whole), measure(mapped)]
    for key in results[0]:
        rows[key] = (results[0][key], results[1][key])
    print(f"\n| {FLAGS.dataset} | in memory | streamed | streamed / memory (of the value) |\n|---|---|---|---|")
    for key, (a, b) in rows.items():
        print(f"| {key} | {a:.3g} | {b:.3g} | {b / a:.2f} |")
    dm_ratio = rows["DM update (s)"][1] / rows["DM update (s)"][0]
    expert_ratio = rows["expert (img/s)"][0] / rows["expert (img/s)"][1]
    print(f"\nmachine load at the end: {os.getloadavg()[0]:.1f}")
    print(f"streamed / memory time, DM update: {dm_ratio:.2f}; expert: {expert_ratio:.2f}")


if __name__ == "__main__":
    app.run(main)
