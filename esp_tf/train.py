r"""esp_tf command line: experts -> condense -> evaluate -> export, in one workdir.

    python -m esp_tf.train --flagfile=configs/quickstart.flags

Reruns resume: finished experts are reused, condensation continues from its last
checkpoint, and phases whose outputs exist are not repeated. See README.md and BUILD.md.
"""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags, logging

from esp_tf import cli, workdir as wd

FLAGS = flags.FLAGS       # absl's global registry; run() installs the command line's flags in it


def main(argv):
    """Flags -> settings -> `pipeline.run`; the library does the rest."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:      # library INFO chatter off unless asked for
        logging.set_verbosity(logging.WARNING)
    from esp_tf import pipeline
    # The workdir is locked before TensorFlow loads (resolving the settings imports it), so a
    # second run in it stops within a second; pipeline.run keeps the lock (re-entrant).
    workdir = os.path.expanduser(FLAGS.workdir) if FLAGS.workdir else None
    early = contextlib.nullcontext()
    if workdir and (os.path.isdir(workdir) or not os.path.exists(workdir)):
        pipeline.check_writable(workdir, "workdir")
        early = wd.WorkdirLock(workdir)
    with early:
        settings = cli.from_flags()
        pipeline.run(settings, settings.workdir)


def _late_user_errors() -> tuple:
    """The user's errors that live in modules importing TensorFlow (see workdir.run_cli)."""
    from esp_tf.data import DatasetNotFoundError
    from esp_tf.evaluate import EvaluationDiverged
    from esp_tf.experts import WeakExpertError
    from esp_tf.trajectories import TrajectoryError
    return DatasetNotFoundError, TrajectoryError, WeakExpertError, EvaluationDiverged


def run():
    cli.install()
    wd.run_cli(main, wd.flags_parser(__doc__, cli.__name__),
               interrupted="interrupted. Rerun the same command to resume: finished experts and phases "
                           "are kept and the condensation continues from its last checkpoint.",
               late_user_errors=_late_user_errors)


if __name__ == "__main__":
    run()
