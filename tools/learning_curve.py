r"""Learning curve of one network on a condensed set: is it not learning, or not transferring?

    python tools/learning_curve.py --condensed=runs/bench/cifar10_ipc1/esp_latents_clip \
        --arch=efficientnetv2s --eval_epochs=1000 --every=100 --output=runs/bench/curve.json

Trains `--arch` on the set exactly as `esp_tf.evaluate` does (same protocol, lr schedule, DSA,
momentum SGD; one seed; its training loop) and every `--every` epochs prints the accuracy on
the condensed set itself and the accuracy on a class-stratified subset of the real test split
(`--test_subset` images), both with BatchNorm in inference mode, plus the test-subset
accuracy with batch statistics (BatchNorm in training mode). At the end it scores the whole
test split. A network that fits the set but stays at chance on real images does not transfer;
one that does not even fit the set needs more steps or another lr; a gap between the two test
columns points at BatchNorm statistics that differ between the set and real images.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from esp_tf import shared_flags
# --data_dir, --seed and the evaluation settings (--eval_epochs, --eval_lr, --eval_batch,
# --eval_dsa) are esp_tf.evaluate's own flags, with the same names and meaning.
shared_flags.install(__name__)

flags.DEFINE_string("condensed", None, "Condensed set (as esp_tf.evaluate --condensed).")
flags.DEFINE_string("arch", "convnet3", "Architecture (models.ARCHS).")
flags.DEFINE_enum("protocol", "standard", ["standard", "idc"], "Evaluation protocol (evaluate.PROTOCOLS); "
                  "--eval_lr and --eval_batch override the protocol's only when given.")
flags.DEFINE_integer("every", 100, "Report every this many epochs.")
flags.DEFINE_integer("test_subset", 2000, "Real test images scored at each report (stratified).")
flags.DEFINE_string("output", None, "JSON file for the curve (default: print only).")
FLAGS = flags.FLAGS


def main(argv):
    import numpy as np
    import tensorflow as tf
    from esp_tf import condensed as condensed_lib, data as data_lib, evaluate, workdir as wd
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.condensed:
        raise app.UsageError("--condensed is required")
    for name in ("eval_epochs", "every", "test_subset"):
        if getattr(FLAGS, name) < 1:
            raise app.UsageError(f"--{name} must be >= 1")
    try:
        cset = condensed_lib.resolve(FLAGS.condensed, FLAGS.data_dir)
        real = cset.load_source(cset.data_dir)
    except (wd.UserError, data_lib.DatasetNotFoundError) as e:
        sys.exit(f"error: {e}")
    x = cset.normalized(real.mean, real.std, real.whitening).astype(np.float32)
    y = cset.labels.astype(np.int32)
    test_x = data_lib.to_model(real, real.test_images).numpy()
    test_y = real.test_labels.astype(np.int32)
    sub = data_lib.stratified_subset(test_y, FLAGS.test_subset)
    overrides = {k: getattr(FLAGS, f) for k, f in (("lr", "eval_lr"), ("batch_size", "eval_batch"))
                 if FLAGS[f].present}                         # else the protocol's (as esp_tf.evaluate)
    config = evaluate.protocol_config(FLAGS.protocol, FLAGS.arch, FLAGS.eval_epochs, FLAGS.eval_dsa, **overrides)
    trainer = evaluate.Trainer(config, x.shape[1:], real.num_classes)
    batch_stats = tf.function(lambda a: tf.argmax(trainer.model(a, training=True), -1, output_type=tf.int32))

    def accuracy(images, labels, training_bn=False):
        predict = batch_stats if training_bn else None
        return round(100.0 * evaluate.accuracy_on(trainer, (images, labels), predict), 2)

    curve, t0 = [], time.time()

    def report(epoch):                  # after each epoch of evaluate's own training loop
        if epoch % FLAGS.every and epoch != FLAGS.eval_epochs:
            return
        point = dict(epoch=epoch, train_acc=accuracy(x, y), test_acc=accuracy(test_x[sub], test_y[sub]),
                     test_acc_batch_stats=accuracy(test_x[sub], test_y[sub], True),
                     seconds=round(time.time() - t0))
        curve.append(point)
        print(json.dumps(point), flush=True)

    print(f"{FLAGS.arch} on {FLAGS.condensed} ({len(y)} images), {FLAGS.protocol} protocol, "
          f"lr {config.lr}, {FLAGS.eval_epochs} epochs; test subset {len(sub)} of {len(test_y)}", flush=True)
    try:
        final = evaluate.train_and_test(trainer, evaluate.array_epochs(x, y, config.batch_size, FLAGS.seed),
                                        (test_x, test_y), FLAGS.seed, on_epoch=report)
    except FloatingPointError as e:
        sys.exit(f"error: {e}")
    result = dict(arch=FLAGS.arch, condensed=FLAGS.condensed, protocol=FLAGS.protocol, lr=config.lr,
                  epochs=FLAGS.eval_epochs, seed=FLAGS.seed, curve=curve, final_test_acc=round(100.0 * final, 2))
    print(f"final accuracy on the whole test split: {result['final_test_acc']}%", flush=True)
    if FLAGS.output:
        wd.write_json(FLAGS.output, result)

if __name__ == "__main__":
    app.run(main)
