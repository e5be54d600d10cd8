"""Expert training: ConvNet runs on the real data whose parameter snapshots span ESP's subspaces.

Recipe (MTT's buffer step, which reaches ~77-79 % on CIFAR-10 after 50 epochs): SGD lr 0.01, no momentum, no weight decay,
batch 256, constant lr, DSA on every batch, a snapshot at init and after every epoch.
Generation is resumable: finished experts are files in the `TrajectoryStore` and are skipped.
"""
from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
import tensorflow as tf
from absl import logging

from esp_tf import augment, config, data as data_lib, fs, workdir as wd
from esp_tf.models import FlatModel
from esp_tf.trajectories import TrajectoryMeta, TrajectoryStore


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    epochs: int = config.ExpertsConfig.expert_epochs    # snapshots per expert = epochs + 1
    lr: float = config.ExpertsConfig.expert_lr          # constant SGD learning rate
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = config.ExpertsConfig.expert_batch
    dsa: augment.DSAConfig | None = augment.DSAConfig()


class _Trainer:
    """Compiled SGD(+momentum) step on a flat parameter vector; traced once per batch shape."""

    def __init__(self, net: FlatModel, config: ExpertConfig):
        self.net, self.config = net, config
        self.step = tf.function(self._step)   # one trace per batch shape
        self.correct = tf.function(self._correct, reduce_retracing=True)

    def _step(self, theta, velocity, x, y, seed):
        cfg = self.config
        if cfg.dsa is not None:
            params = augment.sample(seed, x.shape[0], x.shape[1:3], cfg.dsa, one_family=True)
            x = augment.apply(x, params)
        with tf.GradientTape() as tape:
            tape.watch(theta)
            logits = self.net.logits(theta, x)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grad = tape.gradient(loss, theta) + cfg.weight_decay * theta
        velocity = cfg.momentum * velocity + grad
        return theta - cfg.lr * velocity, velocity, loss

    def _correct(self, theta, x, y):
        pred = tf.argmax(self.net.logits(theta, x), -1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(pred, y), tf.int32))


def test_accuracy(net: FlatModel, theta, real: data_lib.RealData, correct_fn=None) -> float:
    """Accuracy of parameters theta on the real test split."""
    correct_fn = correct_fn or tf.function(
        lambda t, x, y: tf.reduce_sum(tf.cast(tf.equal(
            tf.argmax(net.logits(t, x), -1, output_type=tf.int32), y), tf.int32)))
    hits = sum(int(correct_fn(theta, x, y)) for x, y in data_lib.test_dataset(real))
    return hits / len(real.test_labels)


def _save_partial(path: str, snapshots, velocity, step: int, recipe: str) -> None:
    buf = io.BytesIO()                  # a file object: np.savez would append ".npz" to a name
    np.savez(buf, snapshots=np.stack(snapshots), velocity=velocity, step=step, recipe=np.array(recipe))
    wd.atomic_write_bytes(path, buf.getvalue())


def _load_partial(path: str, recipe: str, num_params: int, epochs: int):
    """(snapshots, velocity, step) of an unfinished expert, or None when the file cannot be
    trusted: unreadable, of another recipe (the `recipe` it records, TrajectoryMeta JSON plus the
    expert's seed, differs; files of older versions record none) or of another shape. Such a
    file is moved aside to `<path>.bad-<time>` with a warning, and the expert starts over."""
    problem = None
    try:
        with fs.open(path, "rb") as f:
            saved = np.load(io.BytesIO(f.read()))
            snapshots, velocity, step = saved["snapshots"], saved["velocity"], int(saved["step"])
            found = str(saved["recipe"]) if "recipe" in saved else None
    except Exception as e:          # a truncated zip, garbage, missing arrays: never trusted
        problem = f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    else:
        if found != recipe:
            problem = ("made with another expert recipe" if found is not None else
                       "records no expert recipe (written by an older esp_tf)")
        elif (snapshots.ndim != 2 or snapshots.shape[1] != num_params or not 1 <= len(snapshots) <= epochs
              or velocity.shape != (num_params,)):
            problem = f"of another shape ({snapshots.shape})"
    if problem is None:
        return list(snapshots), velocity, step
    aside = wd.aside_name(path)
    fs.rename(path, aside)
    wd.say(f"experts: WARNING the unfinished expert {path} is {problem}; moved it to {aside} and "
           "training that expert from the start")
    return None


# An expert whose test accuracy stays within this factor of chance (1 / classes) learned nothing:
# its training diverged (too large --expert_lr) or never started. Such trajectories would steer
# condensation with noise, so they are refused unless --accept_weak_experts.
WEAK_FACTOR = 1.5


class WeakExpertError(ValueError):
    """An expert that diverged or stayed at chance; the message names it and the fix."""


def train_expert(net: FlatModel, real: data_lib.RealData, config: ExpertConfig, seed: int,
                 trainer: _Trainer | None = None, partial_path: str | None = None,
                 on_epoch=None, recipe: str = "") -> tuple[np.ndarray, float]:
    """Trains one expert from a fresh init; returns snapshots [epochs+1, P] and its test accuracy.

    With `partial_path`, the trajectory so far is saved after every epoch (with `recipe`, what
    it was trained with) and a later call with the same recipe continues from it (same seeds, so
    the result equals an uninterrupted run); a partial file that cannot be trusted is moved aside.
    `on_epoch(epoch, epochs, loss)` is called after each epoch. A non-finite loss raises
    WeakExpertError.
    """
    trainer = trainer or _Trainer(net, config)
    recipe = f"{recipe}\nseed {seed}"
    theta = net.init(tf.constant([seed, 0], tf.int64))
    velocity = tf.zeros_like(theta)
    snapshots, step = [theta.numpy()], 0
    saved = (_load_partial(partial_path, recipe, net.num_params, config.epochs)
             if partial_path and fs.exists(partial_path) else None)
    if saved is not None:
        snapshots, velocity, step = saved
        theta, velocity = tf.constant(snapshots[-1]), tf.constant(velocity)
        logging.info("expert seed %d: resuming at epoch %d from %s", seed, len(snapshots) - 1, partial_path)
    for epoch in range(len(snapshots) - 1, config.epochs):
        for x, y in data_lib.train_dataset(real, config.batch_size, seed=seed * 100_003 + epoch):
            theta, velocity, loss = trainer.step(theta, velocity, x, y,
                                                 tf.constant([seed, step + 1], tf.int64))
            step += 1
        if not np.isfinite(float(loss)) or not np.all(np.isfinite(theta.numpy())):
            raise WeakExpertError(f"the expert of seed {seed} diverged: its loss is {float(loss)} after "
                                  f"epoch {epoch + 1}; lower --expert_lr (now {config.lr}). Nothing of "
                                  "it was stored.")
        snapshots.append(theta.numpy())
        if partial_path and epoch + 1 < config.epochs:
            _save_partial(partial_path, snapshots, velocity.numpy(), step, recipe)
        if on_epoch:
            on_epoch(epoch + 1, config.epochs, float(loss))
    acc = test_accuracy(net, theta, real, trainer.correct)
    return np.stack(snapshots).astype(np.float32), acc


def expert_meta(net: FlatModel, model_name: str, model_config: dict, dataset: str,
                num_classes: int, config: ExpertConfig, seed: int | None = None) -> TrajectoryMeta:
    """The metadata trajectories of this model/dataset/recipe are stored (and checked) with;
    `seed` is the `generate` seed the experts derive from (recorded in the recipe when given)."""
    train_config = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("epochs", "dsa")}
    train_config["dsa"] = None if config.dsa is None else dataclasses.asdict(config.dsa)
    if seed is not None:
        train_config["seed"] = int(seed)
    return TrajectoryMeta(model=model_name, model_config=dict(model_config), dataset=dataset,
                          input_shape=tuple(int(d) for d in net.model.input_shape[1:]),
                          num_classes=num_classes, layout=net.layout, epochs=config.epochs,
                          train_config=train_config)


def shard(num_experts: int, worker_index: int = 0, num_workers: int = 1) -> list[int]:
    """The expert indices worker `worker_index` of `num_workers` trains: k % num_workers ==
    worker_index. The shards are disjoint and together cover 0..num_experts-1, and expert k keeps
    its seed whichever worker trains it, so the store holds the same experts for any worker count."""
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f"worker index {worker_index} of {num_workers} workers: need "
                         f"0 <= index < workers")
    return list(range(worker_index, num_experts, num_workers))


def generate(store: TrajectoryStore, net: FlatModel, real: data_lib.RealData, meta: TrajectoryMeta,
             num_experts: int, config: ExpertConfig, seed: int = 0, progress=None,
             on_epoch=None, worker_index: int = 0, num_workers: int = 1,
             accept_weak: bool = False) -> list[float]:
    """Ensures this worker's experts (`shard`) of 0..num_experts-1 exist in `store`; trains only
    the missing ones. With the default single worker that is every expert.

    Expert k uses seed (seed, k), so an interrupted run resumes with the same experts; an
    expert interrupted mid-way continues from its last epoch (`.partial.npz` beside it).
    Several workers (processes or machines) may fill one store at once, each with its own
    `worker_index`: their shards are disjoint, so no two write the same file.
    `progress(k, done, total, acc, seconds)` is called after each expert (done and total count
    this worker's shard), `on_epoch(k, epoch, epochs, loss)` after each epoch.
    An expert whose test accuracy stays within WEAK_FACTOR of chance is refused (WeakExpertError,
    nothing stored) unless `accept_weak`.
    Returns the test accuracies of the experts trained by this call.
    """
    mine = shard(num_experts, worker_index, num_workers)
    store.initialize(meta)
    done = set(store.completed())
    todo = [k for k in mine if k not in done]
    if not todo:
        logging.info("all %d experts of worker %d/%d already in %s", len(mine), worker_index,
                     num_workers, store.directory)
        return []
    trainer = _Trainer(net, config)
    accs, finished = [], len(mine) - len(todo)
    for k in todo:
        t0 = time.time()
        with store.expert_lock(k):          # another process sharing the store may train it
            if k in set(store.completed()):
                logging.info("expert %d was trained by another process meanwhile", k)
                continue
            acc = _train_and_store(store, net, real, meta, config, k, seed, trainer, on_epoch, accept_weak)
        accs.append(acc)
        if progress:
            progress(k, finished + len(accs), len(mine), acc, time.time() - t0)
    return accs


def _train_and_store(store, net, real, meta, config, k, seed, trainer, on_epoch, accept_weak) -> float:
    """Trains expert k (resuming its partial file), refuses a weak one, stores it; its accuracy."""
    partial = store.expert_path(k) + ".partial.npz"
    snapshots, acc = train_expert(
        net, real, config, seed=seed * 1_000_003 + k, trainer=trainer, partial_path=partial,
        on_epoch=(lambda e, n, loss, k=k: on_epoch(k, e, n, loss)) if on_epoch else None,
        recipe=meta.to_json())
    chance = 1.0 / real.num_classes
    if acc <= WEAK_FACTOR * chance and not accept_weak:
        raise WeakExpertError(
            f"expert {k} reached {100 * acc:.1f}% test accuracy, within {WEAK_FACTOR}x of chance "
            f"({100 * chance:.1f}%): it learned nothing (a too large --expert_lr, now {config.lr}, "
            "or too few --expert_epochs) and was not stored. Fix the recipe, or pass "
            "--accept_weak_experts to store such experts knowingly.")
    store.write(k, snapshots)
    if fs.exists(partial):
        fs.remove(partial)
    return acc
