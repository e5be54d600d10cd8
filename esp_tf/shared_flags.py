"""Flags that `esp_tf.train` and `esp_tf.evaluate` share, defined once for both.

The flags live in this module's own registry (`REGISTRY`), not absl's global one, so importing
the library defines no flag; each command line installs them into absl's global registry
(`install`) as its own (its --help lists them). A flag here means the same in both tools.
"""
from __future__ import annotations

import math

from absl import flags

REGISTRY = flags.FlagValues()

flags.DEFINE_string("data_dir", None, "TFDS data_dir holding prepared datasets (default: TFDS's own; "
                    "esp_tf.evaluate: the condensed set's workdir's, else TFDS's own).", flag_values=REGISTRY)
flags.DEFINE_integer("seed", 0, "Run seed; every random draw derives from it. Evaluation run i "
                     "trains from seed + i.", flag_values=REGISTRY)
flags.DEFINE_bool("verbose", False, "On an error, show the Python traceback too.", flag_values=REGISTRY)

# -- evaluation: train fresh networks on the condensed set (standard protocol) ---------------
flags.DEFINE_integer("eval_epochs", 1000, "Training epochs per evaluation run (lr x0.1 at half), as both "
                     "protocols. esp_tf.evaluate --full: 50 unless given (MTT's expert length; the "
                     "paper gives no full-data recipe).", flag_values=REGISTRY)
flags.DEFINE_integer("eval_runs", 5, "Evaluation runs (seeds) per architecture; mean +- std reported "
                     "(the field reports 5).", flag_values=REGISTRY)
flags.DEFINE_integer("eval_batch", 256, "Evaluation batch size (esp_tf.evaluate --protocol=idc: IDC's "
                     "64 unless given).", flag_values=REGISTRY)
flags.DEFINE_float("eval_lr", 0.01, "Evaluation SGD learning rate (momentum 0.9, wd 5e-4; both "
                   "protocols' 0.01).", flag_values=REGISTRY)
flags.DEFINE_bool("eval_dsa", True, "DSA during evaluation training (off loses several points).", flag_values=REGISTRY)


NAMES = tuple(REGISTRY)


def install(module_name: str, flag_values=flags.FLAGS, registry=REGISTRY) -> None:
    """Registers the flags of `registry` in absl's `flag_values` as flags of `module_name` (its
    --help lists them); the same Flag objects, so parsing fills them here too. Twice is once."""
    for name in registry:
        if name not in flag_values:
            flags.DEFINE_flag(registry[name], flag_values, module_name=module_name)
        elif flag_values[name] is not registry[name]:
            raise flags.DuplicateFlagError.from_flag(name, flag_values)


def validate() -> list[str]:
    """Checks of the shared flags, as messages a user can act on (each tool adds its own)."""
    value = lambda name: REGISTRY[name].value       # noqa: E731
    errors = [f"--{name} must be >= 1, got {value(name)}"
              for name in ("eval_epochs", "eval_runs", "eval_batch") if value(name) < 1]
    if not math.isfinite(value("eval_lr")):
        errors.append(f"--eval_lr must be a finite number, got {value('eval_lr')}")
    return errors
