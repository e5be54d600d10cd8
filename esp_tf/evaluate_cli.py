r"""Command line of esp_tf.evaluate: train fresh networks on a condensed set, test them on the
real test split, print a table laid out like the paper's Table 2.

    python -m esp_tf.evaluate --condensed=runs/cifar10_ipc10 --eval_archs=convnet3,resnet10,densenet121 \
        --protocol=standard --eval_runs=5 --output=results.json

--condensed reads any condensed set (esp_tf/condensed.py): a workdir of esp_tf.train, a prepared
TFDS directory, a TFDS name, or a published `.npz` of uint8 renders (docs/sets/). --full trains on the whole real train split instead. The
evaluation settings (--eval_epochs, --eval_runs, --eval_batch, --eval_lr, --eval_dsa) are
esp_tf.train's; the library (protocols, trainer) is esp_tf/evaluate.py.
"""
from __future__ import annotations

import os

from absl import flags

from esp_tf import shared_flags, workdir as wd
from esp_tf.workdir import ARCH_ORDER as _ARCH_ORDER   # the paper's Table 2 column order

shared_flags.install(__name__)   # --data_dir, --seed, --verbose, --eval_*: as train's (a CLI module)
FLAGS = flags.FLAGS
PROTOCOL_NAMES = ("standard", "idc")   # evaluate.PROTOCOLS, named here so --help needs no TensorFlow

flags.DEFINE_string("condensed", None, "Condensed set: an esp_tf workdir, a prepared TFDS directory, "
                    "a TFDS name in --data_dir, or a published .npz of uint8 renders (docs/sets/).")
flags.DEFINE_bool("full", False, "Train on the whole train split of --source_dataset instead "
                  "(the 'Full dataset' row).")
flags.DEFINE_string("source_dataset", None, "Real dataset whose test split scores the set "
                    "(default: the one recorded with the set).")
flags.DEFINE_list("eval_archs", ["convnet3"], "Architectures (models.ARCHS) to train on the set, e.g. "
                  + ",".join(_ARCH_ORDER))
flags.DEFINE_enum("protocol", "standard", list(PROTOCOL_NAMES), "standard (MTT/DM) or idc (IDC's, CutMix; "
                  "batch 64 unless --eval_batch is given).")
flags.DEFINE_integer("steps_per_epoch", None, "--full only: an epoch is this many batches of a "
                     "fresh random order (a compute-capped full-data row; default whole passes).")
flags.DEFINE_string("label", None, "Row label in the table and --output (default: the set's method + "
                    "ipc, or 'full').")
flags.DEFINE_string("output", None, "JSON file the results are merged into (default: print only).")

# Names before esp_tf 0.2, no longer accepted (--method was the row label: train's --method is
# the condensation method; --dsa was evaluation DSA: train's is condensation DSA). An old name
# is an error naming the new one (README 'Renamed flags').
RENAMED_FLAGS = {"epochs": "eval_epochs", "runs": "eval_runs", "batch_size": "eval_batch", "lr": "eval_lr",
                 "dsa": "eval_dsa", "archs": "eval_archs", "method": "label"}


def main(argv):
    from absl import app, logging
    from esp_tf import condensed as condensed_lib, data as data_lib, models
    from esp_tf.evaluate import evaluate, evaluate_full, protocol_config
    F = FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not F["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    for name in ("condensed", "data_dir", "output"):      # bash leaves `~` alone after `=`
        if getattr(F, name):
            setattr(F, name, os.path.expanduser(getattr(F, name)))
    errors = shared_flags.validate()
    if errors:
        raise wd.UserError("; ".join(errors))
    if bool(F.condensed) == F.full:
        raise wd.UserError("give exactly one of --condensed=<set> and --full (with --source_dataset)")
    unknown = [a for a in F.eval_archs if a not in models.ARCHS]
    if unknown or not F.eval_archs:
        raise wd.UserError(f"--eval_archs: unknown {unknown}; known: {', '.join(sorted(models.ARCHS))}")
    if F.steps_per_epoch is not None and not F.full:
        raise wd.UserError("--steps_per_epoch applies to --full only")
    if F.steps_per_epoch is not None and F.steps_per_epoch < 1:
        raise wd.UserError(f"--steps_per_epoch must be >= 1, got {F.steps_per_epoch}")
    if F.full:
        if not F.source_dataset:
            raise wd.UserError("--full needs --source_dataset=<TFDS name>")
        real = data_lib.load(F.source_dataset, F.data_dir)
        label, images, labels = F.label or "full", None, None
        wd.say(f"full training split of {real.name}: {len(real.train_labels)} images")
    else:
        cset = condensed_lib.resolve(F.condensed, F.data_dir, F.source_dataset)
        source_dir, base = cset.data_dir, cset.source_dataset.partition(":")[0]
        if (base.split("/")[0] in data_lib.EMBEDDED_DATASETS and source_dir
                and not os.path.isdir(os.path.join(source_dir, *base.split("/")))):
            source_dir = None    # an embedded source is prepared in TFDS's default data_dir, never
            #                      in a folder the user gave for the condensed set
        real = cset.load_source(source_dir)
        images, labels, label = (cset.normalized(real.mean, real.std, real.whitening), cset.labels,
                                 F.label or cset.label)
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
    # --eval_batch / --eval_lr / --eval_epochs default to the protocol's unless given
    overrides = {k: getattr(F, f) for k, f in (("batch_size", "eval_batch"), ("lr", "eval_lr")) if F[f].present}
    epochs = F.eval_epochs if F["eval_epochs"].present or not F.full else 50
    results = wd.read_results(F.output) if F.output else {}   # fails early if damaged
    import hashlib     # the set's fingerprint: a partial run is reused only for the same images
    set_id = ("full" if F.full else hashlib.sha1(images.astype("float32").tobytes()
                                                 + labels.astype("int64").tobytes()).hexdigest())
    test_x = data_lib.test_dataset(real, 1000)
    for k, arch in enumerate(F.eval_archs):
        config = protocol_config(F.protocol, arch, epochs, F.eval_dsa, **overrides)
        on_epoch = wd.EpochProgress(f"{label} {arch} ({k + 1}/{len(F.eval_archs)})", F.eval_runs, epochs)
        finished, on_done = {}, None     # with --output, a rerun resumes at the first unfinished seed
        if F.output:
            finished, on_done = wd.partial_runs(F.output + ".partial.json", label, arch, dict(
                set=set_id, source_dataset=real.name, protocol=F.protocol, epochs=epochs,
                batch=config.batch_size, lr=config.lr, dsa=F.eval_dsa, seed=F.seed,
                steps_per_epoch=F.steps_per_epoch))
            if finished:
                wd.say(f"{label} {arch}: resuming with {len(finished)} finished run(s) from "
                       f"{F.output}.partial.json")
        kwargs = dict(runs=F.eval_runs, seed=F.seed, on_epoch=on_epoch, done=finished, on_done=on_done,
                      progress=lambda i, n, acc, s: wd.say(
                          f"  {arch} run {i + 1}/{n}: {acc:.2f}% " + ("(finished earlier)" if i in finished else f"({s:.0f}s)")))
        res = (evaluate_full(real, config, steps_per_epoch=F.steps_per_epoch, **kwargs) if F.full else
               evaluate(images, labels, test_x, None, real.num_classes, config, **kwargs))
        res.update(protocol=F.protocol, epochs=epochs, dsa=F.eval_dsa, source_dataset=real.name)
        if F.full:
            res.update(steps_per_epoch=F.steps_per_epoch, train_images_seen=epochs * (
                F.steps_per_epoch * config.batch_size if F.steps_per_epoch else len(real.train_labels)))
        results.setdefault(label, {})[arch] = res
        if F.output:     # merged into the file as it is now: parallel runs may share --output
            results = wd.merge_json_cell(F.output, label, arch, res)
            wd.drop_json_cell(F.output + ".partial.json", label, arch)      # folded into --output
    print(wd.results_table(results), flush=True)


def _late_user_errors() -> tuple:
    """The user's errors that live in modules importing TensorFlow (see workdir.run_cli)."""
    from esp_tf.data import DatasetNotFoundError
    from esp_tf.evaluate import EvaluationDiverged
    return DatasetNotFoundError, EvaluationDiverged


def run():
    """Entry point: every error is one line (workdir.run_cli): exit 2 for bad input (flags, data,
    condensed set), 130 for Ctrl-C, 1 for the rest."""
    wd.run_cli(main, wd.flags_parser(__doc__, __name__, RENAMED_FLAGS),
               interrupted="interrupted; results already merged into --output are kept",
               late_user_errors=_late_user_errors)


if __name__ == "__main__":
    run()
