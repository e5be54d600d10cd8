r"""esp_tf command line: experts -> condense -> evaluate -> export, in one workdir.

    python -m esp_tf.train --flagfile=configs/quickstart.flags

Reruns resume: finished experts are reused, condensation continues from its last
checkpoint, and phases whose outputs exist are not repeated. See README.md and BUILD.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import re
import sys
import tempfile
import time
import traceback

import numpy as np
from absl import app, logging

from esp_tf import cli, workdir as wd
from esp_tf.cli import FLAGS


# =====================================================================================
# Set-up: flags, workdir, data, model
# =====================================================================================
# Flags that may change between runs sharing a workdir without invalidating its results: scheduling,
# paths (a workdir is identified by its content, not by how a path is spelled; the expert store
# checks its own metadata and recipe), and per-architecture / per-name evaluation and export
# choices (eval.json holds one cell per method and architecture; exports are named).
_RERUN_SAFE = {"phases", "log_every", "ckpt_every", "restart", "jit_compile", "data_dir", "experts_dir",
               "workdir", "download", "verbose", "eval_arch", "baselines", "export_name"}
# Flags added after workdirs existed, with the value that reproduces what a run from before them
# did: a flags.txt without the flag is compared as if it held that value. (dm_reduction: those
# runs summed L_DM, so they resume only with --dm_reduction=sum, and the refusal names it.)
_ADDED_FLAGS = {"val_per_class": "0", "dm_reduction": "sum", "range_map": "clip"}
# Evaluation settings: changing them keeps the condensation, and moves aside the outputs they made.
_EVAL_FLAGS = ("eval_epochs", "eval_runs", "eval_batch", "eval_lr", "eval_dsa")
_EVAL_OUTPUTS = ("eval.json", os.path.join("saved_model", "classifier"), "tfds")
_OUTPUTS = ("ckpt", "synthetic.npz", "eval.json", "metrics.jsonl", "grid.png", "curves.png", "tfds",
            "saved_model", "tensorboard", "budget.json")
# What a run that stopped early (e.g. diverged before its first checkpoint) leaves is only logs;
# these are the results that other settings must not be mixed into.
_FINISHED = ("ckpt", "synthetic.npz", "eval.json", "tfds", "saved_model")
_MOVE_ASIDE = "its results are moved aside into a previous-<time>/ folder inside it, nothing is deleted"


def path(*parts) -> str:
    return os.path.join(FLAGS.workdir, *parts)


def _expand_paths():
    """`~` in path flags: bash leaves it alone after `=` (--data_dir=~/tensorflow_datasets)."""
    for name in ("data_dir", "workdir", "experts_dir"):
        if getattr(FLAGS, name):
            setattr(FLAGS, name, os.path.expanduser(getattr(FLAGS, name)))


def _check_writable(folder: str, flag: str):
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise wd.UserError(f"--{flag}={folder} is a file, not a directory; pass a directory")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise wd.UserError(f"--{flag}={folder} is not writable ({e.strerror}: {e.filename}); "
                           "pass a writable directory") from e


def _move_aside(names) -> str:
    """Moves workdir entries `names` into a new <workdir>/previous-<time>/ (same layout); returns it."""
    dest = base = path(time.strftime("previous-%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(dest):
        dest, n = f"{base}-{n}", n + 1
    for name in names:
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(path(name), target)       # a rename within the workdir: nothing is copied or lost
    return dest


def prepare_workdir():
    """Validates flags; refuses to mix a new configuration into an existing run's workdir.

    Returns the recorded flags of the run this one continues (None: a new run). flags.txt itself
    is written by `_write_flags` once the run has really started."""
    _expand_paths()
    errors = cli.validate()
    if FLAGS.data_dir and os.path.exists(FLAGS.data_dir) and not os.path.isdir(FLAGS.data_dir):
        errors.append(f"--data_dir={FLAGS.data_dir} is a file, not a directory")
    if errors:
        raise wd.UserError("invalid flags: " + "; ".join(errors))
    _check_writable(FLAGS.workdir, "workdir")
    old = wd.parse_flags_file(path("flags.txt")) if os.path.exists(path("flags.txt")) else None
    new = cli.flag_values()
    results = [name for name in _OUTPUTS if os.path.exists(path(name))]
    wanted = set(FLAGS.phases)       # checked before --restart moves anything
    if ("condense" not in wanted and wanted & {"evaluate", "export"}
            and (FLAGS.restart or "synthetic.npz" not in results)):
        raise wd.UserError(
            f"--phases={','.join(FLAGS.phases)} needs {path('synthetic.npz')}, which "
            + ("--restart would move aside" if FLAGS.restart and "synthetic.npz" in results else
               "does not exist (the condensation has not finished in this workdir)")
            + "; add the condense phase, e.g. --phases=experts,condense,evaluate,export")
    if FLAGS.restart:
        moved = results + (["flags.txt"] if old is not None else [])
        if moved:
            dest = _move_aside(moved)
            wd.say(f"--restart: moved the previous results ({', '.join(moved)}) to {dest}; "
                   "experts are kept")
        old = None
    elif old is None and results:
        raise wd.UserError(
            f"{FLAGS.workdir} holds results ({', '.join(results)}) but no flags.txt saying which settings "
            "made them, so they cannot be resumed or reported under these flags. Use another "
            f"--workdir, or pass --restart ({_MOVE_ASIDE}).")
    elif old is not None:
        recorded = lambda k: old.get(k, _ADDED_FLAGS.get(k, ""))       # noqa: E731
        changed = {k for k in new if k not in _RERUN_SAFE and k not in _EVAL_FLAGS and recorded(k) != new[k]}
        if changed and any(name in _FINISHED for name in results):
            raise wd.UserError(
                f"{FLAGS.workdir} holds a run with other settings ({', '.join(sorted(changed))} differ "
                f"from its flags.txt). Use another --workdir, or pass --restart ({_MOVE_ASIDE}).")
        if changed:     # a run that stopped before any result: its logs go aside, flags are replaced
            moved = f"; its logs ({', '.join(results)}) moved to {_move_aside(results)}" if results else ""
            wd.say(f"workdir {FLAGS.workdir} holds no results of its earlier settings ("
                   f"{', '.join(sorted(changed))} differ): starting with the new ones{moved}")
            old = None
        else:
            evals = [k for k in _EVAL_FLAGS if old.get(k, "") != new[k]]
            stale = [name for name in _EVAL_OUTPUTS if os.path.exists(path(name))]
            if evals and stale:
                dest = _move_aside(stale)
                wd.say(f"evaluation settings changed ({', '.join(evals)}): moved {', '.join(stale)} "
                       f"(made with the old settings) to {dest}; the condensation is kept")
            wd.say(f"workdir {FLAGS.workdir} exists with the same settings: resuming")
    return old


def _write_flags(old):
    """Writes flags.txt; its --phases is the union with the recorded run's, in phase order, so
    replaying the file reruns (and so resumes) every phase, not only the last partial rerun's."""
    text = cli.flags_file_text()
    if old is not None:
        recorded = set(old.get("phases", "").split(",")) | set(FLAGS.phases)
        text = re.sub(r"(?m)^--phases=.*$", "--phases=" + ",".join(p for p in cli.PHASES if p in recorded),
                      text)
    wd.atomic_write_text(path("flags.txt"), text)


def _check_data(real):
    """Data-dependent flag checks, before any expert or condensation work."""
    from esp_tf.synthetic import LatentSynthetic
    needs = {}
    if FLAGS.baselines:      # random and herding pick --ipc distinct real images per class
        needs[f"--baselines={','.join(FLAGS.baselines)}"] = FLAGS.ipc
    if FLAGS.init == "real" and FLAGS.param == "pixels":
        needs["--init=real"] = FLAGS.ipc
    elif FLAGS.init == "real":
        try:
            needs["--init=real"] = LatentSynthetic.codes_per_class_for(
                FLAGS.ipc, real.image_shape, real.num_classes, num_decoders=FLAGS.num_decoders,
                downsample=FLAGS.latent_downsample)
        except ValueError as e:
            raise wd.UserError(str(e)) from e
    smallest = int(real.train_counts.min())
    for what, need in needs.items():
        if need > smallest:
            raise wd.UserError(
                f"--ipc={FLAGS.ipc} needs {need} distinct real images per class for {what}, but the "
                f"smallest class of {real.name} has {smallest} train images; lower --ipc")


def _setup():
    import tensorflow as tf
    from esp_tf import data as data_lib, models
    tf.config.set_soft_device_placement(True)
    try:
        real = data_lib.load(FLAGS.dataset, FLAGS.data_dir, val_per_class=FLAGS.val_per_class,
                             download=FLAGS.download)
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
                               config, seed=FLAGS.seed)
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

        # The classifier of an earlier --eval_arch is kept: another architecture gets its own folder.
        classifier = path("saved_model", "classifier")
        if os.path.exists(classifier):
            classifier = path("saved_model", f"classifier_{config.arch}")

        def export_first(i, model, acc, method=method):
            if i == 0 and method == FLAGS.method:     # the classifier trained on the condensed set
                saved_models.export_classifier(model, real.mean, real.std, classifier)
                wd.say(f"export: classifier SavedModel {classifier} "
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
    from esp_tf import condensed
    tfds.disable_progress_bar()
    old = prepare_workdir()
    t0 = time.time()
    real, net = _setup()
    _check_data(real)
    _write_flags(old)      # the run has really started: flags and data are valid
    phases = FLAGS.phases
    store = meta = None
    needs_experts = FLAGS.method != "dm" or "herding" in FLAGS.baselines
    if needs_experts and ("experts" in phases or "condense" in phases or "herding" in FLAGS.baselines):
        store, meta = phase_experts(real, net)
    images = labels = synthetic = None
    if "condense" in phases:
        images, labels, synthetic = phase_condense(real, net, store, meta)
    elif os.path.exists(path("synthetic.npz")):
        images, labels = condensed.read_synthetic(path("synthetic.npz"))
    results = {}
    if images is not None and "evaluate" in phases:
        results = phase_evaluate(real, net, store, images, labels)
    if images is not None and "export" in phases:
        phase_export(real, images, labels, synthetic, results)
    if results:
        print(wd.results_table(results), flush=True)
    wd.say(f"done in {time.time() - t0:.0f}s; workdir {FLAGS.workdir}")


def _user_errors() -> tuple:
    """The errors that are the user's to fix. Imported only once one is raised: importing
    esp_tf.data loads TensorFlow, which --help must not wait for."""
    from esp_tf.data import DatasetNotFoundError
    from esp_tf.trajectories import TrajectoryError
    return wd.UserError, DatasetNotFoundError, TrajectoryError, OSError


def run():
    verbose = lambda: FLAGS.is_parsed() and FLAGS.verbose     # noqa: E731
    try:
        app.run(main, flags_parser=wd.flags_parser(__doc__, cli.__name__, wd.RENAMED_TRAIN_FLAGS))
    except SystemExit:          # --help, usage errors: before the clauses below import anything
        raise
    except _user_errors() as e:   # no traceback, exit 2
        if verbose():
            traceback.print_exc()
        wd.fail(str(e) if not isinstance(e, OSError) else
                f"{e.strerror or e}: {e.filename or ''} (free disk space or fix the permissions, then "
                "rerun the same command: it resumes)")
        sys.exit(2)
    except KeyboardInterrupt:
        if verbose():
            traceback.print_exc()
        wd.fail("interrupted. Rerun the same command to resume: finished experts and phases are kept "
                "and the condensation continues from its last checkpoint.")
        sys.exit(130)      # the shell's convention for a SIGINT exit
    except Exception as e:
        tf = sys.modules.get("tensorflow")       # imported by then if the error comes from it
        if tf is None or not isinstance(e, tf.errors.ResourceExhaustedError):
            raise
        if verbose():                            # a full disk under a checkpoint write, or memory
            traceback.print_exc()
        wd.fail(f"{e.message.splitlines()[0][:300]}: out of disk space or memory. Free some and rerun "
                "the same command: it resumes from the last checkpoint.")
        sys.exit(2)


if __name__ == "__main__":
    run()
