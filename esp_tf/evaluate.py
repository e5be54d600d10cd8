"""Evaluation of a condensed set: train fresh networks on it, test on the real test split.

Standard protocol (MTT / DM / DC-BENCH, reference/anchors.md): SGD momentum 0.9, weight
decay 5e-4, lr 0.01, batch 256, lr x0.1 at half the epochs, DSA on every batch, accuracy
after the last epoch, mean +- std over seeds. This module never changes the condensed set.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import tensorflow as tf

from esp_tf import augment, models


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    arch: str = "convnet3"
    epochs: int = 1000               # lr x0.1 at epochs // 2
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4       # coupled L2, as torch's SGD weight_decay
    dsa: augment.DSAConfig | None = augment.DSAConfig()
    test_batch: int = 1000


class _Run:
    """One network + compiled train/test steps; momentum SGD written out (coupled weight decay)."""

    def __init__(self, arch: str, input_shape, num_classes: int, config: EvalConfig):
        self.config = config
        self.model = models.build(arch, input_shape, num_classes)
        self.flat = models.FlatModel(self.model) if not self.model.non_trainable_variables else None
        self.velocity = [tf.Variable(tf.zeros_like(v)) for v in self.model.trainable_variables]
        self.train_step = tf.function(self._train_step)   # one trace per batch shape
        self.count_correct = tf.function(self._count_correct, reduce_retracing=True)

    def reset(self, seed: int):
        if self.flat is not None:
            self.flat.set_flat(self.flat.init(tf.constant([seed, 1], tf.int64)))
        for v in self.velocity:
            v.assign(tf.zeros_like(v))

    def _train_step(self, x, y, lr, seed):
        cfg = self.config
        if cfg.dsa is not None:
            x = augment.apply(x, augment.sample(seed, x.shape[0], x.shape[1:3], cfg.dsa,
                                                one_family=True))
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, variables)
        for v, g, m in zip(variables, grads, self.velocity):
            m.assign(cfg.momentum * m + g + cfg.weight_decay * v)
            v.assign_sub(lr * m)
        return loss

    def _count_correct(self, x, y):
        pred = tf.argmax(self.model(x, training=False), -1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(pred, y), tf.int32))


def train_and_test(run: _Run, images: np.ndarray, labels: np.ndarray, test_images: np.ndarray,
                   test_labels: np.ndarray, seed: int) -> float:
    """Trains run's network from init `seed` on (images, labels); returns real test accuracy.

    images/test_images are normalised float32 NHWC; test_images may also be a callable that
    yields normalised (x, y) batches (so large test splits need not sit in memory as floats).
    """
    cfg = run.config
    run.reset(seed)
    n = len(labels)
    x_all, y_all = tf.constant(images, tf.float32), tf.constant(labels, tf.int32)
    rng = np.random.default_rng(seed)
    step = 0
    for epoch in range(cfg.epochs):
        lr = tf.constant(cfg.lr * (0.1 if epoch >= cfg.epochs // 2 else 1.0), tf.float32)
        order = rng.permutation(n)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            loss = run.train_step(tf.gather(x_all, idx), tf.gather(y_all, idx), lr,
                                  tf.constant([seed, step], tf.int64))
            step += 1
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"evaluation run seed {seed}: training loss is {float(loss)}")
    hits = 0
    for start in range(0, len(test_labels), cfg.test_batch):
        hits += int(run.count_correct(tf.constant(test_images[start:start + cfg.test_batch], tf.float32),
                                      tf.constant(test_labels[start:start + cfg.test_batch], tf.int32)))
    return hits / len(test_labels)


def evaluate(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
             num_classes: int, config: EvalConfig, runs: int = 5, seed: int = 0,
             progress=None) -> dict:
    """Trains `runs` fresh networks (seeds seed..seed+runs-1); returns accuracies, mean and std (%).

    `progress(i, runs, acc, seconds)` is called after each run.
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    run = _Run(config.arch, images.shape[1:], num_classes, config)
    accs = []
    for i in range(runs):
        t0 = time.time()
        accs.append(100.0 * train_and_test(run, images, labels, test_images, test_labels, seed + i))
        if progress:
            progress(i, runs, accs[-1], time.time() - t0)
    return {"accuracies": [round(a, 2) for a in accs], "mean": round(float(np.mean(accs)), 2),
            "std": round(float(np.std(accs)), 2)}
