"""Evaluation: every kind of condensed set resolves, runs are reproducible per seed, the IDC
protocol (lr steps, CutMix, DSA without cutout) is right, and the CLI works end to end."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from esp_tf import condensed, data, evaluate, export
from esp_tf.workdir import UserError

SOURCE = "fashion_mnist_mini"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A tfds data_dir with the embedded source, a fake workdir and two exports (1 image/class)."""
    tmp = tmp_path_factory.mktemp("condensed")
    tfds_dir = str(tmp / "tfds")
    real = data.load(SOURCE, tfds_dir)
    idx = np.searchsorted(real.train_labels, np.arange(10))           # first image of each class
    pixels, labels = real.train_images[idx], real.train_labels[idx]
    images = data.normalize(pixels, real.mean, real.std).numpy()
    work = tmp / "work"
    work.mkdir()
    np.savez(work / "synthetic.npz", images=images, labels=labels)
    (work / "flags.txt").write_text(f"--dataset={SOURCE}\n--data_dir={tfds_dir}\n--method=esp\n--ipc=1\n")
    common = dict(data_dir=tfds_dir, images=pixels, labels=labels, class_names=list(real.class_names))
    with_float = export.export_tfds(name="tiny_export", images_normalized=images + 0.5,
                                    metadata={"source_dataset": SOURCE, "method": "esp"}, **common)
    pixels_only = export.export_tfds(name="tiny_pixels", metadata={"source_dataset": SOURCE}, **common)
    return dict(tmp=tmp, tfds_dir=tfds_dir, real=real, images=images, labels=labels, work=str(work),
                with_float=with_float, pixels_only=pixels_only)


# ---------------------------------------------------------------- condensed-set kinds
def test_workdir_resolves_to_its_images_and_recorded_source_dataset(sets):
    c = condensed.resolve(sets["work"])
    assert (c.kind, c.source_dataset, c.data_dir, c.label) == ("workdir", SOURCE, sets["tfds_dir"], "esp ipc1")
    np.testing.assert_array_equal(c.normalized(None, None), sets["images"])
    np.testing.assert_array_equal(c.labels, sets["labels"])


def test_export_resolves_by_directory_and_by_name_from_its_metadata(sets):
    by_version_dir = condensed.resolve(sets["with_float"], sets["tfds_dir"])
    by_dataset_dir = condensed.resolve(os.path.dirname(sets["with_float"]), sets["tfds_dir"])
    by_name = condensed.resolve("tiny_export", sets["tfds_dir"])
    assert [c.kind for c in (by_version_dir, by_dataset_dir, by_name)] == ["tfds_dir", "tfds_dir", "tfds_name"]
    for c in (by_version_dir, by_dataset_dir, by_name):
        assert c.source_dataset == SOURCE and c.label == "esp ipc1"
        np.testing.assert_array_equal(c.normalized(None, None), sets["images"] + 0.5)  # stored floats win
        np.testing.assert_array_equal(c.labels, sets["labels"])


def test_uint8_only_sets_are_normalised_with_the_source_statistics(sets):
    c = condensed.resolve("tiny_pixels", sets["tfds_dir"])
    real = sets["real"]
    np.testing.assert_allclose(c.normalized(real.mean, real.std), sets["images"], atol=1e-6)


def test_source_dataset_argument_overrides_the_recorded_one(sets):
    assert condensed.resolve(sets["work"], source_dataset="cifar10").source_dataset == "cifar10"
    assert condensed.resolve("tiny_export", sets["tfds_dir"], "mnist").source_dataset == "mnist"


def test_anything_else_is_a_user_error_naming_what_was_looked_for(sets, tmp_path):
    with pytest.raises(UserError, match="neither an esp_tf workdir"):
        condensed.resolve(str(tmp_path))
    with pytest.raises(UserError, match="no TFDS dataset 'no_such_set'"):
        condensed.resolve("no_such_set", sets["tfds_dir"])


def test_a_published_npz_resolves_to_its_pixels_normalised_with_the_source_statistics(sets, tmp_path):
    real = sets["real"]
    pixels = data.to_pixels(real, sets["images"]).numpy()
    path = str(tmp_path / "published.npz")
    condensed.write_published(path, pixels, sets["labels"], SOURCE, val_per_class=3)
    with np.load(path) as raw:                        # numpy alone reads it
        assert raw["pixels"].dtype == np.uint8 and str(raw["source_dataset"]) == SOURCE
    c = condensed.resolve(path, sets["tfds_dir"])
    assert (c.kind, c.source_dataset, c.val_per_class, c.label) == ("published", SOURCE, 3, "published ipc1")
    np.testing.assert_allclose(c.normalized(real.mean, real.std), sets["images"], atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        condensed.write_published(path, sets["images"], sets["labels"], SOURCE)
    np.savez(tmp_path / "other.npz", images=sets["images"])
    with pytest.raises(UserError, match="lacks pixels, labels, source_dataset"):
        condensed.resolve(str(tmp_path / "other.npz"))
    (tmp_path / "cut.npz").write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(UserError, match="damaged"):
        condensed.resolve(str(tmp_path / "cut.npz"))


# ---------------------------------------------------------------- protocols
def test_standard_lr_drops_tenfold_at_half_and_idc_by_five_at_two_thirds_and_five_sixths():
    std = evaluate.protocol_config("standard", "convnet3", epochs=1000)
    lrs = [evaluate.learning_rate(std, e) for e in (0, 499, 500, 999)]
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001])
    idc = evaluate.protocol_config("idc", "resnet10", epochs=1000)
    lrs = [evaluate.learning_rate(idc, e) for e in (0, 665, 666, 832, 833, 999)]
    assert lrs == pytest.approx([0.01, 0.01, 0.002, 0.002, 0.0004, 0.0004])
    assert (idc.batch_size, idc.cutmix_prob, idc.cutmix_beta) == (64, 0.5, 1.0)
    assert (std.batch_size, std.cutmix_prob, std.dsa.families[2]) == (256, 0.0, "cutout")


def test_idc_augmentation_is_flip_and_color_always_then_one_geometric_family_never_cutout():
    from esp_tf import augment
    idc = evaluate.protocol_config("idc", "resnet10")
    assert "cutout" not in idc.dsa.families
    seen = set()
    for s in range(12):
        groups = evaluate.augment_params(tf.constant([s, 0]), 4, (32, 32), idc)
        fams = [{augment.FAMILIES[int(f)] for f in p["family"].numpy()} for p in groups]
        assert fams[:2] == [{"flip"}, {"color"}] and len(fams) == 3 and len(fams[2]) == 1
        seen |= fams[2]
    assert seen == {"crop", "scale", "rotate"}


# ---------------------------------------------------------------- training runs
def test_a_seed_reproduces_a_batchnorm_run_and_another_seed_does_not(sets):
    # Stateless nets re-initialise through FlatModel.init (test_models); BatchNorm nets are
    # rebuilt under the seed. CutMix on, DSA off: DSA's seeding is test_augment's business.
    x, y = sets["images"][:8], sets["labels"][:8]
    config = evaluate.protocol_config("standard", "resnet10", epochs=1, batch_size=4, dsa=False,
                                      cutmix_prob=0.5)
    trainer = evaluate.Trainer(config, x.shape[1:], 10)

    def weights_after(seed):
        evaluate.train_and_test(trainer, evaluate.array_epochs(x, y, 4, seed), (x, y), seed)
        return [v.numpy().copy() for v in trainer.model.variables]
    a, b, c = weights_after(3), weights_after(3), weights_after(4)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_evaluate_reports_mean_and_std_and_accepts_a_test_dataset(sets):
    real, x, y = sets["real"], sets["images"], sets["labels"]
    config = evaluate.EvalConfig(arch="convnet_tiny", epochs=2, batch_size=5)
    test_x = data.normalize(real.test_images[:300], real.mean, real.std).numpy()
    res = evaluate.evaluate(x, y, test_x, real.test_labels[:300], 10, config, runs=2, seed=1)
    assert len(res["accuracies"]) == 2
    assert res["mean"] == pytest.approx(np.mean(res["accuracies"]), abs=0.01)
    assert res["std"] == pytest.approx(np.std(res["accuracies"]), abs=0.01)
    ds = tf.data.Dataset.from_tensor_slices((test_x, real.test_labels[:300])).batch(128)
    assert evaluate.evaluate(x, y, ds, None, 10, config, runs=2, seed=1) == res


def test_an_interrupted_evaluation_resumes_at_its_first_unfinished_run_with_the_same_result(sets):
    """Run i depends only on seed + i, so runs finished before an interruption are reused and the
    rest train as they would have: the resumed result equals the uninterrupted one."""
    real, x, y = sets["real"], sets["images"], sets["labels"]
    config = evaluate.EvalConfig(arch="convnet_tiny", epochs=2, batch_size=5)
    test_x = data.normalize(real.test_images[:300], real.mean, real.std).numpy()
    val = (test_x[:100], real.test_labels[:100])
    saved = {}
    whole = evaluate.evaluate(x, y, test_x, real.test_labels[:300], 10, config, runs=3, seed=4, val=val,
                              on_done=lambda i, acc, v: saved.__setitem__(i, (acc, v)))
    assert sorted(saved) == [0, 1, 2]
    trained = []
    resumed = evaluate.evaluate(x, y, test_x, real.test_labels[:300], 10, config, runs=3, seed=4, val=val,
                                done={0: saved[0], 1: saved[1]}, on_done=lambda i, *_: trained.append(i))
    assert trained == [2]                    # only the unfinished run trained
    assert resumed == whole
    # a reused run's numbers are taken as they are: a marker shows they were not recomputed
    marked = evaluate.evaluate(x, y, test_x, real.test_labels[:300], 10, config, runs=1, seed=4, val=val,
                               done={0: (99.99, 12.5)})
    assert marked["accuracies"] == [99.99] and marked["val_accuracies"] == [12.5]


def test_full_mode_learns_from_the_whole_real_train_split(sets):
    epochs = []
    config = evaluate.EvalConfig(arch="convnet_tiny", epochs=2, dsa=None)
    res = evaluate.evaluate_full(sets["real"], config, runs=1, on_epoch=lambda i, e: epochs.append(e))
    assert epochs == [1, 2]
    assert res["mean"] > 40.0          # 10 classes: chance is 10%


def test_full_mode_steps_per_epoch_caps_each_epoch_with_a_fresh_order(sets, monkeypatch):
    seen, original = [], evaluate.train_and_test

    def spy(trainer, batches, test, seed, on_epoch=None):
        seen.append([np.concatenate([y.numpy() for _, y in batches(e)]) for e in range(trainer.config.epochs)])
        return original(trainer, batches, test, seed, on_epoch)
    monkeypatch.setattr(evaluate, "train_and_test", spy)
    config = evaluate.EvalConfig(arch="convnet_tiny", epochs=2, batch_size=8, dsa=None)
    evaluate.evaluate_full(sets["real"], config, runs=1, steps_per_epoch=3)
    (first, second), = seen
    assert len(first) == len(second) == 3 * 8          # 3 batches of 8, not the whole split
    assert not np.array_equal(first, second)           # each epoch draws a new order
    with pytest.raises(ValueError, match="steps_per_epoch"):
        evaluate.evaluate_full(sets["real"], config, runs=1, steps_per_epoch=0)


# ---------------------------------------------------------------- CLI
def _cli(args, check=True):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-m", "esp_tf.evaluate"] + args, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out


@pytest.mark.parametrize("how", ["console_script", "python_m"])
def test_help_lists_the_tools_own_flags_without_loading_tensorflow(how):
    report = "import sys, atexit; atexit.register(lambda: print('TF loaded:', 'tensorflow' in sys.modules)); "
    cmd = ([sys.executable, "-c", report + "sys.argv = ['esp-evaluate', '--help']; "
            "from esp_tf import evaluate_cli; evaluate_cli.run()"] if how == "console_script" else
           [sys.executable, "-c", report + "import runpy; sys.argv = ['evaluate', '--help']; "
            "runpy.run_module('esp_tf.evaluate', run_name='__main__', alter_sys=True)"])
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--condensed" in out.stdout and "--protocol" in out.stdout and "--steps_per_epoch" in out.stdout
    assert "--eval_archs" in out.stdout and "--eval_runs" in out.stdout and "--seed" in out.stdout  # shared
    assert "--only_check_args" not in out.stdout        # not absl's own flags (--helpfull has them)
    assert out.stdout.rstrip().endswith("TF loaded: False")


def test_the_cli_names_the_protocols_of_the_library():
    from esp_tf import evaluate_cli
    assert evaluate_cli.PROTOCOL_NAMES == tuple(evaluate.PROTOCOLS)


def test_epoch_progress_prints_at_most_every_interval_and_at_each_runs_end(capsys, monkeypatch):
    from esp_tf import workdir as wd
    clock = [100.0]
    monkeypatch.setattr(wd.time, "time", lambda: clock[0])
    tick = wd.EpochProgress("eval esp epochs", runs=3, epochs=4, every=15.0)
    tick(1, 1)                               # resumed: run 0 was finished earlier
    for run, epoch, dt in [(1, 2, 5), (1, 3, 20), (1, 4, 1), (2, 1, 1)]:
        clock[0] += dt
        tick(run, epoch)
    lines = capsys.readouterr().out.splitlines()
    assert [l.split("] ")[1].split()[0] for l in lines] == ["7/12", "8/12"]   # 15 s passed; a run's end
    assert lines[-1].endswith("run 2/3 epoch 4/4")
    assert "ETA" in lines[0] and "ETA ?" not in lines[0]    # rate from the first epoch seen


def test_cli_end_to_end_merges_json_and_prints_the_table(sets, tmp_path):
    output = tmp_path / "results.json"
    output.write_text(json.dumps({"dsa ipc1": {"convnet3": {"accuracies": [1.0], "mean": 1.0, "std": 0.0}}}))
    out = _cli([f"--condensed={sets['work']}", "--eval_archs=convnet3", "--eval_runs=1", "--eval_epochs=2",
                f"--output={output}"])
    results = json.loads(output.read_text())
    cell = results["esp ipc1"]["convnet3"]
    assert len(cell["accuracies"]) == 1 and cell["mean"] == cell["accuracies"][0]
    assert (cell["protocol"], cell["epochs"], cell["source_dataset"]) == ("standard", 2, SOURCE)
    assert "dsa ipc1" in results                                    # merged, not overwritten
    assert "| method | convnet3 |" in out.stdout and "| esp ipc1 | " in out.stdout and " +- " in out.stdout
    assert "ETA" in out.stdout
    assert "outside the pixel range" not in out.stdout             # real images: no note


_COUNTING_CLI = """
import sys
from esp_tf import evaluate
real_train, calls, stop = evaluate.train_and_test, [], int(sys.argv.pop(1))   # stop: 0 = never
def counting(*a, **k):
    calls.append(1)
    if len(calls) == stop:                          # this call is interrupted
        raise KeyboardInterrupt
    return real_train(*a, **k)
evaluate.train_and_test = counting
import atexit
atexit.register(lambda: print(f"TRAINED {len(calls)}"))
from esp_tf import evaluate_cli
sys.argv = ["esp_tf.evaluate"] + sys.argv[1:]
evaluate_cli.run()
"""


def test_cli_an_interrupted_evaluation_resumes_at_its_first_unfinished_run(sets, tmp_path):
    output = tmp_path / "results.json"
    args = [f"--condensed={sets['work']}", "--eval_archs=convnet_tiny", "--eval_runs=3", "--eval_epochs=2",
            f"--output={output}"]
    run = lambda stop, extra=(): subprocess.run(                          # noqa: E731
        [sys.executable, "-c", _COUNTING_CLI, str(stop)] + args + list(extra), cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True, timeout=600)
    first = run(3)                                   # Ctrl-C during the third run
    assert first.returncode == 130, first.stderr[-2000:]
    partial = json.loads((tmp_path / "results.json.partial.json").read_text())
    cell = partial["esp ipc1"]["convnet_tiny"]
    assert sorted(cell["runs"]) == ["0", "1"]
    assert not output.exists() or "esp ipc1" not in json.loads(output.read_text())
    cell["runs"]["0"]["test"] = 99.99                # a marker: no real run of this set scores it
    (tmp_path / "results.json.partial.json").write_text(json.dumps(partial))
    second = run(0)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "TRAINED 1" in second.stdout and "resuming with 2 finished run(s)" in second.stdout
    acc = json.loads(output.read_text())["esp ipc1"]["convnet_tiny"]["accuracies"]
    assert len(acc) == 3 and acc[0] == 99.99 and acc[1] == round(cell["runs"]["1"]["test"], 2)
    assert not (tmp_path / "results.json.partial.json").exists()          # folded into --output
    # other settings (here the epochs) never reuse those runs
    (tmp_path / "results.json.partial.json").write_text(json.dumps(partial))
    third = run(0, ["--eval_epochs=1"])             # the same row and column, one setting changed
    assert "TRAINED 3" in third.stdout and "made with other settings" in third.stdout, third.stdout[-2000:]
    assert 99.99 not in json.loads(output.read_text())["esp ipc1"]["convnet_tiny"]["accuracies"]


def test_cli_notes_a_set_whose_values_leave_the_pixel_range(sets, tmp_path):
    work = tmp_path / "unbounded"
    work.mkdir()
    np.savez(work / "synthetic.npz", images=5.0 * sets["images"], labels=sets["labels"])
    (work / "flags.txt").write_text(f"--dataset={SOURCE}\n--data_dir={sets['tfds_dir']}\n")
    out = _cli([f"--condensed={work}", "--eval_archs=convnet_tiny", "--eval_runs=1", "--eval_epochs=1",
                "--label=old"])
    assert "outside the pixel range 0..255" in out.stdout and "--clip_pixels" in out.stdout
    assert "| method | convnet_tiny |" in out.stdout and "\n| old | " in out.stdout


def test_cli_bad_input_exits_2_with_a_clear_message_and_no_traceback(sets, tmp_path):
    missing = tmp_path / "missing_source"
    missing.mkdir()
    np.savez(missing / "synthetic.npz", images=sets["images"], labels=sets["labels"])
    (missing / "flags.txt").write_text(f"--dataset=cifar10\n--data_dir={tmp_path / 'empty'}\n")
    cases = [[f"--condensed={tmp_path / 'missing_source'}", "--eval_archs=convnet3,resnet999"],
             [f"--condensed={missing}"],
             [f"--condensed={tmp_path}"],
             ["--condensed=no_such_set", f"--data_dir={sets['tfds_dir']}"],
             [f"--condensed={sets['work']}", "--steps_per_epoch=5"],
             [f"--condensed={sets['work']}", "--runs=2"]]        # a name before esp_tf 0.2
    script = textwrap.dedent(f"""
        import sys
        from absl import flags
        from esp_tf import evaluate_cli
        for argv in {cases!r}:
            flags.FLAGS.unparse_flags()
            sys.argv = ["evaluate"] + argv
            try:
                evaluate_cli.run()
            except SystemExit as e:
                print("EXIT", e.code, file=sys.stderr, flush=True)
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    err = out.stderr
    assert err.count("EXIT 2") == 6, err[-3000:]
    assert "--steps_per_epoch applies to --full only" in err
    assert "Traceback" not in err
    assert "unknown ['resnet999']" in err
    assert "'cifar10' is not available" in err and "data_dir" in err
    assert "neither an esp_tf workdir" in err
    assert "no TFDS dataset 'no_such_set'" in err
    assert ("error: --runs was renamed --eval_runs in esp_tf 0.2 (README 'Renamed flags'); use --eval_runs"
            "\nEXIT 2") in err


@pytest.mark.slow
def test_efficientnetv2s_short_evaluation_runs_and_is_reproducible(sets):
    real, x, y = sets["real"], sets["images"], sets["labels"]
    test_x = data.normalize(real.test_images[:100], real.mean, real.std).numpy()
    config = evaluate.protocol_config("standard", "efficientnetv2s", epochs=2, batch_size=10)
    res = evaluate.evaluate(x, y, test_x, real.test_labels[:100], 10, config, runs=2, seed=0)
    assert len(res["accuracies"]) == 2 and all(0.0 <= a <= 100.0 for a in res["accuracies"])
    assert evaluate.evaluate(x, y, test_x, real.test_labels[:100], 10, config, runs=1, seed=0)["accuracies"] \
        == res["accuracies"][:1]


def test_parallel_writers_of_one_results_file_keep_every_cell(tmp_path):
    """Several evaluate processes (one per architecture) may share --output."""
    from esp_tf import workdir
    path = str(tmp_path / "results.json")
    script = textwrap.dedent(f"""
        import sys
        from esp_tf import workdir
        for i in range(40):
            workdir.merge_json_cell({path!r}, "row" + str(i % 3), sys.argv[1] + str(i), i)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, name], cwd=REPO) for name in "abc"]
    assert [p.wait(timeout=600) for p in procs] == [0, 0, 0]
    merged = workdir.read_json(path)
    assert sum(len(cells) for cells in merged.values()) == 3 * 40
    assert merged["row1"]["b4"] == 4


def test_learning_curve_tool_reports_fit_and_transfer_at_each_checkpoint(sets, tmp_path):
    sorted_labels = np.repeat(np.arange(10), 20)                   # a class-sorted test split
    assert np.bincount(sorted_labels[data.stratified_subset(sorted_labels, 50)]).tolist() == [5] * 10
    output = tmp_path / "curve.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "tools/learning_curve.py", f"--condensed={sets['work']}",
                          "--arch=convnet_tiny", "--eval_epochs=4", "--every=2", "--test_subset=100",
                          f"--output={output}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(output.read_text())
    assert [p["epoch"] for p in result["curve"]] == [2, 4]
    for p in result["curve"]:
        assert all(0 <= p[k] <= 100 for k in ("train_acc", "test_acc", "test_acc_batch_stats"))
    assert 0 <= result["final_test_acc"] <= 100 and "test subset 100 of 2000" in out.stdout
    bad = subprocess.run([sys.executable, "tools/learning_curve.py", f"--condensed={tmp_path / 'nothing'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "error:" in bad.stderr and "Traceback" not in bad.stderr
