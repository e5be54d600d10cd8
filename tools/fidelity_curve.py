r"""Accuracy against compute for finished condensation runs: which method gives the best set for
the compute a user has.

    python tools/fidelity_curve.py --out=fidelity.png runs/fidelity/*/
    python tools/fidelity_curve.py --points=docs/fidelity_points.json --record --out=... runs/fidelity/new/

Each argument is a workdir of `esp_tf.train` (flags.txt, metrics.jsonl, eval.json). For each
one this reads the method, the synthetic updates made, the condensation wall-clock (the sum of
`seconds_per_update` over the logged updates) and the evaluation accuracy (validation where the
run held out --val_per_class, and test), prints one Markdown row per run, and plots accuracy
against updates and against seconds, one series per method (ESP, DM, TM) and number of expert trajectories
(flags.txt's --num_experts; a method that reads no trajectories, DM, counts none). Baselines
evaluated beside a run (random, herding) are not plotted.

Workdirs do not outlive the machine they ran on, so a curve is built over sessions in a points
file (--points, JSON): its points are printed and plotted with those of the workdirs given, and
--record adds the workdirs' points to it (each with the commit it was measured at, from
flags.txt's directory's git checkout, and the workdir's name; a point of the same name, dataset
and IPC is replaced). Every point records its dataset, IPC, evaluation epochs and renders per class;
--dataset and --ipc choose the points printed and plotted.
"""
from __future__ import annotations

import io
import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags (defined only when run as a program, so tests can import
    this module beside others that own flags of the same name)."""
    flags.DEFINE_string("out", "fidelity_curve.png", "PNG plot path.")
    flags.DEFINE_string("arch", None, "Evaluation architecture to read (default: the only one in each eval.json).")
    flags.DEFINE_string("points", None, "JSON file of points measured earlier, plotted with the workdirs' ones.")
    flags.DEFINE_bool("record", False, "Add the workdirs' points to --points (replacing same-named ones).")
    flags.DEFINE_string("commit", None, "Commit the recorded points were measured at (default: git HEAD here).")
    flags.DEFINE_string("dataset", "cifar10", "Print and plot only the points of this dataset.")
    flags.DEFINE_integer("ipc", 1, "Print and plot only the points of this IPC.")


def run_point(workdir: str, arch: str | None = None) -> dict:
    """Compute and accuracy of one finished run (raises ValueError naming what is missing)."""
    from esp_tf import methods, workdir as wd
    paths = {name: os.path.join(workdir, name) for name in ("flags.txt", "metrics.jsonl", "eval.json")}
    missing = [name for name, p in paths.items() if not os.path.exists(p)]
    if missing:
        raise ValueError(f"{workdir}: not a finished run ({', '.join(missing)} missing)")
    run = wd.parse_flags_file(paths["flags.txt"])
    method = run.get("method", "esp")
    rows = wd.read_jsonl(paths["metrics.jsonl"], required=("updates", "seconds_per_update"))
    seconds, last = 0.0, 0
    for row in rows:                       # each row averages the updates since the previous one
        seconds += row["seconds_per_update"] * (row["updates"] - last)
        last = row["updates"]
    cells = (wd.read_json(paths["eval.json"]) or {}).get(method, {})
    if not cells:
        raise ValueError(f"{workdir}: eval.json has no {method} result")
    if arch is None:
        if len(cells) != 1:
            raise ValueError(f"{workdir}: several architectures ({', '.join(cells)}); pass --arch")
        arch = next(iter(cells))
    cell = cells[arch]
    uses_experts = methods.get(method).needs_trajectories      # DM draws random networks instead
    experts = int(run["num_experts"]) if uses_experts and "num_experts" in run else None
    budget = wd.read_json(os.path.join(workdir, "budget.json")) or {}
    return {"workdir": workdir.rstrip("/"), "method": method, "param": run.get("param", "pixels"),
            "dataset": run.get("dataset"), "ipc": int(run["ipc"]) if "ipc" in run else None,
            "eval_epochs": int(run["eval_epochs"]) if "eval_epochs" in run else None,
            "renders_per_class": budget.get("images_per_class"),
            "experts": experts,
            "updates": last, "seconds": seconds, "arch": arch, "test": cell["mean"], "test_std": cell["std"],
            "val": cell.get("val_mean"), "val_std": cell.get("val_std"), "runs": len(cell["accuracies"])}


def read_points(path: str | None) -> list[dict]:
    """The points of a --points file ([] when there is none yet)."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["points"]


def record_points(path: str, new: list[dict], commit: str) -> list[dict]:
    """Adds `new` (each tagged with `commit` and named by its workdir's basename) to the points
    file at `path`, replacing points of the same name, dataset and IPC; returns all points."""
    from esp_tf import workdir as wd
    tagged = [{**p, "name": os.path.basename(p["workdir"]), "commit": commit} for p in new]
    key = lambda p: (p.get("name"), p.get("dataset", "cifar10"), p.get("ipc", 1))   # noqa: E731
    keys = {key(p) for p in tagged}
    points = [p for p in read_points(path) if key(p) not in keys] + tagged
    wd.write_json(path, {"points": points})
    return points


def series(point: dict) -> str:
    """The plot series of a point: its method, its experts where it used any, and its renders
    per class (the set's design) where recorded."""
    experts, renders = point.get("experts"), point.get("renders_per_class")
    name = point["method"] if experts is None else f"{point['method']}, {experts} experts"
    return name if renders is None else f"{name}, {renders} renders/class"


def plot(points: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from esp_tf import workdir as wd

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, key, label in ((axes[0], "updates", "synthetic updates"),
                           (axes[1], "seconds", "condensation wall-clock (s, this machine)")):
        for name in sorted({series(p) for p in points}):
            pts = sorted((p for p in points if series(p) == name), key=lambda p: p[key])
            line = ax.errorbar([p[key] for p in pts], [p["test"] for p in pts], [p["test_std"] for p in pts],
                               fmt="o-", capsize=3, label=f"{name}: test")
            val = [p for p in pts if p["val"] is not None]
            if val:
                ax.plot([p[key] for p in val], [p["val"] for p in val], "x--", color=line[0].get_color(),
                        label=f"{name}: validation")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()     # one legend below both panels
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) + 2) // 3), 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    wd.atomic_write_bytes(path, buf.getvalue())


def main(argv):
    if len(argv) < 2 and not FLAGS.points:
        sys.exit("usage: fidelity_curve.py [--out=plot.png] [--points=file.json [--record]] <workdir> ...")
    try:
        new = [run_point(w, FLAGS.arch) for w in argv[1:]]
    except ValueError as e:
        sys.exit(f"error: {e}")
    if FLAGS.record:
        if not FLAGS.points:
            sys.exit("error: --record needs --points=<file>")
        import subprocess
        commit = FLAGS.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                text=True).stdout.strip() or "unknown"
        points = record_points(FLAGS.points, new, commit)
    else:
        new_names = {os.path.basename(p["workdir"]) for p in new}
        points = [p for p in read_points(FLAGS.points) if p.get("name") not in new_names] + new
    points = [p for p in points if p.get("dataset") == FLAGS.dataset and p.get("ipc") == FLAGS.ipc]
    if not points:
        sys.exit(f"error: no point of {FLAGS.dataset} at IPC {FLAGS.ipc} (--dataset, --ipc)")
    print(f"{FLAGS.dataset}, IPC {FLAGS.ipc}; eval epochs and renders per class in the last columns")
    print("| run | method | experts | param | updates | seconds | validation (%) | test (%) | runs | commit "
          "| eval epochs | renders/class |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in sorted(points, key=lambda p: (p["method"], p.get("experts") or 0, p["updates"])):
        val = f"{p['val']:.2f} +- {p['val_std']:.2f}" if p["val"] is not None else "-"
        experts = "-" if p.get("experts") is None else p["experts"]
        print(f"| {os.path.basename(p['workdir'])} | {p['method']} | {experts} | {p['param']} | {p['updates']} | "
              f"{p['seconds']:.0f} | {val} | {p['test']:.2f} +- {p['test_std']:.2f} | {p['runs']} | "
              f"{p.get('commit', 'this checkout')} | {p.get('eval_epochs') or '-'} | "
              f"{p.get('renders_per_class') or '-'} |")
    plot(points, FLAGS.out)
    print(f"plot: {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
