"""Flags of `python -m esp_tf.train` and their conversion into the library's config objects.

Only the command-line layer (train.py, tools/) imports this module; library functions take
explicit arguments. Every default carries its reason.
"""
from __future__ import annotations

import math
import os

from absl import flags

from esp_tf import shared_flags    # --data_dir, --seed, --verbose and the --eval_* settings

flags.adopt_module_key_flags(shared_flags)   # listed by --help and recorded in flags.txt as ours
FLAGS = flags.FLAGS
PHASES = ("experts", "condense", "evaluate", "export")

# -- data & model ------------------------------------------------------------------------
flags.DEFINE_string("dataset", "fashion_mnist_mini", "TFDS dataset name (embedded default needs no download).")
flags.DEFINE_bool("download", True, "Download and prepare a missing dataset through TFDS, as tfds.load "
                  "does (needs network); --nodownload: only read prepared data (tests, benchmarks).")
flags.DEFINE_string("workdir", None, "Output directory of this run (flags, checkpoints, metrics, exports).")
flags.DEFINE_string("experts_dir", None, "Trajectory store; default <workdir>/experts. Share it across runs.")
flags.DEFINE_string("model", "convnet3", "Student/expert network (models.ARCHS).")
flags.DEFINE_integer("width", 128, "ConvNet width (128 in the field's ConvNet-3).")
flags.DEFINE_integer("depth", 3, "ConvNet depth (3 in the field's ConvNet-3).")
flags.DEFINE_list("phases", list(PHASES), "Phases to run, in this order: " + ",".join(PHASES))
flags.DEFINE_integer("val_per_class", 0, "Hold out this many training images per class as a "
                     "validation split (class-balanced, fixed seed): experts and condensation never "
                     "see them, and evaluation scores them beside the test split. Choose "
                     "hyper-parameters on it, never on the test split. 0: no validation split.")

# -- experts (MTT's buffer recipe) -------------------------------------------------------
flags.DEFINE_integer("num_experts", 100, "Expert trajectories to train (MTT 100, ESP paper 1000).")
flags.DEFINE_integer("expert_epochs", 50, "Epochs per expert; snapshots = epochs + 1.")
flags.DEFINE_float("expert_lr", 0.01, "Expert SGD learning rate (constant, no momentum).")
flags.DEFINE_integer("expert_batch", 256, "Expert batch size.")
flags.DEFINE_bool("expert_dsa", True, "DSA augmentation while training experts (MTT: on).")

# -- ESP condensation --------------------------------------------------------------------
flags.DEFINE_enum("method", "esp", ["esp", "dm", "tm"],
                  "Condensation method: esp, or the baselines dm (distribution matching) and tm (MTT).")
flags.DEFINE_enum("param", "pixels", ["pixels", "latents"],
                  "Synthetic-set parameterisation: pixels, or latent codes + shared decoders (paper 4.2, after KFS).")
flags.DEFINE_integer("ipc", 1, "Images per class of the condensed set (the storage budget).")
flags.DEFINE_enum("init", "real", ["real", "gaussian"], "Synthetic init: real images or Gaussian noise (paper).")
flags.DEFINE_integer("iterations", 1000, "Outer iterations; each picks a new expert segment.")
flags.DEFINE_integer("inner_steps", 10, "N: projected student steps (= synthetic updates) per iteration.")
flags.DEFINE_integer("segment_length", 2, "T: expert epochs spanned by one subspace (T+1 snapshots).")
flags.DEFINE_integer("max_start_epoch", 20, "Segments start at an epoch drawn from 0..this-1 (exclusive, "
                     "as MTT's max_start_epoch); experts need this - 1 + --segment_length epochs.")
flags.DEFINE_float("beta", 1e-5, "Weight of the projection loss (paper 4.2).")
flags.DEFINE_float("inner_lr", 0.1, "Projected-SGD student learning rate (paper 4.2).")
flags.DEFINE_list("losses", ["proj", "dm"], "Outer losses: proj, dm or both (paper Table 4).")
flags.DEFINE_enum("dm_reduction", "element_mean", ["sum", "class_mean", "element_mean"],
                  "How ESP's L_DM reduces the squared distances of class-mean embeddings: sum over "
                  "classes and features (DM's code), class_mean (eq. 8 as written), element_mean "
                  "(MSE; chosen on a validation split, see BENCHMARKS.md). Sets what --beta means; "
                  "metrics.jsonl logs the resulting pull ratio ('pull').")
flags.DEFINE_integer("real_per_class", 256, "Real images per class in each DM term (DM default 256).")
flags.DEFINE_float("pixels_lr", None, "Learning rate of synthetic pixels; default per method: esp 0.01 "
                   "(Adam), dm 1.0 (SGD, momentum 0.5, as DM), tm 100 (SGD, momentum 0.5, as MTT).")
flags.DEFINE_integer("syn_batch", 0, "Synthetic images per update (0 = all): esp takes a random "
                     "class-balanced slice (the paper's Figure 8 study); tm per unrolled step (MTT's batch_syn).")
flags.DEFINE_float("student_lr_init", 0.01, "tm: initial value of the learnable student lr (MTT's lr_teacher).")
flags.DEFINE_float("student_lr_lr", 1e-5, "tm: SGD lr of the learnable student lr (MTT's lr_lr).")
flags.DEFINE_float("codes_lr", 0.1, "Adam lr of latent codes (paper 4.2; --param=latents).")
flags.DEFINE_float("decoders_lr", 0.01, "Adam lr of the shared decoders (paper 4.2; --param=latents).")
flags.DEFINE_integer("num_decoders", 4, "Shared decoders; images per class = codes x decoders (--param=latents).")
flags.DEFINE_integer("latent_downsample", 2, "Latent codes are image size / this (--param=latents).")
flags.DEFINE_enum("lr_schedule", "linear", ["linear", "constant"], "Synthetic lr schedule (paper: linear decay).")
flags.DEFINE_bool("dsa", True, "Differentiable Siamese augmentation during condensation.")
flags.DEFINE_bool("clip_pixels", True, "Clip synthetic renders to the real pixel range 0..255 (valid "
                  "images for uint8 export and BatchNorm networks); --noclip_pixels: unbounded.")
flags.DEFINE_enum("range_map", "clip", ["clip", "tanh"], "How --clip_pixels keeps renders inside the "
                  "pixel range: clip (a value at a bound gets no gradient), or tanh (a smooth map into "
                  "the range; every value keeps its gradient).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the ESP step (recommended on GPU).")
flags.DEFINE_integer("ckpt_every", 50, "Checkpoint the synthetic set every this many iterations.")
flags.DEFINE_integer("log_every", 10, "Log metrics every this many iterations.")

# -- evaluation (standard protocol; --eval_epochs/_runs/_batch/_lr/_dsa are in shared_flags) ---
flags.DEFINE_string("eval_arch", None, "Architecture trained on the condensed set (models.ARCHS); "
                    "default: the condensation network (--model/--depth), as the field evaluates "
                    "ConvNet-3 sets on ConvNet-3 and Tiny ImageNet's ConvNet-4 sets on ConvNet-4.")
flags.DEFINE_list("baselines", ["random"], "Real-subset baselines evaluated beside the condensed set: "
                  "random, herding (on expert 0's final embeddings).")

flags.DEFINE_bool("restart", False, "Start over in --workdir: its results are moved aside into "
                  "<workdir>/previous-<time>/ (nothing is deleted; experts are kept).")

# -- export ------------------------------------------------------------------------------
flags.DEFINE_string("export_name", None, "TFDS name of the exported set (default esp_<dataset>_ipc<k>).")


def validate():
    """Cross-flag checks with messages a user can act on."""
    errors = shared_flags.validate()
    if not FLAGS.workdir:
        errors.append("--workdir is required")
    bad = [p for p in FLAGS.phases if p not in PHASES]
    if bad:
        errors.append(f"--phases: unknown {bad}; choose from {','.join(PHASES)}")
    bad = [l for l in FLAGS.losses if l not in ("proj", "dm")]
    if bad or not FLAGS.losses:
        errors.append(f"--losses: {FLAGS.losses} must be a non-empty subset of proj,dm")
    for name in ("ipc", "iterations", "inner_steps", "segment_length", "num_experts", "expert_epochs",
                 "real_per_class", "ckpt_every", "log_every", "num_decoders",
                 "latent_downsample"):
        if getattr(FLAGS, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    if FLAGS.val_per_class < 0:
        errors.append(f"--val_per_class must be >= 0, got {FLAGS.val_per_class}")
    if FLAGS.max_start_epoch < 1:
        errors.append("--max_start_epoch must be >= 1 (segments start at epochs 0..max_start_epoch-1)")
    elif FLAGS.max_start_epoch - 1 + FLAGS.segment_length > FLAGS.expert_epochs:
        errors.append(f"--max_start_epoch - 1 ({FLAGS.max_start_epoch - 1}) + --segment_length "
                      f"({FLAGS.segment_length}) exceeds --expert_epochs ({FLAGS.expert_epochs})")
    bad = [b for b in FLAGS.baselines if b not in ("random", "herding")]
    if bad:
        errors.append(f"--baselines: unknown {bad}; available: random, herding")
    if FLAGS.syn_batch < 0:
        errors.append("--syn_batch must be >= 0 (0 = all synthetic images)")
    for f in FLAGS.get_flags_for_module(__name__):      # NaN/inf would poison every update
        if isinstance(f.value, float) and not math.isfinite(f.value):
            errors.append(f"--{f.name} must be a finite number, got {f.value}")
    from esp_tf import models                            # the registry models.build reads
    for name, value in (("model", FLAGS.model), ("eval_arch", eval_arch())):
        if value not in models.ARCHS:
            errors.append(f"--{name}: unknown {value!r}; known: {', '.join(sorted(models.ARCHS))}")
    return errors


def experts_dir() -> str:
    return FLAGS.experts_dir or os.path.join(FLAGS.workdir, "experts")


def model_config() -> dict:
    return {"width": FLAGS.width, "depth": FLAGS.depth, "norm": "instancenorm", "act": "relu",
            "pool": "avgpool"}


def _dsa(enabled: bool):
    from esp_tf import augment
    return augment.DSAConfig() if enabled else None


def expert_config():
    from esp_tf.experts import ExpertConfig
    return ExpertConfig(epochs=FLAGS.expert_epochs, lr=FLAGS.expert_lr, batch_size=FLAGS.expert_batch,
                        dsa=_dsa(FLAGS.expert_dsa))


def eval_arch() -> str:
    """--eval_arch, else the condensation network: convnet<depth> for the ConvNet family (ConvNet-3
    where no standard ConvNet of that depth is registered, e.g. the tests' tiny depth-2 nets)."""
    if FLAGS.eval_arch:
        return FLAGS.eval_arch
    if FLAGS.model not in ("convnet", "convnet3"):
        return FLAGS.model
    from esp_tf import models
    name = f"convnet{FLAGS.depth}"     # the field's ConvNet-3 / ConvNet-4 (width 128)
    return name if name in models.ARCHS else "convnet3"


def eval_config():
    from esp_tf.evaluate import EvalConfig
    return EvalConfig(arch=eval_arch(), epochs=FLAGS.eval_epochs, batch_size=FLAGS.eval_batch,
                      lr=FLAGS.eval_lr, dsa=_dsa(FLAGS.eval_dsa))


_DEFAULT_LR_PIXELS = {"esp": 0.01, "dm": 1.0, "tm": 100.0}


def lr_pixels() -> float:
    return FLAGS.pixels_lr if FLAGS.pixels_lr is not None else _DEFAULT_LR_PIXELS[FLAGS.method]


def condense_settings():
    from esp_tf.baselines import DMConfig, TMConfig
    from esp_tf.condense import CondenseSettings
    from esp_tf.esp import ESPConfig
    esp = ESPConfig(beta=FLAGS.beta, inner_lr=FLAGS.inner_lr, losses=tuple(FLAGS.losses),
                    real_per_class=FLAGS.real_per_class, dsa=_dsa(FLAGS.dsa),
                    batch_syn=FLAGS.syn_batch or None, dm_reduction=FLAGS.dm_reduction)
    dm = DMConfig(real_per_class=FLAGS.real_per_class, dsa=_dsa(FLAGS.dsa))
    tm = TMConfig(inner_steps=FLAGS.inner_steps, batch_syn=FLAGS.syn_batch or None,
                  init_lr=FLAGS.student_lr_init, dsa=_dsa(FLAGS.dsa))
    return CondenseSettings(workdir=FLAGS.workdir, method=FLAGS.method, dm=dm, tm=tm, lr_lr=FLAGS.student_lr_lr,
                            ipc=FLAGS.ipc, init=FLAGS.init,
                            iterations=FLAGS.iterations, inner_steps=FLAGS.inner_steps,
                            segment_length=FLAGS.segment_length, max_start_epoch=FLAGS.max_start_epoch,
                            esp=esp, param=FLAGS.param, lr_pixels=lr_pixels(),
                            lr_codes=FLAGS.codes_lr, lr_decoders=FLAGS.decoders_lr,
                            num_decoders=FLAGS.num_decoders, latent_downsample=FLAGS.latent_downsample,
                            lr_schedule=FLAGS.lr_schedule, clip_pixels=FLAGS.clip_pixels,
                            range_map=FLAGS.range_map,
                            seed=FLAGS.seed, ckpt_every=FLAGS.ckpt_every, log_every=FLAGS.log_every,
                            jit_compile=FLAGS.jit_compile)


def flag_values() -> dict:
    """This tool's flags (ours and the shared ones) as name -> the string flags.txt records for them."""
    out = {}
    for f in FLAGS.get_key_flags_for_module(__name__):
        text = f.serialize()
        if text.startswith("--no") and "=" not in text and f.boolean:
            out[f.name] = "False"
        elif "=" in text:
            out[f.name] = text.split("=", 1)[1]
        else:
            out[f.name] = "True" if text else ""
    return out


def flags_file_text() -> str:
    """A flagfile that replays this run (--restart and --verbose are never recorded)."""
    lines = [f.serialize() for f in FLAGS.get_key_flags_for_module(__name__) if f.name not in ("restart", "verbose")]
    return ("# Resolved flags of this run. Replay: python -m esp_tf.train --flagfile=<this file>\n"
            + "".join(line + "\n" for line in lines if line))

