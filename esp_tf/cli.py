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

from esp_tf import choices, cluster    # TensorFlow-free: the named choices of the enum flags
from esp_tf import shared_flags    # --data_dir, --seed, --verbose and the --eval_* settings

# The flags live in this registry, not absl's global one: importing the library (esp_tf.pipeline
# imports this module) defines no flag. The command lines `install()` them before parsing.
REGISTRY = flags.FlagValues()
shared_flags.install(__name__, REGISTRY)     # listed by --help and recorded in flags.txt as ours
FLAGS = REGISTRY
PHASES = ("experts", "condense", "evaluate", "export")

# -- data & model ------------------------------------------------------------------------
flags.DEFINE_string("dataset", "fashion_mnist_mini", "TFDS dataset name (embedded default needs no download), "
                    "or folder:<dir> for your own images (one subfolder per class; README 'Your own images').", flag_values=REGISTRY)
flags.DEFINE_integer("image_size", 0, "--dataset=folder:<dir> only: resize every image to this many pixels "
                     "square (0: keep the images' own size, which they must then share).", flag_values=REGISTRY)
flags.DEFINE_bool("download", True, "Download and prepare a missing dataset through TFDS, as tfds.load "
                  "does (needs network); --nodownload: only read prepared data (tests, benchmarks).", flag_values=REGISTRY)
flags.DEFINE_string("workdir", None, "Output directory of this run (flags, checkpoints, metrics, exports).", flag_values=REGISTRY)
flags.DEFINE_string("experts_dir", None, "Trajectory store; default <workdir>/experts. Share it across runs.", flag_values=REGISTRY)
flags.DEFINE_string("model", "convnet3", "Student/expert network (models.ARCHS).", flag_values=REGISTRY)
flags.DEFINE_integer("width", 128, "ConvNet width (128 in the field's ConvNet-3).", flag_values=REGISTRY)
flags.DEFINE_integer("depth", 3, "ConvNet depth (3 in the field's ConvNet-3).", flag_values=REGISTRY)
flags.DEFINE_list("phases", list(PHASES), "Phases to run, in this order: " + ",".join(PHASES), flag_values=REGISTRY)
flags.DEFINE_integer("val_per_class", 0, "Hold out this many training images per class as a "
                     "validation split (class-balanced, fixed seed): experts and condensation never "
                     "see them, and evaluation scores them beside the test split. Choose "
                     "hyper-parameters on it, never on the test split. 0: no validation split.", flag_values=REGISTRY)
flags.DEFINE_enum("real_data", "auto", ["auto", "memory", "stream"], "How real images are held: "
                  "'memory' reads the splits whole; 'stream' writes them once to a class-sorted uint8 cache "
                  "on disk (--real_cache_dir) and reads every batch from it, memory-mapped, so datasets "
                  "larger than memory work and draw the same images; 'auto' streams splits larger than "
                  "1/8 of this machine's memory. TFDS datasets only (folder: datasets are read whole).", flag_values=REGISTRY)
flags.DEFINE_string("real_cache_dir", None, "Local directory of the streamed-data cache (--real_data); "
                    "default <data_dir>/esp_tf_cache. Runs of one dataset share it.", flag_values=REGISTRY)
flags.DEFINE_bool("zca", False, "ZCA-whiten the network inputs (fit on the training images, eps 0.1, "
                  "as MTT does for CIFAR at IPC 1 and 10) instead of per-channel mean/std; experts, "
                  "condensation and evaluation all see whitened images. Needs --noclip_pixels.", flag_values=REGISTRY)

# -- experts (MTT's buffer recipe) -------------------------------------------------------
flags.DEFINE_integer("num_experts", 100, "Expert trajectories to train (MTT 100, ESP paper 1000).", flag_values=REGISTRY)
flags.DEFINE_integer("expert_epochs", 50, "Epochs per expert; snapshots = epochs + 1.", flag_values=REGISTRY)
flags.DEFINE_float("expert_lr", 0.01, "Expert SGD learning rate (constant, no momentum).", flag_values=REGISTRY)
flags.DEFINE_integer("expert_batch", 256, "Expert batch size.", flag_values=REGISTRY)
flags.DEFINE_bool("accept_weak_experts", False, "Store experts whose test accuracy stays within 1.5x "
                  "of chance (they learned nothing, e.g. a diverged --expert_lr); refused by default.", flag_values=REGISTRY)
flags.DEFINE_bool("expert_dsa", True, "DSA augmentation while training experts (MTT: on).", flag_values=REGISTRY)

# -- ESP condensation --------------------------------------------------------------------
flags.DEFINE_string("method", "esp",
                  "Condensation method (esp_tf.methods, or one registered there): esp, or the baselines dm (distribution "
                  "matching) and tm (MTT). Flags marked 'method setting' default to the method's own "
                  "(its Config in esp_tf/methods/<method>.py); flags.txt records the values used.", flag_values=REGISTRY)
flags.DEFINE_string("param", "pixels",
                    "Synthetic-set parameterisation (synthetic.PARAMETERISATIONS, or one registered there): "
                    "pixels, or latents: codes + shared decoders (paper 4.2, after KFS). Flags marked 'param "
                    "setting' default to the parameterisation's own (its Config in esp_tf/synthetic.py).", flag_values=REGISTRY)
flags.DEFINE_integer("ipc", 1, "Images per class of the condensed set (the storage budget).", flag_values=REGISTRY)
flags.DEFINE_enum("init", "real", choices.INITS, "Synthetic init: real images or Gaussian noise (paper).", flag_values=REGISTRY)
flags.DEFINE_integer("iterations", 1000, "Outer iterations; each picks a new expert segment.", flag_values=REGISTRY)
flags.DEFINE_integer("inner_steps", None, "Method setting. esp: N projected student steps (= synthetic "
                     "updates) per iteration; tm: unrolled student steps per update.", flag_values=REGISTRY)
flags.DEFINE_integer("segment_length", 2, "T: expert epochs spanned by one subspace (T+1 snapshots).", flag_values=REGISTRY)
flags.DEFINE_integer("max_start_epoch", 20, "Segments start at an epoch drawn from 0..this-1 (exclusive, "
                     "as MTT's max_start_epoch); experts need this - 1 + --segment_length epochs.", flag_values=REGISTRY)
flags.DEFINE_float("beta", None, "Method setting (esp). Weight of the projection loss (paper 4.2).", flag_values=REGISTRY)
flags.DEFINE_float("inner_lr", None, "Method setting (esp). Projected-SGD student learning rate (paper 4.2).", flag_values=REGISTRY)
flags.DEFINE_list("losses", None, "Method setting (esp). Outer loss terms: proj, dm or both (paper "
                  "Table 4); default both.", flag_values=REGISTRY)
flags.DEFINE_enum("dm_reduction", None, choices.DM_REDUCTIONS,
                  "Method setting (esp). How ESP's L_DM reduces the squared distances of class-mean embeddings: sum over "
                  "classes and features (DM's code), class_mean (eq. 8 as written), element_mean "
                  "(MSE; chosen on a validation split, see BENCHMARKS.md). Sets what --beta means; "
                  "metrics.jsonl logs the resulting pull ratio ('pull').", flag_values=REGISTRY)
flags.DEFINE_integer("real_per_class", None, "Method setting (esp, dm). Real images per class in each "
                     "DM term, drawn afresh every update; 0: every real training image of the class (the "
                     "class mean needs no gradient: forward passes only, in chunks; on CIFAR-10 that is "
                     "4,500-5,000 forwards per class per update).", flag_values=REGISTRY)
flags.DEFINE_integer("syn_batch", None, "Method setting (esp, tm). Synthetic images per update (0 or "
                     "unset = all): esp takes a random "
                     "class-balanced slice (the paper's Figure 8 study); tm per unrolled step (MTT's batch_syn).", flag_values=REGISTRY)
flags.DEFINE_integer("syn_chunk", None, "Method setting (esp, dm). The exact gradient over the whole "
                     "synthetic set is computed in pieces of at most this many renders, so memory grows "
                     "with the piece, not the set (esp_tf/chunks.py); unset: 256 at 32x32, scaled by the "
                     "image area; 0: the whole set at once. Sets no larger than one piece cost nothing "
                     "extra; larger ones about one more forward pass.", flag_values=REGISTRY)
flags.DEFINE_float("student_lr_init", None, "Method setting (tm). Initial value of the learnable student lr (MTT's lr_teacher).", flag_values=REGISTRY)
flags.DEFINE_float("student_lr_lr", None, "Method setting (tm). SGD lr of the learnable student lr (MTT's lr_lr).", flag_values=REGISTRY)
# Parameterisation settings: default None = the parameterisation's own (its Config in
# esp_tf/synthetic.py, where every default is set once); flags.txt records the values used.
flags.DEFINE_float("pixels_lr", None, "Param setting (pixels). Learning rate of synthetic pixels; default: the method's own "
                   "(Method.default_lr_pixels, with its optimizer: Adam for esp, SGD with momentum 0.5 for dm and tm).", flag_values=REGISTRY)
flags.DEFINE_float("codes_lr", None, "Param setting (latents). Adam lr of latent codes (paper 4.2: 0.1).", flag_values=REGISTRY)
flags.DEFINE_float("decoders_lr", None, "Param setting (latents). Adam lr of the shared decoders (paper 4.2: 0.01).", flag_values=REGISTRY)
flags.DEFINE_integer("num_decoders", None, "Param setting (latents). Shared decoders; images per class = codes x decoders.", flag_values=REGISTRY)
flags.DEFINE_integer("latent_downsample", None, "Param setting (latents). Latent codes are image size / this.", flag_values=REGISTRY)
flags.DEFINE_integer("latent_channels", None, "Param setting (latents). Channels of a latent code; unset: the image's "
                     "(the first image-channels carry the real-image init).", flag_values=REGISTRY)
flags.DEFINE_enum("decoder", None, choices.DECODERS, "Param setting (latents). Decoder architecture "
                  "(esp_tf/synthetic.py): residual (conv3x3 on the code, bilinear upsampling, "
                  "conv3x3) or transposed (a learned upsampling by a transposed convolution, as KFS), "
                  "each beside an identity-initialised linear skip.", flag_values=REGISTRY)
flags.DEFINE_integer("decoder_hidden", None, "Param setting (latents). Channels inside each decoder; the "
                     "decoders' floats count against the budget.", flag_values=REGISTRY)
flags.DEFINE_float("decoder_init", None, "Param setting (latents). Scale of each decoder's residual branch at init, in "
                   "normalised pixel units: how differently the decoders start.", flag_values=REGISTRY)
flags.DEFINE_enum("lr_schedule", "linear", choices.LR_SCHEDULES, "Synthetic lr schedule (paper: linear decay).", flag_values=REGISTRY)
flags.DEFINE_bool("dsa", True, "Differentiable Siamese augmentation during condensation.", flag_values=REGISTRY)
flags.DEFINE_bool("clip_pixels", True, "Clip synthetic renders to the real pixel range 0..255 (valid "
                  "images for uint8 export and BatchNorm networks); --noclip_pixels: unbounded.", flag_values=REGISTRY)
flags.DEFINE_enum("range_map", "clip", choices.RANGE_MAPS, "How --clip_pixels keeps renders inside the "
                  "pixel range: clip (a value at a bound gets no gradient), or tanh (a smooth map into "
                  "the range; every value keeps its gradient).", flag_values=REGISTRY)
flags.DEFINE_bool("jit_compile", False, "XLA-compile the ESP step (recommended on GPU).", flag_values=REGISTRY)
# -- scaling out (README "Scaling out"; scheduling only: a rerun may change them) ---------------
flags.DEFINE_integer("worker_index", None, "This worker's index among --num_workers expert-generation "
                     "workers (trains experts k with k %% num_workers == worker_index into the shared "
                     "--experts_dir); default: from TF_CONFIG, else the only worker.", flag_values=REGISTRY)
flags.DEFINE_integer("num_workers", None, "Expert-generation workers filling one --experts_dir "
                     "(with --worker_index); default: the chief + worker tasks of TF_CONFIG, else 1.", flag_values=REGISTRY)
flags.DEFINE_enum("strategy", "none", cluster.STRATEGIES, "tf.distribute strategy "
                  "of the condensation: none (one device), mirrored (every local GPU, data-parallel), "
                  "multi_worker (MultiWorkerMirroredStrategy across the TF_CONFIG cluster).", flag_values=REGISTRY)
flags.DEFINE_integer("ckpt_every", 50, "Checkpoint the synthetic set every this many iterations.", flag_values=REGISTRY)
flags.DEFINE_integer("log_every", 10, "Log metrics every this many iterations.", flag_values=REGISTRY)

# -- evaluation (standard protocol; --eval_epochs/_runs/_batch/_lr/_dsa are in shared_flags) ---
flags.DEFINE_string("eval_arch", None, "Architecture trained on the condensed set (models.ARCHS); "
                    "default: the condensation network (--model/--depth), as the field evaluates "
                    "ConvNet-3 sets on ConvNet-3 and Tiny ImageNet's ConvNet-4 sets on ConvNet-4.", flag_values=REGISTRY)
flags.DEFINE_list("baselines", ["random"], "Real-subset baselines evaluated beside the condensed set: "
                  "random, herding (on expert 0's final embeddings).", flag_values=REGISTRY)

flags.DEFINE_bool("restart", False, "Start over in --workdir: its results are moved aside into "
                  "<workdir>/previous-<time>/ (nothing is deleted; experts are kept).", flag_values=REGISTRY)

# -- export ------------------------------------------------------------------------------
flags.DEFINE_string("export_name", None, "TFDS name of the exported set (default esp_<dataset>_ipc<k>).", flag_values=REGISTRY)


# =====================================================================================
# Settings: the flags above as one frozen value, for the library and the command line alike
# =====================================================================================
NAMES = tuple(REGISTRY)                       # the shared ones, then ours, in definition order
# The names before esp_tf 0.2, as absl aliases (an old command or flagfile still runs; the run
# records the new names). Defined after NAMES: an alias is no setting of its own.
from esp_tf.workdir import RENAMED_TRAIN_FLAGS      # noqa: E402  (light: no TensorFlow)
for _old, _new in RENAMED_TRAIN_FLAGS.items():
    flags.DEFINE_alias(_old, _new, flag_values=REGISTRY)


def install(flag_values=flags.FLAGS) -> None:
    """Defines the command line's flags in absl's global registry (the same Flag objects, so
    parsing it fills `REGISTRY`): the command lines and tools that parse train's flags call it
    before parsing. Twice is once."""
    shared_flags.install(__name__, flag_values, REGISTRY)
# Run options that are not settings of the result (not recorded in flags.txt).
_NOT_RECORDED = ("restart", "verbose")
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


def from_flags() -> Settings:
    """The parsed command line as Settings (method settings resolved)."""
    return resolve(Settings(**_expand({name: FLAGS[name].value for name in NAMES})))


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
    settings given in `s` (those not None)."""
    from esp_tf import synthetic
    kind = synthetic.parameterisation(name or s.param)
    return kind.Config(**{field: getattr(s, field) for field in synthetic.setting_names(kind)
                          if getattr(s, field) is not None})


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
            config = param_config(s, name) if name == s.param else synthetic.PARAMETERISATIONS[name].Config()
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
