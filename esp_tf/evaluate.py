r"""Evaluation of a condensed set: train fresh networks on it, test on the real test split.

    python -m esp_tf.evaluate --condensed=runs/cifar10_ipc10 --archs=convnet3,resnet10,densenet121 \
        --protocol=standard --runs=5 --output=results.json

Protocols of the field's published numbers, both SGD momentum 0.9, weight decay 5e-4, lr 0.01, 1000 epochs:
- standard (MTT / DM / DC-BENCH): batch 256, lr x0.1 at half the epochs, DSA on every batch.
- idc (IDC's cross-architecture numbers): batch 64, lr x0.2 at 2/3 and 5/6 of the epochs,
  CutMix (probability 0.5, Beta(1, 1)), DSA without cutout applied as IDC does (flip and color
  on every batch, then one of crop/scale/rotate).
Accuracy after the last epoch, mean +- std over seeds. Stateless nets (ConvNet) are initialised
through `models.FlatModel` (PyTorch's init); BatchNorm nets are rebuilt under
`keras.utils.set_random_seed(seed)` and copied into one compiled model, so a seed always gives
the same run. The CLI (bottom of the file) reads any condensed set (esp_tf/condensed.py).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import numpy as np
import tensorflow as tf

from esp_tf import augment, models
from esp_tf.workdir import ARCH_ORDER as _ARCH_ORDER, results_table   # the paper's Table 2 layout

_IDC_DSA = augment.DSAConfig(strategy="color_crop_flip_scale_rotate")  # IDC drops cutout with CutMix


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    arch: str = "convnet3"           # the field's student; any models.ARCHS name
    epochs: int = 1000               # both protocols train 1000 epochs
    batch_size: int = 256            # standard protocol; IDC's is 64
    lr: float = 0.01                 # initial SGD learning rate of both protocols
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


def cutmix_box(seed, n: int, height: int, width: int, prob: float, beta: float) -> dict:
    """Random CutMix parameters (IDC's rand_bbox): applied with `prob`, lam ~ Beta(beta, beta),
    a batch permutation, and a box of side floor(size*sqrt(1-lam)) (halved, rounded down, on each
    side of a uniform centre, clipped to the image). Rows [y1, y2), columns [x1, x2)."""
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    applied = tf.random.stateless_uniform([], s[0]) < prob
    g1, g2 = (tf.random.stateless_gamma([], s[i], alpha=beta) for i in (1, 2))
    lam = g1 / (g1 + g2)
    perm = tf.argsort(tf.random.stateless_uniform([n], s[3]))
    cut = tf.sqrt(1.0 - lam)
    half_h = tf.cast(tf.floor(height * cut), tf.int32) // 2
    half_w = tf.cast(tf.floor(width * cut), tf.int32) // 2
    cy = tf.random.stateless_uniform([], s[4], 0, height, tf.int32)
    cx = tf.random.stateless_uniform([], s[5], 0, width, tf.int32)
    y1, y2 = tf.clip_by_value(cy - half_h, 0, height), tf.clip_by_value(cy + half_h, 0, height)
    x1, x2 = tf.clip_by_value(cx - half_w, 0, width), tf.clip_by_value(cx + half_w, 0, width)
    y2, x2 = tf.where(applied, y2, y1), tf.where(applied, x2, x1)  # not applied: empty box
    return {"applied": applied, "lam": lam, "perm": perm, "y1": y1, "y2": y2, "x1": x1, "x2": x2}


def cutmix(seed, x, y, prob: float, beta: float = 1.0):
    """CutMix: pastes a box of a permuted batch into x. Returns (mixed x [B,H,W,C], permuted
    labels [B], ratio): the loss is ratio * CE(y) + (1 - ratio) * CE(permuted labels)."""
    _, h, w, _ = x.shape
    box = cutmix_box(seed, x.shape[0], h, w, prob, beta)
    rows, cols = tf.range(h), tf.range(w)
    inside = (((rows >= box["y1"]) & (rows < box["y2"]))[:, None]
              & ((cols >= box["x1"]) & (cols < box["x2"]))[None, :])          # [H, W]
    mixed = tf.where(inside[None, :, :, None], tf.gather(x, box["perm"]), x)
    area = tf.cast((box["y2"] - box["y1"]) * (box["x2"] - box["x1"]), tf.float32)
    return mixed, tf.gather(y, box["perm"]), 1.0 - area / float(h * w)


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


class _Run:
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
            x, y_b, ratio = cutmix(tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 99),
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


def _array_epochs(images, labels, batch_size: int, seed: int):
    """epoch -> batches of (images, labels) in a seeded random order (a new order every epoch)."""
    x_all, y_all = tf.constant(images, tf.float32), tf.constant(labels, tf.int32)
    rng = np.random.default_rng(seed)

    def batches(epoch):
        order = rng.permutation(len(labels))
        for start in range(0, len(labels), batch_size):
            idx = order[start:start + batch_size]
            yield tf.gather(x_all, idx), tf.gather(y_all, idx)
    return batches


def train_and_test(run: _Run, batches, test, seed: int, on_epoch=None) -> float:
    """Trains run's network from init `seed` on `batches(epoch)`; returns real test accuracy.

    `test` is (normalised images, labels) arrays or a tf.data.Dataset of normalised batches.
    """
    cfg = run.config
    run.reset(seed)
    step, loss = 0, None
    for epoch in range(cfg.epochs):
        lr = tf.constant(learning_rate(cfg, epoch), tf.float32)
        for x, y in batches(epoch):
            loss = run.train_step(x, tf.cast(y, tf.int32), lr, tf.constant([seed, step], tf.int64))
            step += 1
        if on_epoch:
            on_epoch(epoch + 1)
    if loss is None or not np.isfinite(float(loss)):
        raise FloatingPointError(f"evaluation run seed {seed}: training loss is {loss}")
    return accuracy_on(run, test)


def accuracy_on(run: _Run, test, predict=None) -> float:
    """Fraction of `test` ((images, labels) arrays or a tf.data.Dataset of batches) that run's
    network classifies right, with BatchNorm in inference mode, or by `predict(x) -> labels`."""
    if isinstance(test, tf.data.Dataset):
        pairs = iter(test)
    else:
        step = run.config.test_batch
        pairs = ((test[0][i:i + step], test[1][i:i + step]) for i in range(0, len(test[1]), step))
    hits = total = 0
    for x, y in pairs:
        x, y = tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.int32)
        hits += int(run.count_correct(x, y) if predict is None
                    else tf.reduce_sum(tf.cast(tf.equal(predict(x), y), tf.int32)))
        total += int(len(y))
    return hits / total


def _summary(accs, prefix=""):
    return {f"{prefix}accuracies": [round(a, 2) for a in accs],
            f"{prefix}mean": round(float(np.mean(accs)), 2), f"{prefix}std": round(float(np.std(accs)), 2)}


def _repeat(run: _Run, batches_for_seed, test, runs: int, seed: int, progress, on_epoch,
            on_run=None, val=None) -> dict:
    """`runs` trainings of one compiled network from seeds seed..seed+runs-1; accuracies in %.

    With `val` (a held-out validation split, same forms as `test`), each trained network is
    scored on it too, and the result gains val_accuracies / val_mean / val_std: the numbers
    hyper-parameters are chosen by."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    accs, val_accs = [], []
    for i in range(runs):
        t0 = time.time()
        tick = (lambda e, i=i: on_epoch(i, e)) if on_epoch else None
        accs.append(100.0 * train_and_test(run, batches_for_seed(seed + i), test, seed + i, tick))
        if val is not None:
            val_accs.append(100.0 * accuracy_on(run, val))
        if on_run:                  # e.g. export the trained network before the next run resets it
            on_run(i, run.model, accs[-1])
        if progress:
            progress(i, runs, accs[-1], time.time() - t0)
    return {**_summary(accs), **(_summary(val_accs, "val_") if val_accs else {})}


def evaluate(images: np.ndarray, labels: np.ndarray, test_images, test_labels, num_classes: int,
             config: EvalConfig, runs: int = 5, seed: int = 0, progress=None, on_epoch=None,
             on_run=None, val=None) -> dict:
    """Trains `runs` fresh networks (seeds seed..seed+runs-1) on a condensed set; returns
    accuracies, mean and std (%). `test_images` may be a tf.data.Dataset of normalised
    (x, y) batches (then `test_labels` is ignored). `progress(i, runs, acc, seconds)` is called
    after each run, `on_epoch(i, epochs_done)` after each epoch, `on_run(i, model, acc)` with
    the trained Keras model after each run. `val`: a validation split ((images, labels) or a
    dataset of batches) scored beside the test split (see `_repeat`)."""
    run = _Run(config, images.shape[1:], num_classes)
    test = test_images if isinstance(test_images, tf.data.Dataset) else (test_images, test_labels)
    return _repeat(run, lambda s: _array_epochs(images, labels, config.batch_size, s), test,
                   runs, seed, progress, on_epoch, on_run, val=val)


def evaluate_full(real, config: EvalConfig, runs: int = 5, seed: int = 0, progress=None,
                  on_epoch=None, steps_per_epoch: int | None = None) -> dict:
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
    run = _Run(config, real.image_shape, real.num_classes)
    return _repeat(run, batches_for_seed, data_lib.test_dataset(real, config.test_batch),
                   runs, seed, progress, on_epoch, val=data_lib.val_dataset(real, config.test_batch))


# =====================================================================================
# CLI: python -m esp_tf.evaluate (flags are defined only when run as a program, so importing
# this module next to esp_tf.cli, which owns --data_dir/--seed/--dsa of train.py, is safe)
# =====================================================================================


def define_flags():
    """Defines the CLI flags in absl's global registry (once; later calls do nothing)."""
    from absl import flags
    if "condensed" in flags.FLAGS:
        return
    flags.DEFINE_string("condensed", None, "Condensed set: an esp_tf workdir, a prepared TFDS directory, "
                        "or a TFDS name in --data_dir.")
    flags.DEFINE_bool("full", False, "Train on the whole train split of --source_dataset instead "
                      "(the 'Full dataset' row).")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir of TFDS names and of the source dataset "
                        "(default: the workdir's, else TFDS's default).")
    flags.DEFINE_string("source_dataset", None, "Real dataset whose test split scores the set "
                        "(default: the one recorded with the set).")
    flags.DEFINE_list("archs", ["convnet3"], "Architectures (models.ARCHS), e.g. " + ",".join(_ARCH_ORDER))
    flags.DEFINE_enum("protocol", "standard", list(PROTOCOLS), "standard (MTT/DM) or idc (IDC's, CutMix).")
    flags.DEFINE_integer("runs", 5, "Runs (seeds) per architecture: the field reports 5.")
    flags.DEFINE_integer("epochs", None, "Epochs per run (default: 1000 as both protocols; with --full "
                         "50, MTT's expert length, as the paper gives no full-data recipe).")
    flags.DEFINE_integer("batch_size", None, "Training batch (default: the protocol's, 256 / idc 64).")
    flags.DEFINE_float("lr", None, "Initial SGD learning rate (default: the protocols' 0.01).")
    flags.DEFINE_bool("dsa", True, "DSA augmentation while training (without it: several points lower).")
    flags.DEFINE_integer("seed", 0, "Seed of the first run; run i uses seed + i.")
    flags.DEFINE_integer("steps_per_epoch", None, "--full only: an epoch is this many batches of a "
                         "fresh random order (a compute-capped full-data row; default whole passes).")
    flags.DEFINE_string("method", None, "Row label (default: the set's method + ipc, or 'full').")
    flags.DEFINE_string("output", None, "JSON file the results are merged into (default: print only).")
    flags.DEFINE_bool("verbose", False, "On an error, show the Python traceback too.")


def main(argv):
    from absl import app, flags, logging
    from esp_tf import condensed as condensed_lib, data as data_lib, workdir as wd
    F = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not F["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    for name in ("condensed", "data_dir", "output"):      # bash leaves `~` alone after `=`
        if getattr(F, name):
            setattr(F, name, os.path.expanduser(getattr(F, name)))
    if F.lr is not None and not math.isfinite(F.lr):
        raise wd.UserError(f"--lr must be a finite number, got {F.lr}")
    if bool(F.condensed) == F.full:
        raise wd.UserError("give exactly one of --condensed=<set> and --full (with --source_dataset)")
    unknown = [a for a in F.archs if a not in models.ARCHS]
    if unknown or not F.archs:
        raise wd.UserError(f"--archs: unknown {unknown}; known: {', '.join(sorted(models.ARCHS))}")
    if F.steps_per_epoch is not None and not F.full:
        raise wd.UserError("--steps_per_epoch applies to --full only")
    for name in ("runs", "epochs", "batch_size", "steps_per_epoch"):
        if getattr(F, name) is not None and getattr(F, name) < 1:
            raise wd.UserError(f"--{name} must be >= 1")
    if F.full:
        if not F.source_dataset:
            raise wd.UserError("--full needs --source_dataset=<TFDS name>")
        real = data_lib.load(F.source_dataset, F.data_dir)
        label, images, labels = F.method or "full", None, None
        wd.say(f"full training split of {real.name}: {len(real.train_labels)} images")
    else:
        cset = condensed_lib.resolve(F.condensed, F.data_dir, F.source_dataset)
        source_dir, base = cset.data_dir, cset.source_dataset.partition(":")[0]
        if (base.split("/")[0] in data_lib.EMBEDDED_DATASETS and source_dir
                and not os.path.isdir(os.path.join(source_dir, *base.split("/")))):
            source_dir = None    # an embedded source is prepared in TFDS's default data_dir, never
            #                      in a folder the user gave for the condensed set
        real = data_lib.load(cset.source_dataset, source_dir, max_train_per_class=1)
        images, labels, label = cset.normalized(real.mean, real.std), cset.labels, F.method or cset.label
        if images.shape[1:] != real.image_shape or labels.min() < 0 or labels.max() >= real.num_classes:
            raise wd.UserError(f"{F.condensed}: images {images.shape[1:]} with labels {labels.min()}.."
                               f"{labels.max()} do not fit {real.name} ({real.image_shape}, "
                               f"{real.num_classes} classes); set --source_dataset")
        wd.say(f"condensed set {F.condensed} ({cset.kind}): {len(labels)} images; scored on "
               f"{real.name} test ({len(real.test_labels)} images)")
        outside = data_lib.fraction_outside_pixel_range(images, real)
        if outside > 0.01:
            wd.say(f"note: {100 * outside:.1f}% of the set's values lie outside the pixel range 0..255 of "
                   f"{real.name}. BatchNorm networks (resnet10, densenet121, efficientnetv2s) then keep "
                   "statistics that no real image has and lose accuracy; esp_tf.train clips renders "
                   "to the range by default (--clip_pixels)")
    overrides = {k: getattr(F, k) for k in ("batch_size", "lr") if getattr(F, k) is not None}
    epochs = F.epochs or (50 if F.full else 1000)
    results = (wd.read_json(F.output) if F.output else None) or {}   # fails early if corrupt
    test_x = data_lib.test_dataset(real, 1000)
    for k, arch in enumerate(F.archs):
        config = protocol_config(F.protocol, arch, epochs, F.dsa, **overrides)
        name, bar, last = f"{label} {arch} ({k + 1}/{len(F.archs)})", [], [time.time()]

        def on_epoch(i, done):
            if not bar:    # rate (so the ETA) counted from the end of the first epoch: no tracing
                bar.append(wd.Progress(name, F.runs * epochs, done=i * epochs + done))
            if time.time() - last[0] > 15 or done == epochs:   # a line at most every 15 s
                last[0] = time.time()
                bar[0].update(i * epochs + done, f"run {i + 1}/{F.runs} epoch {done}/{epochs}")
        kwargs = dict(runs=F.runs, seed=F.seed, on_epoch=on_epoch,
                      progress=lambda i, n, acc, s: wd.say(f"  {arch} run {i + 1}/{n}: {acc:.2f}% ({s:.0f}s)"))
        res = (evaluate_full(real, config, steps_per_epoch=F.steps_per_epoch, **kwargs) if F.full else
               evaluate(images, labels, test_x, None, real.num_classes, config, **kwargs))
        res.update(protocol=F.protocol, epochs=epochs, dsa=F.dsa, source_dataset=real.name)
        if F.full:
            res.update(steps_per_epoch=F.steps_per_epoch, train_images_seen=epochs * (
                F.steps_per_epoch * config.batch_size if F.steps_per_epoch else len(real.train_labels)))
        results.setdefault(label, {})[arch] = res
        if F.output:     # merged into the file as it is now: parallel runs may share --output
            results = wd.merge_json_cell(F.output, label, arch, res)
    print(results_table(results), flush=True)


def run():
    """Entry point: bad input (flags, data, condensed set) exits 2 with a message, no traceback."""
    from absl import app
    from esp_tf import workdir as wd
    from esp_tf.data import DatasetNotFoundError
    define_flags()
    try:
        app.run(main, flags_parser=wd.parse_argv)
    except (wd.UserError, DatasetNotFoundError, OSError) as e:
        from absl import flags
        if flags.FLAGS.is_parsed() and flags.FLAGS.verbose:
            import traceback
            traceback.print_exc()
        wd.fail(str(e) if not isinstance(e, OSError) else f"{e.strerror or e}: {e.filename or ''}")
        sys.exit(2)
    except KeyboardInterrupt:
        wd.fail("interrupted; results already merged into --output are kept")
        sys.exit(130)


if __name__ == "__main__":
    run()
