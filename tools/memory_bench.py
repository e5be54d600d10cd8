r"""Peak memory of one ESP outer iteration (N inner steps) versus N, all measured in one run.

    python tools/memory_bench.py                      # N = 10,20,40,80, CIFAR-10 shapes, IPC 10
    python tools/memory_bench.py --steps=10,80 --ipc=1

Each setting runs in a fresh child process (same allocator state for all). The child builds
ConvNet-3 and the ESP step on random CIFAR-10-shaped data, runs one warm-up iteration (tracing),
then resets the kernel's peak-RSS counter (/proc/self/clear_refs, Linux) and runs one whole
iteration of N synthetic updates. "step peak" is the peak resident memory during that
iteration minus the resident memory just before it: the memory the iteration itself needs.
The process peak (VmHWM, TF runtime included) is printed beside it.
The last line is `ESP N<max>/N<min> peak-memory ratio: <x>` on the step peak.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

flags.DEFINE_list("steps", ["10", "20", "40", "80"], "Inner steps N to measure.")
flags.DEFINE_integer("ipc", 10, "Synthetic images per class.")
flags.DEFINE_integer("num_classes", 10, "Classes.")
flags.DEFINE_integer("size", 32, "Image side (3 channels).")
flags.DEFINE_integer("width", 128, "ConvNet width.")
flags.DEFINE_integer("real_per_class", 64, "Real images per class in the DM term.")
flags.DEFINE_integer("child", 0, "Internal: measure one setting with this N and print JSON.")
FLAGS = flags.FLAGS


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _child(n_steps: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf
    from esp_tf import data as data_lib, esp, models, subspace
    from esp_tf.synthetic import PixelSynthetic

    c, hw = FLAGS.num_classes, FLAGS.size
    rng = np.random.default_rng(0)
    real = data_lib.RealData(
        name="random", train_images=rng.integers(0, 256, (c * 300, hw, hw, 3), dtype=np.uint8),
        train_labels=np.repeat(np.arange(c), 300).astype(np.int32),
        test_images=np.zeros((c, hw, hw, 3), np.uint8), test_labels=np.arange(c, dtype=np.int32),
        class_names=tuple(map(str, range(c))), mean=np.full(3, 0.5, np.float32),
        std=np.full(3, 0.25, np.float32))
    net = models.FlatModel(models.build("convnet3", (hw, hw, 3), c, width=FLAGS.width))
    syn = PixelSynthetic(c, FLAGS.ipc, (hw, hw, 3), init="gaussian")
    step = esp.ESPStep(net, syn, {"pixels": keras.optimizers.Adam(0.01)},
                       data_lib.ClassBalancedSampler(real),
                       esp.ESPConfig(real_per_class=FLAGS.real_per_class))
    theta0 = net.init([0, 0])
    basis = subspace.basis(tf.stack([theta0 + 0.01 * i for i in range(3)]))

    def iteration(n, it):
        theta = theta0
        for i in range(n):
            theta, m = step(theta, basis, [it, i])
        return float(m["loss"])     # forces completion

    iteration(2, 0)                                   # trace + warm-up
    with open("/proc/self/clear_refs", "w") as f:     # reset VmHWM to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    t0 = time.time()
    iteration(n_steps, 1)
    seconds = time.time() - t0
    peak = _status_kib("VmHWM")
    return {"n": n_steps, "step_peak_mib": (peak - before) / 1024, "process_peak_mib": peak / 1024,
            "seconds_per_update": seconds / n_steps, "traces": step.trace_count}


def main(argv):
    if FLAGS.child:
        print("RESULT " + json.dumps(_child(FLAGS.child)), flush=True)
        return
    steps = [int(s) for s in FLAGS.steps]
    rows = []
    print(f"ESP peak memory, ConvNet-3 width {FLAGS.width}, {FLAGS.size}x{FLAGS.size}x3, "
          f"{FLAGS.num_classes} classes, IPC {FLAGS.ipc}, DM real batch {FLAGS.real_per_class}/class",
          flush=True)
    print(f"{'N':>4} {'step peak MiB':>14} {'process peak MiB':>17} {'s/update':>9}", flush=True)
    for n in steps:
        cmd = [sys.executable, os.path.abspath(__file__), f"--child={n}"] + [
            f"--{k}={getattr(FLAGS, k)}" for k in ("ipc", "num_classes", "size", "width", "real_per_class")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.exit(f"child for N={n} failed:\n{out.stderr[-3000:]}")
        row = json.loads(lines[-1][len("RESULT "):])
        rows.append(row)
        print(f"{n:>4} {row['step_peak_mib']:>14.1f} {row['process_peak_mib']:>17.1f} "
              f"{row['seconds_per_update']:>9.3f}", flush=True)
    lo, hi = rows[0], rows[-1]
    print(f"ESP N{hi['n']}/N{lo['n']} peak-memory ratio: "
          f"{hi['step_peak_mib'] / max(lo['step_peak_mib'], 1e-9):.3f}", flush=True)


if __name__ == "__main__":
    app.run(main)
