r"""Accuracy versus synthetic batch size for the sliced-batch ESP variant (the paper's Figure 8).

    python tools/batch_bench.py --flagfile_base=configs/quickstart.flags --param=latents \
        --batches=10,30,60,0 --out=runs/batch_bench

For each batch size k (0 = every rendered image, the paper's unbiased setting) it runs
`python -m esp_tf.train --flagfile=<base> --param=<param> --syn_batch=k --workdir=<out>/b<k>`
(experts shared through the flagfile's --experts_dir; finished runs resume instead of rerunning),
then prints a table of k vs ConvNet-3 accuracy and writes <out>/batch_bench.png.
The slice is class-balanced and random per update; see chunks.class_balanced_slice.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

flags.DEFINE_string("flagfile_base", "configs/quickstart.flags", "Flagfile every run starts from.")
flags.DEFINE_string("param", "latents", "pixels or latents (latents render more images than IPC).")
flags.DEFINE_list("batches", ["10", "30", "60", "0"], "Synthetic batch sizes; 0 = all images.")
flags.DEFINE_string("out", "runs/batch_bench", "Parent directory of the runs.")
flags.DEFINE_list("extra", [], "Flags added to every run, e.g. --extra=--eval_runs=3,--iterations=20.")
FLAGS = flags.FLAGS


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [("all" if k == 0 else str(k)) for k, _, _ in rows]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.errorbar(range(len(rows)), [m for _, m, _ in rows], yerr=[s for _, _, s in rows], marker="o")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel("synthetic images per update")
    ax.set_ylabel("ConvNet-3 test accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    rows = []
    for k in (int(b) for b in FLAGS.batches):
        work = os.path.join(FLAGS.out, f"b{k}")
        cmd = [sys.executable, "-m", "esp_tf.train", f"--flagfile={FLAGS.flagfile_base}",
               f"--workdir={work}", f"--param={FLAGS.param}", f"--syn_batch={k}", "--baselines="]
        cmd += list(FLAGS.extra)
        print("$ " + " ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"run with syn_batch={k} failed")
        with open(os.path.join(work, "eval.json")) as f:
            cell = json.load(f)["esp"]["convnet3"]
        with open(os.path.join(work, "budget.json")) as f:
            total = json.load(f)["images_per_class"]
        rows.append((k, cell["mean"], cell["std"]))
        print(f"batch {k or 'all'} of {total} per class x classes: {cell['mean']:.2f} +- {cell['std']:.2f}",
              flush=True)
    rows.sort(key=lambda r: r[0] if r[0] else float("inf"))     # small to large, "all" last
    print("\n| synthetic batch | accuracy (%) |\n|---|---|")
    for k, mean, std in rows:
        print(f"| {k or 'all'} | {mean:.2f} +- {std:.2f} |")
    os.makedirs(FLAGS.out, exist_ok=True)
    _plot(rows, os.path.join(FLAGS.out, "batch_bench.png"))
    print(f"plot: {os.path.join(FLAGS.out, 'batch_bench.png')}")


if __name__ == "__main__":
    app.run(main)
