"""Flags that `esp_tf.train` and `esp_tf.evaluate` share, defined once for both.

absl keeps one registry per process, so a flag name can be defined only once: both command
lines import this module and adopt its flags as their own (their --help lists them). A flag
here means the same in both tools. Only the command-line layer imports this module.
"""
from __future__ import annotations

import math

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string("data_dir", None, "TFDS data_dir holding prepared datasets (default: TFDS's own; "
                    "esp_tf.evaluate: the condensed set's workdir's, else TFDS's own).")
flags.DEFINE_integer("seed", 0, "Run seed; every random draw derives from it. Evaluation run i "
                     "trains from seed + i.")
flags.DEFINE_bool("verbose", False, "On an error, show the Python traceback too.")

# -- evaluation: train fresh networks on the condensed set (standard protocol) ---------------
flags.DEFINE_integer("eval_epochs", 1000, "Training epochs per evaluation run (lr x0.1 at half), as both "
                     "protocols. esp_tf.evaluate --full: 50 unless given (MTT's expert length; the "
                     "paper gives no full-data recipe).")
flags.DEFINE_integer("eval_runs", 5, "Evaluation runs (seeds) per architecture; mean +- std reported "
                     "(the field reports 5).")
flags.DEFINE_integer("eval_batch", 256, "Evaluation batch size (esp_tf.evaluate --protocol=idc: IDC's "
                     "64 unless given).")
flags.DEFINE_float("eval_lr", 0.01, "Evaluation SGD learning rate (momentum 0.9, wd 5e-4; both "
                   "protocols' 0.01).")
flags.DEFINE_bool("eval_dsa", True, "DSA during evaluation training (off loses several points).")


def validate() -> list[str]:
    """Checks of the shared flags, as messages a user can act on (each tool adds its own)."""
    errors = [f"--{name} must be >= 1, got {getattr(FLAGS, name)}"
              for name in ("eval_epochs", "eval_runs", "eval_batch") if getattr(FLAGS, name) < 1]
    if not math.isfinite(FLAGS.eval_lr):
        errors.append(f"--eval_lr must be a finite number, got {FLAGS.eval_lr}")
    return errors
