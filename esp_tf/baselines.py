"""Real-subset baselines evaluated beside a condensed set: herding (greedy, on a network's
embeddings) next to the random subset (`data.ClassBalancedSampler.random_subset`). The learned
baselines DM and MTT are condensation methods: `esp_tf.methods.dm`, `esp_tf.methods.tm`.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from esp_tf.models import FlatModel


# -- herding ------------------------------------------------------------------------------------
def herding_select(embed_fn, images_by_class, per_class: int, batch_size: int = 256) -> list:
    """Greedy herding: for each class, `per_class` distinct indices in selection order.

    embed_fn maps images [b, ...] to embeddings [b, D] (e.g. ConvNet-3 features of an expert).
    Step k picks the unselected sample whose addition brings the running mean of the selected
    embeddings closest to the class mean mu: argmin_i ||(s + e_i)/k - mu||^2, which equals
    argmin_i ||e_i||^2 + 2 e_i . (s - k mu) (s = sum of the k-1 chosen). Embeds in batches.
    """
    out = []
    for c, images in enumerate(images_by_class):
        n = len(images)
        if per_class > n:
            raise ValueError(f"herding: class {c} has {n} images, {per_class} requested")
        feats = np.concatenate([np.asarray(embed_fn(images[s:s + batch_size]), np.float64)
                                for s in range(0, n, batch_size)]).reshape(n, -1)   # [n, D]
        mu, total = feats.mean(axis=0), np.zeros(feats.shape[1])
        sq = np.sum(feats * feats, axis=1)                                          # [n]
        taken = np.zeros(n, bool)
        chosen = []
        for k in range(1, per_class + 1):
            score = sq + 2.0 * feats @ (total - k * mu)                             # [n]
            score[taken] = np.inf
            i = int(np.argmin(score))
            chosen.append(i)
            taken[i] = True
            total += feats[i]
        out.append(np.asarray(chosen, np.int64))
    return out


def herding_subset(real, net: FlatModel, theta, per_class: int, batch_size: int = 256):
    """Herding baseline of `real` (data.RealData): uint8 images, int32 labels, class-major.

    Same output as `ClassBalancedSampler.random_subset`; embeddings are net.features at theta
    (an expert's last snapshot) on normalised, un-augmented images.
    """
    from esp_tf import data as data_lib                 # late import: data is not needed above
    theta = tf.convert_to_tensor(theta, net.dtype)
    embed = tf.function(lambda x: net.features(theta, data_lib.to_model(real, x)))
    counts = real.train_counts
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    by_class = [real.train_images[o:o + n] for o, n in zip(offsets, counts)]
    picks = herding_select(lambda x: embed(x).numpy(), by_class, per_class, batch_size)
    index = np.concatenate([o + p for o, p in zip(offsets, picks)])
    return real.train_images[index], real.train_labels[index].astype(np.int32)
