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

import sys
import traceback

from absl import app, logging

from esp_tf import cli, workdir as wd
from esp_tf.cli import FLAGS


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
    """The user's errors that live in modules importing TensorFlow: looked up only for an error
    that is neither a UserError nor an OSError, so neither those nor Ctrl-C wait for TensorFlow
    to load (or fail because it is half loaded)."""
    from esp_tf.data import DatasetNotFoundError
    from esp_tf.experts import WeakExpertError
    from esp_tf.trajectories import TrajectoryError
    return DatasetNotFoundError, TrajectoryError, WeakExpertError


def _fail_user(e, verbose) -> None:
    if verbose():
        traceback.print_exc()
    wd.fail(str(e) if not isinstance(e, OSError) else
            f"{e.strerror or e}: {e.filename or ''} (free disk space or fix the permissions, then "
            "rerun the same command: it resumes)")
    sys.exit(2)


def run():
    verbose = lambda: FLAGS.is_parsed() and FLAGS.verbose     # noqa: E731
    try:
        app.run(main, flags_parser=wd.flags_parser(__doc__, cli.__name__, wd.RENAMED_TRAIN_FLAGS))
    except SystemExit:          # --help, usage errors: before the clauses below import anything
        raise
    except (wd.UserError, OSError) as e:   # no traceback, exit 2
        _fail_user(e, verbose)
    except KeyboardInterrupt:
        if verbose():
            traceback.print_exc()
        wd.fail("interrupted. Rerun the same command to resume: finished experts and phases are kept "
                "and the condensation continues from its last checkpoint.")
        sys.exit(130)      # the shell's convention for a SIGINT exit
    except Exception as e:
        tf = sys.modules.get("tensorflow")       # imported by then if the error comes from it
        if tf is not None and isinstance(e, _late_user_errors()):
            _fail_user(e, verbose)
        if tf is None or not isinstance(e, tf.errors.ResourceExhaustedError):
            raise
        if verbose():                            # a full disk under a checkpoint write, or memory
            traceback.print_exc()
        wd.fail(f"{e.message.splitlines()[0][:300]}: out of disk space or memory. Free some and rerun "
                "the same command: it resumes from the last checkpoint.")
        sys.exit(2)


if __name__ == "__main__":
    run()
