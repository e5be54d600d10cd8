"""Flags of `python -m esp_tf.train` and their conversion into the library's config objects.

Only the command-line layer (train.py, tools/) imports this module; library functions take
explicit arguments. Every default carries its reason.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing

from absl import flags

from esp_tf import choices, config  # TensorFlow-free: every setting, its default, help and type
from esp_tf import shared_flags    # --data_dir, --seed, --verbose and the --eval_* settings
from esp_tf.workdir import RENAMED_TRAIN_FLAGS      # light: no TensorFlow

# The flags live in this registry, not absl's global one: importing the library (esp_tf.pipeline
# imports this module) defines no flag. The command lines `install()` them before parsing.
REGISTRY = flags.FlagValues()
shared_flags.install(__name__, REGISTRY)     # listed by --help and recorded in flags.txt as ours
FLAGS = REGISTRY
PHASES = choices.PHASES


def _define_flags(registry, skip=()) -> None:
    """Every flag but those in `skip`, generated from its setting in esp_tf/config.py (its one
    default, help and type; the method's and parameterisation's settings default to None there,
    i.e. their Config's), then the names before esp_tf 0.2 as absl aliases (an old command or
    flagfile still runs; the run records the new names; an alias is no setting of its own)."""
    for spec, default in config.flag_specs():
        if spec.name not in skip:
            shared_flags.define(spec, default, registry)
    for old, new in RENAMED_TRAIN_FLAGS.items():
        flags.DEFINE_alias(old, new, flag_values=registry)


_define_flags(REGISTRY, skip=config.SHARED)         # the shared ones: shared_flags, installed above


# =====================================================================================
# Settings: the flags above as one frozen value, for the library and the command line alike
# =====================================================================================
# the shared ones, then ours, in definition order (aliases are no settings)
NAMES = tuple(name for name in REGISTRY if name not in RENAMED_TRAIN_FLAGS)


def install(flag_values=flags.FLAGS) -> None:
    """Defines the command line's flags in absl's global registry (the same Flag objects, so
    parsing it fills `REGISTRY`): the command lines and tools that parse train's flags call it
    before parsing. Twice is once."""
    shared_flags.install(__name__, flag_values, REGISTRY)
# Run options that are not settings of the result (not recorded in flags.txt).
_NOT_RECORDED = config.names_with(config.NOT_RECORDED)
Settings = dataclasses.make_dataclass(
    "Settings", [(name, typing.Any) for name in NAMES], frozen=True,
    namespace={"__doc__": "Every setting of an esp_tf run, one field per flag of `python -m "
                          "esp_tf.train` (same name, same meaning; see --help). Make one with "
                          "`esp_tf.cli.settings(**overrides)`."})
_PATHS = ("data_dir", "workdir", "experts_dir")


def _expand(values: dict) -> dict:
    """`~` in path settings: bash leaves it alone after `=` (--data_dir=~/tensorflow_datasets)."""
    return {k: os.path.expanduser(v) if k in _PATHS and v else v for k, v in values.items()}


def settings(**overrides) -> Settings:
    """Settings with every flag's default, `overrides` applied and the method settings resolved
    (`resolve`). Raises UserError for an unknown name or a value the method rejects."""
    from esp_tf import workdir as wd
    unknown = sorted(set(overrides) - set(NAMES))
    if unknown:
        raise wd.UserError(f"unknown settings {', '.join(unknown)}; see python -m esp_tf.train --help")
    values = {name: FLAGS[name].default for name in NAMES}
    return resolve(Settings(**_expand({**values, **overrides})))


def parse(args: list) -> Settings:
    """Settings from command-line arguments of esp_tf.train (`--flag=value`, `--flagfile=...`),
    parsed in a flag registry of their own (generated from esp_tf/config.py like REGISTRY), so a
    tool can read several command lines in one process without touching absl's global flags.
    Raises UserError for an unknown or unparsable flag."""
    from esp_tf import workdir as wd
    registry = flags.FlagValues()
    _define_flags(registry)
    try:
        registry(["esp_tf.train", *args], known_only=False)
    except flags.Error as e:
        raise wd.UserError(f"{e}. `python -m esp_tf.train --helpfull` lists every flag") from e
    return resolve(Settings(**_expand({name: registry[name].value for name in NAMES})))


def from_flags() -> Settings:
    """The parsed command line as Settings (method settings resolved)."""
    return resolve(Settings(**_expand({name: FLAGS[name].value for name in NAMES})))


def run_config(s: Settings) -> config.RunConfig:
    """The nested, typed configuration (config.RunConfig) of flat Settings `s` (resolved)."""
    s = resolve(s)
    groups = {group: cls(**{f.name: _typed(getattr(s, f.name), f) for f in dataclasses.fields(cls)})
              for group, cls in config.GROUPS.items()}
    top = {name: _typed(getattr(s, name), config.RunConfig.__dataclass_fields__[name]) for name in config.TOP}
    return config.RunConfig(**top, **groups, method=method_config(s), param=param_config(s))


def _typed(value, field):
    return tuple(value) if field.metadata.get("flag") == "list" and value is not None else value


def settings_from(c: config.RunConfig) -> Settings:
    """Flat Settings (one field per flag) of a RunConfig: its groups' fields, its method's Config
    (None: the method's defaults) and its parameterisation's Config, as their flags."""
    from esp_tf import methods, synthetic, workdir as wd
    values = {name: getattr(c, name) for name in config.TOP}
    for group in config.GROUPS:
        values.update(dataclasses.asdict(getattr(c, group)))
    method, param = methods.get(c.condense.method), synthetic.parameterisation(c.condense.param)
    for given, owner, fields in ((c.method, method, method.flag_fields),
                                 (c.param, param, {n: n for n in synthetic.setting_names(param)})):
        if given is not None and not isinstance(given, owner.Config):
            raise wd.UserError(f"RunConfig: {type(given).__name__} is not the Config of "
                               f"{owner.__name__} ({owner.Config.__name__})")
        given = given if given is not None else owner.Config()
        for flag, field in fields.items():
            values[flag] = _TO_FLAG.get(flag, lambda v: v)(getattr(given, field))
    values = {k: list(v) if isinstance(v, tuple) and FLAGS[k].flag_type().startswith("comma") else v
              for k, v in values.items()}
    return settings(**values)


def method_config(s: Settings, name: str | None = None):
    """The Config of method `name` (default s.method): its defaults, overridden by the method
    settings given in `s` (those not None)."""
    from esp_tf import methods
    method = methods.get(name or s.method)
    given = {field: _TO_CONFIG.get(flag, lambda v: v)(getattr(s, flag))
             for flag, field in method.flag_fields.items() if getattr(s, flag) is not None}
    return method.Config(dsa=_dsa(s.dsa), **given)


# Method settings: flag values <-> config fields, where the two differ in type.
_TO_CONFIG = {"losses": tuple, "syn_batch": lambda v: v or None}
_TO_FLAG = {"losses": list, "syn_batch": lambda v: v or 0}


def param_config(s: Settings, name: str | None = None):
    """The Config of parameterisation `name` (default s.param): its defaults, overridden by the
    settings given in `s` (those not None), then those whose default depends on the set size
    filled for s.ipc (the Config's `for_ipc`, if it has one)."""
    from esp_tf import synthetic
    kind = synthetic.parameterisation(name or s.param)
    config = kind.Config(**{field: getattr(s, field) for field in synthetic.setting_names(kind)
                            if getattr(s, field) is not None})
    return _for_ipc(config, s.ipc)


def _for_ipc(config, ipc):
    return config.for_ipc(ipc) if hasattr(config, "for_ipc") and ipc is not None else config


def resolve(s: Settings) -> Settings:
    """`s` with every method and parameterisation setting left None set to its default, so
    flags.txt records the values a run used: s.method's (s.param's) own first, then each other
    registered one's (a setting the run's does not read keeps the default of the first that
    reads it). Raises UserError, naming the flag, for a value the method's config rejects."""
    from esp_tf import methods, synthetic, workdir as wd
    if s.method not in methods.names():
        raise wd.UserError(f"--method: unknown {s.method!r}; registered: {', '.join(methods.names())}")
    filled = {}
    if s.param in synthetic.PARAMETERISATIONS:      # an unknown one is reported by validate()
        for name in (s.param, *[n for n in synthetic.PARAMETERISATIONS if n != s.param]):
            config = (param_config(s, name) if name == s.param
                      else _for_ipc(synthetic.PARAMETERISATIONS[name].Config(), s.ipc))
            for field in synthetic.setting_names(synthetic.PARAMETERISATIONS[name]):
                if getattr(s, field) is None and field not in filled:
                    filled[field] = getattr(config, field)
    for name in (s.method, *[n for n in methods.names() if n != s.method]):
        method = methods.get(name)
        try:
            config = method_config(s, name) if name == s.method else method.Config()
        except ValueError as e:   # the config's message starts with its field: name the flag
            fields = {field: flag for flag, field in method.flag_fields.items()}
            first = str(e).split(" ", 1)[0]
            raise wd.UserError(f"invalid flags: --{fields.get(first, 'method=' + s.method)}: {e}") from e
        for flag, field in method.flag_fields.items():
            if getattr(s, flag) is None and flag not in filled:
                filled[flag] = _TO_FLAG.get(flag, lambda v: v)(getattr(config, field))
    return dataclasses.replace(s, **filled)


# The range of every numeric flag, in one table: name -> (lowest allowed, whether the lowest
# itself is allowed). A flag left None (a method setting not set, an optional size) is not
# checked here; method settings are also checked by their method's Config.
_AT_LEAST_ONE = ("ipc", "iterations", "segment_length", "num_experts", "expert_epochs", "expert_batch",
                 "eval_epochs", "eval_runs", "eval_batch", "ckpt_every", "log_every", "num_decoders",
                 "latent_downsample", "latent_channels", "decoder_hidden", "width", "depth",
                 "inner_steps", "max_start_epoch")
_AT_LEAST_ZERO = ("val_per_class", "real_per_class", "seed", "syn_batch", "syn_chunk", "beta", "decoder_init", "image_size")
_POSITIVE = ("expert_lr", "eval_lr", "inner_lr", "pixels_lr", "codes_lr", "decoders_lr",
             "student_lr_init", "student_lr_lr")
RANGES = {**{n: (1, True) for n in _AT_LEAST_ONE}, **{n: (0, True) for n in _AT_LEAST_ZERO},
          **{n: (0, False) for n in _POSITIVE}}
# Upper bounds of the learning rates, far above any published setting (SGD 0.01-0.1 for networks,
# Adam 0.01-0.1 for codes and decoders, MTT's pixel lr up to 1,000): a larger value only makes a
# run that diverges, or one whose networks die silently at chance accuracy.
MAXIMA = {"expert_lr": 10.0, "eval_lr": 10.0, "inner_lr": 100.0, "codes_lr": 10.0, "decoders_lr": 10.0,
          "student_lr_init": 10.0, "student_lr_lr": 10.0, "pixels_lr": 1e5}
# A TFDS name (name, name/config, name:version, name/config:version), or the embedded default.
_DATASET_NAME = r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9]+\.[0-9]+\.[0-9]+|:[0-9]+\.\*\.\*)?"


def range_errors(s) -> list:
    """A message for every numeric flag outside its range (RANGES, MAXIMA), naming the flag."""
    errors = []
    for name, (low, inclusive) in RANGES.items():
        value = getattr(s, name)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue                      # reported as not finite below
        if value < low or (value == low and not inclusive):
            errors.append(f"--{name} must be {'>=' if inclusive else '>'} {low}, got {value}")
        elif name in MAXIMA and value > MAXIMA[name]:
            errors.append(f"--{name} must be <= {MAXIMA[name]:g} (a larger one only diverges), got {value:g}")
    return errors


def validate(s: Settings) -> list:
    """Cross-setting checks with messages a user can act on (flag names)."""
    import re
    errors = []
    if not s.workdir:
        errors.append("--workdir is required")
    bad = [p for p in s.phases if p not in PHASES]
    if bad:
        errors.append(f"--phases: unknown {bad}; choose from {','.join(PHASES)}")
    elif not s.phases:
        errors.append(f"--phases is empty: nothing would run; choose from {','.join(PHASES)}")
    errors += range_errors(s)
    from esp_tf import synthetic as synthetic_lib       # the parameterisation registry
    if s.param not in synthetic_lib.PARAMETERISATIONS:
        errors.append(f"--param: unknown {s.param!r}; registered: {', '.join(synthetic_lib.PARAMETERISATIONS)}")
    if s.image_size and not (s.dataset or "").startswith("folder:"):
        errors.append(f"--image_size={s.image_size} applies to --dataset=folder:<dir> only")
    if (s.dataset or "").startswith("folder:"):
        if not s.dataset[len("folder:"):]:
            errors.append("--dataset=folder: needs a folder, e.g. --dataset=folder:~/photos")
        if s.real_data == "stream":
            errors.append("--real_data=stream reads TFDS datasets; a folder: dataset is read into memory "
                          "(drop the flag, or prepare the folder as a TFDS dataset with `tfds build`)")
    elif not re.fullmatch(_DATASET_NAME, s.dataset or ""):
        errors.append(f"--dataset={s.dataset!r} is not a TFDS dataset name (name, name/config or "
                      "name:version, e.g. cifar10 or fashion_mnist:3.0.1)")
    if s.real_data == "stream" and s.jit_compile:
        errors.append("--real_data=stream reads real batches on the host, which XLA cannot compile: "
                      "drop --jit_compile or use --real_data=memory")
    if s.export_name is not None and not re.fullmatch(r"[a-z][a-z0-9_]*", s.export_name):
        errors.append(f"--export_name={s.export_name!r}: a TFDS name is snake_case ([a-z][a-z0-9_]*), "
                      "so tfds.load can read the export")
    if s.zca and s.clip_pixels:
        errors.append("--zca: whitened images have no per-channel pixel range to clip renders to; "
                      "add --noclip_pixels")
    if s.max_start_epoch >= 1 and s.max_start_epoch - 1 + s.segment_length > s.expert_epochs:
        errors.append(f"--max_start_epoch - 1 ({s.max_start_epoch - 1}) + --segment_length "
                      f"({s.segment_length}) exceeds --expert_epochs ({s.expert_epochs})")
    bad = [b for b in s.baselines if b not in choices.BASELINES]
    if bad:
        errors.append(f"--baselines: unknown {bad}; available: {', '.join(choices.BASELINES)}")
    for name in NAMES:                                   # NaN/inf would poison every update
        value = getattr(s, name)
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"--{name} must be a finite number, got {value}")
    if s.strategy != "none":
        from esp_tf import methods
        if not methods.get(s.method).data_parallel:
            errors.append(f"--method={s.method} has no data-parallel update: drop --strategy (esp and dm "
                          "have one)")
        if s.jit_compile:
            errors.append("--jit_compile is not supported under --strategy yet: drop one of them")
    from esp_tf import models                            # the registry models.build reads
    for name, value in (("model", s.model), ("eval_arch", eval_arch(s))):
        if value not in models.ARCHS:
            errors.append(f"--{name}: unknown {value!r}; known: {', '.join(sorted(models.ARCHS))}")
    return errors


def experts_dir(s: Settings) -> str:
    return s.experts_dir or os.path.join(s.workdir, "experts")


def model_config(s: Settings) -> dict:
    return {"width": s.width, "depth": s.depth, "norm": "instancenorm", "act": "relu", "pool": "avgpool"}


def _dsa(enabled: bool):
    from esp_tf import augment
    return augment.DSAConfig() if enabled else None


def expert_config(s: Settings):
    from esp_tf.experts import ExpertConfig
    return ExpertConfig(epochs=s.expert_epochs, lr=s.expert_lr, batch_size=s.expert_batch,
                        dsa=_dsa(s.expert_dsa))


def eval_arch(s: Settings) -> str:
    """--eval_arch, else the condensation network: convnet<depth> for the ConvNet family (ConvNet-3
    where no standard ConvNet of that depth is registered, e.g. the tests' tiny depth-2 nets)."""
    if s.eval_arch:
        return s.eval_arch
    if s.model not in ("convnet", "convnet3"):
        return s.model
    from esp_tf import models
    name = f"convnet{s.depth}"     # the field's ConvNet-3 / ConvNet-4 (width 128)
    return name if name in models.ARCHS else "convnet3"


def eval_config(s: Settings):
    from esp_tf.evaluate import EvalConfig
    return EvalConfig(arch=eval_arch(s), epochs=s.eval_epochs, batch_size=s.eval_batch,
                      lr=s.eval_lr, dsa=_dsa(s.eval_dsa))


def condense_settings(s: Settings):
    from esp_tf.condense import CondenseSettings
    return CondenseSettings(workdir=s.workdir, method=s.method, method_config=method_config(s),
                            ipc=s.ipc, init=s.init, iterations=s.iterations,
                            segment_length=s.segment_length, max_start_epoch=s.max_start_epoch,
                            param=s.param, param_config=param_config(s), lr_schedule=s.lr_schedule,
                            clip_pixels=s.clip_pixels, range_map=s.range_map, seed=s.seed,
                            ckpt_every=s.ckpt_every, log_every=s.log_every, jit_compile=s.jit_compile)


def _serialized(s: Settings, name: str) -> str:
    """`--name=value` as absl writes it for the flag (`--name`/`--noname` for booleans; '' for None)."""
    return FLAGS[name]._serialize(getattr(s, name))


def values(s: Settings) -> dict:
    """Settings as name -> the string flags.txt records for them."""
    out = {}
    for name in NAMES:
        text = _serialized(s, name)
        if text.startswith("--no") and "=" not in text and FLAGS[name].boolean:
            out[name] = "False"
        elif "=" in text:
            out[name] = text.split("=", 1)[1]
        else:
            out[name] = "True" if text else ""
    return out


def from_values(recorded: dict) -> Settings:
    """Settings from a flags.txt's recorded strings (`workdir.parse_flags_file`): each parsed by
    its flag; settings not recorded (added since) take their flag default."""
    out = {}
    for name in NAMES:
        flag = FLAGS[name]
        if name not in recorded:
            out[name] = flag.default
        elif flag.boolean:
            out[name] = recorded[name] == "True"
        else:
            out[name] = flag.parser.parse(recorded[name]) if recorded[name] != "" else None
            if recorded[name] == "" and isinstance(flag.default, list):
                out[name] = []
    return Settings(**out)


def flags_file_text(s: Settings) -> str:
    """A flagfile that replays this run (--restart and --verbose are never recorded)."""
    lines = [_serialized(s, name) for name in NAMES if name not in _NOT_RECORDED]
    return ("# Resolved flags of this run. Replay: python -m esp_tf.train --flagfile=<this file>\n"
            + "".join(line + "\n" for line in lines if line))
