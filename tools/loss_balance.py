r"""How much each ESP loss term moves the synthetic images: gradient norms and their cosine.

    python tools/loss_balance.py --workdir=runs/quickstart [--segments=5]

For the condensed set in a workdir (synthetic.npz) and random segments of its experts, prints
||dL_DM/dx||, ||dL_proj/dx|| (beta = 1), the beta at which beta * L_proj pulls as hard as L_DM,
and cos(dL_DM/dx, dL_proj/dx). Without augmentation, at the segment start theta*_t. Use it to
check whether --beta makes the projection loss matter at all in your setting.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

flags.DEFINE_string("workdir", None, "A finished esp_tf.train workdir.", required=True)
flags.DEFINE_integer("segments", 5, "Random expert segments to average over.")
flags.DEFINE_integer("real_per_class", 64, "Real images per class for the DM means.")
FLAGS = flags.FLAGS


def main(argv):
    import numpy as np
    import tensorflow as tf
    from esp_tf import data as data_lib, esp, models, subspace, workdir
    from esp_tf.trajectories import TrajectoryStore

    run = workdir.parse_flags_file(os.path.join(FLAGS.workdir, "flags.txt"))
    syn = np.load(os.path.join(FLAGS.workdir, "synthetic.npz"))
    real = data_lib.load(run["dataset"], run.get("data_dir") or None)
    net = models.FlatModel(models.build(run["model"], real.image_shape, real.num_classes,
                                        width=int(run["width"]), depth=int(run["depth"])))
    experts_dir = run.get("experts_dir") or os.path.join(FLAGS.workdir, "experts")
    store = TrajectoryStore(experts_dir)
    length, max_start = int(run["segment_length"]), int(run["max_start_epoch"])
    x = tf.constant(syn["images"])
    y = tf.constant(syn["labels"])
    sampler = data_lib.ClassBalancedSampler(real)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(FLAGS.segments):
        k = int(rng.choice(store.completed()))
        t = int(rng.integers(0, max_start))          # exclusive, as subspace.select_segment
        segment = tf.constant(store.read(k, t + length + 1)[t:])
        basis, theta = subspace.basis(segment), segment[0]
        xr, _ = sampler.sample(tf.constant([i, 99], tf.int64), FLAGS.real_per_class)
        means = tf.reduce_mean(tf.reshape(net.features(theta, xr),
                                          [real.num_classes, FLAGS.real_per_class, -1]), 1)
        grads = {}
        for term in ("dm", "proj"):
            # the run's own L_DM reduction; runs from before the flag existed summed (DM's code)
            cfg = esp.ESPConfig(beta=1.0, losses=(term,), dsa=None,
                                dm_reduction=run.get("dm_reduction", "sum"))
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss, _ = esp.outer_loss(net, theta, basis, x, y, means, cfg)
            grads[term] = tape.gradient(loss, x)
        g_dm, g_proj = (float(tf.norm(grads[t])) for t in ("dm", "proj"))
        cos = float(tf.reduce_sum(grads["dm"] * grads["proj"])) / (g_dm * g_proj + 1e-30)
        rows.append((k, t, g_dm, g_proj, g_dm / g_proj, cos))
        print(f"expert {k} epoch {t}: |dL_DM/dx| {g_dm:.4g}  |dL_proj/dx| {g_proj:.4g}  "
              f"balancing beta {g_dm / g_proj:.3g}  cos {cos:+.3f}", flush=True)
    beta = float(run.get("beta", 1e-5))
    mean_ratio = float(np.mean([r[4] for r in rows]))
    print(f"run beta {beta:g}: beta*L_proj pulls {beta / mean_ratio:.3g} as hard as L_DM "
          f"(balancing beta {mean_ratio:.3g}, mean cos {np.mean([r[5] for r in rows]):+.3f})")


if __name__ == "__main__":
    app.run(main)
