r"""Writes a finished run's condensed set as a published `.npz` (uint8 renders, labels, source
dataset) that anyone can re-score, with a JSON sidecar of how it was made and what it scored.

    python tools/publish_set.py --workdir=runs/design/best --data_dir=../shared/data/tfds \
        --out=docs/sets/cifar10_ipc1_dm.npz --command="python -m esp_tf.train --flagfile=..."

The `.npz` holds `pixels` (uint8 [N, H, W, C]: the renders as viewable images, what the run's
`image` export holds), `labels`, `source_dataset`, `zca` and `val_per_class`; it reads with numpy
alone, and `python -m esp_tf.evaluate --condensed=<file>.npz --data_dir=...` scores it. The
sidecar `<file>.json` records the command, the run's resolved flags, its eval.json and budget.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from esp_tf import cli
cli.install()      # --workdir (the finished run to read) and --data_dir (its source
FLAGS = flags.FLAGS
#                                  dataset's TFDS data_dir; default: the recorded one) are the run's own flags

flags.DEFINE_string("out", None, "Path of the .npz to write (its .json sidecar goes beside it).")
flags.DEFINE_string("command", "", "The command that made the run, recorded in the sidecar.")


def publish(workdir: str, out: str, command: str = "", data_dir: str | None = None) -> dict:
    """Writes `out` and its sidecar from `workdir`; returns the sidecar's content."""
    import numpy as np
    from esp_tf import condensed, data as data_lib, pipeline, workdir as wd
    run = pipeline.load_run(workdir, data_dir)
    if run.images is None:
        raise wd.UserError(f"{workdir} has no synthetic.npz: condense first")
    pixels = data_lib.to_pixels(run.real, run.images).numpy()
    condensed.write_published(out, pixels, run.labels, run.settings.dataset, zca=run.settings.zca,
                              val_per_class=run.settings.val_per_class)
    sidecar = {"command": command, "images": int(len(run.labels)),
               "images_per_class": int(np.bincount(run.labels).max()),
               # the resolved flags, without this machine's paths
               "flags": {k: v for k, v in wd.parse_flags_file(os.path.join(workdir, "flags.txt")).items()
                         if k not in ("data_dir", "workdir", "experts_dir")},
               "budget": wd.read_json(os.path.join(workdir, "budget.json")),
               "eval": wd.read_json(os.path.join(workdir, "eval.json"))}
    wd.write_json(os.path.splitext(out)[0] + ".json", sidecar)
    return sidecar


def main(argv):
    if not FLAGS.workdir or not FLAGS.out or not FLAGS.out.endswith(".npz"):
        sys.exit("usage: publish_set.py --workdir=<run> --out=<file>.npz [--command=...] [--data_dir=...]")
    from esp_tf import workdir as wd
    try:
        meta = publish(FLAGS.workdir, FLAGS.out, FLAGS.command, FLAGS.data_dir)
    except wd.UserError as e:
        sys.exit(f"error: {e}")
    size = os.path.getsize(FLAGS.out)
    print(f"{FLAGS.out}: {meta['images']} images ({meta['images_per_class']} per class), {size / 1e6:.2f} MB; "
          f"sidecar {os.path.splitext(FLAGS.out)[0]}.json")
    print(json.dumps(meta["eval"], indent=1)[:2000])


if __name__ == "__main__":
    app.run(main)
