r"""Runs several condensation variants on one flagfile (sharing its experts) and tabulates them.

    python tools/compare.py --flagfile_base=configs/quickstart.flags --out=runs/compare \
        --variants=esp,esp_beta0.25,proj_only,dm_only,dm,tm

Variants are names from VARIANTS or ad-hoc `--variant=name:<flags>` (repeatable), e.g.
`--variant="dm300:--method=dm --iterations=300"`. Each variant is the run of
`python -m esp_tf.train --flagfile=<base> --workdir=<out>/<variant> <overrides>`, run in this
process (`cli.parse`, `pipeline.run`) one after another; finished variants are not rerun (the
pipeline resumes). The last output is a Markdown
table: variant, method, validation and test accuracy mean +- std over the evaluation seeds
(validation where the flagfile holds out --val_per_class; choose on it, never on test), and
the baselines of the first variant (random, herding).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

VARIANTS = {
    "esp": [],                                            # the flagfile as is (paper beta 1e-5)
    "esp_beta0.25": ["--beta=0.25"],                      # projection and DM pull about equally
    "esp_lr0.05": ["--pixels_lr=0.05"],                   # larger Adam steps on the pixels
    "esp_lr0.05_beta0.25": ["--pixels_lr=0.05", "--beta=0.25"],
    "proj_only": ["--losses=proj", "--beta=1.0"],         # Table 4 ablation rows
    "dm_only": ["--losses=dm"],
    "dm": ["--method=dm", "--pixels_lr=1.0", "--iterations=400"],   # DM: as many updates as ESP
    "tm": ["--method=tm", "--pixels_lr=100"],             # trajectory matching, MTT's image lr
    "latents": ["--param=latents"],
}

FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags (defined only when run as a program, so tests can import
    this module beside others that own flags of the same name)."""
    flags.DEFINE_string("flagfile_base", "configs/quickstart.flags", "Flagfile every variant starts from.")
    flags.DEFINE_string("out", "runs/compare", "Parent directory of the variants' workdirs.")
    flags.DEFINE_list("variants", [], f"Any of {', '.join(VARIANTS)}.")
    flags.DEFINE_multi_string("variant", [], "Ad-hoc variant 'name:<space-separated train flags>', run "
                              "after --variants, e.g. --variant='dm300:--method=dm --iterations=300'.")
    flags.DEFINE_list("extra", [], "Flags added to every variant, e.g. --extra=--eval_runs=3.")


def main(argv):
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    todo = [(v, VARIANTS[v]) for v in FLAGS.variants]
    for spec in FLAGS.variant:
        name, sep, overrides = spec.partition(":")
        if not sep or not name or "/" in name:
            sys.exit(f"--variant={spec!r}: expected 'name:<flags>'")
        todo.append((name, overrides.split()))
    if not todo:
        sys.exit("nothing to run: give --variants and/or --variant")
    if len({name for name, _ in todo}) != len(todo):
        sys.exit("variant names must be unique (each gets its own workdir)")
    from esp_tf import cli, pipeline, workdir as wd
    rows = []
    for i, (name, overrides) in enumerate(todo):
        work = os.path.join(FLAGS.out, name)
        baselines = [] if i == 0 else ["--baselines="]
        args = [f"--flagfile={FLAGS.flagfile_base}", f"--workdir={work}"] + overrides + baselines + list(FLAGS.extra)
        print("$ python -m esp_tf.train " + " ".join(args), flush=True)
        try:
            pipeline.run(cli.parse(args), work)
        except wd.UserError as e:
            sys.exit(f"variant {name}: {e}")
        with open(os.path.join(work, "eval.json")) as f:
            rows += table_rows(name, json.load(f))
    print("\n" + HEADER)
    for row in rows:
        print(row)


# validation first: choices are made on it (--val_per_class); test is reported for the choice
HEADER = "| variant | method | arch | validation (%) | test (%) | runs |\n|---|---|---|---|---|---|"


def table_rows(variant: str, results: dict) -> list[str]:
    """Markdown rows of one variant's eval.json (baselines keep their own name)."""
    rows = []
    for method, per_arch in results.items():
        for arch, cell in per_arch.items():
            label = variant if method not in ("random", "herding") else method
            val = f"{cell['val_mean']:.2f} +- {cell['val_std']:.2f}" if "val_mean" in cell else "-"
            rows.append(f"| {label} | {method} | {arch} | {val} | {cell['mean']:.2f} +- {cell['std']:.2f} "
                        f"| {len(cell['accuracies'])} |")
    return rows


if __name__ == "__main__":
    define_flags()
    app.run(main)
