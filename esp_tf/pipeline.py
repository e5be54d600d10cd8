"""The whole esp_tf pipeline as a library call: experts -> condense -> evaluate -> export.

    from esp_tf import cli, pipeline
    settings = cli.settings(dataset="fashion_mnist_mini", ipc=1, num_experts=2, expert_epochs=3)
    results = pipeline.run(settings, "runs/mine")          # eval.json's content
    run = pipeline.load_run("runs/mine")                    # settings, data, net, store, set

`python -m esp_tf.train` is this with the settings read from flags. Reruns resume: finished
experts are reused, condensation continues from its last checkpoint, and phases whose outputs
exist are not repeated; a workdir holding a run of other settings is refused (see RELIABILITY.md).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time

import numpy as np

from esp_tf import cli, cluster, config as config_lib, fs, workdir as wd


# =====================================================================================
# Set-up: flags, workdir, data, model
# =====================================================================================
# What each flag is to a run's identity is marked on its setting in esp_tf/config.py (RUN,
# EXPERTS, RERUN_SAFE, EVALUATION, NOT_RECORDED); a method's and a parameterisation's settings
# belong to them (Method.flag_fields, the fields of the parameterisation's Config).
# A flag missing from an older flags.txt is compared as its default: a new flag's default keeps
# what runs did before it. The exceptions (FlagSpec.before_added) record what runs did before
# the flag existed: dm_reduction (they summed L_DM, today's default again) and
# latent_downsample (codes at 1/2); a run that differs is refused with the flag that resumes it.
_ADDED_FLAGS = config_lib.added_defaults()
_RERUN_SAFE = set(config_lib.names_with(config_lib.RERUN_SAFE))
_IDENTITY = set(config_lib.names_with(config_lib.RUN))
_EXPERT_FLAGS = set(config_lib.names_with(config_lib.EXPERTS))
# Evaluation settings: changing them keeps the condensation, and moves aside the outputs they made.
_EVAL_FLAGS = config_lib.names_with(config_lib.EVALUATION)
# eval_partial.json: the finished runs of an evaluation under way (workdir.partial_runs), folded
# into eval.json at its end.
_EVAL_OUTPUTS = ("eval.json", "eval_partial.json", os.path.join("saved_model", "classifier"), "tfds")
_OUTPUTS = ("ckpt", "synthetic.npz", "eval.json", "eval_partial.json", "metrics.jsonl", "grid.png",
            "curves.png", "tfds", "saved_model", "tensorboard", "budget.json")
# What a run that stopped early (e.g. diverged before its first checkpoint) leaves is only logs;
# these are the results that other settings must not be mixed into.
_FINISHED = ("ckpt", "synthetic.npz", "eval.json", "tfds", "saved_model")
_MOVE_ASIDE = "its results are moved aside into a previous-<time>/ folder inside it, nothing is deleted"


def _owned_flags() -> dict:
    """Flag -> where it belongs: 'method <name>' / 'param <name>' for every flag a registered
    method (`Method.flag_fields`) or parameterisation (the fields of its `Config`) reads, 'experts' for the
    expert recipe, and 'run', 'rerun-safe', 'evaluation' or 'not recorded' for the rest. A flag
    in none of them is a KeyError here (tests/test_faults.py keeps every flag classified)."""
    from esp_tf import methods, synthetic as synthetic_lib
    owners = {}
    for name in methods.names():
        for flag in methods.get(name).flag_fields:
            owners.setdefault(flag, set()).add(f"method {name}")
    for name, kind in synthetic_lib.PARAMETERISATIONS.items():
        for flag in synthetic_lib.setting_names(kind):
            owners.setdefault(flag, set()).add(f"param {name}")
    for group, names in (("run", _IDENTITY), ("experts", _EXPERT_FLAGS), ("rerun-safe", _RERUN_SAFE),
                         ("evaluation", set(_EVAL_FLAGS)), ("not recorded", set(cli._NOT_RECORDED))):
        for flag in names:
            owners.setdefault(flag, set()).add(group)
    missing = sorted(set(cli.NAMES) - set(owners))
    if missing:
        raise KeyError(f"flags of no identity class: {', '.join(missing)} (no registered method or "
                       "parameterisation reads them; esp_tf/config.py METHOD_FLAGS, PARAM_FLAGS)")
    return owners


def identity_flags(s) -> set:
    """The flags that decide what the run of `s` computes, so a workdir resumes only under the
    same values: the run's own (_IDENTITY), its method's and its parameterisation's settings,
    and the expert recipe when the run reads experts. Another method's setting, a setting of
    the other parameterisation, scheduling, paths and evaluation never refuse a finished run."""
    from esp_tf import methods
    reads_experts = methods.get(s.method).needs_trajectories or "herding" in s.baselines
    used = {"run", f"method {s.method}", f"param {s.param}"} | ({"experts"} if reads_experts else set())
    return {flag for flag, owners in _owned_flags().items()
            if owners & used and not owners & {"rerun-safe", "evaluation", "not recorded"}}


def _path(s, *parts) -> str:
    return os.path.join(s.workdir, *parts)


def check_writable(folder: str, flag: str):
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise wd.UserError(f"--{flag}={folder} is a file, not a directory; pass a directory")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise wd.UserError(f"--{flag}={folder} is not writable ({e.strerror}: {e.filename}); "
                           "pass a writable directory") from e


def _move_aside(s, names) -> str:
    """Moves workdir entries `names` into a new <workdir>/previous-<time>/ (same layout); returns it."""
    dest = wd.free_name(_path(s, time.strftime("previous-%Y%m%d-%H%M%S")))
    for name in names:
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(_path(s, name), target)       # a rename within the workdir: nothing is copied or lost
    return dest


def prepare_workdir(s):
    """Validates flags; refuses to mix a new configuration into an existing run's workdir.

    Returns the recorded flags of the run this one continues (None: a new run). flags.txt itself
    is written by `_write_flags` once the run has really started."""
    errors = cli.validate(s)
    if s.data_dir and os.path.exists(s.data_dir) and not os.path.isdir(s.data_dir):
        errors.append(f"--data_dir={s.data_dir} is a file, not a directory")
    if errors:
        raise wd.UserError("invalid flags: " + "; ".join(errors))
    check_writable(s.workdir, "workdir")
    old = wd.parse_flags_file(_path(s, "flags.txt")) if os.path.exists(_path(s, "flags.txt")) else None
    new = cli.values(s)
    results = [name for name in _OUTPUTS if os.path.exists(_path(s, name))]
    wanted = set(s.phases)       # checked before --restart moves anything
    if ("condense" not in wanted and wanted & {"evaluate", "export"}
            and (s.restart or "synthetic.npz" not in results)):
        raise wd.UserError(
            f"--phases={','.join(s.phases)} needs {_path(s, 'synthetic.npz')}, which "
            + ("--restart would move aside" if s.restart and "synthetic.npz" in results else
               "does not exist (the condensation has not finished in this workdir)")
            + "; add the condense phase, e.g. --phases=experts,condense,evaluate,export")
    if s.restart:
        moved = results + (["flags.txt"] if old is not None else [])
        if moved:
            dest = _move_aside(s, moved)
            wd.say(f"--restart: moved the previous results ({', '.join(moved)}) to {dest}; "
                   "experts are kept")
        old = None
    elif old is None and results:
        raise wd.UserError(
            f"{s.workdir} holds results ({', '.join(results)}) but no flags.txt saying which settings "
            "made them, so they cannot be resumed or reported under these flags. Use another "
            f"--workdir, or pass --restart ({_MOVE_ASIDE}).")
    elif old is not None:
        # a flag added since the run: what the run did, the flag's default unless _ADDED_FLAGS says
        default = cli.values(cli.settings(method=s.method, param=s.param))
        recorded = lambda k: old.get(k, _ADDED_FLAGS.get(k, default[k]))       # noqa: E731
        changed = {k for k in identity_flags(s) if recorded(k) != new[k]}
        if changed and any(name in _FINISHED for name in results):
            # a default that changed since the run (the code resolution at IPC 1) lands here
            # too: name the recorded values, so the run can be resumed as it was made
            diff = ", ".join(f"--{k}={recorded(k)} in its flags.txt, {new[k]} now" for k in sorted(changed))
            raise wd.UserError(
                f"{s.workdir} holds a run with other settings ({diff}). To resume it, pass "
                f"{' '.join(f'--{k}={recorded(k)}' for k in sorted(changed))} (or "
                f"--flagfile={_path(s, 'flags.txt')}); else use another --workdir, or pass "
                f"--restart ({_MOVE_ASIDE}).")
        if changed:     # a run that stopped before any result: its logs go aside, flags are replaced
            moved = f"; its logs ({', '.join(results)}) moved to {_move_aside(s, results)}" if results else ""
            wd.say(f"workdir {s.workdir} holds no results of its earlier settings ("
                   f"{', '.join(sorted(changed))} differ): starting with the new ones{moved}")
            old = None
        else:
            evals = [k for k in _EVAL_FLAGS if old.get(k, "") != new[k]]
            stale = [name for name in _EVAL_OUTPUTS if os.path.exists(_path(s, name))]
            if evals and stale:
                dest = _move_aside(s, stale)
                wd.say(f"evaluation settings changed ({', '.join(evals)}): moved {', '.join(stale)} "
                       f"(made with the old settings) to {dest}; the condensation is kept")
            wd.say(f"workdir {s.workdir} exists with the same settings: resuming")
    return old


def _write_flags(s, old):
    """Writes flags.txt; its --phases is the union with the recorded run's, in phase order, so
    replaying the file reruns (and so resumes) every phase, not only the last partial rerun's."""
    text = cli.flags_file_text(s)
    if old is not None:
        recorded = set(old.get("phases", "").split(",")) | set(s.phases)
        text = re.sub(r"(?m)^--phases=.*$", "--phases=" + ",".join(p for p in cli.PHASES if p in recorded),
                      text)
    wd.atomic_write_text(_path(s, "flags.txt"), text)


def _check_data(s, real):
    """Data-dependent flag checks, before any expert or condensation work."""
    from esp_tf import condense, synthetic as synthetic_lib
    needs = {}
    if s.baselines:      # random and herding pick --ipc distinct real images per class
        needs[f"--baselines={','.join(s.baselines)}"] = s.ipc
    settings = cli.condense_settings(s)
    try:
        # the set's design must fit its budget whatever the init (a latent design that does not
        # fit would otherwise fail only after the experts were trained)
        synthetic_lib.parameterisation(s.param).real_images_needed(settings, real.image_shape, real.num_classes)
        needs["--init=real"] = condense.real_images_needed(settings, real.image_shape, real.num_classes)
    except ValueError as e:
        raise wd.UserError(str(e)) from e
    smallest = int(real.train_counts.min())
    for what, need in needs.items():
        if need > smallest:
            raise wd.UserError(
                f"--ipc={s.ipc} needs {need} distinct real images per class for {what}, but the "
                f"smallest class of {real.name} has {smallest} train images; lower --ipc")


def _setup(s, quiet: bool = False):
    import tensorflow as tf
    from esp_tf import data as data_lib, models
    from esp_tf import folder, streamed
    tf.config.set_soft_device_placement(True)
    name = folder.name_for(folder.parse(s.dataset)[0], s.image_size) if folder.is_folder(s.dataset) else s.dataset
    try:
        real = data_lib.load(name, s.data_dir, val_per_class=s.val_per_class, download=s.download,
                             zca=s.zca, real_data="memory" if folder.is_folder(name) else s.real_data,
                             cache_dir=s.real_cache_dir)
    except (folder.FolderError, streamed.StreamError) as e:
        raise wd.UserError(str(e)) from e
    except ValueError as e:
        if s.val_per_class and "val_per_class" in str(e):
            raise wd.UserError(f"--{e}") from e
        raise
    val = f" / val {len(real.val_labels)}" if len(real.val_labels) else ""
    if not quiet:
        how = (f", streamed from {os.path.dirname(real.train_images.filename)}" if real.streamed else "")
        wd.say(f"data: {real.name} train {len(real.train_labels)}{val} / test {len(real.test_labels)} images, "
               f"{real.num_classes} classes, shape {real.image_shape}{how}")
    model = models.build(s.model, real.image_shape, real.num_classes,
                         width=s.width, depth=s.depth)
    return real, models.FlatModel(model)


# =====================================================================================
# Phase 1: experts (resumable: one finished TFRecord per expert)
# =====================================================================================
def phase_experts(s, real, net, worker):
    """Trains this worker's shard of the experts (`cluster.worker`: all of them for a single
    worker); with several workers and a later phase that reads every expert, then waits until
    the other workers have filled the store."""
    from esp_tf import experts
    from esp_tf.trajectories import TrajectoryStore
    config = cli.expert_config(s)
    store = TrajectoryStore(cli.experts_dir(s))
    meta = experts.expert_meta(net, s.model, cli.model_config(s), real.train_identity, real.num_classes,
                               config, seed=s.seed)
    mine = experts.shard(s.num_experts, worker.index, worker.count)
    finished = [k for k in store.completed() if k in set(mine)]
    name = "experts" if worker.count == 1 else f"experts worker {worker.index}/{worker.count}"
    if worker.count > 1:
        wd.say(f"experts: worker {worker.index} of {worker.count} (from {worker.source}) trains "
               f"{len(mine)} of {s.num_experts} experts (k % {worker.count} == {worker.index}) into "
               f"{store.directory}")
    bar = wd.Progress(name, len(mine), done=len(finished))

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

    accs = experts.generate(store, net, real, meta, s.num_experts, config, seed=s.seed,
                            progress=progress, on_epoch=on_epoch, worker_index=worker.index,
                            num_workers=worker.count, accept_weak=s.accept_weak_experts)
    if accs:
        wd.say(f"experts: trained {len(accs)}, mean test accuracy {100 * np.mean(accs):.1f}%")
    if worker.count > 1 and set(s.phases) != {"experts"}:
        _wait_for_experts(store, s.num_experts)
    return store, meta


def _wait_for_experts(store, num_experts: int, poll_seconds: float = 10.0) -> None:
    """Blocks until experts 0..num_experts-1 are all in `store` (the other workers' shards),
    saying every minute which are missing. No time limit: a launcher restarts a dead worker,
    which resumes its shard."""
    last = 0.0
    while True:
        missing = sorted(set(range(num_experts)) - set(store.completed()))
        if not missing:
            return
        if time.time() - last >= 60:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            wd.say(f"experts: waiting for {len(missing)} expert(s) from the other workers: {shown}")
            last = time.time()
        time.sleep(poll_seconds)


# =====================================================================================
# Phase 2: condensation (checkpointed every --ckpt_every iterations)
# =====================================================================================
def phase_condense(s, real, net, store, meta, strategy=None):
    from esp_tf import condense, methods
    settings = cli.condense_settings(s)
    trajectories = None
    if settings.method_class.needs_trajectories:      # DM draws fresh random networks instead
        from esp_tf.segments import StoreSource        # checks the store; reads a segment per iteration
        needed = condense.snapshots_needed(s.max_start_epoch, s.segment_length)
        trajectories = StoreSource(store, meta, s.num_experts, needed)
        wd.say(f"condense: {s.num_experts} experts x {needed} snapshots x {meta.num_params} params, "
               "one segment read per iteration")
    detail = methods.get(s.method).describe(settings.method_config)
    wd.say(f"condense: {s.method.upper()} {s.iterations} iterations{' ' + detail if detail else ''}, "
           f"IPC {s.ipc}, param {s.param}")
    if strategy is not None:
        wd.say(f"condense: {strategy.num_replicas_in_sync} replicas ({type(strategy).__name__}); "
               "each update is split across them")
    return condense.run(real, net, trajectories, settings, strategy)


# =====================================================================================
# Phase 3: evaluation of the condensed set and the baselines
# =====================================================================================
def _baseline_sets(s, real, net, store) -> dict:
    """Real-subset baselines with the run's IPC: random, and herding on expert 0's embeddings."""
    from esp_tf import baselines, data as data_lib
    sets = {}
    if "random" in s.baselines:
        rx, ry = data_lib.ClassBalancedSampler(real).random_subset(s.seed, s.ipc)
        sets["random"] = (data_lib.to_model(real, rx).numpy(), ry)
    if "herding" in s.baselines:
        theta = store.read(0)[-1]                       # expert 0 after its last epoch
        hx, hy = baselines.herding_subset(real, net, theta, s.ipc)
        sets["herding"] = (data_lib.to_model(real, hx).numpy(), hy)
    return sets


def phase_evaluate(s, real, net, store, images, labels):
    import tensorflow as tf
    from esp_tf import data as data_lib, evaluate, saved_models
    config = cli.eval_config(s)
    test_x = (data_lib.test_dataset(real) if real.streamed    # read as the evaluation goes
              else data_lib.to_model_array(real, real.test_images))
    val = data_lib.val_dataset(real)
    results = wd.read_results(_path(s, "eval.json"))
    sets = {s.method: (images, labels), **_baseline_sets(s, real, net, store)}
    for method, (x, y) in sets.items():
        if config.arch in results.get(method, {}):
            wd.say(f"evaluate: {method} on {config.arch} already in eval.json, skipped")
            continue
        bar = wd.Progress(f"eval {method}", s.eval_runs)

        # The classifier of an earlier --eval_arch is kept: another architecture gets its own
        # folder. One left by an interrupted evaluation of this architecture (none other is in
        # eval.json) is replaced, so no second classifier appears beside it.
        classifier = _path(s, "saved_model", "classifier")
        others = {a for per in results.values() for a in per} - {config.arch}
        if others and os.path.exists(classifier):
            classifier = _path(s, "saved_model", f"classifier_{config.arch}")

        def export_first(i, model, acc, method=method):
            if i == 0 and method == s.method:     # the classifier trained on the condensed set
                saved_models.export_classifier(model, real.mean, real.std, classifier,
                                              whitening=real.whitening)
                wd.say(f"export: classifier SavedModel {classifier} "
                       f"(seed {s.seed}, test accuracy {acc:.2f}%, signature 'serve' takes uint8)")

        # An interrupted evaluation resumes at its first unfinished run: each finished run is in
        # eval_partial.json (run i depends only on its seed; the workdir's flags guard the settings,
        # changed evaluation flags move the file aside). Run 0 is reused only beside the
        # classifier it exported.
        partial_path = _path(s, "eval_partial.json")
        done, save_run = wd.partial_runs(partial_path, method, config.arch, {})
        done = {i: r for i, r in done.items() if i < s.eval_runs}
        if method == s.method and 0 in done and not os.path.exists(classifier):
            del done[0]
        if val is not None and any(v is None for _, v in done.values()):
            done = {}
        if done:
            wd.say(f"evaluate: {method} on {config.arch} resumes with {len(done)} of {s.eval_runs} runs "
                   f"finished ({partial_path})")

        res = evaluate.evaluate(np.asarray(x), np.asarray(y), test_x, real.test_labels, real.num_classes,
                                config, runs=s.eval_runs, seed=s.seed, on_run=export_first, val=val,
                                done=done, on_done=save_run,
                                on_epoch=wd.EpochProgress(f"eval {method} epochs", s.eval_runs, config.epochs),
                                progress=lambda i, n, acc, _: bar.update(
                                    i + 1, f"run {i}: {acc:.2f}%" + (" (finished earlier)" if i in done else "")))
        results.setdefault(method, {})[config.arch] = res
        wd.write_json(_path(s, "eval.json"), results)
        wd.drop_json_cell(partial_path, method, config.arch, sole_writer=True)   # folded into eval.json
        with tf.summary.create_file_writer(_path(s, "tensorboard")).as_default(step=0):
            tf.summary.text(f"eval/{method}/{config.arch}", f"{res['mean']:.2f} +- {res['std']:.2f} %")
            for i, acc in enumerate(res["accuracies"]):
                tf.summary.scalar(f"eval/{method}/{config.arch}", acc, step=i)
    return results


# =====================================================================================
# Phase 4: exports
# =====================================================================================
def phase_export(s, real, images, labels, synthetic, results):
    from esp_tf import data as data_lib, export, saved_models
    pixels = data_lib.to_pixels(real, images).numpy()
    clipped = data_lib.fraction_outside_pixel_range(images, real)
    if clipped > 0:
        wd.say(f"export: WARNING {100 * clipped:.2f}% of the set's values lie outside the pixel range "
               "0..255 and are clipped in the uint8 'image' feature (the run used --noclip_pixels); "
               "'image_normalized' holds the set exactly")
    grid = export.image_grid(pixels, labels, real.num_classes)
    export.save_png(grid, _path(s, "grid.png"))
    from esp_tf import folder
    source = folder.short_name(real.name) if folder.is_folder(real.name) else real.name.split(':')[0]
    name = s.export_name or f"{s.method}_{source}_ipc{s.ipc}"
    meta = {"source_dataset": real.name, "method": s.method, "param": s.param, "ipc": s.ipc,
            "flags": cli.values(s), "accuracy": results.get(s.method, {}),
            "fraction_clipped_in_uint8": round(clipped, 6),
            # ZCA-whitened runs: 'image' holds the un-whitened pixels; 'image_normalized' the network
            # inputs, which a reader reproduces from 'image' by fitting the same ZCA on the source
            # train split minus this validation split (esp_tf.evaluate does)
            "zca": real.whitening is not None, "val_per_class": s.val_per_class}
    out = export.export_tfds(name=name, data_dir=_path(s, "tfds"), images=pixels, labels=labels,
                             class_names=list(real.class_names), metadata=meta,
                             images_normalized=np.asarray(images, np.float32))
    wd.say(f"export: grid {_path(s, 'grid.png')}; TFDS dataset '{name}' in {out}")
    if synthetic is not None:
        gen = saved_models.export_generator(synthetic, real.mean, real.std,
                                            _path(s, "saved_model", "generator"), whitening=real.whitening)
        wd.say(f"export: generator SavedModel {gen} (signature 'render')")
    if os.path.exists(_path(s, "metrics.jsonl")):
        export.plot_curves(_path(s, "metrics.jsonl"), _path(s, "curves.png"))


# =====================================================================================
# The pipeline
# =====================================================================================
def run(settings, workdir: str) -> dict:
    """Runs the phases of `settings` (a config.RunConfig, or the flat cli.Settings) in
    `workdir` (resuming what a previous run there finished) and returns the evaluation results
    ({method: {arch: summary}}, those of eval.json; empty without the evaluate phase). Raises
    workdir.UserError for anything the user must fix, among them another run holding the
    workdir (`workdir.WorkdirLock`, taken first)."""
    if isinstance(settings, config_lib.RunConfig):
        settings = cli.settings_from(settings)
    s = dataclasses.replace(settings, workdir=os.path.expanduser(workdir) if workdir else workdir)
    if not s.workdir:
        raise wd.UserError("invalid flags: --workdir is required")
    check_writable(s.workdir, "workdir")
    with wd.WorkdirLock(s.workdir):
        return _run_locked(s)


def _run_locked(s) -> dict:
    import tensorflow_datasets as tfds
    from esp_tf import condensed, methods
    tfds.disable_progress_bar()
    old = prepare_workdir(s)
    worker = cluster.worker(s.worker_index, s.num_workers)
    strategy = cluster.make_strategy(s.strategy)     # first: multi_worker configures the runtime
    t0 = time.time()
    real, net = _setup(s)
    _check_data(s, real)
    _write_flags(s, old)      # the run has really started: settings and data are valid
    store = meta = None
    needs_experts = methods.get(s.method).needs_trajectories or "herding" in s.baselines
    if needs_experts and ("experts" in s.phases or "condense" in s.phases or "herding" in s.baselines):
        store, meta = phase_experts(s, real, net, worker)
    images = labels = synthetic = None
    if "condense" in s.phases:
        images, labels, synthetic = phase_condense(s, real, net, store, meta, strategy)
        if s.strategy == "multi_worker" and worker.index > 0:
            wd.say(f"condense: worker {worker.index} done; worker 0 (the chief) evaluates and exports")
            return {}
    elif os.path.exists(_path(s, "synthetic.npz")):
        images, labels = condensed.read_synthetic(_path(s, "synthetic.npz"))
    results = {}
    if images is not None and "evaluate" in s.phases:
        results = phase_evaluate(s, real, net, store, images, labels)
    if images is not None and "export" in s.phases:
        phase_export(s, real, images, labels, synthetic, results)
    if results:
        print(wd.results_table(results), flush=True)
    wd.say(f"done in {time.time() - t0:.0f}s; workdir {s.workdir}")
    return results


@dataclasses.dataclass
class Run:
    """A finished (or partial) run, rebuilt from its workdir for tools: its settings (as
    recorded in flags.txt), its real data (with the run's validation split), its student
    network, its expert store (None when the directory does not exist) and its condensed set
    (images normalised, labels; None before the condensation finished)."""
    settings: cli.Settings
    real: object
    net: object
    store: object
    images: np.ndarray | None
    labels: np.ndarray | None

    @property
    def condense_settings(self):
        return cli.condense_settings(self.settings)


def load_run(workdir: str, data_dir: str | None = None) -> Run:
    """Rebuilds the run in `workdir` from its flags.txt (`data_dir` overrides the recorded one)."""
    from esp_tf import condensed
    from esp_tf.trajectories import TrajectoryStore
    flags_txt = os.path.join(workdir, "flags.txt")
    if not os.path.exists(flags_txt):
        raise wd.UserError(f"{workdir} is not an esp_tf workdir ({flags_txt} is missing)")
    s = cli.from_values(wd.parse_flags_file(flags_txt))
    s = dataclasses.replace(s, workdir=workdir, **({"data_dir": data_dir} if data_dir else {}))
    real, net = _setup(s, quiet=True)
    directory = cli.experts_dir(s)
    store = TrajectoryStore(directory) if fs.isdir(directory) else None
    images = labels = None
    if os.path.exists(os.path.join(workdir, "synthetic.npz")):
        images, labels = condensed.read_synthetic(os.path.join(workdir, "synthetic.npz"))
    return Run(s, real, net, store, images, labels)
