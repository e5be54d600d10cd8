r"""Where an ESP update and expert training spend their time, and how close they come to the CPU.

    python tools/speed_bench.py                       # the default cases (~15-20 min on 2 busy cores)
    python tools/speed_bench.py --quick               # a tiny version (tests; shapes too small to mean much)
    python tools/speed_bench.py --costs --results=speed_bench.json   # BUILD.md's paper-config costs

One run, one child process per case (this script with --case=<json>): each case starts from the
same allocator and tracing state. Data are random, CIFAR-10-shaped (32x32x3, 10 classes, uint8
pixels normalised as the library does); nothing is downloaded. The steps are the library's own
(`esp_tf.methods.esp.ESPStep`, `esp_tf.synthetic`, `esp_tf.experts.train_expert`).

ESP cases (IPC 1 latents = 120 rendered images, or IPC 10 pixels = 100 images; DM real batch r
per class; XLA on or off; DSA on, losses proj+dm, the paper's defaults otherwise):
  * "first" is the first update, split into "trace" (Python tracing: `get_concrete_function`
    builds the graph) and "first run" (its first call: graph optimisation, and XLA compilation
    with --jit_compile, kernel set-up, and the update itself); "update" the fastest of --warm
    warm updates (the least disturbed by other jobs; every time below is so).
  * The parts are timed as separate compiled functions (same jit setting), each over --warm calls:
      real   the real DM forward: `matching.real_class_means` (sampling + per-class map_fn), no DSA;
             "batched" beside it: the same means from one forward of all C*r images (no map_fn);
      fwd+G  the synthetic forward, G = dCE/dtheta and E E^T G (`esp.outer_loss` without an outer tape);
      outer  the same under an outer tape plus the outer gradients w.r.t. the augmented images, one
             per loss term as ESPStep takes them: "2nd order" = outer - fwd+G;
      render rendering the set and its backward (a random linear functional of the render);
      opt    the optimizer updates (`matching.apply_grads`) with fixed gradients;
      DSA    by ablation: the full step minus the same step with dsa=None;
      other  the full step minus the sum of the above (tracing-free host overhead, segment
             sums, the metrics; negative values are timing noise).
  * FLOPs are counted analytically by `esp_tf.flops` (convolutions and dense layers; per
    synthetic image F + G (2F - f0) + reverse-over-reverse (4F - f0) + L_DM's backward F_conv,
    per real image F_conv; its docstring says why). The count of the "outer" function is
    cross-checked once against XLA: `flops.hlo_flops` of its optimized HLO
    (`experimental_get_compiler_ir(...)(stage='optimized_hlo')`, in the XLA-on IPC 1 latents
    r64 case) is printed beside the analytic count ("HLO check").
  * Efficiency = FLOPs / time / matmul peak, the peak being the best of 5 timed float32
    2048x2048 tf.matmul calls measured in the same child just before its case.

Expert cases: `experts.train_expert` (SGD, batch 256) for --epochs epochs of 2,560 images, with and
without DSA, against `keras.Model.fit` of the same ConvNet-3 (models.build) on the same
normalised images, batch and optimizer, with Keras' default jit_compile ("auto": off on a
CPU-only machine; the column says what it resolved to) and with jit_compile=True. img/s is over
the fastest warm epoch; "first" is the first epoch (tracing) against that warm epoch.

The run writes every number to --out (JSON). Its last line is exactly
`ESP step FLOP efficiency: <x>; experts / keras fit: <y>`: x is the efficiency of the IPC 1
latents, DM real 256/class, XLA-off update (the issue's target case; in --quick the only ESP
case), y the warm img/s of expert training without DSA over `keras.Model.fit` (default jit).
Timings on shared machines vary up to ~2x between runs: compare ratios within one run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

flags.DEFINE_bool("quick", False, "A tiny version (16x16 images, width 8, children in parallel): checks the tool, "
                  "measures nothing.")
flags.DEFINE_integer("warm", 3, "Warm calls timed per ESP case and part.")
flags.DEFINE_integer("epochs", 4, "Epochs per expert case (the first one traces).")
flags.DEFINE_list("only", [], "Run only the cases whose names contain one of these strings "
                  "(a trailing $ asks for that exact name: latents1_r64$).")
flags.DEFINE_string("out", "speed_bench.json", "JSON file for every number of the run.")
flags.DEFINE_bool("costs", False, "Print the paper-config cost table from --results, run nothing.")
flags.DEFINE_string("results", "speed_bench.json", "--costs: the JSON of a previous full run.")
flags.DEFINE_string("configs", None, "--costs: the configs/ folder (default: the repository's).")
flags.DEFINE_string("case", None, "Internal: run one case (JSON) and print its RESULT line.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERT_IMAGES = 2560            # 10 batches of 256 per epoch, no remainder batch
LAST = "ESP step FLOP efficiency: {x:.3f}; experts / keras fit: {y:.3f}"


# -- the child: one case ---------------------------------------------------------------------

def _matmul_peak() -> float:
    """Best FLOP/s of 5 timed float32 2048x2048 tf.matmul calls (after a warm-up)."""
    import tensorflow as tf
    n = 2048
    a = tf.random.stateless_normal([n, n], [0, 1])
    mm = tf.function(lambda a: tf.matmul(a, a))
    mm(a).numpy()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        mm(a).numpy()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def _timed(fn, reps: int) -> tuple[float, float]:
    """(seconds of the first call, fastest of `reps` further calls); fn(i) returns a tensor,
    read back after each call. The fastest call is the one least disturbed by other jobs on a
    shared machine (the mean would add their load to every part)."""
    t0 = time.perf_counter()
    fn(0).numpy()
    first = time.perf_counter() - t0
    best = float("inf")
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i + 1).numpy()
        best = min(best, time.perf_counter() - t0)
    return first, best


def _fake_real(c: int, hw: int, per_class: int):
    import numpy as np
    from esp_tf import data as data_lib
    rng = np.random.default_rng(0)
    return data_lib.RealData(
        name="random", train_images=rng.integers(0, 256, (c * per_class, hw, hw, 3), dtype=np.uint8),
        train_labels=np.repeat(np.arange(c), per_class).astype(np.int32),
        test_images=rng.integers(0, 256, (c * 10, hw, hw, 3), dtype=np.uint8),
        test_labels=np.repeat(np.arange(c), 10).astype(np.int32),
        class_names=tuple(map(str, range(c))), mean=np.full(3, 0.5, np.float32),
        std=np.full(3, 0.25, np.float32))


def _esp_case(case: dict) -> dict:
    import keras
    import tensorflow as tf
    from esp_tf import data as data_lib, models, subspace, synthetic as synthetic_lib
    from esp_tf.flops import esp_update_flops, hlo_flops, network_flops, render_flops
    from esp_tf.matching import apply_grads, build_optimizers, ordered_variables, real_class_means
    from esp_tf.methods import get as get_method

    method = get_method("esp")
    esp_mod = sys.modules[method.__module__]          # its ESPStep and outer_loss
    c, hw, width, r, jit, warm = (case[k] for k in ("classes", "size", "width", "real_per_class", "jit", "warm"))
    shape = (hw, hw, 3)
    real = _fake_real(c, hw, max(300, r))
    sampler = data_lib.ClassBalancedSampler(real)
    net = models.FlatModel(models.build("convnet3", shape, c, width=width))
    flops_net = network_flops(net.model)

    def make_syn():
        if case["param"] == "latents":
            return synthetic_lib.LatentSynthetic(c, case["ipc"], shape, init="gaussian")
        return synthetic_lib.PixelSynthetic(c, case["ipc"], shape, init="gaussian")

    def optimizers(syn):       # the paper's outer optimizer: Adam (codes 0.1, decoders 0.01, pixels 0.01)
        return {name: keras.optimizers.Adam(0.1 if name == "codes" else 0.01) for name in syn.variable_groups()}

    theta = net.init([0, 0])
    basis = subspace.basis(tf.stack([theta + 0.01 * tf.random.stateless_normal(theta.shape, [i, 1])
                                     for i in range(3)]))
    cfg = method.Config(real_per_class=r)
    syn = make_syn()
    step = esp_mod.ESPStep(net, syn, optimizers(syn), sampler, cfg, jit_compile=jit)
    row = {"images": int(syn.render()[0].shape[0])}
    t0 = time.perf_counter()          # the first update's Python tracing alone (graph building)
    step._compiled.get_concrete_function(theta, basis, tf.constant([0, 0], tf.int64))
    row["trace"] = time.perf_counter() - t0
    row["first_run"], row["update"] = _timed(lambda i: step(theta, basis, [0, i])[0], warm)
    row["first"] = row["trace"] + row["first_run"]

    syn_off = make_syn()     # the DSA ablation: its own set and optimizers
    step_off = esp_mod.ESPStep(net, syn_off, optimizers(syn_off), sampler,
                               method.Config(real_per_class=r, dsa=None), jit_compile=jit)
    _, row["update_nodsa"] = _timed(lambda i: step_off(theta, basis, [0, i])[0], warm)

    compile_ = lambda f: tf.function(f, jit_compile=jit)     # noqa: E731
    real_fn = compile_(lambda seed: real_class_means(net, theta, sampler, seed, r, c, None))
    _, row["real"] = _timed(lambda i: real_fn(tf.constant([1, i], tf.int64)), warm)

    def real_batched(seed):     # the same means from ONE forward of all C*r images (no map_fn)
        x, y = sampler.sample(seed, r)
        return tf.stop_gradient(tf.math.unsorted_segment_mean(net.features(theta, x), y, c))

    real_batched_fn = compile_(real_batched)
    _, row["real_batched"] = _timed(lambda i: real_batched_fn(tf.constant([1, i], tf.int64)), warm)

    x_aug, y_syn = syn.render()
    x_aug = tf.identity(x_aug)
    real_means = real_fn(tf.constant([0, 0], tf.int64))
    no_dsa = method.Config(real_per_class=r, dsa=None)

    def fwd_g(x):
        loss, aux = esp_mod.outer_loss(net, theta, basis, x, y_syn, real_means, no_dsa)
        return loss + tf.reduce_sum(aux["g_in"])

    def outer(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            _, aux = esp_mod.outer_loss(net, theta, basis, x, y_syn, real_means, no_dsa)
        grads = [tape.gradient(w, x) for w in aux["weighted"].values()]   # one per term, as ESPStep
        return tf.add_n(grads)

    fwd_g_fn, outer_fn = compile_(fwd_g), compile_(outer)
    _, row["fwd_g"] = _timed(lambda i: fwd_g_fn(x_aug + 1e-3 * i), warm)
    _, row["outer"] = _timed(lambda i: outer_fn(x_aug + 1e-3 * i), warm)

    groups = syn.variable_groups()
    variables = ordered_variables(groups)

    def render_grad(probe):
        with tf.GradientTape() as tape:
            x, _ = syn.render()
            loss = tf.reduce_sum(x * probe)
        return tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, variables)])

    render_fn = compile_(render_grad)
    _, row["render"] = _timed(lambda i: render_fn(x_aug * (1.0 + i)), warm)

    syn_opt = make_syn()
    opts, groups_opt = optimizers(syn_opt), syn_opt.variable_groups()
    build_optimizers(opts, groups_opt)
    fixed = [1e-3 * tf.ones_like(v) for v in ordered_variables(groups_opt)]

    def opt_step(_):
        apply_grads(opts, groups_opt, fixed)
        return ordered_variables(groups_opt)[0][0, 0, 0, 0]

    opt_fn = compile_(opt_step)
    _, row["opt"] = _timed(lambda i: opt_fn(tf.constant(i)), warm)

    row["dsa"] = row["update"] - row["update_nodsa"]
    row["second_order"] = row["outer"] - row["fwd_g"]
    row["other"] = row["update_nodsa"] - (row["real"] + row["outer"] + row["render"] + row["opt"])
    row["traces"] = step.trace_count
    flops = esp_update_flops(flops_net, row["images"], c * r, cfg.losses, render_flops(syn))
    row["flops"] = flops
    if case.get("hlo_check"):
        text = tf.function(outer, jit_compile=True).experimental_get_compiler_ir(x_aug)(stage="optimized_hlo")
        row["hlo_outer_flops"] = hlo_flops(text)
        row["analytic_outer_flops"] = flops["fwd_g"] + flops["second_order"]
    return row


def _expert_case(case: dict) -> dict:
    import keras
    import numpy as np
    from esp_tf import augment, data as data_lib, experts, models
    from esp_tf.flops import network_flops

    c, hw, width, epochs = case["classes"], case["size"], case["width"], case["epochs"]
    n = case["images"]
    real = _fake_real(c, hw, n // c)
    model = models.build("convnet3", (hw, hw, 3), c, width=width)
    stamps = []
    if case["kind"] == "keras_fit":
        x = data_lib.normalize(real.train_images, real.mean, real.std).numpy()
        kw = {} if case["jit"] == "auto" else {"jit_compile": case["jit"]}
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **kw)

        class Stamp(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        model.fit(x, real.train_labels, batch_size=256, epochs=epochs, shuffle=True, verbose=0,
                  callbacks=[Stamp()])
        jit_used = bool(model.jit_compile)
    else:
        net = models.FlatModel(model)
        dsa = augment.DSAConfig() if case["kind"] == "experts_dsa" else None
        config = experts.ExpertConfig(epochs=epochs, batch_size=256, dsa=dsa)
        t0 = time.perf_counter()
        experts.train_expert(net, real, config, seed=0,
                             on_epoch=lambda *_: stamps.append(time.perf_counter()))
        jit_used = False
    times = np.diff([t0] + stamps)
    warm_epoch = float(np.min(times[1:]))
    return {"first_epoch": float(times[0]), "warm_epoch": warm_epoch, "img_per_s": n / warm_epoch,
            "jit": jit_used, "train_flops_per_image": network_flops(model)["train"]}


def _child(case: dict) -> dict:
    peak = _matmul_peak()
    row = _esp_case(case) if case["type"] == "esp" else _expert_case(case)
    return {**case, **row, "peak": peak}


# -- the parent: cases, table, last line -----------------------------------------------------

def _cases(quick: bool) -> list[dict]:
    if quick:
        base = {"classes": 10, "size": 16, "width": 8, "warm": 1}
        esp = [{**base, "type": "esp", "name": "latents1_r4", "param": "latents", "ipc": 1, "real_per_class": 4,
                "jit": False, "headline": True}]
        ex = {**base, "type": "experts", "epochs": 2, "images": 256}
        return esp + [{**ex, "name": "experts_nodsa", "kind": "experts_nodsa"},
                      {**ex, "name": "keras_fit", "kind": "keras_fit", "jit": "auto"}]
    base = {"classes": 10, "size": 32, "width": 128, "warm": FLAGS.warm}
    esp = []
    for param, ipc in (("latents", 1), ("pixels", 10)):
        for r in (64, 256):
            for jit in (False, True):
                name = f"{param}{ipc}_r{r}" + ("_xla" if jit else "")
                esp.append({**base, "type": "esp", "name": name, "param": param, "ipc": ipc, "real_per_class": r,
                            "jit": jit, "headline": (param, r, jit) == ("latents", 256, False),
                            "hlo_check": (param, r, jit) == ("latents", 64, True)})
    ex = {**base, "type": "experts", "epochs": FLAGS.epochs, "images": EXPERT_IMAGES}
    return esp + [{**ex, "name": "experts_dsa", "kind": "experts_dsa"},
                  {**ex, "name": "experts_nodsa", "kind": "experts_nodsa"},
                  {**ex, "name": "keras_fit", "kind": "keras_fit", "jit": "auto"},
                  {**ex, "name": "keras_fit_xla", "kind": "keras_fit", "jit": True}]


def select(cases: list[dict], only: list[str]) -> list[dict]:
    """The cases --only asks for: names containing one of its strings, or equal to one that
    ends in $ (latents1_r64$ without latents1_r64_xla); every case when it is empty."""
    def wanted(name: str) -> bool:
        return any(s[:-1] == name if s.endswith("$") else s in name for s in only)
    return [c for c in cases if not only or wanted(c["name"])]


def _start_child(case: dict):
    cmd = [sys.executable, os.path.abspath(__file__), "--case=" + json.dumps(case)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _result(case: dict, proc) -> dict:
    stdout, stderr = proc.communicate()
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"case {case['name']} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _results(cases: list[dict], parallel: bool):
    """Yields each case's result in order: children one at a time, or (--quick, where the
    numbers mean nothing) all at once."""
    if parallel:
        procs = [_start_child(c) for c in cases]
        try:
            yield from (_result(c, p) for c, p in zip(cases, procs))
        finally:                          # a failed case: stop the others
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    else:
        for c in cases:
            yield _result(c, _start_child(c))


def _esp_line(r: dict) -> str:
    f = r["flops"]
    rate = f["total"] / r["update"]
    return (f"| {r['name']} | {r['images']} | {r['first']:.2f} | {r['trace']:.2f} | {r['first_run']:.2f} | "
            f"{r['update']:.3f} | {r['first'] / r['update']:.1f} | {r['real']:.3f} | {r['real_batched']:.3f} | "
            f"{r['fwd_g']:.3f} | {r['second_order']:.3f} | {r['dsa']:.3f} | {r['render']:.3f} | {r['opt']:.3f} | "
            f"{r['other']:.3f} | {f['total'] / 1e9:.1f} | {rate / 1e9:.1f} | {rate / r['peak']:.2f} | "
            f"{f['real'] / r['real'] / r['peak']:.2f} | "
            f"{(f['fwd_g'] + f['second_order']) / r['outer'] / r['peak']:.2f} |")


# -- what a paper config costs ---------------------------------------------------------------

# TFDS train / test split sizes, image shape and classes of the paper configs' datasets.
DATASETS = {"cifar10": (50_000, 10_000, (32, 32, 3), 10), "cifar100": (50_000, 10_000, (32, 32, 3), 100),
            "svhn_cropped": (73_257, 26_032, (32, 32, 3), 10),
            "tiny_imagenet": (100_000, 10_000, (64, 64, 3), 200),
            "fashion_mnist": (60_000, 10_000, (28, 28, 1), 10)}
PAPER_CONFIGS = ("cifar10", "cifar10_ipc10", "cifar10_ipc50", "cifar100", "cifar100_ipc10", "svhn",
                 "svhn_ipc10", "svhn_ipc50", "tiny_imagenet", "tiny_imagenet_ipc10", "fashion_mnist")
# The GPU estimate: an NVIDIA A100's FP32 peak without tensor cores, at an assumed efficiency.
GPU_NAME, GPU_PEAK, GPU_EFFICIENCY = "NVIDIA A100 (FP32 peak 19.5 TFLOP/s)", 19.5e12, 0.4


def read_flagfile(path: str) -> dict:
    """`--name=value` lines of a flagfile (comments and blank lines skipped)."""
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("--") and "=" in line:
                name, value = line[2:].split("=", 1)
                out[name] = value
    return out


def config_flops(flagfile: dict) -> dict:
    """FLOPs of expert generation, condensation and the ESP set's evaluation for one paper flagfile."""
    from esp_tf import models, synthetic as synthetic_lib
    from esp_tf.flops import esp_update_flops, network_flops, render_flops
    n_train, n_test, shape, c = DATASETS[flagfile["dataset"]]
    model = models.build(flagfile.get("model", "convnet3"), shape, c, depth=int(flagfile.get("depth", 3)))
    net = network_flops(model)
    ipc = int(flagfile["ipc"])
    if flagfile.get("param", "pixels") == "latents":
        syn = synthetic_lib.LatentSynthetic(c, ipc, shape, init="gaussian",
                                            num_decoders=int(flagfile.get("num_decoders", 4)),
                                            downsample=(int(flagfile["latent_downsample"])
                                                        if "latent_downsample" in flagfile else None))
    else:
        syn = synthetic_lib.PixelSynthetic(c, ipc, shape, init="gaussian")
    images = syn.images_per_class * c
    losses = tuple(flagfile.get("losses", "proj,dm").split(","))
    update = esp_update_flops(net, images, c * int(flagfile["real_per_class"]), losses, render_flops(syn))
    experts_n, epochs = int(flagfile["num_experts"]), int(flagfile["expert_epochs"])
    runs, eval_epochs = int(flagfile["eval_runs"]), int(flagfile["eval_epochs"])
    return {"images": images,
            "experts": experts_n * (epochs * n_train * net["train"] + n_test * net["forward"]),
            "condense": int(flagfile["iterations"]) * int(flagfile["inner_steps"]) * update["total"],
            "evaluate": runs * (eval_epochs * images * net["train"] + n_test * net["forward"])}


def print_costs(results_path: str, configs_dir: str) -> None:
    """Markdown table: each paper config's FLOPs, GPU hours (estimate) and CPU hours at the
    FLOP/s a full run of this bench measured (condensation: the headline ESP case; experts and
    evaluation: expert training with DSA)."""
    if not os.path.exists(results_path):
        sys.exit(f"--results {results_path} not found: run `python tools/speed_bench.py` first")
    with open(results_path) as f:
        rows = {r["name"]: r for r in json.load(f)}
    head = [r for r in rows.values() if r.get("headline")]
    if not head or "experts_dsa" not in rows or rows["experts_dsa"]["size"] != 32:
        sys.exit(f"{results_path} is not from a full run (needs the headline ESP case and experts_dsa)")
    h, e = head[0], rows["experts_dsa"]
    esp_rate = h["flops"]["total"] / h["update"]
    train_rate = e["img_per_s"] * e["train_flops_per_image"]
    gpu = GPU_PEAK * GPU_EFFICIENCY
    print(f"CPU rates measured by {os.path.basename(results_path)}: ESP update {esp_rate / 1e9:.1f} GFLOP/s "
          f"({h['name']}), expert training with DSA {train_rate / 1e9:.1f} GFLOP/s ({e['img_per_s']:.0f} img/s). "
          f"GPU estimate: {GPU_NAME} at {GPU_EFFICIENCY:.0%} = {gpu / 1e12:.1f} TFLOP/s.")
    print("| config | rendered images | experts PFLOP | condensation PFLOP | evaluation PFLOP | "
          "GPU hours (estimate) | CPU hours, experts | CPU hours, condensation | CPU hours, evaluation |")
    print("|---" * 9 + "|")
    for name in PAPER_CONFIGS:
        path = os.path.join(configs_dir, name + ".flags")
        if not os.path.exists(path):
            sys.exit(f"paper config {path} not found")
        f = config_flops(read_flagfile(path))
        total = f["experts"] + f["condense"] + f["evaluate"]
        print(f"| {name} | {f['images']} | {f['experts'] / 1e15:,.1f} | {f['condense'] / 1e15:,.1f} | "
              f"{f['evaluate'] / 1e15:,.2f} | {total / gpu / 3600:,.1f} | {f['experts'] / train_rate / 3600:,.0f} | "
              f"{f['condense'] / esp_rate / 3600:,.0f} | {f['evaluate'] / train_rate / 3600:,.1f} |", flush=True)


def main(argv):
    if FLAGS.case:
        print("RESULT " + json.dumps(_child(json.loads(FLAGS.case))), flush=True)
        return
    if FLAGS.costs:
        print_costs(FLAGS.results, FLAGS.configs or os.path.join(REPO, "configs"))
        return
    cases = select(_cases(FLAGS.quick), FLAGS.only)
    if not cases:
        sys.exit(f"--only={','.join(FLAGS.only)} matches no case; the cases are: "
                 + ", ".join(c["name"] for c in _cases(FLAGS.quick)))
    rows, t_start = [], time.time()
    esp_header = False
    for r in _results(cases, parallel=FLAGS.quick):
        rows.append(r)
        if r["type"] == "esp":
            if not esp_header:
                print("ESP update (seconds; one child per case; DSA on, losses proj+dm; parts: see the docstring)")
                print("| case | images | first | trace | first run | update | first / update | real | real batched | fwd+G "
                      "| 2nd order | DSA | render | opt | other | GFLOP | GFLOP/s | eff | real eff | outer eff |")
                print("|---" * 20 + "|")
                esp_header = True
            print(_esp_line(r), flush=True)
            if "hlo_outer_flops" in r:
                print(f"HLO check ({r['name']}, outer function): XLA {r['hlo_outer_flops'] / 1e9:.2f} GFLOP, "
                      f"analytic {r['analytic_outer_flops'] / 1e9:.2f} GFLOP", flush=True)
    ex = {r["name"]: r for r in rows if r["type"] == "experts"}
    if ex:
        print("Expert training (batch 256, SGD; img/s over the warm epochs)")
        print("| case | jit | first epoch s | warm epoch s | first / warm | img/s | GFLOP/s | eff |")
        print("|---" * 8 + "|")
        for r in ex.values():
            rate = r["img_per_s"] * r["train_flops_per_image"]
            print(f"| {r['name']} | {r['jit']} | {r['first_epoch']:.2f} | {r['warm_epoch']:.2f} | "
                  f"{r['first_epoch'] / r['warm_epoch']:.2f} | {r['img_per_s']:.0f} | {rate / 1e9:.1f} | "
                  f"{rate / r['peak']:.2f} |", flush=True)
    peaks = [r["peak"] for r in rows]
    print(f"matmul peak per child (GFLOP/s): min {min(peaks) / 1e9:.1f}, max {max(peaks) / 1e9:.1f}; "
          f"run took {time.time() - t_start:.0f} s")
    with open(FLAGS.out, "w") as f:
        json.dump(rows, f, indent=1)
    head = [r for r in rows if r.get("headline")]
    if not head or "experts_nodsa" not in ex or "keras_fit" not in ex:
        sys.exit("the last line needs the headline ESP case, experts_nodsa and keras_fit (see --only)")
    h = head[0]
    x = h["flops"]["total"] / h["update"] / h["peak"]
    y = ex["experts_nodsa"]["img_per_s"] / ex["keras_fit"]["img_per_s"]
    print(LAST.format(x=x, y=y), flush=True)


if __name__ == "__main__":
    app.run(main)
