r"""How much each ESP loss term moves the synthetic images: gradient norms and their cosine.

    python tools/loss_balance.py --workdir=runs/quickstart [--segments=5]

For the condensed set in a workdir (synthetic.npz) and random segments of its experts, prints
||dL_DM/dx||, ||dL_proj/dx|| (beta = 1), the beta at which beta * L_proj pulls as hard as L_DM,
and cos(dL_DM/dx, dL_proj/dx). Without augmentation, at the segment start theta*_t, with the
run's own DM batch (--real_per_class) and L_DM reduction. Use it to
check whether --beta makes the projection loss matter at all in your setting.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from esp_tf import cli
cli.install()      # --workdir is the run's own flag: the finished run to read
FLAGS = flags.FLAGS

flags.DEFINE_integer("segments", 5, "Random expert segments to average over.")


def main(argv):
    import numpy as np
    import tensorflow as tf
    from esp_tf import data as data_lib, matching, pipeline, subspace, workdir
    from esp_tf.methods import esp

    if not FLAGS.workdir:
        sys.exit("error: --workdir is required (a finished esp_tf.train workdir)")
    try:
        run = pipeline.load_run(FLAGS.workdir)
    except workdir.UserError as e:
        sys.exit(f"error: {e}")
    if run.images is None or run.store is None:
        sys.exit(f"error: {FLAGS.workdir}: needs a finished condensation (synthetic.npz) and its experts")
    s, real, net = run.settings, run.real, run.net
    length, max_start = s.segment_length, s.max_start_epoch
    x, y = tf.constant(run.images), tf.constant(run.labels)
    sampler = data_lib.ClassBalancedSampler(real)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(FLAGS.segments):
        k = int(rng.choice(run.store.completed()))
        t = int(rng.integers(0, max_start))          # exclusive, as subspace.select_segment
        segment = tf.constant(run.store.read(k, t + length + 1)[t:])
        basis, theta = subspace.basis(segment), segment[0]
        # the run's own DM batch and L_DM reduction, no augmentation
        means = matching.real_class_means(net, theta, sampler, tf.constant([i, 99], tf.int64),
                                          s.real_per_class, real.num_classes, None)
        grads = {}
        for term in esp.LOSS_TERMS:
            cfg = esp.ESPConfig(beta=1.0, losses=(term,), dsa=None, dm_reduction=s.dm_reduction)
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss, _ = esp.outer_loss(net, theta, basis, x, y, means, cfg)
            grads[term] = tape.gradient(loss, x)
        g_dm, g_proj = (float(tf.norm(grads[t])) for t in ("dm", "proj"))
        cos = float(tf.reduce_sum(grads["dm"] * grads["proj"])) / (g_dm * g_proj + 1e-30)
        rows.append((k, t, g_dm, g_proj, g_dm / g_proj, cos))
        print(f"expert {k} epoch {t}: |dL_DM/dx| {g_dm:.4g}  |dL_proj/dx| {g_proj:.4g}  "
              f"balancing beta {g_dm / g_proj:.3g}  cos {cos:+.3f}", flush=True)
    mean_ratio = float(np.mean([r[4] for r in rows]))
    print(f"run beta {s.beta:g}: beta*L_proj pulls {s.beta / mean_ratio:.3g} as hard as L_DM "
          f"(balancing beta {mean_ratio:.3g}, mean cos {np.mean([r[5] for r in rows]):+.3f})")


if __name__ == "__main__":
    app.run(main)
