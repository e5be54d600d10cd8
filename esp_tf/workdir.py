"""Workdir helpers: atomic writes, JSON lines, progress lines with rate and ETA, the result table.

No flags here: the CLI passes paths and values in.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid

from esp_tf import fs


class UserError(Exception):
    """A problem the user can fix (bad flags, missing data, incompatible workdir): no traceback."""


def atomic_write(path: str, write_fn) -> None:
    """The one file writer of esp_tf: `write_fn(tmp)` writes a unique temp file in the target's
    folder (open it with `fs.open`, or a TensorFlow writer, so that URLs work), which is fsynced
    and renamed to `path`. A rename within one folder is atomic, so readers (and a resumed run)
    see no file or a complete one, never a truncated one, and a crashed or killed writer leaves
    only a hidden `.tmp` file that no reader picks up. The temp file is created by `write_fn`
    itself, so it gets the umask's usual permissions (0644), not mkstemp's 0600, and files stay
    readable to the other users of a shared folder.

    `path` may be a filesystem URL (gs://, s3://, ram://; see `fs`): there the rename is a copy
    + delete, the final object still appears whole or not at all, and a writer killed between
    the two leaves its hidden temp object behind, ignored by every reader.
    """
    folder = os.path.dirname(fs.absolute(path))
    fs.makedirs(folder)
    tmp = f"{folder}/.{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write_fn(tmp)
        fs.fsync(tmp)                 # data on disk before the rename makes it visible
        fs.replace(tmp, path)
    except BaseException as e:
        if fs.exists(tmp):
            fs.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp):
            # a full disk under write() names no file: say which result could not be written
            raise OSError(e.errno, f"{e.strerror or e} while writing {path}", path) from e
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp):
        with fs.open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


_TF_NOISE = re.compile(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", re.S)


def error_text(e: Exception, limit: int = 200) -> str:
    """`Type: first line` of an exception, without TensorFlow's op-name decorations."""
    text = getattr(e, "message", None) or str(e)
    text = _TF_NOISE.sub("", text).strip()
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:limit]}"


LOCK_NAME = ".esp_tf.lock"


class WorkdirLock:
    """An exclusive lock on a workdir for the whole of one run (`with WorkdirLock(path):`).

    Two runs in one workdir would interleave their writes (one evaluation cell lost, logs moved
    aside under the other, a flags.txt that describes neither). The second process therefore
    stops at once with a UserError naming the holder. The lock is the kernel's (flock on
    <workdir>/.esp_tf.lock), held by the open file: a run that dies in any way, SIGKILL
    included, releases it, so a lock left by a dead process is never in the way and nothing is
    ever deleted to clear one. The file keeps the last holder's PID for the message. Bucket
    paths (`gs://...`) have no file locks: there the lock is a no-op.
    """

    _held: dict = {}             # realpath -> [open lock file, depth]: re-entry in one process

    def __init__(self, folder: str):
        self.folder, self._key = folder, None

    def __enter__(self):
        import fcntl
        import socket
        if "://" in self.folder:
            return self
        key = os.path.realpath(self.folder)
        if key in WorkdirLock._held:          # this process holds it already (CLI, then library)
            WorkdirLock._held[key][1] += 1
            self._key = key
            return self
        os.makedirs(self.folder, exist_ok=True)
        f = open(os.path.join(self.folder, LOCK_NAME), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that recorded no PID"
            f.close()
            raise UserError(f"{self.folder} is in use by another esp_tf run ({holder}); nothing was "
                            "changed. Wait for it to end (then rerun this command: it resumes), or "
                            "use another --workdir.") from None
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        WorkdirLock._held[key] = [f, 1]
        self._key = key
        return self

    def __exit__(self, *exc):
        if self._key is not None:
            entry = WorkdirLock._held[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                import fcntl
                del WorkdirLock._held[self._key]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                entry[0].close()
            self._key = None
        return False


def read_results(path: str) -> dict:
    """A results file (eval.json, esp_tf.evaluate --output): {method: {arch: {"accuracies",
    "mean", "std", ...}}}, {} when it does not exist. Any other content is a UserError naming the
    file (it is kept): a damaged results file must not be merged into or printed."""
    obj = read_json(path) or {}
    ok = isinstance(obj, dict) and all(
        isinstance(per, dict) and all(isinstance(cell, dict) and {"accuracies", "mean", "std"} <= set(cell)
                                      for cell in per.values()) for per in obj.values())
    if not ok:
        raise UserError(f"{path} is not a results file ({{method: {{architecture: {{accuracies, mean, "
                        "std}}}}}}); move it aside (it is kept for you to inspect) and rerun the same command "
                        "to recompute it")
    return obj


def merge_json_cell(path: str, row: str, column: str, value) -> dict:
    """Sets obj[row][column] = value in the JSON file at `path` (created if missing) and returns
    the merged object. The file is re-read under an exclusive lock right before the atomic
    write, so processes filling different cells of one results file never drop each other's."""
    import fcntl
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            obj = read_json(path) or {}
            if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
                raise UserError(f"{path} is not a table of cells ({{row: {{column: value}}}}); move it "
                                "aside (it is kept for you to inspect) and rerun the same command")
            obj.setdefault(row, {})[column] = value
            write_json(path, obj)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return obj


def drop_json_cell(path: str, row: str, column: str, sole_writer: bool = False) -> None:
    """Removes obj[row][column] from the JSON file at `path` under merge_json_cell's lock; the
    file goes when nothing is left in it, and with `sole_writer` (no other process can write it,
    e.g. a file in a workdir that one run holds) its lock file too. A missing file or cell is no
    error."""
    import fcntl
    if not os.path.exists(path):
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            obj = read_json(path) or {}
            if isinstance(obj, dict) and isinstance(obj.get(row), dict):
                obj[row].pop(column, None)
                if not obj[row]:
                    del obj[row]
            if obj:
                write_json(path, obj)
            else:
                os.remove(path)
                if sole_writer:
                    os.remove(path + ".lock")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def free_name(base: str) -> str:
    """`base`, or `base-1`, `base-2`, ... the first that does not exist: a name to move something
    to without overwriting what an earlier move in the same second put there."""
    name, k = base, 1
    while fs.exists(name):
        name, k = f"{base}-{k}", k + 1
    return name


def aside_name(path: str) -> str:
    """A free `<path>.bad-<time>` to move a damaged file or folder to (free_name)."""
    return free_name(f"{path}.bad-{time.strftime('%Y%m%d-%H%M%S')}")


def partial_runs(path: str, row: str, column: str, settings: dict):
    """The runs of cell (row, column) that an interrupted evaluation under the same `settings`
    finished, {i: (test %, val % or None)}, as the JSON file at `path` holds them
    ({row: {column: {"settings", "runs": {"<i>": {"test", "val"}}}}}), and `save(i, test, val)`,
    which adds a run to it under merge_json_cell's lock. Run i of an evaluation depends only on
    seed + i, so a finished run is reused as it is and an interruption costs one run at most.
    A damaged file is moved aside to `<path>.bad-<time>` and runs of other settings are not used,
    each named in one line (drop_json_cell removes the cell once it is folded in)."""
    try:
        obj = read_json(path) or {}
        if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
            raise UserError("not a table")
    except UserError:
        bad = aside_name(path)
        os.replace(path, bad)
        say(f"warning: {path} is damaged (moved to {bad}); the runs it held are trained again")
        obj = {}
    cell = (obj.get(row) or {}).get(column)
    runs = {}
    if isinstance(cell, dict) and cell.get("settings") == settings and isinstance(cell.get("runs"), dict):
        runs = {k: v for k, v in cell["runs"].items() if k.isdigit() and isinstance(v, dict) and "test" in v}
    elif cell is not None:
        say(f"{row} {column}: the runs in {path} were made with other settings; training anew")

    def save(i, acc, val):
        runs[str(i)] = {"test": round(acc, 4), "val": val}
        merge_json_cell(path, row, column, {"settings": settings, "runs": runs})
    return {int(k): (v["test"], v.get("val")) for k, v in runs.items()}, save


def read_json(path: str):
    """The parsed file, or None when it does not exist; a corrupt file is a UserError."""
    if not fs.exists(path):
        return None
    try:
        with fs.open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); move it aside (it is kept for you to "
                        "inspect) and rerun the same command to recompute it") from e


def read_jsonl(path: str, required=(), warn: bool = True) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per line. A damaged line (a killed writer's
    half line, an edit) or an object lacking a `required` key is skipped, with one warning line
    naming the file: an auxiliary log never stops a run or a tool."""
    rows, skipped = [], 0
    with fs.open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and all(k in row for k in required):
                rows.append(row)
            else:
                skipped += 1
    if skipped and warn:
        say(f"warning: skipped {skipped} damaged line(s) of {path}")
    return rows


def append_jsonl(path: str, obj) -> None:
    with fs.open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


def say(msg: str) -> None:
    """One progress line on stdout (flushed, so it shows through pipes and CI logs)."""
    print(msg, flush=True)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Prints `[name] done/total (pct) rate ETA message` lines; rate counted from the first update."""

    def __init__(self, name: str, total: int, done: int = 0):
        self.name, self.total, self.done = name, total, done
        self._t0, self._d0 = time.time(), done

    def update(self, done: int, message: str = "") -> None:
        self.done = done
        elapsed = time.time() - self._t0
        rate = (done - self._d0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        eta_s = _fmt_seconds(eta) if eta == eta else "?"
        rate_s = f"{rate:.2f}/s" if rate >= 0.1 else (f"{60 * rate:.2f}/min" if rate > 0 else "-")
        say(f"[{self.name}] {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%) "
            f"{rate_s} ETA {eta_s} {message}".rstrip())


class EpochProgress:
    """The `on_epoch(run, epochs_done)` callback of an evaluation of `runs` x `epochs`: a Progress
    line `[name] done/total ... run r/runs epoch e/epochs` at most every `every` seconds and at
    the end of each run. The rate (so the ETA) counts from the end of the first epoch it sees,
    which leaves out tracing and the runs an interrupted evaluation had already finished."""

    def __init__(self, name: str, runs: int, epochs: int, every: float = 15.0):
        self.name, self.runs, self.epochs, self.every = name, runs, epochs, every
        self.bar, self.last = None, time.time()

    def __call__(self, run: int, done: int) -> None:
        now = run * self.epochs + done
        if self.bar is None:
            self.bar = Progress(self.name, self.runs * self.epochs, done=now)
        if time.time() - self.last > self.every or done == self.epochs:
            self.last = time.time()
            self.bar.update(now, f"run {run + 1}/{self.runs} epoch {done}/{self.epochs}")


ARCH_ORDER = ("convnet3", "resnet10", "densenet121", "efficientnetv2s")  # the paper's column order


def _cell(res: dict) -> str:
    """'test mean +- std', plus the validation split's when the run held one out."""
    text = f"{res['mean']:.2f} +- {res['std']:.2f}"
    return text + (f" (val {res['val_mean']:.2f} +- {res['val_std']:.2f})" if "val_mean" in res else "")


def results_table(results: dict) -> str:
    """Markdown table like the paper's Table 2: rows = methods (full dataset last), columns =
    architectures (ConvNet-3, ResNet-10, DenseNet-121, EfficientNetV2-S first), test mean +- std (%),
    and the validation split's beside it when there is one."""
    archs = sorted({a for per in results.values() for a in per},
                   key=lambda a: (ARCH_ORDER.index(a) if a in ARCH_ORDER else len(ARCH_ORDER), a))
    lines = ["| method | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for method in sorted(results, key=lambda m: m.startswith("full")):
        per = results[method]
        cells = [_cell(per[a]) if a in per else "-" for a in archs]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Flags of esp_tf.train renamed in esp_tf 0.2 (old name -> new name). The old names stay as
# absl aliases of the new flags (cli.py), so an old command or flagfile still runs and never
# records them; the flags.txt of workdirs made before hold them, and `parse_flags_file` reads
# them under the new names.
RENAMED_TRAIN_FLAGS = {"lr_pixels": "pixels_lr", "lr_codes": "codes_lr", "lr_decoders": "decoders_lr",
                       "lr_teacher": "student_lr_init", "lr_lr": "student_lr_lr", "batch_syn": "syn_batch"}


def parse_flags_file(path: str, renamed: dict = RENAMED_TRAIN_FLAGS) -> dict:
    """Flag values recorded in a flags.txt written by flags_file_text (name -> raw string), with
    the `renamed` flags of older files under their current names."""
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("--no") and "=" not in line:
                name, value = line[4:], "False"
            elif line.startswith("--") and "=" in line:
                name, value = line[2:].split("=", 1)
            elif line.startswith("--"):
                name, value = line[2:], "True"
            else:
                continue
            values[renamed.get(name, name)] = value
    return values


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def run_cli(main, flags_parser, *, interrupted: str, late_user_errors=tuple) -> None:
    """The one error boundary of esp_tf's command lines: `app.run(main)`, and every error that
    reaches it becomes one `error:` line on stderr. Exit 2: the user's to fix (UserError,
    OSError such as a full disk, `late_user_errors()` — error classes of modules that load
    TensorFlow, looked up only once TensorFlow is loaded — and ResourceExhausted); 130: Ctrl-C
    (`interrupted` says what is kept), which never imports anything; 1: anything else, named by
    its type and first line. `--verbose` adds the traceback."""
    import traceback
    from absl import app, flags

    def verbose():
        return flags.FLAGS.is_parsed() and "verbose" in flags.FLAGS and flags.FLAGS.verbose

    def stop(message, code):
        if verbose():
            traceback.print_exc()
        fail(message)
        sys.exit(code)

    try:
        app.run(main, flags_parser=flags_parser)
    except SystemExit:          # --help, usage errors: before the clauses below import anything
        raise
    except (UserError, OSError) as e:
        stop(str(e) if not isinstance(e, OSError) else
             f"{e.strerror or e}: {e.filename or ''} (free disk space or fix the permissions, then "
             "rerun the same command: it resumes)", 2)
    except KeyboardInterrupt:
        stop(interrupted, 130)
    except Exception as e:
        tf = sys.modules.get("tensorflow")       # imported by then if the error comes from it
        if tf is not None and isinstance(e, late_user_errors()):
            stop(str(e), 2)
        if tf is not None and isinstance(e, tf.errors.ResourceExhaustedError):
            stop(f"{e.message.splitlines()[0][:300]}: out of disk space or memory. Free some and rerun "
                 "the same command: it resumes from the last checkpoint.", 2)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        stop(f"unexpected {type(e).__name__}: {first} (rerun with --verbose for the traceback, and "
             "please report it with that command)", 1)


HELP_FLAGS = ("-h", "-?", "--help", "--helpshort")


def flags_parser(doc: str, module_name: str, renamed: dict | None = None):
    """An absl `flags_parser` for a tool: --help prints `doc` and the flags `module_name` defines
    or adopts (not absl's "Try --helpfull", nor TensorFlow's own flags), before anything heavy is
    imported; other arguments go to `parse_argv`. `renamed` (old name -> new name): flag names
    that are no longer accepted, named in the error of an unknown flag."""
    def parse(argv):
        if any(a in HELP_FLAGS for a in argv[1:]):
            from absl import flags
            print(doc.strip() + "\n\nFlags (--helpfull adds those of the libraries):\n"
                  + flags.FLAGS.module_help(module_name), flush=True)
            sys.exit(0)
        return parse_argv(argv, renamed)
    return parse


def parse_argv(argv, renamed: dict | None = None):
    """absl.app.run's `flags_parser` for the entry points: an unknown or unparsable flag becomes
    a UserError (one line, exit 2) instead of absl's two-line message with exit code 1; an
    unknown flag in `renamed` (old name -> new name) is named with its new name."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        if e.flagname in (renamed or {}):
            raise UserError(f"--{e.flagname} was renamed --{renamed[e.flagname]} in esp_tf 0.2 (README "
                            f"'Renamed flags'); use --{renamed[e.flagname]}") from e
        raise UserError(f"{e}. `--helpfull` lists every flag") from e
    except flags.Error as e:
        raise UserError(f"{e}. `--helpfull` lists every flag") from e
    except UnicodeDecodeError as e:         # a --flagfile that is not text
        files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--flagfile=")]
        raise UserError(f"a --flagfile is not a text file ({', '.join(files) or 'flagfile'}: {e.reason} "
                        f"at byte {e.start}); give a text file of --flag=value lines") from e
