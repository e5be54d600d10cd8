"""The condensation loop, for every registered method and parameterisation, with checkpoints
and resume.

    for it in iterations:                        # resumes at the last checkpointed iteration
        metrics = method.iteration(it)           # ESP: segment -> E = qr(segment) -> N updates

The loop knows no method or parameterisation by name: `esp_tf.methods` and
`synthetic.PARAMETERISATIONS` supply them. Every random draw derives from (seed, iteration,
update), and the checkpoint holds the synthetic set, the optimizers' state, the method's own
variables and the iteration, so a resumed run ends where an uninterrupted one would. Writes
<workdir>/ckpt/, metrics.jsonl, budget.json, tensorboard/ and synthetic.npz.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from esp_tf import config, data as data_lib, fs, methods, synthetic as synthetic_lib, workdir as wd
from esp_tf.methods.base import Context
from esp_tf.models import FlatModel


@dataclasses.dataclass(frozen=True)
class CondenseSettings:
    workdir: str
    method: str = "esp"              # a name in esp_tf.methods (esp, or the baselines dm, tm)
    method_config: object = None     # that method's Config; None: its defaults
    # defaults: the settings' own, in esp_tf/config.py (one default per setting)
    ipc: int = config.CondenseConfig.ipc
    init: str = config.CondenseConfig.init
    iterations: int = config.CondenseConfig.iterations
    segment_length: int = config.ExpertsConfig.segment_length
    max_start_epoch: int = config.ExpertsConfig.max_start_epoch   # segments start at t ~ U{0..this-1} (MTT)
    param: str = "pixels"            # a name in synthetic.PARAMETERISATIONS (pixels, latents)
    param_config: object = None      # that parameterisation's Config (synthetic.py); None: its defaults
    lr_schedule: str = config.CondenseConfig.lr_schedule   # linear decay to 0 over all updates, or constant
    clip_pixels: bool = config.CondenseConfig.clip_pixels  # renders kept inside the real pixel range
    range_map: str = config.CondenseConfig.range_map       # ... by clipping, or a smooth tanh map
    seed: int = config.RunConfig.seed
    ckpt_every: int = config.CondenseConfig.ckpt_every
    log_every: int = config.CondenseConfig.log_every
    jit_compile: bool = config.CondenseConfig.jit_compile

    def __post_init__(self):
        method = methods.get(self.method)             # raises on an unknown name
        for field, kind, label in (("method_config", method, "method " + repr(self.method)),
                                   ("param_config", synthetic_lib.parameterisation(self.param),
                                    "param " + repr(self.param))):
            value = getattr(self, field)
            if value is None:
                object.__setattr__(self, field, kind.Config())
            elif not isinstance(value, kind.Config):
                raise ValueError(f"{field} of {label} must be a {kind.Config.__name__}, got "
                                 f"{type(value).__name__}")

    @property
    def method_class(self):
        return methods.get(self.method)

    @property
    def updates_per_iteration(self) -> int:
        return self.method_class.updates_per_iteration(self.method_config)


def settings(**values) -> CondenseSettings:
    """CondenseSettings from flat names, as the command line's flags: the fields of the chosen
    parameterisation's Config (e.g. num_decoders, pixels_lr) go into its `param_config`; those of
    other parameterisations are not read (as on the command line)."""
    kind = synthetic_lib.parameterisation(values.get("param", "pixels"))
    names = set(synthetic_lib.setting_names(kind))
    others = {n for k in synthetic_lib.PARAMETERISATIONS.values() for n in synthetic_lib.setting_names(k)}
    given = {k: values.pop(k) for k in list(values) if k in names}
    for k in [k for k in values if k in others]:
        del values[k]
    return CondenseSettings(**values, param_config=kind.Config(**given))


def snapshots_needed(max_start_epoch: int, segment_length: int) -> int:
    """Snapshots per expert that segments can reach: starts 0..max_start_epoch-1 (exclusive, as
    MTT) plus segment_length epochs, plus the init snapshot. Experts need train only
    max_start_epoch - 1 + segment_length epochs."""
    return max_start_epoch + segment_length


def real_images_needed(s: CondenseSettings, image_shape, num_classes: int) -> int:
    """Distinct real images per class that the set's init takes (0 unless init='real')."""
    if s.init != "real":
        return 0
    return synthetic_lib.parameterisation(s.param).real_images_needed(s, image_shape, num_classes)


def make_synthetic(real: data_lib.RealData, s: CondenseSettings):
    """The learnable set for s.param: IPC images per class, or codes + decoders in that budget."""
    kind = synthetic_lib.parameterisation(s.param)
    try:
        n = real_images_needed(s, real.image_shape, real.num_classes)
        real_images = None
        if n:                                # n random real images per class, normalised, class-major
            x, _ = data_lib.ClassBalancedSampler(real).random_subset(s.seed, n)
            real_images = data_lib.to_model(real, x).numpy()
        bounds = data_lib.pixel_range(real) if s.clip_pixels else None
        return kind.from_settings(s, real.num_classes, real.image_shape, real_images, bounds)
    except ValueError as e:                  # e.g. a budget the parameterisation cannot meet
        raise wd.UserError(str(e)) from e


def make_optimizers(s: CondenseSettings) -> dict:
    """One optimizer per variable group of the synthetic set (the parameterisation names the
    optimizer and lr of each, pixels taking the method's own), each with the --lr_schedule, plus
    the method's optimizers of its own variables."""
    total = s.iterations * s.updates_per_iteration

    def schedule(lr):
        if s.lr_schedule == "linear":
            return keras.optimizers.schedules.PolynomialDecay(lr, total, 0.0, power=1.0)
        return lr

    groups = synthetic_lib.parameterisation(s.param).learning_rates(s, s.method_class)
    opts = {name: make(schedule(lr)) for name, (make, lr) in groups.items()}
    return {**opts, **s.method_class.extra_optimizers(s.method_config)}


NONFINITE_ADVICE = ("Usual causes: a too large --inner_lr, --pixels_lr (--codes_lr/--decoders_lr with "
                    "--param=latents, --student_lr_init/--student_lr_lr with --method=tm) or --beta. Lower them and "
                    "rerun in a new --workdir, or in this one with --restart (its results are moved aside).")


def _save_synthetic(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    if not np.all(np.isfinite(images)):      # never reached while the in-loop check holds
        raise wd.UserError(f"the condensed set holds NaN/inf values; {path} was not written. "
                           f"{NONFINITE_ADVICE}")
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    wd.atomic_write_bytes(path, buf.getvalue())


def run(real: data_lib.RealData, net: FlatModel, trajectories, s: CondenseSettings, strategy=None):
    """Condenses `real` with the method of `s`, guided by `trajectories` when the method reads
    them (None otherwise): an array [K, S, P], or a `segments` source that reads one segment
    per iteration (segments.StoreSource). With a tf.distribute `strategy`, the set and its
    optimizers are mirrored and every update is split across the replicas (`data_parallel`).

    Returns (images, labels, synthetic): the rendered set as normalised float32 [C*M, H, W, Ch]
    (what the model sees) with int32 labels, and the learnable set itself. A finished run
    restores its last checkpoint and returns at once.
    """
    method_class = s.method_class
    if method_class.needs_trajectories:
        needed = snapshots_needed(s.max_start_epoch, s.segment_length)
        if trajectories is not None:
            from esp_tf import segments
            trajectories = segments.as_source(trajectories)
        if trajectories is None or trajectories.num_snapshots < needed:
            have = "none" if trajectories is None else f"{trajectories.num_snapshots} snapshots"
            raise wd.UserError(f"method {s.method} needs expert trajectories of max_start_epoch + "
                               f"segment_length = {needed} snapshots; got {have}")
    if strategy is not None:
        _check_data_parallel(s, strategy)
    if real.streamed and s.jit_compile:      # --real_data=auto chose to stream
        raise wd.UserError(f"{real.name} is streamed from disk (--real_data), and its real batches are "
                           "read on the host, which XLA cannot compile: drop --jit_compile, or pass "
                           "--real_data=memory on a machine that holds the dataset")
    with data_parallel_scope(strategy):
        syn = make_synthetic(real, s)
    budget = syn.budget()
    wd.write_json(os.path.join(s.workdir, "budget.json"), budget)
    wd.say(f"synthetic set: {s.param}, {budget['params_per_class']:.0f} stored floats per class "
           f"(budget {budget['budget_per_class']}), {syn.images_per_class} images rendered per class")
    with data_parallel_scope(strategy):
        optimizers = make_optimizers(s)
        context = Context(net=net, synthetic=syn, optimizers=optimizers,
                          sampler=data_lib.ClassBalancedSampler(real),
                          trajectories=trajectories if method_class.needs_trajectories else None,
                          segment_length=s.segment_length, max_start_epoch=s.max_start_epoch, seed=s.seed,
                          jit_compile=s.jit_compile, strategy=strategy)
        method = method_class(context, s.method_config)
    extra = method.state()
    iteration = tf.Variable(0, dtype=tf.int64, name="iteration")
    ckpt = tf.train.Checkpoint(synthetic=syn, iteration=iteration, **extra,
                               **{f"opt_{k}": o for k, o in optimizers.items()})
    manager = tf.train.CheckpointManager(ckpt, os.path.join(s.workdir, "ckpt"), max_to_keep=2)
    restored = _restore_last_intact(ckpt, manager)
    if restored:
        wd.say(f"condense: resumed from {restored} at iteration {int(iteration)}")
    metrics_path = os.path.join(s.workdir, "metrics.jsonl")
    _drop_metrics_after(metrics_path, int(iteration))

    # The set is checked for NaN/inf after every update, in-graph: `finite` stays True until one
    # update makes any variable of the set non-finite; it is read once per iteration (the loop
    # reads the loss then anyway), before anything is logged, checkpointed or saved.
    watched = list(syn.trainable_variables) + list(extra.values())
    finite = tf.Variable(True, trainable=False, name="finite")

    @tf.function
    def check_finite():
        ok = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in watched]))
        finite.assign(tf.logical_and(finite, ok))

    board = tf.summary.create_file_writer(os.path.join(s.workdir, "tensorboard"))

    def grid_summary(step: int):
        from esp_tf import export
        images, labels = syn.render()
        pixels = data_lib.to_pixels(real, images).numpy()
        grid = export.image_grid(pixels, labels.numpy(), real.num_classes)
        with board.as_default(step=step):
            tf.summary.image("synthetic", grid[None])
    bar = wd.Progress("condense", s.iterations, done=int(iteration))
    sums, count, t_log = {}, 0, time.time()
    per_it = s.updates_per_iteration
    while int(iteration) < s.iterations:
        it = int(iteration)
        metrics, info = method.iteration(it, check_finite)
        for m in metrics:
            for name, v in m.items():
                sums[name] = sums.get(name, 0.0) + v
            count += 1
        loss = float(metrics[-1]["loss"])
        set_finite = bool(finite.numpy())
        if not np.isfinite(loss) or not set_finite:
            what = ("the synthetic set became non-finite (NaN or inf)" if not set_finite else
                    f"the {s.method.upper()} loss became non-finite ({loss})")
            last = (f"the last checkpoint, {manager.latest_checkpoint}, is finite"
                    if manager.latest_checkpoint else "no checkpoint was written yet")
            raise wd.UserError(f"{what} at iteration {it + 1}; it was not checkpointed or saved "
                               f"({last}). {NONFINITE_ADVICE}")
        iteration.assign_add(1)
        done = it + 1
        if done % s.log_every == 0 or done == s.iterations:
            row = {name: float(v) / count for name, v in sums.items()}
            row.update({k: int(v) for k, v in info.items()})
            row.update(iteration=done, updates=done * per_it, time=time.time(),
                       seconds_per_update=(time.time() - t_log) / count)
            wd.append_jsonl(metrics_path, row)
            with board.as_default(step=done):
                for name, value in row.items():
                    if name not in ("iteration", "updates", "time", "expert", "start_epoch"):
                        tf.summary.scalar(f"condense/{name}", value)
            shown = [f"{k} {row[k]:.4g}" for k in ("loss", "dm", "proj", "pull", "ce", "syn_lr") if k in row]
            bar.update(done, " ".join(shown))
            sums, count, t_log = {}, 0, time.time()
        if done % s.ckpt_every == 0 or done == s.iterations:
            manager.save(checkpoint_number=done)
            grid_summary(done)
            board.flush()
    images, labels = (t.numpy() for t in syn.render())
    _save_synthetic(os.path.join(s.workdir, "synthetic.npz"), images, labels)
    return images, labels, syn


def _check_data_parallel(s: CondenseSettings, strategy) -> None:
    """What a split update needs: a method with one, and a real batch that splits evenly."""
    if not s.method_class.data_parallel:
        raise wd.UserError(f"method {s.method} has no data-parallel update; run it without --strategy")
    replicas, config = strategy.num_replicas_in_sync, s.method_config
    per_class = getattr(config, "real_per_class", 0) if getattr(config, "needs_real", True) else 0
    if per_class % replicas:
        raise wd.UserError(f"--real_per_class={per_class} must be a multiple of the {replicas} replicas "
                           "of --strategy (each embeds an equal share of every class's real batch)")


def data_parallel_scope(strategy):
    """strategy.scope() (variables made inside are mirrored), or no scope without a strategy."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _checkpoint_problem(path: str) -> str | None:
    """Why checkpoint `path` cannot be resumed from ("damaged ..." or "non-finite"), or None.

    Reads every tensor through a CheckpointReader, which verifies the files (a missing or
    truncated shard raises) without touching the live variables."""
    try:
        reader = tf.train.load_checkpoint(path)
        tensors = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map()]
    except (tf.errors.OpError, ValueError, OSError, IndexError) as e:   # IndexError: a short read
        return f"damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if any(np.issubdtype(np.asarray(t).dtype, np.floating) and not np.all(np.isfinite(t)) for t in tensors):
        return "non-finite (holds NaN/inf values)"
    return None


def _restore_last_intact(ckpt, manager) -> str | None:
    """Restores the newest intact, finite checkpoint of `manager`; returns its path (None: none)."""
    skipped, paths = [], list(manager.checkpoints)
    if not paths:    # a lost or garbled `checkpoint` index lists nothing, but the shards remain
        found = fs.glob(os.path.join(manager.directory, "ckpt-*.index"))
        paths = sorted((p[:-len(".index")] for p in found), key=lambda p: int(p.rsplit("-", 1)[1]))
    for path in reversed(paths):           # newest first
        problem = _checkpoint_problem(path)
        if problem:
            wd.say(f"condense: checkpoint {path} is {problem}; trying an older one")
            skipped.append(path)
            continue
        try:
            ckpt.restore(path).assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as e:
            raise wd.UserError(
                f"the checkpoint {path} does not match this configuration "
                f"({str(e).splitlines()[0][:300]}). Use another --workdir, or --restart to move this "
                "run's results aside.") from e
        return path
    if skipped:
        raise wd.UserError(
            f"no intact checkpoint to resume from: {', '.join(skipped)} cannot be used (see above). "
            "Pass --restart to move this run's results aside and condense from scratch (an intact "
            "synthetic.npz can still be evaluated and exported with --phases=evaluate,export).")
    return None


def _drop_metrics_after(path: str, iteration: int) -> None:
    """Keeps the rows of metrics.jsonl up to `iteration` (the resumed one): rows logged after the
    last checkpoint are logged again by the resumed run, and a killed writer may leave half a line
    (damaged lines are dropped, with a warning)."""
    if not fs.exists(path):
        return
    with fs.open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    kept = [json.dumps(r, sort_keys=True) for r in wd.read_jsonl(path, required=("iteration",))
            if isinstance(r["iteration"], int) and r["iteration"] <= iteration]
    if kept != lines:
        wd.atomic_write_text(path, "".join(line + "\n" for line in kept))
