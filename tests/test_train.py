"""End-to-end: the pipeline on tiny settings (in-process, as a library call) writes every workdir
artifact; the CLI replays its flags.txt, resumes and refuses clashes; tools read the run back."""
import contextlib
import dataclasses
import io
import json
import time
import subprocess

import numpy as np
import pytest

from conftest import REPO, run_python

TINY = ["--num_experts=2", "--expert_epochs=2", "--max_start_epoch=1", "--segment_length=2",
        "--iterations=4", "--inner_steps=2", "--real_per_class=4", "--eval_epochs=3",
        "--eval_runs=2", "--width=8", "--depth=2", "--log_every=2", "--baselines=random,herding",
        "--ckpt_every=2"]


def _run(args, tmp_path, check=True):
    """The command line itself (its exit codes and messages are what these tests check)."""
    return run_python(["-m", "esp_tf.train", f"--data_dir={tmp_path / 'tfds'}", "--nodownload"] + args,
                      check=check)


def _as_settings(argv) -> dict:
    """['--name=value', ...] -> {name: parsed value}, parsed by the flags themselves."""
    from esp_tf import cli
    out = {}
    for arg in argv:
        name, value = arg[2:].split("=", 1)
        out[name] = cli.FLAGS[name].parser.parse(value)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The whole pipeline, in-process: `pipeline.run(cli.settings(...), workdir)`."""
    from esp_tf import cli, pipeline
    tmp = tmp_path_factory.mktemp("e2e")
    work = tmp / "work"
    settings = cli.settings(data_dir=str(tmp / "tfds"), download=False, **_as_settings(TINY))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = pipeline.run(settings, str(work))
    assert set(results) == {"esp", "random", "herding"}
    return tmp, work, subprocess.CompletedProcess([], 0, printed.getvalue(), "")


def test_cli_writes_every_workdir_artifact(finished_run):
    tmp, work, out = finished_run
    for name in ("flags.txt", "metrics.jsonl", "eval.json", "grid.png", "synthetic.npz", "ckpt",
                 "experts/metadata.json", "experts/expert_00000.tfrecord", "tfds", "curves.png",
                 "saved_model/generator/saved_model.pb", "saved_model/classifier/saved_model.pb",
                 "tensorboard", "budget.json"):
        assert (work / name).exists(), name
    results = json.loads((work / "eval.json").read_text())
    for method in ("esp", "random", "herding"):
        cell = results[method]["convnet3"]
        assert len(cell["accuracies"]) == 2
        assert cell["mean"] == pytest.approx(np.mean(cell["accuracies"]), abs=0.01)
    rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert "| esp |" in out.stdout and "| random |" in out.stdout     # the accuracy table
    # a long evaluation shows its progress within runs, not only after each (hours at 1,000 epochs)
    assert "[eval esp epochs]" in out.stdout and "run 2/2 epoch" in out.stdout


def test_flags_txt_is_a_replayable_flagfile_and_a_rerun_resumes_without_redoing_work(finished_run):
    tmp, work, _ = finished_run
    before = (work / "eval.json").read_text()
    out = _run([f"--flagfile={work / 'flags.txt'}"], tmp)
    assert "resuming" in out.stdout
    assert "already in eval.json" in out.stdout
    assert (work / "eval.json").read_text() == before


def test_rerun_with_other_settings_is_refused_without_losing_results(finished_run):
    tmp, work, _ = finished_run
    before = (work / "synthetic.npz").read_bytes()
    out = _run([f"--workdir={work}"] + TINY[:-1] + ["--ipc=2"], tmp, check=False)
    assert out.returncode != 0
    assert "ipc" in out.stderr and "--restart" in out.stderr
    assert "--ipc=1 in its flags.txt, 2 now" in out.stderr and "To resume it, pass --ipc=1" in out.stderr
    assert (work / "synthetic.npz").read_bytes() == before


def test_bad_flags_and_missing_datasets_fail_fast_with_clear_messages(tmp_path):
    out = _run([f"--workdir={tmp_path / 'w'}", "--losses=proj,tm"] + TINY, tmp_path, check=False)
    assert out.returncode != 0 and "--losses" in out.stderr
    out = _run([f"--workdir={tmp_path / 'w2'}", "--dataset=cifar10"] + TINY, tmp_path, check=False)
    assert out.returncode != 0 and "cifar10" in out.stderr and "data_dir" in out.stderr
    assert "Traceback" not in out.stderr


def test_drift_tool_rebuilds_the_real_init_of_a_finished_run(finished_run):
    tmp, work, _ = finished_run
    out = run_python([REPO / "tools" / "drift.py", work])
    assert out.returncode == 0, out.stderr[-3000:]
    row = [line for line in out.stdout.splitlines() if line.startswith(f"| {work} |")]
    mean_abs, rms, init_rms = (float(c) for c in row[0].strip("| ").split(" | ")[2:])
    # 8 Adam updates of lr <= 0.01 move a pixel at most ~0.08: a wrongly rebuilt init (other
    # real images, RMS ~1) could not come this close
    assert 0 < mean_abs <= 0.08 and rms <= 0.1 and init_rms > 0.5


def test_load_run_gives_tools_the_settings_data_net_store_and_set_of_a_run(finished_run):
    from esp_tf import cli, pipeline, workdir as wd
    tmp, work, _ = finished_run
    run = pipeline.load_run(str(work))
    assert run.settings.inner_steps == 2 and run.settings.width == 8 and run.settings.method == "esp"
    recorded = wd.parse_flags_file(work / "flags.txt")
    assert {k: v for k, v in cli.values(run.settings).items() if k in recorded} == recorded
    assert run.real.name.startswith("fashion_mnist_mini") and run.net.num_params > 0
    assert run.store.completed() == [0, 1]
    np.testing.assert_array_equal(run.images, np.load(work / "synthetic.npz")["images"])
    with pytest.raises(wd.UserError, match="not an esp_tf workdir"):
        pipeline.load_run(str(tmp))


def test_loss_balance_tool_reads_a_finished_run(finished_run):
    tmp, work, _ = finished_run
    out = run_python([REPO / "tools" / "loss_balance.py", f"--workdir={work}", "--segments=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len([l for l in lines if l.startswith("expert ")]) == 2
    assert lines[-1].startswith("run beta 1e-05: beta*L_proj pulls")


def test_publish_tool_writes_a_set_that_scores_like_the_run_and_records_how_it_was_made(finished_run):
    from esp_tf import condensed, data as data_lib
    tmp, work, _ = finished_run
    out = tmp / "sets" / "tiny.npz"
    (tmp / "sets").mkdir()
    done = run_python([REPO / "tools" / "publish_set.py", f"--workdir={work}", f"--out={out}",
                       "--command=python -m esp_tf.train ..."])
    assert done.returncode == 0, done.stderr[-3000:]
    side = json.loads((tmp / "sets" / "tiny.json").read_text())
    assert side["command"] == "python -m esp_tf.train ..." and side["flags"]["method"] == "esp"
    assert side["eval"]["esp"]["convnet3"]["accuracies"] and side["budget"]["images_per_class"] >= 1
    c = condensed.resolve(str(out), str(tmp / "tfds"))
    real = data_lib.load("fashion_mnist_mini", str(tmp / "tfds"))
    saved = np.load(work / "synthetic.npz")
    np.testing.assert_array_equal(c.labels, saved["labels"])
    half_level = 0.5 / (255 * float(np.min(real.std)))    # half a grey level, normalised units
    assert np.abs(c.normalized(real.mean, real.std) - saved["images"]).max() <= half_level + 1e-5


def test_default_run_renders_valid_pixels_and_the_uint8_export_clips_nothing(finished_run):
    import tensorflow_datasets as tfds
    from esp_tf import data as data_lib
    tmp, work, out = finished_run
    real = data_lib.load("fashion_mnist_mini", str(tmp / "tfds"))
    lo, hi = data_lib.pixel_range(real)
    x = np.load(work / "synthetic.npz")["images"]
    assert x.min() >= lo.min() - 1e-6 and x.max() <= hi.max() + 1e-6
    assert data_lib.fraction_outside_pixel_range(x, real) == 0
    version_dir = next(p for p in (work / "tfds").rglob("dataset_info.json")).parent
    meta = tfds.builder_from_directory(str(version_dir)).info.metadata
    assert meta["fraction_clipped_in_uint8"] == 0
    assert "WARNING" not in out.stdout


def test_help_lists_the_tools_own_flags_without_loading_tensorflow():
    code = ("import sys, atexit; atexit.register(lambda: print('TF loaded:', 'tensorflow' in sys.modules)); "
            "sys.argv = ['esp-train', '--help']; from esp_tf import train; train.run()")
    out = run_python(["-c", code])
    assert out.returncode == 0, out.stderr
    assert "--val_per_class" in out.stdout and "--dm_reduction" in out.stdout and "--ipc" in out.stdout
    assert "--eval_runs" in out.stdout and "--seed" in out.stdout             # shared with esp_tf.evaluate
    assert "--lr_codes: Alias for --codes_lr." in out.stdout                  # names before 0.2
    assert "--only_check_args" not in out.stdout        # not absl's own flags (--helpfull has them)
    assert out.stdout.rstrip().endswith("TF loaded: False")


def test_importing_the_library_defines_no_absl_flag_and_help_is_fast():
    # the libraries esp_tf builds on define absl flags of their own (absl.app, TensorFlow): first
    code = ("from absl import app, flags, logging; import tensorflow, tensorflow_datasets, keras; "
            "before = set(flags.FLAGS); "
            "import esp_tf.pipeline, esp_tf.condense, esp_tf.data, esp_tf.evaluate; from esp_tf import cli; "
            "s = cli.settings(ipc=3); print('new flags:', sorted(set(flags.FLAGS) - before), s.ipc)")
    out = run_python(["-c", code], check=True)
    assert "new flags: [] 3" in out.stdout
    start = time.perf_counter()
    out = run_python(["-m", "esp_tf.train", "--help"], check=True)
    seconds = time.perf_counter() - start
    from esp_tf import cli
    missing = [n for n in cli.NAMES if f"--{n}:" not in out.stdout and f"--[no]{n}:" not in out.stdout]
    assert not missing, missing
    assert seconds < 10, seconds      # ~0.1 s here: no TensorFlow import; loose against a busy machine


def test_a_workdir_written_by_an_older_release_resumes(tmp_path):
    """tests/data/workdir_f926414_dm: a finished DM run written before identity came from the
    settings a run uses (its flags.txt lacks every flag added since). It resumes as finished under
    today's flags, and still refuses a change of a setting it used."""
    import shutil
    from esp_tf import cli, pipeline, workdir as wd
    work = tmp_path / "old"
    shutil.copytree(REPO / "tests" / "data" / "workdir_f926414_dm", work)
    before = (work / "synthetic.npz").read_bytes()
    recorded = wd.parse_flags_file(str(work / "flags.txt"))
    assert "real_data" not in recorded and recorded["method"] == "dm"
    settings = dataclasses.replace(cli.from_values(recorded), workdir=str(work), data_dir=str(tmp_path / "tfds"),
                                   experts_dir=None, phases=["condense"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pipeline.run(settings, str(work))
    assert "same settings: resuming" in printed.getvalue()
    assert (work / "synthetic.npz").read_bytes() == before
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):                  # the same run, as a typed RunConfig
        pipeline.run(cli.run_config(settings), str(work))
    assert "same settings: resuming" in printed.getvalue()
    assert (work / "synthetic.npz").read_bytes() == before
    with pytest.raises(wd.UserError, match="real_per_class"):
        pipeline.run(dataclasses.replace(settings, real_per_class=8), str(work))


def test_a_latent_run_made_before_the_size_dependent_default_names_the_value_that_resumes_it(tmp_path):
    """An IPC 1 latent run made when codes were at 1/2 by default (its flags.txt may lack
    --latent_downsample, or record 2) is refused under today's default (1/4 at IPC 1) with one
    line naming the recorded value and the flag that resumes it; its results stay in place."""
    from esp_tf import cli, pipeline, workdir as wd
    work = tmp_path / "old"
    work.mkdir()
    old = cli.settings(param="latents", method="dm", latent_downsample=2, workdir=str(work),
                       data_dir=str(tmp_path / "tfds"))
    for keep in (True, False):      # recorded, or written before the flag existed
        lines = [line for line in cli.flags_file_text(old).splitlines()
                 if keep or not line.startswith("--latent_downsample")]
        (work / "flags.txt").write_text("\n".join(lines) + "\n")
        (work / "synthetic.npz").write_bytes(b"finished")
        today = cli.settings(param="latents", method="dm", workdir=str(work), data_dir=str(tmp_path / "tfds"))
        assert today.latent_downsample == 4
        with pytest.raises(wd.UserError, match="--latent_downsample=2 in its flags.txt, 4 now") as e:
            pipeline.prepare_workdir(today)
        assert "To resume it, pass --latent_downsample=2" in str(e.value)
        assert (work / "synthetic.npz").read_bytes() == b"finished"
        assert pipeline.prepare_workdir(dataclasses.replace(today, latent_downsample=2)) is not None


def test_an_esp_run_made_under_the_element_mean_default_names_the_reduction_that_resumes_it(tmp_path):
    """ESP runs made while L_DM's element mean was the default recorded it in flags.txt; under
    today's default (DM's sum) such a finished run is refused with the flag that resumes it, and
    one written before the flag existed (it summed) resumes as it is."""
    from esp_tf import cli, pipeline, workdir as wd
    work = tmp_path / "old"
    work.mkdir()
    old = cli.settings(method="esp", dm_reduction="element_mean", workdir=str(work), data_dir=str(tmp_path / "tfds"))
    (work / "flags.txt").write_text(cli.flags_file_text(old))
    (work / "synthetic.npz").write_bytes(b"finished")
    today = cli.settings(method="esp", workdir=str(work), data_dir=str(tmp_path / "tfds"))
    assert today.dm_reduction == "sum"
    with pytest.raises(wd.UserError, match="--dm_reduction=element_mean in its flags.txt, sum now") as e:
        pipeline.prepare_workdir(today)
    assert "To resume it, pass --dm_reduction=element_mean" in str(e.value)
    assert (work / "synthetic.npz").read_bytes() == b"finished"
    assert pipeline.prepare_workdir(dataclasses.replace(today, dm_reduction="element_mean")) is not None
    lines = [line for line in cli.flags_file_text(old).splitlines() if not line.startswith("--dm_reduction")]
    (work / "flags.txt").write_text("\n".join(lines) + "\n")
    assert pipeline.prepare_workdir(today) is not None
    with pytest.raises(wd.UserError, match="--dm_reduction=sum in its flags.txt, element_mean now"):
        pipeline.prepare_workdir(dataclasses.replace(today, dm_reduction="element_mean"))


# ------------------------------------------------ flag names of esp_tf 0.2 and the old names' aliases
def _parse(argv):
    from esp_tf import workdir as wd
    return wd.parse_argv(["esp_tf.train"] + argv)


def test_old_flag_names_are_aliases_that_set_the_new_flags_and_are_never_recorded():
    from absl import flags
    from absl.testing import flagsaver
    from esp_tf import cli
    old = ["--lr_pixels=0.5", "--lr_codes=0.2", "--lr_decoders=0.03", "--lr_teacher=0.02", "--lr_lr=1e-4",
           "--batch_syn", "20"]                                   # `--flag value` works too
    with flagsaver.flagsaver():
        _parse(["--workdir=/tmp/x"] + old)
        F = flags.FLAGS
        assert (F.pixels_lr, F.codes_lr, F.decoders_lr, F.student_lr_init, F.student_lr_lr, F.syn_batch) == (
            0.5, 0.2, 0.03, 0.02, 1e-4, 20)
        text = cli.flags_file_text(cli.from_flags())
    assert "--codes_lr=0.2" in text and "--syn_batch=20" in text and "lr_codes" not in text
    assert not set(wd_renamed()) & set(cli.NAMES)                 # an alias is no setting of its own


def wd_renamed():
    from esp_tf import workdir as wd
    return wd.RENAMED_TRAIN_FLAGS


def test_an_old_name_after_a_flagfile_of_new_names_overrides_it_as_absl_does(tmp_path):
    from absl import flags
    from absl.testing import flagsaver
    flagfile = tmp_path / "new.flags"
    flagfile.write_text("--codes_lr=0.1\n--decoders_lr=0.01\n")
    with flagsaver.flagsaver():       # an old command: a config (new names) and an old-name override
        _parse([f"--flagfile={flagfile}", "--lr_codes=0", "--lr_decoders=0"])
        assert (flags.FLAGS.codes_lr, flags.FLAGS.decoders_lr) == (0.0, 0.0)


def test_a_workdir_whose_flags_txt_has_the_old_names_resumes(tmp_path, capsys):
    from absl.testing import flagsaver
    from esp_tf import cli, pipeline, workdir as wd
    work = tmp_path / "old"
    args = [f"--workdir={work}", "--param=latents", "--codes_lr=0.2", "--syn_batch=10", "--nodownload"]
    with flagsaver.flagsaver():
        _parse(args)
        settings = cli.from_flags()
        text, new = cli.flags_file_text(settings), cli.values(settings)
    for old_name, new_name in wd.RENAMED_TRAIN_FLAGS.items():     # as esp_tf 0.1 recorded the run
        text = text.replace(f"--{new_name}=", f"--{old_name}=")
    assert "--lr_codes=0.2" in text and "--batch_syn=10" in text and "--codes_lr" not in text
    work.mkdir()
    (work / "flags.txt").write_text(text)
    (work / "synthetic.npz").write_bytes(b"")                     # a finished result: no mixing allowed
    recorded = wd.parse_flags_file(str(work / "flags.txt"))
    assert recorded == {k: v for k, v in new.items() if v and k not in ("restart", "verbose")}
    for argv in (args, [f"--flagfile={work / 'flags.txt'}"]):       # the same command, or the replayed file
        with flagsaver.flagsaver():
            _parse(argv)
            assert pipeline.prepare_workdir(cli.from_flags()) == recorded
        assert "exists with the same settings: resuming" in capsys.readouterr().out
