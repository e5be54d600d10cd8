"""The condensation loop: expert segments -> subspaces -> ESP updates, with checkpoints and resume.

    for it in iterations:                        # resumes at the last checkpointed iteration
        segment = random expert k, epochs t..t+T  (in-graph, seeded by (seed, it))
        E = qr(segment); theta = theta*_t
        for n in 1..N: theta = esp_step(theta, E, seed(it, n))   # one synthetic update each

Every random draw derives from (seed, iteration, inner step), and the checkpoint holds the
synthetic set, Adam's state and the iteration, so a resumed run ends where an uninterrupted
one would. Writes <workdir>/ckpt/, metrics.jsonl and synthetic.npz.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from esp_tf import data as data_lib, subspace, workdir as wd
from esp_tf.baselines import DMConfig, DMStep, TMConfig, TMStep
from esp_tf.esp import ESPConfig, ESPStep
from esp_tf.models import FlatModel
from esp_tf.synthetic import LatentSynthetic, PixelSynthetic


METHODS = ("esp", "dm", "tm")


@dataclasses.dataclass(frozen=True)
class CondenseSettings:
    workdir: str
    method: str = "esp"              # esp, or the baselines dm (distribution matching), tm (MTT)
    ipc: int = 1
    init: str = "real"
    iterations: int = 1000
    inner_steps: int = 10
    segment_length: int = 2
    max_start_epoch: int = 20        # segments start at epoch t ~ U{0..max_start_epoch-1} (MTT)
    esp: ESPConfig = ESPConfig()
    dm: DMConfig = DMConfig()
    tm: TMConfig = TMConfig()
    lr_lr: float = 1e-5              # tm: SGD lr of the learnable student lr (MTT)
    param: str = "pixels"            # "pixels" or "latents" (codes + shared decoders, paper 4.2)
    lr_pixels: float = 0.01          # Adam lr of pixels (normalised units)
    lr_codes: float = 0.1            # Adam lr of latent codes (paper 4.2)
    lr_decoders: float = 0.01        # Adam lr of the shared decoders (paper 4.2)
    num_decoders: int = 4            # latents: decoders shared by all classes
    latent_downsample: int = 2       # latents: codes are H/f x W/f
    lr_schedule: str = "linear"      # linear decay to 0 over all updates (paper 4.2), or constant
    clip_pixels: bool = True         # renders kept inside the real pixel range [0, 255] (synthetic.py)
    range_map: str = "clip"          # ... by clipping, or "tanh": a smooth map that keeps every gradient
    seed: int = 0
    ckpt_every: int = 50
    log_every: int = 10
    jit_compile: bool = False


def snapshots_needed(max_start_epoch: int, segment_length: int) -> int:
    """Snapshots per expert that segments can reach: starts 0..max_start_epoch-1 (exclusive, as
    MTT) plus segment_length epochs, plus the init snapshot. Experts need train only
    max_start_epoch - 1 + segment_length epochs."""
    return max_start_epoch + segment_length


def real_init(real: data_lib.RealData, s: CondenseSettings, per_class: int):
    """per_class random real images of each class, normalised, class-major (or None)."""
    if s.init != "real":
        return None
    x, _ = data_lib.ClassBalancedSampler(real).random_subset(s.seed, per_class)
    return data_lib.normalize(x, real.mean, real.std).numpy()


def make_synthetic(real: data_lib.RealData, s: CondenseSettings):
    """The learnable set for --param: IPC images per class, or codes + decoders in that budget."""
    bounds = data_lib.pixel_range(real) if s.clip_pixels else None
    if s.param == "latents":
        design = {"num_decoders": s.num_decoders, "downsample": s.latent_downsample}
        try:
            n = LatentSynthetic.codes_per_class_for(s.ipc, real.image_shape, real.num_classes, **design)
        except ValueError as e:
            raise wd.UserError(str(e)) from e
        return LatentSynthetic(real.num_classes, s.ipc, real.image_shape, init=s.init,
                               real_images=real_init(real, s, n), seed=s.seed, pixel_range=bounds,
                               range_map=s.range_map, **design)
    if s.param != "pixels":
        raise ValueError(f"param must be pixels or latents, got {s.param!r}")
    return PixelSynthetic(real.num_classes, s.ipc, real.image_shape, init=s.init,
                          real_images=real_init(real, s, s.ipc), seed=s.seed, pixel_range=bounds,
                          range_map=s.range_map)


def updates_per_iteration(s: CondenseSettings) -> int:
    """Synthetic updates per iteration: ESP updates once per inner step, DM/TM once."""
    return s.inner_steps if s.method == "esp" else 1


def make_optimizers(s: CondenseSettings) -> dict:
    """One optimizer per variable group of the synthetic set, each with the --lr_schedule.

    Latents: Adam (paper 4.2). Pixels: Adam for ESP (paper's outer optimizer), SGD with
    momentum 0.5 for DM and TM (their references). TM adds SGD on its learnable student lr.
    """
    total = s.iterations * updates_per_iteration(s)

    def schedule(lr):
        if s.lr_schedule == "linear":
            return keras.optimizers.schedules.PolynomialDecay(lr, total, 0.0, power=1.0)
        return lr

    if s.param == "latents":
        opts = {"codes": keras.optimizers.Adam(schedule(s.lr_codes)),
                "decoders": keras.optimizers.Adam(schedule(s.lr_decoders))}
    elif s.method == "esp":
        opts = {"pixels": keras.optimizers.Adam(schedule(s.lr_pixels))}
    else:
        opts = {"pixels": keras.optimizers.SGD(schedule(s.lr_pixels), momentum=0.5)}
    if s.method == "tm":
        opts["lr"] = keras.optimizers.SGD(s.lr_lr, momentum=0.5)
    return opts


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


def run(real: data_lib.RealData, net: FlatModel, trajectories: np.ndarray, s: CondenseSettings):
    """Condenses `real` with ESP guided by `trajectories` [K, S, P].

    Returns (images, labels, synthetic): the rendered set as normalised float32 [C*M, H, W, Ch]
    (what the model sees) with int32 labels, and the learnable set itself. A finished run
    restores its last checkpoint and returns at once.
    """
    if s.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {s.method!r}")
    needed = snapshots_needed(s.max_start_epoch, s.segment_length)
    if s.method != "dm" and trajectories.shape[1] < needed:
        raise wd.UserError(f"trajectories have {trajectories.shape[1]} snapshots; max_start_epoch + "
                           f"segment_length = {needed} are needed")
    syn = make_synthetic(real, s)
    budget = syn.budget()
    wd.write_json(os.path.join(s.workdir, "budget.json"), budget)
    wd.say(f"synthetic set: {s.param}, {budget['params_per_class']:.0f} stored floats per class "
           f"(budget {budget['budget_per_class']}), {syn.images_per_class} images rendered per class")
    optimizers = make_optimizers(s)
    sampler = data_lib.ClassBalancedSampler(real)
    extra = {}
    if s.method == "esp":
        step = ESPStep(net, syn, optimizers, sampler, s.esp, jit_compile=s.jit_compile)
    elif s.method == "dm":
        step = DMStep(net, syn, optimizers, sampler, s.dm, jit_compile=s.jit_compile)
    else:
        step = TMStep(net, syn, optimizers, sampler, s.tm)
        extra["syn_lr"] = step.syn_lr
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

    one_iteration = _iteration_fn(s, step, trajectories, after_update=check_finite)
    board = tf.summary.create_file_writer(os.path.join(s.workdir, "tensorboard"))

    def grid_summary(step: int):
        from esp_tf import export
        images, labels = syn.render()
        pixels = data_lib.denormalize(images, real.mean, real.std).numpy()
        grid = export.image_grid(pixels, labels.numpy(), real.num_classes)
        with board.as_default(step=step):
            tf.summary.image("synthetic", grid[None])
    bar = wd.Progress("condense", s.iterations, done=int(iteration))
    sums, count, t_log = {}, 0, time.time()
    per_it = updates_per_iteration(s)
    while int(iteration) < s.iterations:
        it = int(iteration)
        metrics, info = one_iteration(it)
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
        found = glob.glob(os.path.join(manager.directory, "ckpt-*.index"))
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
    last checkpoint are logged again by the resumed run, and a killed writer may leave half a line."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if kept != lines:
        wd.atomic_write_text(path, "".join(line + "\n" for line in kept))


def _iteration_fn(s: CondenseSettings, step, trajectories, after_update=lambda: None):
    """`one_iteration(it) -> (list of per-update metrics, info)` for the method in `s`;
    `after_update()` runs after each update of the synthetic set."""
    update_seed = lambda n: [s.seed + 1_000_003, n]
    if s.method == "dm":      # a fresh random network each iteration; no experts
        def dm_iteration(it):
            metrics = step(update_seed(it))
            after_update()
            return [metrics], {}
        return dm_iteration
    trajs = tf.constant(trajectories, tf.float32)

    @tf.function
    def segment_for(seed):
        segment, k, t = subspace.select_segment(trajs, seed, s.segment_length, s.max_start_epoch)
        basis = subspace.basis(segment) if s.method == "esp" else segment[-1]   # tm: the target
        return segment[0], basis, k, t

    def one_iteration(it):
        theta, basis_or_target, k, t = segment_for(tf.constant([s.seed, it], tf.int64))
        info = {"expert": k, "start_epoch": t}
        if s.method == "tm":
            metrics = step(theta, basis_or_target, update_seed(it))
            after_update()
            return [metrics], info
        metrics = []
        for n in range(s.inner_steps):
            theta, m = step(theta, basis_or_target, update_seed(it * s.inner_steps + n))
            after_update()
            metrics.append(m)
        return metrics, info

    return one_iteration
