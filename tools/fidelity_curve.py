r"""Accuracy against compute for finished condensation runs: which method gives the best set for
the compute a user has.

    python tools/fidelity_curve.py --out=fidelity.png runs/fidelity/*/

Each argument is a workdir of `esp_tf.train` (flags.txt, metrics.jsonl, eval.json). For each
one this reads the method, the synthetic updates made, the condensation wall-clock (the sum of
`seconds_per_update` over the logged updates) and the evaluation accuracy (validation where the
run held out --val_per_class, and test), prints one Markdown row per run, and plots accuracy
against updates and against seconds, one series per method (ESP, DM, TM). Baselines evaluated
beside a run (random, herding) are not plotted.
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


def run_point(workdir: str, arch: str | None = None) -> dict:
    """Compute and accuracy of one finished run (raises ValueError naming what is missing)."""
    from esp_tf import workdir as wd
    paths = {name: os.path.join(workdir, name) for name in ("flags.txt", "metrics.jsonl", "eval.json")}
    missing = [name for name, p in paths.items() if not os.path.exists(p)]
    if missing:
        raise ValueError(f"{workdir}: not a finished run ({', '.join(missing)} missing)")
    run = wd.parse_flags_file(paths["flags.txt"])
    method = run.get("method", "esp")
    with open(paths["metrics.jsonl"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
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
    return {"workdir": workdir.rstrip("/"), "method": method, "param": run.get("param", "pixels"),
            "updates": last, "seconds": seconds, "arch": arch, "test": cell["mean"], "test_std": cell["std"],
            "val": cell.get("val_mean"), "val_std": cell.get("val_std"), "runs": len(cell["accuracies"])}


def plot(points: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from esp_tf import workdir as wd

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "updates", "synthetic updates"),
                           (axes[1], "seconds", "condensation wall-clock (s, this machine)")):
        for method in sorted({p["method"] for p in points}):
            pts = sorted((p for p in points if p["method"] == method), key=lambda p: p[key])
            ax.errorbar([p[key] for p in pts], [p["test"] for p in pts], [p["test_std"] for p in pts],
                        fmt="o-", capsize=3, label=f"{method} test")
            val = [p for p in pts if p["val"] is not None]
            if val:
                ax.plot([p[key] for p in val], [p["val"] for p in val], "x--", label=f"{method} validation")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    wd.atomic_write_bytes(path, buf.getvalue())


def main(argv):
    if len(argv) < 2:
        sys.exit("usage: fidelity_curve.py [--out=plot.png] <workdir> [<workdir> ...]")
    try:
        points = [run_point(w, FLAGS.arch) for w in argv[1:]]
    except ValueError as e:
        sys.exit(f"error: {e}")
    print("| run | method | param | updates | seconds | validation (%) | test (%) | runs |")
    print("|---|---|---|---|---|---|---|---|")
    for p in points:
        val = f"{p['val']:.2f} +- {p['val_std']:.2f}" if p["val"] is not None else "-"
        print(f"| {os.path.basename(p['workdir'])} | {p['method']} | {p['param']} | {p['updates']} | "
              f"{p['seconds']:.0f} | {val} | {p['test']:.2f} +- {p['test_std']:.2f} | {p['runs']} |")
    plot(points, FLAGS.out)
    print(f"plot: {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
