r"""Peak memory of one synthetic update versus N (and IPC), ESP against MTT, all in one run.

    python tools/memory_bench.py                      # ESP, N = 10,20,40,80, CIFAR-10 shapes, IPC 10
    python tools/memory_bench.py --steps=10,80 --ipc=1
    python tools/memory_bench.py --methods=esp,tm --ipcs=1,10,50 --plot=memory.png
    python tools/memory_bench.py --param=latents --ipc=10 --syn_chunks=default,0   # the whole set
    python tools/memory_bench.py --expert_counts=4,64         # memory against the number of experts
    python tools/memory_bench.py --paper_configs              # the paper configs' experts in memory

Each setting runs in a fresh child process (same allocator state for all). The child builds
ConvNet-3 on random CIFAR-10-shaped data and traces the step WITHOUT running it (oneDNN keeps
what a run allocates, so a warm-up run would hide the memory being measured), resets the
kernel's peak-RSS counter (/proc/self/clear_refs, Linux), runs one update for the memory and a
second one for the time (warm). One update is:
  esp: one outer iteration of N ESP steps (each step also updates the synthetic set);
  tm:  one `tm.TMStep` call, N student steps unrolled into one graph (MTT).
Both consume N student steps. "step peak" is the peak resident memory during the measured
update minus the resident memory just before it (first run, so one-off run set-up is in it
for both methods); the process peak (VmHWM) is printed beside it.
A child whose RSS passes --max_mib is killed and reported as a lower bound (">").
With only ESP (no --methods, no other --ipcs) the output is the original one, ending with
`ESP N<last>/N<first> peak-memory ratio: <x>` (--steps order). With esp and tm the last line is
`TM/ESP peak-memory ratio at N=<max>: <x>`, and a PNG plot is written (matplotlib).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

flags.DEFINE_list("steps", ["10", "20", "40", "80"], "Inner steps N to measure.")
flags.DEFINE_integer("ipc", 10, "Synthetic images per class.")
flags.DEFINE_integer("num_classes", 10, "Classes.")
flags.DEFINE_integer("size", 32, "Image side (3 channels).")
flags.DEFINE_integer("width", 128, "ConvNet width.")
flags.DEFINE_integer("real_per_class", 64, "Real images per class in the DM term.")
flags.DEFINE_list("methods", ["esp"], "Methods: esp, tm (MTT's unrolled trajectory matching).")
flags.DEFINE_list("ipcs", [], "IPCs of the IPC sweep at N=--ipc_steps (default: only --ipc, no sweep).")
flags.DEFINE_integer("ipc_steps", 0, "N of the IPC sweep (0: the smallest of --steps).")
flags.DEFINE_integer("syn_batch", 0, "TM: synthetic images per student step (as esp_tf.train --syn_batch) (0: all, MTT's default).")
flags.DEFINE_bool("dsa", True, "DSA in both methods (as they are run); --nodsa traces much faster.")
flags.DEFINE_integer("max_mib", 12288, "Kill a child whose RSS passes this (MiB): protects a shared machine.")
flags.DEFINE_string("plot", None, "PNG plot path (default memory_bench.png when tm or an IPC sweep is run).")
flags.DEFINE_enum("param", "pixels", ["pixels", "latents"], "Synthetic set of the ESP rows: IPC "
                  "pixel images, or latent codes + decoders (--latent_downsample, --num_decoders).")
flags.DEFINE_integer("latent_downsample", 2, "Latents: codes are image size / this.")
flags.DEFINE_integer("num_decoders", 4, "Latents: shared decoders (renders per class = codes x decoders).")
flags.DEFINE_list("syn_chunks", [], "Whole-set mode: one ESP update (N=1) of the whole set per value of "
                  "--syn_chunk (renders per piece of the exact gradient, 0: one piece; 'default': the "
                  "library's), ending with `IPC <ipc> ESP update peak memory, whole set: <X> GB` for the first.")
flags.DEFINE_list("expert_counts", [], "Expert-store mode: peak memory of ESP condensation (2 iterations, "
                  "pixels) guided by stores of these many ConvNet-size experts (4 snapshots each, random "
                  "values), read one segment per iteration as esp_tf.train does, and loaded whole as before; "
                  "ends with `expert store memory ratio, <last>/<first>: <x>`.")
flags.DEFINE_bool("paper_configs", False, "Print, for every paper flagfile in configs/, the host memory "
                  "its experts take during condensation: read one segment at a time (two segments held) "
                  "against all experts loaded whole (before), by arithmetic from the flagfile and the model.")
flags.DEFINE_integer("child", 0, "Internal: measure one setting with this N and print JSON.")
flags.DEFINE_integer("child_experts", 0, "Internal: expert-store mode, this many experts.")
flags.DEFINE_bool("child_stream", True, "Internal: expert-store mode, segments read per iteration.")
flags.DEFINE_integer("child_chunk", -1, "Internal: --syn_chunk of the --child setting (-1: the library's).")
flags.DEFINE_enum("child_method", "esp", ["esp", "tm"], "Internal: method of the --child setting.")
FLAGS = flags.FLAGS
METHODS = ("esp", "tm")


def _status_kib(field: str, pid="self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status (Linux only)")


def _random_data_and_net(c: int, hw: int):
    """Random CIFAR-shaped real data (300 images per class) and ConvNet-3 of --width."""
    import numpy as np
    from esp_tf import data as data_lib, models
    rng = np.random.default_rng(0)
    real = data_lib.RealData(
        name="random", train_images=rng.integers(0, 256, (c * 300, hw, hw, 3), dtype=np.uint8),
        train_labels=np.repeat(np.arange(c), 300).astype(np.int32),
        test_images=np.zeros((c, hw, hw, 3), np.uint8), test_labels=np.arange(c, dtype=np.int32),
        class_names=tuple(map(str, range(c))), mean=np.full(3, 0.5, np.float32),
        std=np.full(3, 0.25, np.float32))
    return real, models.FlatModel(models.build("convnet3", (hw, hw, 3), c, width=FLAGS.width))


def _child(n_steps: int, method: str) -> dict:
    import keras
    import tensorflow as tf
    from esp_tf import augment, data as data_lib, subspace
    from esp_tf.methods import esp, tm
    from esp_tf.synthetic import LatentSynthetic, PixelSynthetic

    c, hw = FLAGS.num_classes, FLAGS.size
    real, net = _random_data_and_net(c, hw)
    if FLAGS.param == "latents":
        syn = LatentSynthetic(c, FLAGS.ipc, (hw, hw, 3), init="gaussian", downsample=FLAGS.latent_downsample,
                              num_decoders=FLAGS.num_decoders)
    else:
        syn = PixelSynthetic(c, FLAGS.ipc, (hw, hw, 3), init="gaussian")
    theta0 = net.init([0, 0])
    dsa = augment.DSAConfig() if FLAGS.dsa else None
    if method == "esp":
        chunk = None if FLAGS.child_chunk < 0 else FLAGS.child_chunk     # None: the library's default
        step = esp.ESPStep(net, syn, {g: keras.optimizers.Adam(0.01) for g in syn.variable_groups()},
                           data_lib.ClassBalancedSampler(real),
                           esp.ESPConfig(real_per_class=FLAGS.real_per_class, dsa=dsa, chunk=chunk))
        basis = subspace.basis(tf.stack([theta0 + 0.01 * i for i in range(3)]))

        def iteration(it):
            theta = theta0
            for i in range(n_steps):
                theta, m = step(theta, basis, [it, i])
            return float(m["loss"])     # forces completion
        args, updates = (theta0, basis), n_steps     # ESP updates the synthetic set at every step
    else:
        # MTT's optimizers: SGD momentum 0.5 on pixels (lr_img) and on the student lr (lr_lr).
        opts = {"pixels": keras.optimizers.SGD(100.0, momentum=0.5),
                "lr": keras.optimizers.SGD(1e-5, momentum=0.5)}
        step = tm.TMStep(net, syn, opts, None, tm.TMConfig(
            inner_steps=n_steps, batch_syn=FLAGS.syn_batch or None, dsa=dsa))
        target = theta0 + 0.01 * tf.random.stateless_normal(theta0.shape, [1, 1])

        def iteration(it):
            return float(step(theta0, target, [it, 0])["loss"])
        args, updates = (theta0, target), 1          # one TM call = one synthetic update

    # Trace without running: oneDNN keeps the memory a run allocates, so a warm-up run would
    # hide the update's own memory from the measurement (RSS stays at its peak afterwards).
    step._compiled.get_concrete_function(*args, tf.constant([0, 0], tf.int64))
    with open("/proc/self/clear_refs", "w") as f:     # reset VmHWM to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    iteration(1)                                      # first run: memory (incl. one-off run set-up)
    peak = _status_kib("VmHWM")
    t0 = time.time()
    iteration(2)                                      # second run: time, warm
    seconds = time.time() - t0
    extra = {"renders": syn.num_units * syn.renders_per_unit, "chunks": step.chunks.count,
             "chunk": step.chunks.chunk_renders} if method == "esp" else {}
    return {**extra, "method": method, "n": n_steps, "ipc": FLAGS.ipc, "step_peak_mib": (peak - before) / 1024,
            "process_peak_mib": peak / 1024, "seconds_per_iteration": seconds,
            "seconds_per_update": seconds / updates, "traces": step.trace_count}


def _child_store(num_experts: int, stream: bool) -> dict:
    """Peak memory of 2 ESP iterations guided by a store of `num_experts` experts."""
    import keras
    import numpy as np
    from esp_tf import data as data_lib, segments
    from esp_tf.methods.base import Context
    from esp_tf.methods.esp import ESP, ESPConfig
    from esp_tf.synthetic import PixelSynthetic
    from esp_tf.trajectories import TrajectoryMeta, TrajectoryStore

    c, hw, snapshots = FLAGS.num_classes, FLAGS.size, 4
    rng = np.random.default_rng(0)
    real, net = _random_data_and_net(c, hw)
    meta = TrajectoryMeta(model="convnet", model_config={}, dataset="random", input_shape=(hw, hw, 3),
                          num_classes=c, layout=net.layout, epochs=snapshots - 1)
    with tempfile.TemporaryDirectory() as tmp:
        store = TrajectoryStore(tmp)
        store.initialize(meta)
        theta = net.init([0, 0]).numpy()
        for k in range(num_experts):                          # one expert in memory at a time
            store.write(k, theta + 0.01 * rng.standard_normal((snapshots, theta.size), np.float32))
        trajectories = (segments.StoreSource(store, meta, num_experts, snapshots) if stream
                        else store.load(meta, num_snapshots=snapshots))
        syn = PixelSynthetic(c, 1, (hw, hw, 3), init="gaussian")
        ctx = Context(net=net, synthetic=syn, optimizers={"pixels": keras.optimizers.Adam(0.01)},
                      sampler=data_lib.ClassBalancedSampler(real), trajectories=trajectories,
                      segment_length=2, max_start_epoch=2, seed=0)
        method = ESP(ctx, ESPConfig(real_per_class=FLAGS.real_per_class, inner_steps=1))
        with open("/proc/self/clear_refs", "w") as f:      # the condensation's peak, not the writes'
            f.write("5")
        for it in range(2):
            method.iteration(it, lambda: None)
        return {"experts": num_experts, "stream": stream, "process_peak_mib": _status_kib("VmHWM") / 1024}


def _expert_store(counts):
    """Peak memory of condensation against the number of experts, streamed and loaded whole."""
    print(f"Peak memory of 2 ESP iterations (pixels, IPC 1) guided by a store of ConvNet-3 width "
          f"{FLAGS.width} experts ({FLAGS.size}x{FLAGS.size}x3, 4 snapshots each)", flush=True)
    print(f"{'experts':>8} {'segments read per iteration MiB':>32} {'store loaded whole MiB':>23}", flush=True)
    rows = {}
    for k in counts:
        rows[k] = [_measure("esp", 1, 1, child_experts=k, stream=stream) for stream in (True, False)]
        print(f"{k:>8} {rows[k][0]['process_peak_mib']:>32.1f} {rows[k][1]['process_peak_mib']:>23.1f}",
              flush=True)
    lo, hi = counts[0], counts[-1]
    whole = rows[hi][1]["process_peak_mib"] / rows[lo][1]["process_peak_mib"]
    print(f"loaded whole (before): {hi}/{lo} peak-memory ratio {whole:.3f}", flush=True)
    print(f"expert store memory ratio, {hi}/{lo}: "
          f"{rows[hi][0]['process_peak_mib'] / rows[lo][0]['process_peak_mib']:.3f}", flush=True)


# (input shape, classes) of the paper configs' datasets (TFDS: svhn_cropped, cifar10, cifar100,
# tiny_imagenet as prepared by esp_tf, fashion_mnist)
_DATASETS = {"svhn_cropped": ((32, 32, 3), 10), "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
             "tiny_imagenet": ((64, 64, 3), 200), "fashion_mnist": ((28, 28, 1), 10)}


def _paper_configs():
    """Experts' host memory during condensation per paper flagfile, by arithmetic."""
    import pathlib
    from esp_tf import models, workdir
    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    print("| config | experts | snapshots used / expert | P (floats) | all experts loaded whole (before) "
          "| two segments (read per iteration) |")
    print("|---|---|---|---|---|---|")
    for path in sorted(root.glob("*.flags")):
        f = workdir.parse_flags_file(str(path))
        if f.get("dataset") not in _DATASETS or f.get("method", "esp") not in ("esp", "tm") or \
                path.stem.startswith(("bench_", "fidelity_", "quickstart")):
            continue
        shape, classes = _DATASETS[f["dataset"]]
        depth, width = int(f.get("depth", 3)), int(f.get("width", 128))
        p = models.FlatModel(models.build("convnet", shape, classes, depth=depth, width=width)).num_params
        k, t = int(f["num_experts"]), int(f.get("segment_length", 2))
        used = int(f["max_start_epoch"]) + t                  # condense.snapshots_needed
        whole, two = k * used * p * 4, 2 * (t + 1) * p * 4
        print(f"| {path.stem} | {k} | {used} | {p:,} | {whole / 1e9:.1f} GB | {two / 1e6:.1f} MB |")


def _measure(method: str, n: int, ipc: int, chunk: int = -1, child_experts: int = 0,
             stream: bool = True) -> dict:
    """Runs one child, killing it past --max_mib; returns its row (killed=True: a lower bound)."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={n}", f"--child_method={method}",
           f"--ipc={ipc}", f"--child_chunk={chunk}", f"--child_experts={child_experts}",
           f"--child_stream={stream}"] + [
               f"--{k}={getattr(FLAGS, k)}" for k in ("num_classes", "size", "width", "real_per_class",
                                                     "syn_batch", "dsa", "param", "latent_downsample",
                                                     "num_decoders")]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc, peak, t0 = subprocess.Popen(cmd, stdout=out, stderr=err, text=True), 0, time.time()
        while proc.poll() is None:
            try:
                peak = max(peak, _status_kib("VmRSS", proc.pid))
            except (OSError, RuntimeError):   # exiting between poll() and the read
                pass
            if peak > FLAGS.max_mib * 1024:
                proc.kill()
                proc.wait()
                return {"method": method, "n": n, "ipc": ipc, "killed": True, "step_peak_mib": peak / 1024,
                        "process_peak_mib": peak / 1024, "seconds_per_iteration": time.time() - t0,
                        "seconds_per_update": float("nan")}
            time.sleep(0.05)
        out.seek(0), err.seek(0)
        lines = [l for l in out.read().splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"child for {method} N={n} IPC={ipc} failed:\n{err.read()[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _legacy(steps):
    """The original ESP-only report, byte for byte."""
    rows = []
    print(f"ESP peak memory, ConvNet-3 width {FLAGS.width}, {FLAGS.size}x{FLAGS.size}x3, "
          f"{FLAGS.num_classes} classes, IPC {FLAGS.ipc}, DM real batch {FLAGS.real_per_class}/class",
          flush=True)
    print(f"{'N':>4} {'step peak MiB':>14} {'process peak MiB':>17} {'s/update':>9}", flush=True)
    for n in steps:
        row = _measure("esp", n, FLAGS.ipc)
        if row.get("killed"):
            sys.exit(f"child for N={n} passed --max_mib={FLAGS.max_mib} and was killed")
        rows.append(row)
        print(f"{n:>4} {row['step_peak_mib']:>14.1f} {row['process_peak_mib']:>17.1f} "
              f"{row['seconds_per_update']:>9.3f}", flush=True)
    return rows


def _compare(methods, steps, ipcs, ipc_n):
    """Every method at every N (IPC --ipc), then every IPC at N=ipc_n; one table row per setting."""
    settings = [(m, n, FLAGS.ipc) for m in methods for n in steps]
    settings += [(m, ipc_n, i) for m in methods for i in ipcs if (m, ipc_n, i) not in settings]
    print(f"Peak memory of one synthetic update (esp: N ESP steps; tm: one MTT update of N unrolled "
          f"steps, syn_batch {FLAGS.syn_batch or 'all'}, DSA {'on' if FLAGS.dsa else 'off'}), "
          f"ConvNet-3 width {FLAGS.width}, {FLAGS.size}x{FLAGS.size}x3, {FLAGS.num_classes} classes, "
          f"DM real batch {FLAGS.real_per_class}/class", flush=True)
    print(f"{'method':>6} {'N':>4} {'IPC':>4} {'step peak MiB':>14} {'process peak MiB':>17} "
          f"{'s/iteration':>12} {'s/update':>9}", flush=True)
    rows = []
    for method, n, ipc in settings:
        row = _measure(method, n, ipc)
        rows.append(row)
        mark = ">" if row.get("killed") else " "
        print(f"{method:>6} {n:>4} {ipc:>4} {mark}{row['step_peak_mib']:>13.1f} {mark}"
              f"{row['process_peak_mib']:>16.1f} {row['seconds_per_iteration']:>12.3f} "
              f"{row['seconds_per_update']:>9.3f}", flush=True)
    return rows


def _whole_set(values):
    """One ESP update (N=1) of the whole set per --syn_chunk value; the line for the first."""
    print(f"One ESP update of the whole synthetic set ({FLAGS.param}, IPC {FLAGS.ipc}), ConvNet-3 width "
          f"{FLAGS.width}, {FLAGS.size}x{FLAGS.size}x3, {FLAGS.num_classes} classes, DM real batch "
          f"{FLAGS.real_per_class}/class, DSA {'on' if FLAGS.dsa else 'off'}", flush=True)
    print(f"{'syn_chunk':>9} {'renders':>8} {'pieces':>7} {'process peak GB':>16} {'step peak GB':>13} "
          f"{'s/update':>9}", flush=True)
    rows = []
    for value in values:
        row = _measure("esp", 1, FLAGS.ipc, -1 if value == "default" else int(value))
        rows.append(row)
        mark = ">" if row.get("killed") else " "
        print(f"{str(row.get('chunk', value)):>9} {row.get('renders', '?'):>8} {row.get('chunks', '?'):>7} "
              f"{mark}{row['process_peak_mib'] / 1024:>15.2f} {mark}{row['step_peak_mib'] / 1024:>12.2f} "
              f"{row['seconds_per_update']:>9.2f}", flush=True)
    first = rows[0]
    bound = ">=" if first.get("killed") else ""
    print(f"IPC {FLAGS.ipc} ESP update peak memory, whole set: {bound}{first['process_peak_mib'] / 1024:.2f} GB",
          flush=True)


def main(argv):
    if FLAGS.child:
        result = (_child_store(FLAGS.child_experts, FLAGS.child_stream) if FLAGS.child_experts
                  else _child(FLAGS.child, FLAGS.child_method))
        print("RESULT " + json.dumps(result), flush=True)
        return
    if FLAGS.expert_counts:
        _expert_store([int(k) for k in FLAGS.expert_counts])
        return
    if FLAGS.paper_configs:
        _paper_configs()
        return
    if FLAGS.syn_chunks:
        _whole_set(FLAGS.syn_chunks)
        return
    steps = [int(s) for s in FLAGS.steps]
    methods = [m for m in METHODS if m in FLAGS.methods]
    if not methods or len(methods) != len(set(FLAGS.methods)):
        sys.exit(f"--methods must be a non-empty subset of {','.join(METHODS)}, got {FLAGS.methods}")
    ipcs = [int(i) for i in FLAGS.ipcs] or [FLAGS.ipc]
    ipc_n = FLAGS.ipc_steps or min(steps)
    if methods == ["esp"] and ipcs == [FLAGS.ipc]:
        rows = _legacy(steps)
        if FLAGS.plot:
            _plot(rows, ipc_n, FLAGS.plot)
    else:
        rows = _compare(methods, steps, ipcs, ipc_n)
        _plot(rows, ipc_n, FLAGS.plot or "memory_bench.png")
    for method in methods:
        at = {r["n"]: r for r in rows if r["method"] == method and r["ipc"] == FLAGS.ipc}
        lo, hi = at[steps[0]], at[steps[-1]]       # --steps order, as the original report
        bound = ">=" if hi.get("killed") else ""
        print(f"{method.upper()} N{hi['n']}/N{lo['n']} peak-memory ratio: {bound}"
              f"{hi['step_peak_mib'] / max(lo['step_peak_mib'], 1e-9):.3f}", flush=True)
    if methods == ["esp", "tm"]:
        esp, tm = ({r["method"]: r for r in rows if r["n"] == max(steps) and r["ipc"] == FLAGS.ipc}[m]
                   for m in methods)
        bound = ">=" if tm.get("killed") else ""
        print(f"TM/ESP peak-memory ratio at N={max(steps)}: {bound}"
              f"{tm['step_peak_mib'] / max(esp['step_peak_mib'], 1e-9):.3f}", flush=True)


_COLORS = {"esp": "tab:blue", "tm": "tab:red"}


def _plot(rows, ipc_n, path):
    """Writes `path`: step peak MiB vs N (IPC --ipc) and vs IPC (N=ipc_n), one line per method."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from esp_tf import workdir

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    panels = ((axes[0], [r for r in rows if r["ipc"] == FLAGS.ipc], "n", f"N (inner steps), IPC {FLAGS.ipc}"),
              (axes[1], [r for r in rows if r["n"] == ipc_n], "ipc", f"IPC, N={ipc_n}"))
    for ax, sub, key, label in panels:
        for method, color in _COLORS.items():
            pts = sorted((r[key], r["step_peak_mib"], r.get("killed")) for r in sub if r["method"] == method)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=method)
            for x, y, killed in pts:
                if killed:                  # the child was stopped at --max_mib: a lower bound
                    ax.annotate(">=", (x, y), textcoords="offset points", xytext=(4, 4), color=color)
        ax.set_xlabel(label)
        ax.set_ylabel("step peak MiB")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    workdir.atomic_write_bytes(path, buf.getvalue())
    print(f"plot: {path} (step peak MiB; esp blue, tm red)", flush=True)


if __name__ == "__main__":
    app.run(main)
