"""The scripts in tools/ that read finished workdirs: their numbers come from the files."""

import functools
import importlib.util
import json

import pytest

from conftest import REPO


@functools.cache            # a tool defines absl flags at import: load each once per session
def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finished_run(path, method="esp", val=True, experts=2):
    path.mkdir()
    (path / "flags.txt").write_text(f"--method={method}\n--param=latents\n--num_experts={experts}\n"
                                    "--dataset=cifar10\n--ipc=10\n--eval_epochs=300\n")
    (path / "budget.json").write_text(json.dumps({"images_per_class": 56}))
    rows = [{"iteration": 2, "updates": 50, "seconds_per_update": 2.0},
            {"iteration": 4, "updates": 100, "seconds_per_update": 3.0}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cell = {"accuracies": [40.0, 42.0], "mean": 41.0, "std": 1.0}
    if val:
        cell.update(val_accuracies=[39.0, 40.0], val_mean=39.5, val_std=0.5)
    (path / "eval.json").write_text(json.dumps({method: {"convnet3": cell}, "random": {"convnet3": cell}}))
    return str(path)


def test_fidelity_curve_reads_updates_wall_clock_and_both_accuracies(tmp_path):
    curve = _tool("fidelity_curve")
    point = curve.run_point(_finished_run(tmp_path / "a"))
    assert point["updates"] == 100 and point["seconds"] == 50 * 2.0 + 50 * 3.0
    assert (point["method"], point["test"], point["val"], point["runs"]) == ("esp", 41.0, 39.5, 2)
    assert (point["dataset"], point["ipc"], point["eval_epochs"], point["renders_per_class"]) == (
        "cifar10", 10, 300, 56)
    dm = curve.run_point(_finished_run(tmp_path / "b", method="dm", val=False))
    assert dm["method"] == "dm" and dm["val"] is None
    curve.plot([point, dm], str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fidelity_curve_keeps_runs_on_more_experts_in_their_own_series(tmp_path):
    curve = _tool("fidelity_curve")
    two = curve.run_point(_finished_run(tmp_path / "two"))
    eight = curve.run_point(_finished_run(tmp_path / "eight", experts=8))
    dm = curve.run_point(_finished_run(tmp_path / "dm", method="dm", experts=8))   # DM uses no experts
    assert (two["experts"], eight["experts"], dm["experts"]) == (2, 8, None)
    assert [curve.series(p) for p in (two, eight, dm)] == [
        "esp, 2 experts, 56 renders/class", "esp, 8 experts, 56 renders/class", "dm, 56 renders/class"]
    assert curve.series({"method": "esp"}) == "esp"          # a point recorded before experts were
    curve.plot([two, eight, dm], str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fidelity_curve_records_points_across_sessions_and_replaces_a_rerun(tmp_path):
    curve = _tool("fidelity_curve")
    ledger = str(tmp_path / "points.json")
    assert curve.read_points(ledger) == []
    a = curve.run_point(_finished_run(tmp_path / "a"))
    curve.record_points(ledger, [a], "abc123")
    b = curve.run_point(_finished_run(tmp_path / "b", method="dm"))
    points = curve.record_points(ledger, [b, a], "def456")          # a measured again: replaced
    assert [(p["name"], p["method"], p["commit"]) for p in points] == [("b", "dm", "def456"),
                                                                      ("a", "esp", "def456")]
    assert curve.read_points(ledger) == points
    other = {**a, "dataset": "fashion_mnist"}                       # same name, another dataset: kept apart
    assert len(curve.record_points(ledger, [other], "aaa111")) == 3


def test_fidelity_curve_names_what_an_unfinished_run_lacks(tmp_path):
    curve = _tool("fidelity_curve")
    work = tmp_path / "half"
    work.mkdir()
    (work / "flags.txt").write_text("--method=esp\n")
    with pytest.raises(ValueError, match="metrics.jsonl, eval.json missing"):
        curve.run_point(str(work))


def test_compare_tool_reports_validation_beside_test_and_marks_runs_without_one():
    compare = _tool("compare")
    rows = compare.table_rows("beta_x", {
        "esp": {"convnet3": {"accuracies": [50.0, 52.0], "mean": 51.0, "std": 1.0,
                             "val_accuracies": [48.0, 49.0], "val_mean": 48.5, "val_std": 0.5}},
        "random": {"convnet3": {"accuracies": [15.0], "mean": 15.0, "std": 0.0}}})
    assert "| validation (%) | test (%) |" in compare.HEADER
    assert rows == ["| beta_x | esp | convnet3 | 48.50 +- 0.50 | 51.00 +- 1.00 | 2 |",
                    "| random | random | convnet3 | - | 15.00 +- 0.00 | 1 |"]


def test_speed_bench_quick_run_ends_with_finite_positive_efficiency_and_throughput_ratio(tmp_path):
    import math
    import re
    from conftest import run_python
    out = run_python([REPO / "tools" / "speed_bench.py", "--quick", f"--out={tmp_path / 'speed.json'}"],
                     check=True)
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"ESP step FLOP efficiency: (\S+); experts / keras fit: (\S+)", last)
    assert m, last
    x, y = float(m.group(1)), float(m.group(2))
    assert math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0, last
    rows = json.loads((tmp_path / "speed.json").read_text())
    assert {r["name"] for r in rows} == {"latents1_r4", "experts_nodsa", "keras_fit"}
    assert all(r["peak"] > 0 for r in rows)



def test_speed_bench_only_selects_by_substring_or_by_exact_name_with_a_dollar():
    bench = _tool("speed_bench")
    cases = [{"name": n} for n in ("latents1_r64", "latents1_r64_xla", "pixels10_r64", "keras_fit")]
    names = lambda only: [c["name"] for c in bench.select(cases, only)]        # noqa: E731
    assert names([]) == ["latents1_r64", "latents1_r64_xla", "pixels10_r64", "keras_fit"]
    assert names(["latents1_r64"]) == ["latents1_r64", "latents1_r64_xla"]
    assert names(["latents1_r64$"]) == ["latents1_r64"]
    assert names(["r64$", "keras"]) == ["keras_fit"]


def test_speed_bench_only_matching_nothing_is_one_line_naming_the_cases(tmp_path):
    from conftest import run_python
    out = run_python([REPO / "tools" / "speed_bench.py", "--quick", "--only=nonesuch$",
                      f"--out={tmp_path / 'speed.json'}"])
    assert out.returncode != 0
    assert "--only=nonesuch$ matches no case; the cases are: latents1_r4, experts_nodsa, keras_fit" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "speed.json").exists()


def test_speed_bench_costs_every_paper_config_from_a_runs_rates(tmp_path, capsys):
    bench = _tool("speed_bench")
    results = tmp_path / "speed.json"
    results.write_text(json.dumps([
        {"name": "latents1_r256", "headline": True, "flops": {"total": 2e11}, "update": 2.0},
        {"name": "experts_dsa", "size": 32, "img_per_s": 100.0, "train_flops_per_image": 1e9}]))
    bench.print_costs(str(results), str(REPO / "configs"))
    lines = capsys.readouterr().out.splitlines()
    assert "ESP update 100.0 GFLOP/s" in lines[0] and "expert training with DSA 100.0 GFLOP/s" in lines[0]
    rows = {line.split(" | ")[0][2:]: line for line in lines[3:]}
    assert set(rows) == set(bench.PAPER_CONFIGS)
    c10 = bench.config_flops(bench.read_flagfile(str(REPO / "configs" / "cifar10.flags")))
    assert c10["images"] == 560                                     # 14 codes (H/4) x 4 decoders x 10 classes
    # 5,000 iterations x 50 updates at 100 GFLOP/s
    assert rows["cifar10"].split(" | ")[7] == f"{c10['condense'] / 1e11 / 3600:,.0f}"


def test_compare_runs_its_variants_in_process_and_tabulates_them(tmp_path):
    """tools/compare.py parses each variant's command line on its own (cli.parse) and runs the
    pipeline in its own process; a second call resumes the finished variants."""
    from conftest import run_python
    base = tmp_path / "base.flags"
    base.write_text("\n".join(["--method=dm", "--pixels_lr=1.0", "--iterations=2", "--real_per_class=4",
                               "--eval_epochs=2", "--eval_runs=1", "--width=8", "--depth=2", "--baselines=random",
                               "--log_every=1", "--ckpt_every=1", "--nodownload",
                               f"--data_dir={tmp_path / 'tfds'}"]) + "\n")
    args = ["tools/compare.py", f"--flagfile_base={base}", f"--out={tmp_path / 'out'}",
            "--variant=dm2:--ipc=1", "--variant=dm2_ipc2:--ipc=2"]
    out = run_python(args, check=True)
    table = out.stdout[out.stdout.index("| variant |"):]
    assert "| dm2 | dm | convnet3 |" in table and "| dm2_ipc2 | dm | convnet3 |" in table
    assert "| random | random | convnet3 |" in table                  # baselines of the first variant only
    for name in ("dm2", "dm2_ipc2"):
        assert (tmp_path / "out" / name / "eval.json").exists()
    again = run_python(args, check=True)
    assert again.stdout.count("same settings: resuming") == 2
    bad = run_python(["tools/compare.py", f"--flagfile_base={base}", f"--out={tmp_path / 'out'}",
                      "--variant=x:--no_such_flag=1"])
    assert bad.returncode != 0 and "variant x:" in bad.stderr and "no_such_flag" in bad.stderr


def _latent_set(path, decoder_shift, classes=3, codes=4, decoders=2):
    """A finished latent run whose decoder k renders every code shifted by k * decoder_shift."""
    import numpy as np
    path.mkdir()
    rng = np.random.default_rng(0)
    base = rng.normal(size=(classes, codes, 1, 4, 4, 1))
    images = base + decoder_shift * np.arange(decoders).reshape(1, 1, decoders, 1, 1, 1)
    np.savez(path / "synthetic.npz", images=images.reshape(-1, 4, 4, 1).astype(np.float32),
             labels=np.repeat(np.arange(classes), codes * decoders))
    (path / "budget.json").write_text(json.dumps({"num_decoders": decoders, "codes_per_class": codes}))
    return str(path)


def test_render_spread_is_zero_for_copies_and_grows_with_what_the_decoders_change(tmp_path, capsys):
    tool = _tool("render_spread")
    copies = tool.spread(_latent_set(tmp_path / "copies", 0.0))
    assert copies["decoder_spread"] == pytest.approx(0.0, abs=1e-6) and copies["code_spread"] > 0.5
    shifted = tool.spread(_latent_set(tmp_path / "shifted", 2.0))
    assert shifted["decoder_spread"] == pytest.approx(1.0, rel=1e-5)     # +-1 around the mean of 2 decoders
    assert shifted["code_spread"] == pytest.approx(copies["code_spread"], rel=1e-5)
    assert tool.main(["render_spread", str(tmp_path / "shifted")]) == 0
    assert "| 2 | 4 | 1.000 |" in capsys.readouterr().out
    (tmp_path / "pixels").mkdir()
    (tmp_path / "pixels" / "budget.json").write_text("{}")
    (tmp_path / "pixels" / "synthetic.npz").write_bytes(b"")
    assert tool.main(["render_spread", str(tmp_path / "pixels")]) == 2
    assert "not a latent set" in capsys.readouterr().err
