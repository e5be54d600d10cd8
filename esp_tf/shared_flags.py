"""Flags that `esp_tf.train` and `esp_tf.evaluate` share, defined once for both.

The flags live in this module's own registry (`REGISTRY`), not absl's global one, so importing
the library defines no flag; each command line installs them into absl's global registry
(`install`) as its own (its --help lists them). A flag here means the same in both tools.
"""
from __future__ import annotations

import math

from absl import flags

from esp_tf import config

REGISTRY = flags.FlagValues()



def define(spec, default, flag_values) -> None:
    """Defines the flag of `spec` (a config.FlagSpec) with `default` in `flag_values`."""
    kw = dict(flag_values=flag_values)
    if spec.flag == "enum":
        flags.DEFINE_enum(spec.name, default, list(spec.choices), spec.help, **kw)
    elif spec.flag == "list":
        flags.DEFINE_list(spec.name, None if default is None else list(default), spec.help, **kw)
    else:
        define_fn = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer, "float": flags.DEFINE_float,
                     "bool": flags.DEFINE_bool}[spec.flag]
        define_fn(spec.name, default, spec.help, **kw)


# The shared settings' flags, generated from their fields in esp_tf/config.py (one default each).
for _spec, _default in config.flag_specs():
    if _spec.name in config.SHARED:
        define(_spec, _default, REGISTRY)

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
