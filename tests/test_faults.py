"""Fault injection: every finding of issue 10 ("Nothing lost and nothing false") as a test.

Each case runs the CLI (or, where noted, the library) on a copy of one tiny finished run and
checks the exit code, that the message names the problem, and that no finished result is lost
or overwritten. Faults are injected deterministically: files are truncated or rewritten, and
the few faults that cannot be staged on disk (a full disk, Ctrl-C, no network) are simulated by
patching one function in a wrapper process that then runs `esp_tf.train` normally.
RELIABILITY.md lists these cases and what each gets.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

TINY = ["--num_experts=1", "--expert_epochs=2", "--max_start_epoch=1", "--segment_length=2",
        "--iterations=2", "--inner_steps=1", "--real_per_class=4", "--eval_epochs=1", "--eval_runs=1",
        "--width=4", "--depth=2", "--log_every=1", "--ckpt_every=1", "--baselines=random",
        "--eval_arch=convnet_tiny", "--nodownload"]
# Every file a finished run leaves, compared byte for byte before and after a faulty command.
RESULTS = ("flags.txt", "synthetic.npz", "eval.json", "metrics.jsonl", "grid.png", "ckpt/checkpoint")


def _env(tmp):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO),
            "TFDS_DATA_DIR": str(tmp / "tfds_default")}


def _train(tmp, args, patch="", cwd=None, data_dir=True, timeout=600):
    """Runs `python -m esp_tf.train args` after executing `patch` (fault injection) in-process."""
    code = f"import sys\n{patch}\nfrom esp_tf import train\nsys.argv = ['esp_tf.train'] + sys.argv[1:]\ntrain.run()\n"
    extra = [f"--data_dir={tmp / 'tfds'}"] if data_dir else []
    return subprocess.run([sys.executable, "-c", code] + extra + args, cwd=cwd or REPO, env=_env(tmp),
                          capture_output=True, text=True, timeout=timeout)


def _evaluate(tmp, args):
    return subprocess.run([sys.executable, "-m", "esp_tf.evaluate"] + args, cwd=REPO, env=_env(tmp),
                          capture_output=True, text=True, timeout=600)


def _ok(out):
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _refused(out, *words, code=2):
    """Exit `code`, one `error:` line naming every word, and no traceback."""
    assert out.returncode == code, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def _snapshot(work):
    return {name: (work / name).read_bytes() for name in RESULTS if (work / name).exists()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny finished run (all four phases) and its data_dir; cases work on copies of it."""
    tmp = tmp_path_factory.mktemp("faults")
    work = tmp / "work"
    _ok(_train(tmp, [f"--workdir={work}"] + TINY))
    return tmp, work


@pytest.fixture
def run_copy(finished, tmp_path):
    """A fresh copy of the finished run in this test's tmp_path; returns (tmp, copy, snapshot)."""
    tmp, work = finished
    copy = tmp_path / "copy"
    shutil.copytree(work, copy, symlinks=True)
    return tmp, copy, _snapshot(copy)


# ---------------------------------------------------------------------------------------------
# 1. Non-finite synthetic sets
# ---------------------------------------------------------------------------------------------
def test_1_a_diverging_condensation_stops_names_the_flags_and_saves_nothing_non_finite(finished, tmp_path):
    tmp, work = finished
    fresh = tmp_path / "nan"
    out = _train(tmp, [f"--workdir={fresh}", f"--experts_dir={work / 'experts'}", "--beta=1e38",
                       "--phases=experts,condense,evaluate,export"] + TINY + ["--inner_steps=3"])
    line = _refused(out, "non-finite", "--inner_lr", "--pixels_lr", "--beta")
    assert "not checkpointed or saved" in line
    assert not (fresh / "synthetic.npz").exists() and not (fresh / "tfds").exists()
    from esp_tf import condense
    for index in (fresh / "ckpt").glob("ckpt-*.index") if (fresh / "ckpt").exists() else []:
        assert condense._checkpoint_problem(str(index)[:-len(".index")]) is None
    # the corrected command in the same workdir: nothing finished there, so no --restart needed
    out = _ok(_train(tmp, [f"--workdir={fresh}", f"--experts_dir={work / 'experts'}",
                           "--phases=experts,condense"] + TINY))
    assert "starting with the new ones" in out.stdout and "beta" in out.stdout
    assert np.isfinite(np.load(fresh / "synthetic.npz")["images"]).all()


def test_1_export_and_evaluate_refuse_a_non_finite_set(run_copy):
    tmp, work, before = run_copy
    saved = np.load(work / "synthetic.npz")
    images = saved["images"].copy()
    images[0, 0, 0, 0] = np.nan
    np.savez(work / "synthetic.npz", images=images, labels=saved["labels"])
    tfds_before = sorted(p.relative_to(work) for p in (work / "tfds").rglob("*"))
    _refused(_train(tmp, [f"--workdir={work}", "--phases=export"] + TINY), "synthetic.npz", "NaN")
    assert sorted(p.relative_to(work) for p in (work / "tfds").rglob("*")) == tfds_before
    _refused(_evaluate(tmp, [f"--condensed={work}", "--eval_runs=1", "--eval_epochs=1"]), "NaN")


def test_1_non_finite_float_flags_are_rejected_before_any_work(tmp_path):
    out = _train(tmp_path, [f"--workdir={tmp_path / 'w'}", "--beta=nan", "--pixels_lr=inf"] + TINY)
    line = _refused(out, "invalid flags")
    assert "--beta must be a finite number" in out.stderr and "--pixels_lr must be a finite" in out.stderr
    assert not (tmp_path / "w" / "flags.txt").exists(), line
    _refused(_evaluate(tmp_path, ["--condensed=x", "--eval_lr=nan"]), "--eval_lr must be a finite number")


def test_3_unknown_or_unparsable_flags_are_one_line_with_exit_code_2(tmp_path):
    _refused(_train(tmp_path, [f"--workdir={tmp_path / 'w'}", "--ipc=abc"]), "--ipc", "--helpfull")
    _refused(_train(tmp_path, [f"--workdir={tmp_path / 'w'}", "--ipcc=1"]), "ipcc", "--helpfull")
    _refused(_evaluate(tmp_path, ["--eval_runs=many"]), "--eval_runs", "--helpfull")
    _refused(_evaluate(tmp_path, ["--runs=many"]), "--runs was renamed --eval_runs")   # a name before 0.2
    assert not (tmp_path / "w").exists()


def test_1_resume_names_and_skips_a_non_finite_checkpoint(tmp_path, capsys):
    import tensorflow as tf
    from esp_tf import condense
    v = tf.Variable([1.0, 2.0])
    ckpt = tf.train.Checkpoint(v=v)
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=2)
    manager.save(checkpoint_number=1)
    v.assign([np.nan, 0.0])          # as an older version could checkpoint a diverged set
    manager.save(checkpoint_number=2)
    v.assign([5.0, 5.0])
    assert condense._restore_last_intact(ckpt, manager).endswith("ckpt-1")
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])
    assert "ckpt-2 is non-finite" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 2. Workdir identity, --restart, damaged checkpoints
# ---------------------------------------------------------------------------------------------
def test_2_a_moved_workdir_spelled_with_a_slash_or_relative_path_resumes(run_copy):
    tmp, work, before = run_copy
    out = _ok(_train(tmp, [f"--workdir={work}/", "--phases=experts,condense,evaluate"] + TINY))
    assert "resuming" in out.stdout and "already in eval.json" in out.stdout
    out = _ok(_train(tmp, [f"--workdir={work.name}", "--phases=experts,condense,evaluate"] + TINY,
                     cwd=work.parent))
    assert "resuming" in out.stdout
    after = _snapshot(work)
    for name in ("synthetic.npz", "eval.json", "metrics.jsonl", "grid.png"):
        assert after[name] == before[name], name


def test_2_restart_moves_finished_results_aside_and_says_where(run_copy):
    tmp, work, before = run_copy
    out = _ok(_train(tmp, [f"--workdir={work}", "--restart", "--phases=experts"] + TINY))
    aside = [p for p in work.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and str(aside[0]) in out.stdout
    for name, data in before.items():
        assert (aside[0] / name).read_bytes() == data, name
    for name in ("tfds", "saved_model/classifier", "saved_model/generator", "ckpt"):
        assert (aside[0] / name).exists(), name
    assert (work / "experts" / "expert_00000.tfrecord").exists()       # experts are kept


def test_2_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_older_one(run_copy):
    tmp, work, before = run_copy
    data = next((work / "ckpt").glob("ckpt-2.data-*"))
    data.write_bytes(data.read_bytes()[:10])                          # truncated shard
    (work / "ckpt" / "checkpoint").unlink()                           # and a lost index file
    out = _ok(_train(tmp, [f"--workdir={work}", "--phases=experts,condense"] + TINY))
    assert "ckpt-2 is damaged" in out.stdout and "resumed from" in out.stdout and "ckpt-1" in out.stdout
    a, b = np.load(work / "synthetic.npz"), np.load(tmp / "work" / "synthetic.npz")
    np.testing.assert_array_equal(a["images"], b["images"])           # the same set, recomputed
    assert _snapshot(work)["eval.json"] == before["eval.json"]


def test_2_no_intact_checkpoint_is_an_error_that_keeps_the_results(run_copy):
    tmp, work, before = run_copy
    for data in (work / "ckpt").glob("ckpt-*.data-*"):
        data.write_bytes(b"garbage")
    _refused(_train(tmp, [f"--workdir={work}", "--phases=experts,condense"] + TINY),
             "no intact checkpoint", "--restart", "--phases=evaluate,export")
    after = _snapshot(work)
    for name in ("synthetic.npz", "eval.json", "metrics.jsonl"):
        assert after[name] == before[name], name


# ---------------------------------------------------------------------------------------------
# 3. Early validation; flags.txt only once the run started; eval-only changes need no --restart
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,words", [
    (["--eval_arch=resnet18"], ["--eval_arch", "resnet18", "resnet10"]),
    (["--ipc=301"], ["--ipc=301", "300 train images"]),
    (["--dataset=fashion_mnst"], ["fashion_mnst"]),
    (["--val_per_class=300"], ["--val_per_class=300", "smallest class", "use fewer"]),
    # issue 22: flags that ran to exit 0 with meaningless results, or gave tracebacks (the
    # command line once; every flag of the table in test_3_every_out_of_range_flag_is_named)
    (["--depth=0", "--eval_lr=-1"], ["--depth must be >= 1, got 0", "--eval_lr must be > 0, got -1.0"]),
    (["--export_name=My Set"], ["--export_name='My Set'", "snake_case"]),
    # a latent design over its budget, with Gaussian init too: refused before the experts train
    (["--param=latents", "--num_decoders=200", "--init=gaussian"], ["latent budget too small"]),
])
def test_3_bad_settings_fail_before_any_work_and_write_no_flags_txt(tmp_path, bad, words):
    work = tmp_path / "w"
    out = _train(tmp_path, [f"--workdir={work}"] + TINY + bad)
    _refused(out, *words)
    assert not (work / "flags.txt").exists() and not (work / "experts").exists()


@pytest.mark.parametrize("bad,message", [
    (dict(depth=0), "--depth must be >= 1, got 0"), (dict(width=-3), "--width must be >= 1, got -3"),
    (dict(expert_batch=0), "--expert_batch must be >= 1"), (dict(eval_lr=-1.0), "--eval_lr must be > 0"),
    (dict(expert_lr=0.0), "--expert_lr must be > 0"), (dict(seed=-1), "--seed must be >= 0"),
    (dict(codes_lr=-0.1), "--codes_lr must be > 0"), (dict(eval_lr=1e30), "--eval_lr must be <= 10"),
    (dict(codes_lr=1e3), "--codes_lr must be <= 10"), (dict(inner_lr=1e9), "--inner_lr must be <= 100"),
    (dict(pixels_lr=1e9), "--pixels_lr must be <= 100000"), (dict(image_size=-1), "--image_size must be >= 0"),
    (dict(dataset=""), "--dataset='' is not a TFDS dataset name"),
    (dict(dataset="../etc"), "--dataset='../etc' is not a TFDS dataset name"),
    (dict(dataset="folder:"), "--dataset=folder: needs a folder"),
    (dict(image_size=32), "--image_size=32 applies to --dataset=folder:<dir> only"),
    (dict(phases=[]), "--phases is empty"),
    (dict(dataset="folder:/x", real_data="stream"), "--real_data=stream reads TFDS datasets"),
    (dict(real_data="stream", jit_compile=True), "XLA cannot compile"),
])
def test_3_every_out_of_range_flag_is_named_before_any_work(tmp_path, bad, message):
    from esp_tf import cli
    errors = cli.validate(cli.settings(workdir=str(tmp_path), **bad))
    assert any(message in e for e in errors), errors
    assert cli.validate(cli.settings(workdir=str(tmp_path))) == []


def test_3_a_run_is_identified_by_the_settings_it_uses_only(run_copy, monkeypatch):
    """Another method's or the other parameterisation's settings, and where the data live, never
    refuse a finished run; the run's own method settings do; a flags.txt of an older version
    (without flags added since) resumes; a flag of no identity class fails here."""
    import dataclasses
    from esp_tf import cli, pipeline, workdir as wd
    tmp, work, before = run_copy
    recorded = wd.parse_flags_file(str(work / "flags.txt"))
    base = dataclasses.replace(cli.from_values(recorded), workdir=str(work))
    assert base.method == "esp" and base.param == "pixels"
    for change in (dict(student_lr_init=0.05, student_lr_lr=1e-6),     # tm's
                   dict(codes_lr=0.05, num_decoders=8, decoder="transposed"),   # latents'
                   dict(real_data="stream", syn_chunk=3)):
        assert pipeline.prepare_workdir(dataclasses.replace(base, **change)) is not None, change
    for change in (dict(real_per_class=8), dict(beta=0.5), dict(pixels_lr=0.5), dict(segment_length=1)):
        with pytest.raises(wd.UserError, match=list(change)[0]):
            pipeline.prepare_workdir(dataclasses.replace(base, **change))
    older = "".join(line + "\n" for line in (work / "flags.txt").read_text().splitlines()
                    if not line.startswith(("--decoder_init", "--real_data", "--image_size", "--zca")))
    (work / "flags.txt").write_text(older)
    assert pipeline.prepare_workdir(base) is not None
    assert _snapshot(work) == {**before, "flags.txt": older.encode()}     # nothing moved or lost
    monkeypatch.setattr(cli, "NAMES", cli.NAMES + ("brand_new_flag",))
    with pytest.raises(KeyError, match="brand_new_flag"):
        pipeline._owned_flags()


def test_3_changing_only_evaluation_flags_keeps_the_condensation(run_copy):
    tmp, work, before = run_copy
    out = _ok(_train(tmp, [f"--workdir={work}", "--phases=evaluate"] + TINY
                     + ["--eval_arch=convnet", "--eval_epochs=2", "--width=4"]))
    assert "moved eval.json" in out.stdout
    aside = next(p for p in work.iterdir() if p.name.startswith("previous-"))
    assert (aside / "eval.json").read_bytes() == before["eval.json"]
    assert (work / "synthetic.npz").read_bytes() == before["synthetic.npz"]
    assert set(json.loads((work / "eval.json").read_text())["esp"]) == {"convnet"}
    assert "--eval_epochs=2" in (work / "flags.txt").read_text()


def test_3_a_new_eval_arch_adds_a_column_and_keeps_the_old_classifier(run_copy):
    tmp, work, before = run_copy
    classifier = (work / "saved_model" / "classifier" / "saved_model.pb").read_bytes()
    _ok(_train(tmp, [f"--workdir={work}", "--phases=evaluate"] + TINY + ["--eval_arch=convnet"]))
    cells = json.loads((work / "eval.json").read_text())["esp"]
    assert set(cells) == {"convnet_tiny", "convnet"}
    assert cells["convnet_tiny"] == json.loads(before["eval.json"])["esp"]["convnet_tiny"]
    assert (work / "saved_model" / "classifier" / "saved_model.pb").read_bytes() == classifier
    assert (work / "saved_model" / "classifier_convnet" / "saved_model.pb").exists()


# ---------------------------------------------------------------------------------------------
# 4. Provenance
# ---------------------------------------------------------------------------------------------
def test_4_experts_of_another_recipe_are_refused_naming_the_fields(finished, tmp_path):
    tmp, work = finished
    meta = (work / "experts" / "metadata.json").read_bytes()
    out = _train(tmp, [f"--workdir={tmp_path / 'w'}", f"--experts_dir={work / 'experts'}"] + TINY
                 + ["--expert_lr=0.02", "--expert_batch=64", "--noexpert_dsa"])
    _refused(out, "expert trajectories", "metadata.json")
    for field in ("train_config.lr: found 0.01, expected 0.02", "train_config.batch_size: found 256",
                  "train_config.dsa"):
        assert field in out.stderr, field
    assert (work / "experts" / "metadata.json").read_bytes() == meta


def test_4_results_without_flags_txt_are_refused(run_copy):
    tmp, work, before = run_copy
    (work / "flags.txt").unlink()
    _refused(_train(tmp, [f"--workdir={work}", "--beta=1e-3"] + TINY), "no flags.txt", "--restart")
    assert not (work / "flags.txt").exists()
    assert (work / "synthetic.npz").read_bytes() == before["synthetic.npz"]


def test_4_a_partial_rerun_keeps_the_full_phase_list(run_copy):
    tmp, work, before = run_copy
    _ok(_train(tmp, [f"--workdir={work}", "--phases=experts"] + TINY))
    assert "--phases=experts,condense,evaluate,export" in (work / "flags.txt").read_text()


def test_4_evaluate_or_export_without_a_condensed_set_is_an_error(run_copy):
    tmp, work, before = run_copy
    _refused(_train(tmp, [f"--workdir={work}", "--phases=evaluate", "--restart"] + TINY),
             "synthetic.npz", "--restart would move aside")
    assert not [p for p in work.iterdir() if p.name.startswith("previous-")]    # nothing moved
    (work / "synthetic.npz").unlink()
    _refused(_train(tmp, [f"--workdir={work}", "--phases=evaluate,export"] + TINY),
             "synthetic.npz", "does not exist", "condense")
    assert (work / "eval.json").read_bytes() == before["eval.json"]


# ---------------------------------------------------------------------------------------------
# 5. One-line errors instead of tracebacks
# ---------------------------------------------------------------------------------------------
def test_5_a_truncated_synthetic_npz_is_named_as_damaged(run_copy):
    tmp, work, before = run_copy
    (work / "synthetic.npz").write_bytes(before["synthetic.npz"][:100])
    _refused(_train(tmp, [f"--workdir={work}", "--phases=export"] + TINY), "synthetic.npz", "damaged")
    _refused(_evaluate(tmp, [f"--condensed={work}", "--eval_runs=1", "--eval_epochs=1"]),
             "synthetic.npz", "damaged")
    out = _train(tmp, [f"--workdir={work}", "--phases=export", "--verbose"] + TINY)
    assert out.returncode == 2 and "Traceback" in out.stderr                     # --verbose shows it


def test_5_a_corrupt_exported_tfrecord_is_named(run_copy):
    tmp, work, before = run_copy
    record = next((work / "tfds").rglob("*.tfrecord*"))
    record.write_bytes(record.read_bytes()[:-7])
    _refused(_evaluate(tmp, [f"--condensed={record.parent}", "--eval_runs=1", "--eval_epochs=1"]),
             str(record.parent), "damaged", "--phases=export")


def test_5_a_workdir_that_is_a_file_or_not_writable_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    _refused(_train(tmp_path, [f"--workdir={tmp_path / 'file'}"] + TINY), "is a file")
    if os.geteuid() == 0:     # root writes through permission bits: use sysfs, which refuses mkdir
        readonly = "/sys/esp_tf_faults_test"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        readonly = str(tmp_path / "ro" / "w")
    _refused(_train(tmp_path, [f"--workdir={readonly}"] + TINY), "not writable", readonly)


DISK_FULL = """
import tensorflow as tf
class _Full:
    def __init__(self, path): open(path, "wb").close()
    def write(self, record): raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
    def flush(self): pass
    def close(self): pass
tf.io.TFRecordWriter = _Full
"""


def test_5_a_full_disk_while_writing_experts_is_one_line_and_leaves_no_partial_file(finished, tmp_path):
    tmp, _ = finished
    experts = tmp_path / "experts"
    out = _train(tmp, [f"--workdir={tmp_path / 'w'}", f"--experts_dir={experts}"] + TINY, patch=DISK_FULL)
    _refused(out, "could not write", "expert_00000.tfrecord", "No space left", "disk space")
    # neither a final nor a temp expert file (the per-epoch .partial.npz resume point may stay)
    assert [n for n in os.listdir(experts) if n.endswith((".tfrecord", ".tmp"))] == []


# The checkpoint writer of iteration 2 finds the disk full.
CKPT_DISK_FULL = """
import tensorflow as tf
_save = tf.train.CheckpointManager.save
def _save_or_full(self, checkpoint_number=None, **kw):
    if checkpoint_number == 2:
        raise tf.errors.ResourceExhaustedError(None, None, "ckpt-2.data: No space left on device")
    return _save(self, checkpoint_number=checkpoint_number, **kw)
tf.train.CheckpointManager.save = _save_or_full
"""


def test_5_a_full_disk_while_checkpointing_is_one_line_and_the_rerun_resumes(finished, tmp_path):
    tmp, work = finished
    args = [f"--workdir={tmp_path / 'w'}", f"--experts_dir={work / 'experts'}",
            "--phases=experts,condense"] + TINY
    _refused(_train(tmp, args, patch=CKPT_DISK_FULL), "No space left", "rerun the same command")
    assert not (tmp_path / "w" / "synthetic.npz").exists()
    out = _ok(_train(tmp, args))
    assert "resumed from" in out.stdout and "ckpt-1" in out.stdout
    a, b = np.load(tmp_path / "w" / "synthetic.npz"), np.load(work / "synthetic.npz")
    np.testing.assert_array_equal(a["images"], b["images"])


# Ctrl-C right after metrics.jsonl got the row of iteration 3, one past the checkpoint at 2.
CTRL_C = """
from esp_tf import workdir
_append = workdir.append_jsonl
def _append_then_interrupt(path, row):
    _append(path, row)
    if row.get("iteration") == 3:
        raise KeyboardInterrupt
workdir.append_jsonl = _append_then_interrupt
"""


def test_5_ctrl_c_is_one_line_and_the_resumed_run_logs_no_duplicate_rows(finished, tmp_path):
    tmp, work = finished
    args = [f"--workdir={tmp_path / 'w'}", f"--experts_dir={work / 'experts'}",
            "--phases=experts,condense"] + TINY + ["--iterations=4", "--ckpt_every=2"]
    out = _train(tmp, args, patch=CTRL_C)
    line = _refused(out, "interrupted", "Rerun the same command to resume", code=130)
    assert "KeyboardInterrupt" not in out.stderr, out.stderr
    assert [x for x in out.stderr.splitlines() if x.startswith("error:")] == [line]
    out = _ok(_train(tmp, args))
    assert "resumed from" in out.stdout
    rows = [json.loads(x)["iteration"] for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# 6. Small ones
# ---------------------------------------------------------------------------------------------
def test_6_tilde_in_path_flags_is_expanded(finished, tmp_path):
    tmp, work = finished
    home = tmp_path / "home"
    home.mkdir()
    _ok(_train(tmp_path, ["--data_dir=~/tfds", "--workdir=~/w", f"--experts_dir={work / 'experts'}",
                          "--phases=experts"] + TINY, data_dir=False, cwd=tmp_path,
               patch=f"import os; os.environ['HOME'] = {str(home)!r}"))
    assert (home / "tfds" / "fashion_mnist_mini").is_dir() and (home / "w" / "flags.txt").exists()
    assert not (tmp_path / "~").exists()


def test_6_a_missing_data_dir_is_reported_as_not_existing(tmp_path):
    out = _train(tmp_path, [f"--workdir={tmp_path / 'w'}", "--dataset=cifar10",
                            f"--data_dir={tmp_path / 'nowhere'}"] + TINY, data_dir=False)
    _refused(out, "does not exist", "nowhere")


def test_6_evaluating_an_export_by_name_writes_nothing_into_its_folder(finished):
    tmp, work = finished
    tfds_dir = work / "tfds"
    before = sorted(p.name for p in tfds_dir.iterdir())
    name = before[0]
    _ok(_evaluate(tmp, [f"--condensed={name}", f"--data_dir={tfds_dir}", "--eval_runs=1", "--eval_epochs=1",
                        "--eval_archs=convnet_tiny"]))
    assert sorted(p.name for p in tfds_dir.iterdir()) == before


def test_6_grid_png_has_the_usual_permissions(finished):
    _, work = finished
    umask = os.umask(0)
    os.umask(umask)
    assert (work / "grid.png").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# 7. --download: through TFDS with a network; an error within seconds without one
# ---------------------------------------------------------------------------------------------
OFFLINE = "from esp_tf import data; data.network_reachable = lambda *a, **k: False"


def test_7_without_network_download_fails_within_seconds_saying_how_to_prepare_offline(tmp_path):
    t0 = time.time()
    out = _train(tmp_path, [f"--workdir={tmp_path / 'w'}", "--dataset=svhn_cropped", "--download"]
                 + TINY[:-1], patch=OFFLINE)
    _refused(out, "svhn_cropped", "network cannot be reached", "tfds build")
    assert time.time() - t0 < 60          # TF start-up included; TFDS alone would retry for minutes


def test_7_download_goes_through_tfds_only_when_asked(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds
    from esp_tf import data as data_lib
    calls = []

    class Reached(Exception):
        pass

    def fake_prepare(self, *a, **k):
        calls.append(self.name)
        raise Reached
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake_prepare)
    monkeypatch.setattr(data_lib, "network_reachable", lambda *a, **k: True)
    with pytest.raises(data_lib.DatasetNotFoundError, match="tfds build"):
        data_lib.load("svhn_cropped", str(tmp_path))                  # library default: offline
    assert calls == []
    with pytest.raises(Reached):
        data_lib.load("svhn_cropped", str(tmp_path), download=True)
    assert calls == ["svhn_cropped"]
    with pytest.raises(data_lib.DatasetNotFoundError, match="fashion_mnst"):
        data_lib.load("fashion_mnst", str(tmp_path), download=True)     # a typo never downloads
    assert calls == ["svhn_cropped"]


def test_7_the_network_probe_answers_within_its_timeout_on_local_ports():
    import socket
    from esp_tf import data as data_lib
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert data_lib.network_reachable(("127.0.0.1", port), timeout=1.0)
    finally:
        server.close()
    t0 = time.time()
    assert not data_lib.network_reachable(("127.0.0.1", port), timeout=1.0)   # closed now
    assert time.time() - t0 < 3


# ---------------------------------------------------------------------------------------------
# 8. Concurrency (issue 22): one run per workdir
# ---------------------------------------------------------------------------------------------
HOLD = """
import sys, time
from esp_tf import workdir
with workdir.WorkdirLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(tmp, work):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], cwd=REPO, env=_env(tmp),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_8_a_second_run_in_a_held_workdir_exits_2_at_once_naming_the_holder_and_changes_nothing(run_copy):
    tmp, work, before = run_copy
    holder = _holder(tmp, work)
    try:
        t0 = time.time()
        out = _train(tmp, [f"--workdir={work}"] + TINY)
        elapsed = time.time() - t0
        line = _refused(out, "in use by another esp_tf run", f"PID {holder.pid}", "nothing was changed")
        assert elapsed < 5, elapsed                              # before TensorFlow is even imported
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert _snapshot(work) == before and not [p for p in work.iterdir() if p.name.startswith("previous-")]
    finally:
        holder.kill()                                            # SIGKILL: the kernel drops its lock
        holder.wait()
    _ok(_train(tmp, [f"--workdir={work}"] + TINY))             # a dead holder is never in the way
    after = _snapshot(work)                                    # (flags.txt now names this copy's path)
    assert {k: v for k, v in after.items() if k != "flags.txt"} == {
        k: v for k, v in before.items() if k != "flags.txt"}, line


def test_8_two_runs_started_together_one_runs_and_the_other_exits_2(finished, tmp_path):
    tmp, done = finished
    work = tmp_path / "work"
    args = [f"--workdir={work}", f"--experts_dir={done / 'experts'}"] + TINY
    code = "from esp_tf import train\nimport sys\nsys.argv = ['esp_tf.train'] + sys.argv[1:]\ntrain.run()\n"
    procs = [subprocess.Popen([sys.executable, "-c", code, f"--data_dir={tmp / 'tfds'}"] + args, cwd=REPO,
                              env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], (codes, [o[1][-2000:] for o in outs])
    loser = outs[[p.returncode for p in procs].index(2)][1]
    assert "in use by another esp_tf run" in loser and "Traceback" not in loser
    # the survivor's results are those of a run alone: the finished run of the same settings
    assert json.loads((work / "eval.json").read_text()).keys() == json.loads((done / "eval.json").read_text()).keys()
    rows = [json.loads(line)["iteration"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)), rows                     # no row logged twice
    alone, here = np.load(done / "synthetic.npz"), np.load(work / "synthetic.npz")
    np.testing.assert_allclose(here["images"], alone["images"], rtol=1e-4, atol=1e-5)


def test_8_the_workdir_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    from esp_tf import workdir
    with workdir.WorkdirLock(str(tmp_path)):
        with workdir.WorkdirLock(str(tmp_path / "." )):          # the CLI, then the library: one lock
            pass
        other = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, env=_env(tmp_path),
                               capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and "in use by another esp_tf run" in other.stderr
        assert f"PID {os.getpid()}" in other.stderr
    holder = _holder(tmp_path, tmp_path)                          # released on exit: another may take it
    holder.kill()
    holder.wait()
    with workdir.WorkdirLock("gs://bucket/run"):                 # buckets have no file locks: a no-op
        pass


def test_8_ctrl_c_before_tensorflow_loads_exits_130_without_loading_it(tmp_path):
    patch = ("import atexit\natexit.register(lambda: print('tensorflow loaded:', 'tensorflow' in sys.modules))\n"
             "from esp_tf import cli\n"
             "def interrupted():\n    raise KeyboardInterrupt\n"
             "cli.from_flags = interrupted\n")
    out = _train(tmp_path, [f"--workdir={tmp_path / 'work'}"] + TINY, patch=patch)
    _refused(out, "interrupted", code=130)
    assert "tensorflow loaded: False" in out.stdout, out.stdout


def test_8_a_damaged_metrics_log_is_skipped_with_a_warning_never_fatal(run_copy):
    tmp, work, before = run_copy
    log = work / "metrics.jsonl"
    good = log.read_text()
    log.write_text(good + '{"iteration": 3, "loss": 0.\n' + "not json at all\n" + '["a list"]\n')
    out = _ok(_train(tmp, [f"--workdir={work}", "--phases=export"] + TINY))
    assert "warning: skipped 3 damaged line(s)" in out.stdout and "Traceback" not in out.stderr
    assert (work / "curves.png").read_bytes()[:4] == b"\x89PNG"
    from esp_tf import workdir
    rows = workdir.read_jsonl(str(log), required=("iteration",), warn=False)
    assert [r["iteration"] for r in rows] == [json.loads(l)["iteration"] for l in good.splitlines()]
    (work / "eval.json").write_text('{"esp": ')
    out = _train(tmp, [f"--workdir={work}", "--phases=evaluate"] + TINY)
    line = _refused(out, "eval.json is not valid JSON", "move it aside")
    assert "delete" not in line                                  # no advice of ours deletes a result


# ---------------------------------------------------------------------------------------------
# 9. The expert store checks itself (issue 22)
# ---------------------------------------------------------------------------------------------
def test_9_diverged_experts_are_refused_in_one_line_and_nothing_is_stored(tmp_path):
    work = tmp_path / "w"
    out = _train(tmp_path, [f"--workdir={work}"] + TINY + ["--expert_lr=10"])
    line = _refused(out, "--expert_lr", "stored")       # at chance (or a non-finite loss: "diverged")
    assert "chance" in line or "diverged" in line
    assert not list((work / "experts").glob("expert_*.tfrecord"))
    out = _ok(_train(tmp_path, [f"--workdir={work}"] + TINY + ["--expert_lr=10", "--accept_weak_experts",
                                                            "--phases=experts"]))
    assert list((work / "experts").glob("expert_*.tfrecord"))     # stored knowingly when asked


def test_9_condensation_refuses_a_store_that_lost_an_expert_after_the_experts_phase(finished, tmp_path):
    tmp, done = finished
    store = tmp_path / "experts"
    shutil.copytree(done / "experts", store)
    patch = ("from esp_tf import experts\norig = experts.generate\n"
             "def lose_one(store, *a, **k):\n    out = orig(store, *a, **k)\n"
             "    import os\n    os.remove(store.expert_path(0))\n    return out\n"
             "experts.generate = lose_one\n")
    work = tmp_path / "w"
    out = _train(tmp, [f"--workdir={work}", f"--experts_dir={store}"] + TINY, patch=patch)
    _refused(out, "--num_experts=1 but 1 of them are not in", "expert 0", "trains only the missing ones")
    assert not (work / "synthetic.npz").exists()


def test_8_an_unexpected_error_is_one_line_with_exit_1_and_verbose_shows_the_traceback(tmp_path):
    patch = ("from esp_tf import pipeline\n"
             "def boom(*a, **k):\n    raise RuntimeError('boom\\nsecond line')\n"
             "pipeline.run = boom\n")
    out = _train(tmp_path, [f"--workdir={tmp_path / 'w'}"] + TINY, patch=patch)
    line = _refused(out, "unexpected RuntimeError: boom", "--verbose", code=1)
    assert "second line" not in line
    out = _train(tmp_path, [f"--workdir={tmp_path / 'w'}", "--verbose"] + TINY, patch=patch)
    assert out.returncode == 1 and "Traceback" in out.stderr


# ---------------------------------------------------------------------------------------------
# 10. Damaged inputs that gave tracebacks (issue 22)
# ---------------------------------------------------------------------------------------------
def test_10_a_binary_flagfile_is_one_line(tmp_path):
    (tmp_path / "bin.flags").write_bytes(b"\x00\x01binary\xff\xfe")
    _refused(_train(tmp_path, [f"--flagfile={tmp_path / 'bin.flags'}"]), "not a text file", "bin.flags")


@pytest.mark.parametrize("damage", ["truncated_tfrecord", "dataset_info"])
def test_10_a_damaged_prepared_dataset_is_one_line_naming_its_folder(finished, tmp_path, damage):
    tmp, _ = finished
    data = tmp_path / "tfds"
    shutil.copytree(tmp / "tfds", data)
    version = next(data.glob("fashion_mnist_mini/*/dataset_info.json")).parent
    if damage == "truncated_tfrecord":
        shard = next(version.glob("*train.tfrecord*"))
        shard.write_bytes(shard.read_bytes()[:100_000])
    else:
        (version / "dataset_info.json").write_text('{"name": "fashion')
    out = subprocess.run([sys.executable, "-m", "esp_tf.train", f"--data_dir={data}",
                          f"--workdir={tmp_path / 'w'}"] + TINY, cwd=REPO, env=_env(tmp),
                         capture_output=True, text=True, timeout=600)
    line = _refused(out, "is damaged", "move that folder aside")
    assert "function_node" not in line


def test_10_evaluating_a_set_without_images_is_one_line(tmp_path):
    np.savez(tmp_path / "empty.npz", pixels=np.zeros((0, 28, 28, 1), np.uint8), labels=np.zeros((0,), np.int32),
             source_dataset=np.array("fashion_mnist_mini"))
    _refused(_evaluate(tmp_path, [f"--condensed={tmp_path / 'empty.npz'}"]), "holds no images")


def test_10_a_full_disk_under_our_own_writes_names_the_file(tmp_path, monkeypatch):
    import errno
    from esp_tf import fs, workdir

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fs, "fsync", full)
    with pytest.raises(OSError) as raised:
        workdir.atomic_write_text(str(tmp_path / "eval.json"), "{}")
    assert raised.value.filename == str(tmp_path / "eval.json") and "No space left" in raised.value.strerror
    assert not list(tmp_path.iterdir())                          # no temp file left behind


def test_10_a_huge_learning_rate_is_refused_before_any_work_and_keeps_the_run(run_copy):
    tmp, work, before = run_copy          # every bound: test_3_every_out_of_range_flag_is_named
    _refused(_train(tmp, [f"--workdir={work}"] + TINY + ["--eval_lr=1e30"]), "--eval_lr", "must be <=")
    assert _snapshot(work) == before


def test_10_a_diverged_evaluation_run_is_a_named_error_not_a_number():
    import tensorflow as tf
    from esp_tf import evaluate
    trainer = evaluate.Trainer(evaluate.EvalConfig(arch="convnet_tiny", epochs=1, dsa=None), (8, 8, 1), 2)
    x = np.full((4, 8, 8, 1), np.nan, np.float32)               # a NaN set trains into NaN
    batches = lambda epoch: [(tf.constant(x), tf.constant([0, 1, 0, 1]))]
    with pytest.raises(evaluate.EvaluationDiverged, match="diverged.*--eval_lr"):
        evaluate.train_and_test(trainer, batches, (x, np.array([0, 1, 0, 1])), seed=0)


def test_10_an_interrupted_evaluation_resumes_from_its_finished_runs_and_folds_them_into_eval_json(run_copy):
    tmp, work, before = run_copy
    (work / "eval.json").unlink()            # killed after run 0 of the condensed set was saved
    marker = {"esp": {"convnet_tiny": {"settings": {}, "runs": {"0": {"test": 99.99, "val": None}}}}}  # no real run scores 99.99
    (work / "eval_partial.json").write_text(json.dumps(marker))
    out = _ok(_train(tmp, [f"--workdir={work}"] + TINY))
    assert "resumes with 1 of 1 runs finished" in out.stdout + out.stderr
    results = json.loads((work / "eval.json").read_text())
    assert results["esp"]["convnet_tiny"]["accuracies"] == [99.99]       # reused, not retrained
    assert results["random"]["convnet_tiny"]["accuracies"] == \
        json.loads(before["eval.json"])["random"]["convnet_tiny"]["accuracies"]   # seeded subset
    assert not (work / "eval_partial.json").exists()                     # folded into eval.json
    assert not (work / "eval_partial.json.lock").exists()
    # run 0 without the classifier it exported is trained again (a damaged file: the test below)
    (work / "eval.json").unlink()
    shutil.rmtree(work / "saved_model" / "classifier")
    (work / "eval_partial.json").write_text(json.dumps(marker))
    _ok(_train(tmp, [f"--workdir={work}"] + TINY))
    assert json.loads((work / "eval.json").read_text())["esp"]["convnet_tiny"]["accuracies"] != [99.99]
    assert (work / "saved_model" / "classifier").is_dir()
    # changed evaluation settings move the runs of the old ones aside with eval.json
    (work / "eval_partial.json").write_text(json.dumps(marker))
    _ok(_train(tmp, [f"--workdir={work}"] + TINY[:-1] + ["--eval_epochs=2", "--nodownload"]))
    assert json.loads((work / "eval.json").read_text())["esp"]["convnet_tiny"]["accuracies"] != [99.99]
    assert len(list(work.glob("previous-*/eval_partial.json"))) == 1


def test_10_a_damaged_partial_results_file_is_moved_aside_named_and_its_runs_trained_again(tmp_path, capsys):
    from esp_tf import workdir as wd
    path = str(tmp_path / "eval_partial.json")
    damaged = '{"esp": {"convnet_tiny": {"runs": '          # a writer killed mid-file
    for text in (damaged, '["not", "a", "table"]'):
        (tmp_path / "eval_partial.json").write_text(text)
        done, save = wd.partial_runs(path, "esp", "convnet_tiny", {"epochs": 2})
        assert done == {}                                # nothing of it is reused
        assert "eval_partial.json is damaged" in capsys.readouterr().out
        save(0, 51.25, 50.0)                             # the new runs go to a fresh file
        assert wd.partial_runs(path, "esp", "convnet_tiny", {"epochs": 2})[0] == {0: (51.25, 50.0)}
        assert wd.partial_runs(path, "esp", "convnet_tiny", {"epochs": 3})[0] == {}   # other settings
        assert "made with other settings" in capsys.readouterr().out
        (tmp_path / "eval_partial.json").unlink()
    kept = sorted(p.read_text() for p in tmp_path.glob("eval_partial.json.bad-*"))
    assert kept == sorted([damaged, '["not", "a", "table"]'])   # both moved aside, none overwritten


def test_10_an_interrupted_evaluation_replaces_its_own_classifier_and_a_damaged_results_file_is_named(run_copy):
    tmp, work, before = run_copy
    (work / "eval.json").unlink()            # killed after the classifier export, before eval.json
    _ok(_train(tmp, [f"--workdir={work}"] + TINY))
    assert sorted(p.name for p in (work / "saved_model").iterdir()) == ["classifier", "generator"]
    assert json.loads((work / "eval.json").read_text()).keys() == json.loads(before["eval.json"]).keys()
    (work / "eval.json").write_text('{"esp": [1, 2]}')
    _refused(_train(tmp, [f"--workdir={work}", "--eval_runs=2"] + TINY), "is not a results file",
                    "move it aside")
    assert (work / "eval.json").read_text() == '{"esp": [1, 2]}'          # kept
