r"""Evaluation of a condensed set: train fresh networks on it, test on the real test split.

The library: protocols (`PROTOCOLS`, `protocol_config`, `learning_rate`), the `Trainer`, and
`evaluate` / `evaluate_full`. Its command line is esp_tf/evaluate_cli.py:

    python -m esp_tf.evaluate --condensed=runs/cifar10_ipc10 --eval_archs=convnet3,resnet10 --output=results.json

Protocols of the field's published numbers, both SGD momentum 0.9, weight decay 5e-4, lr 0.01, 1000 epochs:
- standard (MTT / DM / DC-BENCH): batch 256, lr x0.1 at half the epochs, DSA on every batch.
- idc (IDC's cross-architecture numbers): batch 64, lr x0.2 at 2/3 and 5/6 of the epochs,
  CutMix (probability 0.5, Beta(1, 1); `augment.cutmix`), DSA without cutout applied as IDC
  does (flip and color on every batch, then one of crop/scale/rotate).
Accuracy after the last epoch, mean +- std over seeds. Stateless nets (ConvNet) are initialised
through `models.FlatModel` (PyTorch's init); BatchNorm nets are rebuilt under
`keras.utils.set_random_seed(seed)` and copied into one compiled model, so a seed always gives
the same run.
"""
from __future__ import annotations

if __name__ == "__main__":      # python -m esp_tf.evaluate: the CLI, before TensorFlow loads (fast --help)
    from esp_tf.evaluate_cli import run
    run()                       # exits; the library below is imported by the CLI as esp_tf.evaluate

import dataclasses
import time

import numpy as np
import tensorflow as tf

from esp_tf import augment, config, models

_IDC_DSA = augment.DSAConfig(strategy="color_crop_flip_scale_rotate")  # IDC drops cutout with CutMix


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    arch: str = "convnet3"           # the field's student; any models.ARCHS name
    epochs: int = config.EvalConfig.eval_epochs       # both protocols train 1000 epochs
    batch_size: int = config.EvalConfig.eval_batch    # standard protocol; IDC's is 64
    lr: float = config.EvalConfig.eval_lr             # initial SGD learning rate of both protocols
    momentum: float = 0.9            # both protocols
    weight_decay: float = 5e-4       # coupled L2 on every parameter, as torch's SGD weight_decay
    dsa: augment.DSAConfig | None = augment.DSAConfig()   # full DSA strategy; None: no DSA
    dsa_mode: str = "one_family"     # DSA 'S' mode; "idc": flip + color always, one other family
    lr_steps: tuple = ((1, 2),)      # (num, den): lr *= lr_gamma from epoch epochs * num // den on
    lr_gamma: float = 0.1            # standard: x0.1 (IDC: x0.2)
    cutmix_prob: float = 0.0         # CutMix off (standard protocol)
    cutmix_beta: float = 1.0         # box area fraction ~ Beta(beta, beta) (IDC: 1.0)
    test_batch: int = 1000           # test-time batch; any size gives the same accuracy


PROTOCOLS = {
    "standard": {},
    "idc": dict(batch_size=64, lr_steps=((2, 3), (5, 6)), lr_gamma=0.2, cutmix_prob=0.5,
                cutmix_beta=1.0, dsa_mode="idc"),
}


def protocol_config(protocol: str, arch: str, epochs: int = 1000, dsa: bool = True,
                    **overrides) -> EvalConfig:
    """EvalConfig of a named protocol; `overrides` (e.g. batch_size, lr) win over the protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    aug = (_IDC_DSA if protocol == "idc" else augment.DSAConfig()) if dsa else None
    return EvalConfig(**{"arch": arch, "epochs": epochs, "dsa": aug, **PROTOCOLS[protocol], **overrides})


def learning_rate(config: EvalConfig, epoch: int) -> float:
    """Learning rate of 0-based `epoch`: torch's MultiStepLR with milestones epochs*num//den."""
    drops = sum(epoch >= config.epochs * num // den for num, den in config.lr_steps)
    return config.lr * config.lr_gamma ** drops


def augment_params(seed, n: int, image_size, config: EvalConfig) -> list[dict]:
    """DSA parameter sets applied in order. 'one_family': one family of the strategy per batch.
    'idc': IDC's DiffAug, flip and color every batch, then one of the other families."""
    if config.dsa_mode == "one_family":
        return [augment.sample(seed, n, image_size, config.dsa, one_family=True)]
    if config.dsa_mode != "idc":
        raise ValueError(f"unknown dsa_mode {config.dsa_mode!r}")
    families = config.dsa.families
    groups = [[f] for f in ("flip", "color") if f in families]
    groups.append([f for f in families if f not in ("flip", "color")])
    return [augment.sample(tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), i), n,
                           image_size, dataclasses.replace(config.dsa, strategy="_".join(g)), one_family=True)
            for i, g in enumerate(groups) if g]


class Trainer:
    """One compiled network reused across seeds; momentum SGD written out (coupled weight decay)."""

    def __init__(self, config: EvalConfig, input_shape, num_classes: int):
        self.config, self.input_shape, self.num_classes = config, tuple(input_shape), num_classes
        self.model = models.build(config.arch, self.input_shape, num_classes)
        self.flat = None if self.model.non_trainable_variables else models.FlatModel(self.model)
        self.velocity = [tf.Variable(tf.zeros_like(v)) for v in self.model.trainable_variables]
        self.train_step = tf.function(self._train_step)   # one trace per batch shape
        self.count_correct = tf.function(self._count_correct, reduce_retracing=True)

    def reset(self, seed: int):
        """Fresh parameters, statistics and momentum; the same seed gives the same values."""
        if self.flat is not None:
            self.flat.set_flat(self.flat.init(tf.constant([seed, 1], tf.int64)))
        else:
            import keras
            keras.utils.set_random_seed(seed)   # seeds every initializer (and RNG state) of a rebuild
            fresh = models.build(self.config.arch, self.input_shape, self.num_classes)
            if [tuple(v.shape) for v in fresh.variables] != [tuple(v.shape) for v in self.model.variables]:
                raise RuntimeError(f"{self.config.arch}: a rebuild has another variable layout")
            for v, f in zip(self.model.variables, fresh.variables):
                v.assign(f)
        for v in self.velocity:
            v.assign(tf.zeros_like(v))

    def _train_step(self, x, y, lr, seed):
        cfg = self.config
        if cfg.dsa is not None:
            for params in augment_params(seed, x.shape[0], x.shape[1:3], cfg):
                x = augment.apply(x, params)
        y_b, ratio = y, 1.0
        if cfg.cutmix_prob > 0:
            x, y_b, ratio = augment.cutmix(tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 99),
                                   x, y, cfg.cutmix_prob, cfg.cutmix_beta)
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)   # BatchNorm: batch statistics, moving averages updated
            ce = lambda labels: tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
            loss = ratio * ce(y) + (1.0 - ratio) * ce(y_b) if cfg.cutmix_prob > 0 else ce(y)
        grads = tape.gradient(loss, variables)
        for v, g, m in zip(variables, grads, self.velocity):
            m.assign(cfg.momentum * m + g + cfg.weight_decay * v)
            v.assign_sub(lr * m)
        return loss

    def _count_correct(self, x, y):
        pred = tf.argmax(self.model(x, training=False), -1, output_type=tf.int32)  # BatchNorm: moving stats
        return tf.reduce_sum(tf.cast(tf.equal(pred, y), tf.int32))


def array_epochs(images, labels, batch_size: int, seed: int):
    """epoch -> batches of (images, labels) in a seeded random order (a new order every epoch)."""
    x_all, y_all = tf.constant(images, tf.float32), tf.constant(labels, tf.int32)
    rng = np.random.default_rng(seed)

    def batches(epoch):
        order = rng.permutation(len(labels))
        for start in range(0, len(labels), batch_size):
            idx = order[start:start + batch_size]
            yield tf.gather(x_all, idx), tf.gather(y_all, idx)
    return batches


class EvaluationDiverged(FloatingPointError):
    """An evaluation run whose training loss became non-finite: its accuracy would mean nothing."""


def train_and_test(trainer: Trainer, batches, test, seed: int, on_epoch=None) -> float:
    """Trains trainer's network from init `seed` on `batches(epoch)`; returns real test accuracy.

    `test` is (normalised images, labels) arrays or a tf.data.Dataset of normalised batches.
    """
    cfg = trainer.config
    trainer.reset(seed)
    step, loss = 0, None
    for epoch in range(cfg.epochs):
        lr = tf.constant(learning_rate(cfg, epoch), tf.float32)
        for x, y in batches(epoch):
            loss = trainer.train_step(x, tf.cast(y, tf.int32), lr, tf.constant([seed, step], tf.int64))
            step += 1
        if on_epoch:
            on_epoch(epoch + 1)
    if loss is None or not np.isfinite(float(loss)):
        raise EvaluationDiverged(f"the evaluation network of seed {seed} diverged on the condensed set "
                                 f"(training loss {None if loss is None else float(loss)}); lower --eval_lr "
                                 f"(now {cfg.lr}) or check the set")
    return accuracy_on(trainer, test)


def accuracy_on(trainer: Trainer, test, predict=None) -> float:
    """Fraction of `test` ((images, labels) arrays or a tf.data.Dataset of batches) that trainer's
    network classifies right, with BatchNorm in inference mode, or by `predict(x) -> labels`."""
    if isinstance(test, tf.data.Dataset):
        pairs = iter(test)
    else:
        step = trainer.config.test_batch
        pairs = ((test[0][i:i + step], test[1][i:i + step]) for i in range(0, len(test[1]), step))
    hits = total = 0
    for x, y in pairs:
        x, y = tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.int32)
        hits += int(trainer.count_correct(x, y) if predict is None
                    else tf.reduce_sum(tf.cast(tf.equal(predict(x), y), tf.int32)))
        total += int(len(y))
    return hits / total


def _summary(accs, prefix=""):
    return {f"{prefix}accuracies": [round(a, 2) for a in accs],
            f"{prefix}mean": round(float(np.mean(accs)), 2), f"{prefix}std": round(float(np.std(accs)), 2)}


def _repeat(trainer: Trainer, batches_for_seed, test, runs: int, seed: int, progress, on_epoch,
            on_run=None, val=None, done=None, on_done=None) -> dict:
    """`runs` trainings of one compiled network from seeds seed..seed+runs-1; accuracies in %.

    With `val` (a held-out validation split, same forms as `test`), each trained network is
    scored on it too, and the result gains val_accuracies / val_mean / val_std: the numbers
    hyper-parameters are chosen by.

    `done` {i: (test %, val % or None)}: runs finished earlier (an interrupted evaluation), taken
    as they are: run i depends only on its seed, seed + i, since the network, its statistics and
    its momentum are reset per run. `on_done(i, test %, val % or None)` is called after each
    run this call trains (e.g. to save it, so that an interruption loses one run at most)."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    done = done or {}
    if val is not None and any(done[i][1] is None for i in done):
        raise ValueError("a finished run without its validation accuracy cannot be reused with `val`")
    accs, val_accs = [], []
    for i in range(runs):
        if i in done:
            accs.append(float(done[i][0]))
            if val is not None:
                val_accs.append(float(done[i][1]))
            if progress:
                progress(i, runs, accs[-1], 0.0)
            continue
        t0 = time.time()
        tick = (lambda e, i=i: on_epoch(i, e)) if on_epoch else None
        accs.append(100.0 * train_and_test(trainer, batches_for_seed(seed + i), test, seed + i, tick))
        if val is not None:
            val_accs.append(100.0 * accuracy_on(trainer, val))
        if on_run:                  # e.g. export the trained network before the next run resets it
            on_run(i, trainer.model, accs[-1])
        if on_done:
            on_done(i, accs[-1], val_accs[-1] if val is not None else None)
        if progress:
            progress(i, runs, accs[-1], time.time() - t0)
    return {**_summary(accs), **(_summary(val_accs, "val_") if val_accs else {})}


def evaluate(images: np.ndarray, labels: np.ndarray, test_images, test_labels, num_classes: int,
             config: EvalConfig, runs: int = 5, seed: int = 0, progress=None, on_epoch=None,
             on_run=None, val=None, done=None, on_done=None) -> dict:
    """Trains `runs` fresh networks (seeds seed..seed+runs-1) on a condensed set; returns
    accuracies, mean and std (%). `test_images` may be a tf.data.Dataset of normalised
    (x, y) batches (then `test_labels` is ignored). `progress(i, runs, acc, seconds)` is called
    after each run, `on_epoch(i, epochs_done)` after each epoch, `on_run(i, model, acc)` with
    the trained Keras model after each run. `val`: a validation split ((images, labels) or a
    dataset of batches) scored beside the test split. `done` / `on_done`: runs finished by an
    interrupted evaluation, and the callback that saves each new one (see `_repeat`)."""
    trainer = Trainer(config, images.shape[1:], num_classes)
    test = test_images if isinstance(test_images, tf.data.Dataset) else (test_images, test_labels)
    return _repeat(trainer, lambda s: array_epochs(images, labels, config.batch_size, s), test,
                   runs, seed, progress, on_epoch, on_run, val=val, done=done, on_done=on_done)


def evaluate_full(real, config: EvalConfig, runs: int = 5, seed: int = 0, progress=None,
                  on_epoch=None, steps_per_epoch: int | None = None, done=None, on_done=None) -> dict:
    """Like `evaluate`, trained on the whole real train split of `real` (data.RealData) through
    data.train_dataset, one seeded order per (seed, epoch): the "Full dataset" row.

    `steps_per_epoch` caps an "epoch" at that many batches of its fresh random order (a
    compute-limited full-data baseline; None: whole passes)."""
    from esp_tf import data as data_lib
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def batches_for_seed(s):
        def batches(epoch):
            ds = data_lib.train_dataset(
                real, config.batch_size, int(np.random.SeedSequence([s, epoch]).generate_state(1)[0]))
            return ds if steps_per_epoch is None else ds.take(steps_per_epoch)
        return batches
    trainer = Trainer(config, real.image_shape, real.num_classes)
    return _repeat(trainer, batches_for_seed, data_lib.test_dataset(real, config.test_batch),
                   runs, seed, progress, on_epoch, val=data_lib.val_dataset(real, config.test_batch),
                   done=done, on_done=on_done)


def __getattr__(name):
    """`esp_tf.evaluate:run`, the console script's target before the CLI moved to evaluate_cli,
    keeps working until `pip install -e .` is rerun (one release)."""
    if name == "run":
        from esp_tf.evaluate_cli import run
        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
