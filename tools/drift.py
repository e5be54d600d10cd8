r"""How far condensation moved a pixel synthetic set from its real-image initialisation.

    python tools/drift.py --data_dir=../shared/data/tfds runs/bench/cifar10_ipc1/esp_pixels runs/bench/cifar10_ipc1/dm

For each finished workdir with `--param=pixels --init=real`, rebuilds the initial real images
exactly as the run chose them (its dataset, --seed and --ipc from flags.txt) and prints the mean
and RMS of |synthetic - init| in normalised units next to the RMS of the init itself. A method
whose images barely leave their init is step-size limited rather than converged.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from esp_tf import cli
cli.install()      # the run's own flags; this tool reads --data_dir (optional)
FLAGS = flags.FLAGS


def main(argv):
    import numpy as np
    from esp_tf import condense, pipeline, workdir as wd
    if len(argv) < 2:
        sys.exit("give one or more workdirs")
    print("| workdir | method | mean abs change | RMS change | RMS of init |\n|---|---|---|---|---|")
    for work in argv[1:]:
        try:
            run = pipeline.load_run(work, data_dir=FLAGS.data_dir)
        except wd.UserError as e:
            sys.exit(f"error: {e}")
        s = run.settings
        if run.images is None:
            sys.exit(f"error: {work}: not a finished workdir (no synthetic.npz)")
        if s.param != "pixels" or s.init != "real":
            sys.exit(f"error: {work}: drift needs --param=pixels --init=real (has {s.param}, {s.init})")
        # the initial set exactly as the run built it (same seed, same real images, same range map)
        init = condense.make_synthetic(run.real, run.condense_settings).render()[0].numpy()
        d = run.images - init
        print(f"| {work} | {s.method} | {np.abs(d).mean():.3f} | "
              f"{np.sqrt((d ** 2).mean()):.3f} | {np.sqrt((init ** 2).mean()):.3f} |")


if __name__ == "__main__":
    app.run(main)
