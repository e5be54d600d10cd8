r"""Scale-out benchmark (issue #13): sharded expert generation with 2 worker processes against 1,
and the per-device memory of one data-parallel ESP update with 1 and 2 replicas, in one run.

    python tools/scale_bench.py                                  # the defaults below
    python tools/scale_bench.py --num_experts=4 --expert_epochs=2 --nomemory

Expert generation: the same experts (0..num_experts-1, same seeds) are trained twice into two
fresh stores, first by 1 worker process, then by 2 worker processes at once (--worker_index /
--num_workers, the command line's sharding). Every process is pinned to its own core
(`taskset -c`) and runs TensorFlow with intra- and inter-op threads 1, so the ratio measures the
sharding itself, as each worker of a real cluster has its own machine. Times are wall-clock from
launch to exit (process start-up included, as on a cluster); the two stores are compared expert
by expert. The speed-up is C(1 worker) / max C(each of the 2 workers), C being a process's CPU
seconds (user + system, start-up included): a single-threaded process pinned to a core of its
own runs for its CPU time, so this is the wall-clock speed-up of workers on their own machines,
and other users of a shared machine do not move it. The wall-clock ratio is printed beside it;
on a loaded machine it falls short, because Linux shares the cores between sessions
(autogroup), not between processes.

Memory: one ESP update (ConvNet-3 on CIFAR-10-shaped random data) on one device (the plain
`ESPStep`), then split over 2 replicas with MultiWorkerMirroredStrategy: 2 processes on
localhost, one replica each, so a process's memory is its device's. As in memory_bench.py,
each process traces the step without running it, resets its peak-RSS counter
(/proc/self/clear_refs, Linux) and runs one update; "update peak" is the peak RSS during the
update minus the RSS before it. With 2 replicas the larger of the two processes is reported.

Last line: `expert generation speed-up, 2 workers: <x>`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

flags.DEFINE_string("dataset", "fashion_mnist_mini", "Dataset of the experts (the embedded one needs no data).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: a temp folder, prepared once before timing).")
flags.DEFINE_integer("num_experts", 4, "Experts trained by each of the two runs.")
flags.DEFINE_integer("expert_epochs", 2, "Epochs per expert.")
flags.DEFINE_integer("width", 128, "ConvNet-3 width of the experts (the field's 128).")
flags.DEFINE_list("cores", ["0", "1"], "The two cores the worker processes are pinned to.")
flags.DEFINE_bool("memory", True, "Also measure the per-device memory of one ESP update, 1 vs 2 replicas.")
flags.DEFINE_integer("ipc", 10, "Memory: synthetic images per class.")
flags.DEFINE_integer("real_per_class", 64, "Memory: real images per class of the DM term (even).")
flags.DEFINE_integer("size", 32, "Memory: image side (3 channels, 10 classes).")
flags.DEFINE_string("keep", None, "Keep the stores and workdirs in this folder (default: a temp folder, deleted).")
flags.DEFINE_string("child", None, "Internal: memory (a memory-measuring child).")
flags.DEFINE_integer("num_workers", 1, "Internal: the memory child's replica count (>1: MultiWorkerMirroredStrategy).")
FLAGS = flags.FLAGS


def _single_threaded():
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


# An expert-generation worker: the command line itself (its --worker_index/--num_workers
# sharding), with TensorFlow single-threaded before anything runs; at exit it prints the CPU
# seconds it used (user + system, all its threads).
_EXPERTS_CHILD = """
import resource, sys
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
from esp_tf import train
sys.argv = ["esp_tf.train"] + sys.argv[1:]
try:
    train.run()
finally:
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(f"CPU_SECONDS {use.ru_utime + use.ru_stime:.3f}", flush=True)
"""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _child_memory():
    import tensorflow as tf
    _single_threaded()                  # configures the context; the strategy then initialises it
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if FLAGS.num_workers > 1 else None
    import keras
    import numpy as np
    from esp_tf import condense, data as data_lib, data_parallel, models, subspace
    from esp_tf.methods import esp
    from esp_tf.synthetic import PixelSynthetic
    c, hw = 10, FLAGS.size
    rng = np.random.default_rng(0)
    real = data_lib.RealData(
        name="random", train_images=rng.integers(0, 256, (c * 300, hw, hw, 3), dtype=np.uint8),
        train_labels=np.repeat(np.arange(c), 300).astype(np.int32),
        test_images=np.zeros((c, hw, hw, 3), np.uint8), test_labels=np.arange(c, dtype=np.int32),
        class_names=tuple(map(str, range(c))), mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32))
    net = models.FlatModel(models.build("convnet3", (hw, hw, 3), c, width=128))
    config = esp.ESPConfig(real_per_class=FLAGS.real_per_class)
    with condense.data_parallel_scope(strategy):
        syn = PixelSynthetic(c, FLAGS.ipc, (hw, hw, 3), init="gaussian")
        opts = {"pixels": keras.optimizers.Adam(0.01)}
    sampler = data_lib.ClassBalancedSampler(real)
    step = (data_parallel.ReplicatedESPStep(strategy, net, syn, opts, sampler, config) if strategy
            else esp.ESPStep(net, syn, opts, sampler, config))
    theta = net.init([0, 0])
    basis = subspace.basis(tf.stack([theta + 0.01 * i for i in range(3)]))
    seed = tf.constant([0, 0], tf.int64)
    step._compiled.get_concrete_function(theta, basis, seed)   # trace only: a run would hide the memory
    with open("/proc/self/clear_refs", "w") as f:             # reset VmHWM to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    _, metrics = step(theta, basis, seed)
    float(metrics["loss"])
    peak = _status_kib("VmHWM")
    print("RESULT " + json.dumps({"update_peak_mib": (peak - before) / 1024, "process_peak_mib": peak / 1024,
                                  "replicas": strategy.num_replicas_in_sync if strategy else 1}), flush=True)


def _pinned(index: int) -> list:
    return ["taskset", "-c", FLAGS.cores[index % len(FLAGS.cores)], sys.executable]


def _launch_experts(index: int, count: int, root: str):
    args = ["--phases=experts", f"--dataset={FLAGS.dataset}", f"--data_dir={FLAGS.data_dir}", "--nodownload",
            f"--num_experts={FLAGS.num_experts}", f"--expert_epochs={FLAGS.expert_epochs}",
            "--max_start_epoch=1", "--segment_length=1", f"--width={FLAGS.width}",
            f"--experts_dir={os.path.join(root, 'experts')}", f"--workdir={os.path.join(root, f'work{index}')}",
            f"--worker_index={index}", f"--num_workers={count}"]
    return subprocess.Popen(_pinned(index) + ["-c", _EXPERTS_CHILD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _launch_memory(index: int, count: int, env=None):
    cmd = _pinned(index) + [os.path.abspath(__file__), "--child=memory", f"--num_workers={count}"]
    cmd += [f"--{k}={getattr(FLAGS, k)}" for k in ("ipc", "real_per_class", "size")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait(procs, what: str) -> list:
    outs = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"error: the {what} child failed (exit {p.returncode}):\n{err[-3000:]}")
        outs.append(out)
    return outs


def _experts(base: str) -> float:
    import numpy as np
    from esp_tf.trajectories import TrajectoryStore
    wall, cpu = {}, {}
    for count in (1, 2):
        root = os.path.join(base, f"{count}_workers")
        t0 = time.time()
        outs = _wait([_launch_experts(i, count, root) for i in range(count)], f"{count}-worker experts")
        wall[count] = time.time() - t0
        cpus = [float(line.split()[1]) for out in outs for line in out.splitlines()
                if line.startswith("CPU_SECONDS ")]
        cpu[count] = max(cpus)
        print(f"{count} worker process(es): {FLAGS.num_experts} experts x {FLAGS.expert_epochs} epochs in "
              f"{wall[count]:.1f} s wall; CPU seconds per process: {', '.join(f'{c:.1f}' for c in cpus)}",
              flush=True)
    one, two = (TrajectoryStore(os.path.join(base, f"{n}_workers", "experts")) for n in (1, 2))
    if one.completed() != list(range(FLAGS.num_experts)) or two.completed() != one.completed():
        sys.exit(f"error: the stores differ in their experts: {one.completed()} vs {two.completed()}")
    diff = max(float(np.max(np.abs(one.read(k) - two.read(k)))) for k in one.completed())
    print(f"same experts in both stores: {one.completed()}; max |difference| {diff:.3g}", flush=True)
    print(f"wall-clock ratio, 1 worker / 2 workers: {wall[1] / wall[2]:.2f} (on a shared, loaded machine "
          "the scheduler shares the cores between sessions, so this understates the sharding)", flush=True)
    return cpu[1] / cpu[2]


def _memory() -> None:
    import socket
    rows = {}
    rows[1] = [json.loads(l[7:]) for o in _wait([_launch_memory(0, 1)], "memory")
               for l in o.splitlines() if l.startswith("RESULT ")]
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    hosts = [f"localhost:{p}" for p in ports]
    procs = [_launch_memory(i, 2, {"TF_CONFIG": json.dumps(
        {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})}) for i in range(2)]
    rows[2] = [json.loads(l[7:]) for o in _wait(procs, "2-replica memory") for l in o.splitlines()
               if l.startswith("RESULT ")]
    print(f"per-device memory of one ESP update (ConvNet-3 width 128, {FLAGS.size}x{FLAGS.size}x3, 10 "
          f"classes, IPC {FLAGS.ipc}, real {FLAGS.real_per_class}/class):", flush=True)
    for n, rs in rows.items():
        worst = max(rs, key=lambda r: r["update_peak_mib"])
        each = ", ".join(f"{r['update_peak_mib']:.1f}" for r in rs)
        print(f"  {n} replica(s): update peak {worst['update_peak_mib']:.1f} MiB, process peak "
              f"{worst['process_peak_mib']:.1f} MiB" + (f" (per process: {each})" if n > 1 else ""),
              flush=True)


def main(argv):
    del argv
    if FLAGS.child == "memory":
        return _child_memory()
    logging.set_verbosity(logging.WARNING)       # TFDS's INFO lines while preparing the data
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    if shutil.which("taskset") is None:
        sys.exit("error: taskset not found (util-linux); it pins each worker process to one core")
    base = FLAGS.keep or tempfile.mkdtemp(prefix="scale_bench_")
    try:
        if FLAGS.data_dir is None:
            FLAGS.data_dir = os.path.join(base, "tfds")
        from esp_tf import data
        data.load(FLAGS.dataset, FLAGS.data_dir, download=False)   # prepared before any timing
        print(f"load before: {os.getloadavg()[0]:.2f} (1-min average), cores {','.join(FLAGS.cores)}",
              flush=True)
        speedup = _experts(base)
        if FLAGS.memory:
            _memory()
        print(f"load after: {os.getloadavg()[0]:.2f} (1-min average)", flush=True)
        print(f"expert generation speed-up, 2 workers: {speedup:.2f}", flush=True)
    finally:
        if FLAGS.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
