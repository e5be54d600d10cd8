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

flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the one recorded in each flags.txt).")
FLAGS = flags.FLAGS


def main(argv):
    import numpy as np
    from esp_tf import condense, data as data_lib, workdir as wd
    if len(argv) < 2:
        sys.exit("give one or more workdirs")
    print("| workdir | method | mean abs change | RMS change | RMS of init |\n|---|---|---|---|---|")
    for work in argv[1:]:
        try:
            f = wd.parse_flags_file(os.path.join(work, "flags.txt"))
            images = np.load(os.path.join(work, "synthetic.npz"))["images"]
        except OSError as e:
            sys.exit(f"{work}: not a finished workdir ({e})")
        if f.get("param", "pixels") != "pixels" or f.get("init", "real") != "real":
            sys.exit(f"{work}: drift needs --param=pixels --init=real (has {f.get('param')}, {f.get('init')})")
        real = data_lib.load(f["dataset"], FLAGS.data_dir or f.get("data_dir") or None)
        settings = condense.CondenseSettings(workdir=work, init="real", seed=int(f.get("seed", 0)))
        init = condense.real_init(real, settings, int(f["ipc"])).reshape(images.shape)  # as the run did
        d = images - init
        print(f"| {work} | {f.get('method', 'esp')} | {np.abs(d).mean():.3f} | "
              f"{np.sqrt((d ** 2).mean()):.3f} | {np.sqrt((init ** 2).mean()):.3f} |")


if __name__ == "__main__":
    app.run(main)
