r"""esp_tf command line: experts -> condense -> evaluate -> export, in one workdir.

    python -m esp_tf.train --flagfile=configs/quickstart.flags

Reruns resume: finished experts are reused, condensation continues from its last
checkpoint, and phases whose outputs exist are not repeated. See README.md and BUILD.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import shutil
import sys
import time

import numpy as np
from absl import app, logging

from esp_tf import cli, workdir as wd
from esp_tf.cli import FLAGS


# =====================================================================================
# Set-up: flags, workdir, data, model
# =====================================================================================
# Flags that may change between runs sharing a workdir without invalidating its results.
_RERUN_SAFE = {"phases", "log_every", "ckpt_every", "restart", "jit_compile", "data_dir", "experts_dir"}
_OUTPUTS = ("ckpt", "synthetic.npz", "eval.json", "metrics.jsonl", "grid.png", "curves.png", "tfds",
            "saved_model", "tensorboard", "budget.json")


def path(*parts) -> str:
    return os.path.join(FLAGS.workdir, *parts)


def prepare_workdir():
    """Validates flags; refuses to mix a new configuration into an existing run's workdir."""
    errors = cli.validate()
    if errors:
        raise wd.UserError("invalid flags:\n  " + "\n  ".join(errors))
    os.makedirs(FLAGS.workdir, exist_ok=True)
    old = wd.parse_flags_file(path("flags.txt")) if os.path.exists(path("flags.txt")) else None
    new = cli.flag_values()
    if old is not None and FLAGS.restart:
        for name in _OUTPUTS:
            p = path(name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
        wd.say(f"--restart: removed previous outputs in {FLAGS.workdir} (experts are kept)")
    elif old is not None:
        changed = {k for k in new if k not in _RERUN_SAFE and old.get(k, "") != new[k]}
        if changed:
            raise wd.UserError(
                f"{FLAGS.workdir} holds a run with other settings ({', '.join(sorted(changed))} differ "
                "from its flags.txt). Use another --workdir, or pass --restart to discard its results.")
        wd.say(f"workdir {FLAGS.workdir} exists with the same settings: resuming")
    wd.atomic_write_text(path("flags.txt"), cli.flags_file_text())


def _setup():
    import tensorflow as tf
    from esp_tf import data as data_lib, models
    tf.config.set_soft_device_placement(True)
    try:
        real = data_lib.load(FLAGS.dataset, FLAGS.data_dir, val_per_class=FLAGS.val_per_class)
    except ValueError as e:
        if FLAGS.val_per_class and "val_per_class" in str(e):
            raise wd.UserError(f"--{e}") from e
        raise
    val = f" / val {len(real.val_labels)}" if len(real.val_labels) else ""
    wd.say(f"data: {real.name} train {len(real.train_labels)}{val} / test {len(real.test_labels)} images, "
           f"{real.num_classes} classes, shape {real.image_shape}")
    model = models.build(FLAGS.model, real.image_shape, real.num_classes,
                         width=FLAGS.width, depth=FLAGS.depth)
    return real, models.FlatModel(model)


# =====================================================================================
# Phase 1: experts (resumable: one finished TFRecord per expert)
# =====================================================================================
def phase_experts(real, net):
    from esp_tf import experts
    from esp_tf.trajectories import TrajectoryStore
    config = cli.expert_config()
    store = TrajectoryStore(cli.experts_dir())
    meta = experts.expert_meta(net, FLAGS.model, cli.model_config(), real.train_identity, real.num_classes,
                               config)
    finished = [k for k in store.completed() if k < FLAGS.num_experts] if os.path.isdir(store.directory) else []
    bar = wd.Progress("experts", FLAGS.num_experts, done=len(finished))

    def progress(k, done, total, acc, seconds):
        tick[0] = time.time()
        bar.update(done, f"expert {k}: test acc {100 * acc:.1f}% ({seconds:.0f}s)")

    epoch_bar, tick = {}, [time.time()]

    def on_epoch(k, epoch, epochs, loss):
        seconds, tick[0] = time.time() - tick[0], time.time()
        if epochs >= 10:     # long experts: a line per epoch too
            bar_k = epoch_bar.setdefault(k, wd.Progress(f"expert {k}", epochs, done=epoch - 1))
            bar_k.update(epoch, f"loss {loss:.3f}")
        elif seconds > 60:   # few but slow epochs (full-size datasets on CPU): say each one
            wd.say(f"[expert {k}] epoch {epoch}/{epochs} loss {loss:.3f} ({seconds:.0f}s)")

    accs = experts.generate(store, net, real, meta, FLAGS.num_experts, config, seed=FLAGS.seed,
                            progress=progress, on_epoch=on_epoch)
    if accs:
        wd.say(f"experts: trained {len(accs)}, mean test accuracy {100 * np.mean(accs):.1f}%")
    return store, meta


# =====================================================================================
# Phase 2: condensation (checkpointed every --ckpt_every iterations)
# =====================================================================================
def phase_condense(real, net, store, meta):
    from esp_tf import condense
    trajectories = None
    if FLAGS.method != "dm":      # DM draws a fresh random network per iteration instead
        trajectories = store.load(meta, num_snapshots=condense.snapshots_needed(FLAGS.max_start_epoch,
                                                                               FLAGS.segment_length),
                                  max_experts=FLAGS.num_experts)
        wd.say(f"condense: {trajectories.shape[0]} experts x {trajectories.shape[1]} snapshots x "
               f"{trajectories.shape[2]} params")
    detail = {"esp": f"x {FLAGS.inner_steps} inner steps, losses {','.join(FLAGS.losses)}",
              "tm": f"x {FLAGS.inner_steps} unrolled student steps", "dm": ""}[FLAGS.method]
    wd.say(f"condense: {FLAGS.method.upper()} {FLAGS.iterations} iterations {detail}, IPC {FLAGS.ipc}, "
           f"param {FLAGS.param}")
    return condense.run(real, net, trajectories, cli.condense_settings())


# =====================================================================================
# Phase 3: evaluation of the condensed set and the baselines
# =====================================================================================
def _baseline_sets(real, net, store) -> dict:
    """Real-subset baselines with the run's IPC: random, and herding on expert 0's embeddings."""
    from esp_tf import baselines, data as data_lib
    sets = {}
    if "random" in FLAGS.baselines:
        rx, ry = data_lib.ClassBalancedSampler(real).random_subset(FLAGS.seed, FLAGS.ipc)
        sets["random"] = (data_lib.normalize(rx, real.mean, real.std).numpy(), ry)
    if "herding" in FLAGS.baselines:
        theta = store.read(0)[-1]                       # expert 0 after its last epoch
        hx, hy = baselines.herding_subset(real, net, theta, FLAGS.ipc)
        sets["herding"] = (data_lib.normalize(hx, real.mean, real.std).numpy(), hy)
    return sets


def phase_evaluate(real, net, store, images, labels):
    import tensorflow as tf
    from esp_tf import data as data_lib, evaluate, saved_models
    config = cli.eval_config()
    test_x = data_lib.normalize(real.test_images, real.mean, real.std).numpy()
    val = data_lib.val_dataset(real)
    results = wd.read_json(path("eval.json")) or {}
    sets = {FLAGS.method: (images, labels), **_baseline_sets(real, net, store)}
    for method, (x, y) in sets.items():
        if config.arch in results.get(method, {}):
            wd.say(f"evaluate: {method} on {config.arch} already in eval.json, skipped")
            continue
        bar = wd.Progress(f"eval {method}", FLAGS.eval_runs)

        def export_first(i, model, acc, method=method):
            if i == 0 and method == FLAGS.method:     # the classifier trained on the condensed set
                saved_models.export_classifier(model, real.mean, real.std, path("saved_model", "classifier"))
                wd.say(f"export: classifier SavedModel {path('saved_model', 'classifier')} "
                       f"(seed {FLAGS.seed}, test accuracy {acc:.2f}%, signature 'serve' takes uint8)")

        res = evaluate.evaluate(np.asarray(x), np.asarray(y), test_x, real.test_labels, real.num_classes,
                                config, runs=FLAGS.eval_runs, seed=FLAGS.seed, on_run=export_first, val=val,
                                progress=lambda i, n, acc, s: bar.update(i + 1, f"run {i}: {acc:.2f}%"))
        results.setdefault(method, {})[config.arch] = res
        wd.write_json(path("eval.json"), results)
        with tf.summary.create_file_writer(path("tensorboard")).as_default(step=0):
            tf.summary.text(f"eval/{method}/{config.arch}", f"{res['mean']:.2f} +- {res['std']:.2f} %")
            for i, acc in enumerate(res["accuracies"]):
                tf.summary.scalar(f"eval/{method}/{config.arch}", acc, step=i)
    return results


# =====================================================================================
# Phase 4: exports
# =====================================================================================
def phase_export(real, images, labels, synthetic, results):
    from esp_tf import data as data_lib, export, saved_models
    pixels = data_lib.denormalize(images, real.mean, real.std).numpy()
    clipped = data_lib.fraction_outside_pixel_range(images, real)
    if clipped > 0:
        wd.say(f"export: WARNING {100 * clipped:.2f}% of the set's values lie outside the pixel range "
               "0..255 and are clipped in the uint8 'image' feature (the run used --noclip_pixels); "
               "'image_normalized' holds the set exactly")
    grid = export.image_grid(pixels, labels, real.num_classes)
    export.save_png(grid, path("grid.png"))
    name = FLAGS.export_name or f"{FLAGS.method}_{real.name.split(':')[0]}_ipc{FLAGS.ipc}"
    meta = {"source_dataset": real.name, "method": FLAGS.method, "param": FLAGS.param, "ipc": FLAGS.ipc,
            "flags": cli.flag_values(), "accuracy": results.get(FLAGS.method, {}),
            "fraction_clipped_in_uint8": round(clipped, 6)}
    out = export.export_tfds(name=name, data_dir=path("tfds"), images=pixels, labels=labels,
                             class_names=list(real.class_names), metadata=meta,
                             images_normalized=np.asarray(images, np.float32))
    wd.say(f"export: grid {path('grid.png')}; TFDS dataset '{name}' in {out}")
    if synthetic is not None:
        gen = saved_models.export_generator(synthetic, real.mean, real.std,
                                            path("saved_model", "generator"))
        wd.say(f"export: generator SavedModel {gen} (signature 'render')")
    if os.path.exists(path("metrics.jsonl")):
        export.plot_curves(path("metrics.jsonl"), path("curves.png"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:      # library INFO chatter off unless asked for
        logging.set_verbosity(logging.WARNING)
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    prepare_workdir()
    t0 = time.time()
    real, net = _setup()
    phases = FLAGS.phases
    store = meta = None
    needs_experts = FLAGS.method != "dm" or "herding" in FLAGS.baselines
    if needs_experts and ("experts" in phases or "condense" in phases or "herding" in FLAGS.baselines):
        store, meta = phase_experts(real, net)
    images = labels = synthetic = None
    if "condense" in phases:
        images, labels, synthetic = phase_condense(real, net, store, meta)
    elif os.path.exists(path("synthetic.npz")):
        saved = np.load(path("synthetic.npz"))
        images, labels = saved["images"], saved["labels"]
    results = {}
    if images is not None and "evaluate" in phases:
        results = phase_evaluate(real, net, store, images, labels)
    if images is not None and "export" in phases:
        phase_export(real, images, labels, synthetic, results)
    if results:
        print(wd.results_table(results), flush=True)
    wd.say(f"done in {time.time() - t0:.0f}s; workdir {FLAGS.workdir}")


def run():
    from esp_tf.data import DatasetNotFoundError
    from esp_tf.trajectories import TrajectoryError
    try:
        app.run(main)
    except (wd.UserError, DatasetNotFoundError, TrajectoryError) as e:   # no traceback, exit 2
        wd.fail(str(e))
        sys.exit(2)


if __name__ == "__main__":
    run()
