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
import io
import os
import time

import keras
import numpy as np
import tensorflow as tf

from esp_tf import data as data_lib, subspace, workdir as wd
from esp_tf.esp import ESPConfig, ESPStep
from esp_tf.models import FlatModel
from esp_tf.synthetic import LatentSynthetic, PixelSynthetic


@dataclasses.dataclass(frozen=True)
class CondenseSettings:
    workdir: str
    ipc: int = 1
    init: str = "real"
    iterations: int = 1000
    inner_steps: int = 10
    segment_length: int = 2
    max_start_epoch: int = 20
    esp: ESPConfig = ESPConfig()
    param: str = "pixels"            # "pixels" or "latents" (codes + shared decoders, paper 4.2)
    lr_pixels: float = 0.01          # Adam lr of pixels (normalised units)
    lr_codes: float = 0.1            # Adam lr of latent codes (paper 4.2)
    lr_decoders: float = 0.01        # Adam lr of the shared decoders (paper 4.2)
    num_decoders: int = 4            # latents: decoders shared by all classes
    latent_downsample: int = 2       # latents: codes are H/f x W/f
    lr_schedule: str = "linear"      # linear decay to 0 over all updates (paper 4.2), or constant
    seed: int = 0
    ckpt_every: int = 50
    log_every: int = 10
    jit_compile: bool = False


def _real_init(real: data_lib.RealData, s: CondenseSettings, per_class: int):
    """per_class random real images of each class, normalised, class-major (or None)."""
    if s.init != "real":
        return None
    x, _ = data_lib.ClassBalancedSampler(real).random_subset(s.seed, per_class)
    return data_lib.normalize(x, real.mean, real.std).numpy()


def make_synthetic(real: data_lib.RealData, s: CondenseSettings):
    """The learnable set for --param: IPC images per class, or codes + decoders in that budget."""
    if s.param == "latents":
        design = {"num_decoders": s.num_decoders, "downsample": s.latent_downsample}
        try:
            n = LatentSynthetic.codes_per_class_for(s.ipc, real.image_shape, real.num_classes, **design)
        except ValueError as e:
            raise wd.UserError(str(e)) from e
        return LatentSynthetic(real.num_classes, s.ipc, real.image_shape, init=s.init,
                               real_images=_real_init(real, s, n), seed=s.seed, **design)
    if s.param != "pixels":
        raise ValueError(f"param must be pixels or latents, got {s.param!r}")
    return PixelSynthetic(real.num_classes, s.ipc, real.image_shape, init=s.init,
                          real_images=_real_init(real, s, s.ipc), seed=s.seed)


def make_optimizers(s: CondenseSettings) -> dict:
    """One Adam per variable group of the synthetic set, each with the --lr_schedule."""
    total = s.iterations * s.inner_steps

    def adam(lr):
        if s.lr_schedule == "linear":
            lr = keras.optimizers.schedules.PolynomialDecay(lr, total, 0.0, power=1.0)
        return keras.optimizers.Adam(lr)

    if s.param == "latents":
        return {"codes": adam(s.lr_codes), "decoders": adam(s.lr_decoders)}
    return {"pixels": adam(s.lr_pixels)}


def _save_synthetic(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def run(real: data_lib.RealData, net: FlatModel, trajectories: np.ndarray, s: CondenseSettings):
    """Condenses `real` with ESP guided by `trajectories` [K, S, P].

    Returns (images, labels, synthetic): the rendered set as normalised float32 [C*M, H, W, Ch]
    (what the model sees) with int32 labels, and the learnable set itself. A finished run
    restores its last checkpoint and returns at once.
    """
    needed = s.max_start_epoch + s.segment_length + 1
    if trajectories.shape[1] < needed:
        raise wd.UserError(f"trajectories have {trajectories.shape[1]} snapshots; max_start_epoch + "
                           f"segment_length + 1 = {needed} are needed")
    syn = make_synthetic(real, s)
    budget = syn.budget()
    wd.write_json(os.path.join(s.workdir, "budget.json"), budget)
    wd.say(f"synthetic set: {s.param}, {budget['params_per_class']:.0f} stored floats per class "
           f"(budget {budget['budget_per_class']}), {syn.images_per_class} images rendered per class")
    optimizers = make_optimizers(s)
    step = ESPStep(net, syn, optimizers, data_lib.ClassBalancedSampler(real), s.esp,
                   jit_compile=s.jit_compile)
    iteration = tf.Variable(0, dtype=tf.int64, name="iteration")
    ckpt = tf.train.Checkpoint(synthetic=syn, iteration=iteration,
                               **{f"opt_{k}": o for k, o in optimizers.items()})
    manager = tf.train.CheckpointManager(ckpt, os.path.join(s.workdir, "ckpt"), max_to_keep=2)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        wd.say(f"condense: resumed from {manager.latest_checkpoint} at iteration {int(iteration)}")

    trajs = tf.constant(trajectories, tf.float32)

    @tf.function
    def subspace_for(seed):
        segment, k, t = subspace.select_segment(trajs, seed, s.segment_length, s.max_start_epoch)
        return segment[0], subspace.basis(segment), k, t

    metrics_path = os.path.join(s.workdir, "metrics.jsonl")
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
    while int(iteration) < s.iterations:
        it = int(iteration)
        theta, basis, k, t = subspace_for(tf.constant([s.seed, it], tf.int64))
        for n in range(s.inner_steps):
            theta, m = step(theta, basis, [s.seed + 1_000_003, it * s.inner_steps + n])
            for name, v in m.items():
                sums[name] = sums.get(name, 0.0) + v
            count += 1
        loss = float(m["loss"])
        if not np.isfinite(loss):
            raise wd.UserError(
                f"ESP loss became {loss} at iteration {it}; the synthetic set was NOT saved past the "
                f"last checkpoint ({manager.latest_checkpoint}). Lower --lr_pixels (or --lr_codes/--lr_decoders) or --beta and rerun.")
        iteration.assign_add(1)
        done = it + 1
        if done % s.log_every == 0 or done == s.iterations:
            row = {name: float(v) / count for name, v in sums.items()}
            row.update(iteration=done, updates=done * s.inner_steps, expert=int(k), start_epoch=int(t),
                       seconds_per_update=(time.time() - t_log) / count, time=time.time())
            wd.append_jsonl(metrics_path, row)
            with board.as_default(step=done):
                for name in ("loss", "dm", "proj", "ce", "syn_acc", "in_subspace", "seconds_per_update"):
                    tf.summary.scalar(f"condense/{name}", row[name])
            bar.update(done, f"loss {row['loss']:.4g} dm {row['dm']:.4g} proj {row['proj']:.4g} "
                             f"ce {row['ce']:.3f}")
            sums, count, t_log = {}, 0, time.time()
        if done % s.ckpt_every == 0 or done == s.iterations:
            manager.save(checkpoint_number=done)
            grid_summary(done)
            board.flush()
    images, labels = (t.numpy() for t in syn.render())
    _save_synthetic(os.path.join(s.workdir, "synthetic.npz"), images, labels)
    return images, labels, syn
