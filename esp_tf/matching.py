"""Distribution-matching pieces shared by the condensation methods (ESP's L_DM, the DM baseline,
MTT's student batches): Siamese augmentation draws, real class-mean embeddings, the DM loss, and
grouped optimizer updates. No I/O, no flags.
"""
from __future__ import annotations

import tensorflow as tf

from esp_tf import augment
from esp_tf.choices import DM_REDUCTIONS  # noqa: F401  (named once, TF-free; matching.DM_REDUCTIONS)

# How the DM loss reduces the per-class squared distances of mean embeddings [C, D]:
#   sum          over classes and features (DM's reference code);
#   class_mean   mean over classes of the squared L2 norm (ESP's eq. 8 as the paper writes it);
#   element_mean mean over classes and features (the usual MSE reduction).
# The ESP paper's beta = 1e-5 balances L_DM against L_proj only under some unstated
# convention, so the convention is a setting and ESP runs log the measured pull ratio.


def dm_loss(real_means: tf.Tensor, syn_features: tf.Tensor, syn_labels: tf.Tensor,
            reduction: str = "sum") -> tf.Tensor:
    """||mean real embedding - mean synthetic embedding||^2 per class, reduced over classes and
    features by `reduction` (DM_REDUCTIONS; "sum" is DM's code, "class_mean" ESP's eq. 8)."""
    num_classes = tf.shape(real_means)[0]
    syn_means = tf.math.unsorted_segment_mean(syn_features, syn_labels, num_classes)  # [C, D]
    squared = tf.square(real_means - syn_means)                                       # [C, D]
    if reduction == "class_mean":
        return tf.reduce_sum(squared) / tf.cast(num_classes, squared.dtype)
    if reduction == "element_mean":
        return tf.reduce_mean(squared)
    if reduction != "sum":
        raise ValueError(f"reduction must be one of {DM_REDUCTIONS}, got {reduction!r}")
    return tf.reduce_sum(squared)


def siamese_params(seed, num_classes: int, image_size, dsa):
    """One DSA parameter draw per class ([C]-leading dict), or None when dsa is None."""
    if dsa is None:
        return None
    return augment.sample(seed, num_classes, tuple(image_size), dsa)


def augment_by_class(x, labels, params):
    """Augments x [B, H, W, Ch] with the draw of each sample's class (identity if params is None)."""
    return x if params is None else augment.apply(x, augment.take(params, labels))


# Real images per forward pass of a whole-class mean (--real_per_class=0): 512 at 32x32, scaled
# by the image area. Forward passes only (the real side carries no gradient), so memory is that
# of one such batch's activations.
WHOLE_CLASS_CHUNK_PIXELS = 512 * 32 * 32


def whole_class_sums(net, theta, sampler, num_classes: int, params, part=(0, 1)) -> tf.Tensor:
    """Sum of the embeddings [C, D] of EVERY real training image of each class at theta (with
    the class's DSA draw), gradient stopped; `part=(i, n)` sums only chunks k = i, i+n, ... of
    each class (n replicas together cover every chunk once). Classes one at a time, each in
    chunks of WHOLE_CLASS_CHUNK_PIXELS pixels; rows past a class's end are masked out."""
    shape = sampler.image_shape
    chunk = max(1, WHOLE_CLASS_CHUNK_PIXELS // (int(shape[0]) * int(shape[1])))
    chunk = min(chunk, sampler.max_class_count)
    chunks = -(-sampler.max_class_count // chunk)                    # ceil
    index, count = part
    mine = len(range(index, chunks, count))

    def one_class(c):
        def body(j, acc):
            x, mask = sampler.class_rows(c, (index + j * count) * chunk, chunk)
            y = tf.fill([chunk], c)
            feats = net.features(theta, augment_by_class(x, y, params))
            return j + 1, acc + tf.reduce_sum(feats * tf.cast(mask, feats.dtype)[:, None], axis=0)

        init = (tf.constant(0), tf.zeros([net.feature_dim], theta.dtype))
        return tf.while_loop(lambda j, acc: j < mine, body, init, parallel_iterations=1)[1]

    sums = tf.map_fn(one_class, tf.range(num_classes, dtype=tf.int32), fn_output_signature=theta.dtype,
                     parallel_iterations=1)
    return tf.stop_gradient(sums)


def real_class_means(net, theta, sampler, seed, per_class: int, num_classes: int, params) -> tf.Tensor:
    """Mean embedding [C, D] of a fresh class-balanced real batch at theta, gradient stopped;
    per_class 0: of every real image of the class (`whole_class_sums`; no draw, seed unused).

    `net` is a models.FlatModel. Classes are embedded one at a time (map_fn) so memory is that
    of one class batch.
    """
    if per_class == 0:
        counts = tf.cast(sampler.class_counts, theta.dtype)[:, None]
        return whole_class_sums(net, theta, sampler, num_classes, params) / counts
    x, y = sampler.sample(seed, per_class)                        # [C*r, H, W, Ch], [C*r]
    x = tf.reshape(x, [num_classes, per_class, *x.shape[1:]])     # [C, r, H, W, Ch]
    y = tf.reshape(y, [num_classes, per_class])                   # [C, r]

    def one_class(args):
        xc, yc = args
        return tf.reduce_mean(net.features(theta, augment_by_class(xc, yc, params)), axis=0)

    means = tf.map_fn(one_class, (x, y), fn_output_signature=theta.dtype, parallel_iterations=1)
    return tf.stop_gradient(means)


def ordered_variables(groups: dict) -> list:
    """The variables of `groups` (name -> list), in the order `apply_grads` expects."""
    return [v for name in sorted(groups) for v in groups[name]]


def apply_grads(optimizers: dict, groups: dict, grads: list) -> None:
    """Applies grads (ordered as `ordered_variables(groups)`) group by group."""
    start = 0
    for name in sorted(groups):
        n = len(groups[name])
        optimizers[name].apply(grads[start:start + n], groups[name])
        start += n


def dense(grads, variables):
    """Gradients with None (a variable the loss does not reach) replaced by zeros."""
    return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]


def build_optimizers(optimizers: dict, groups: dict, extra=()) -> None:
    """Checks there is one optimizer per group (and per name in `extra`), and builds each on its
    group's variables (extra names are built by their owner)."""
    names = [*groups, *extra]
    if set(optimizers) != set(names):
        raise ValueError(f"need one optimizer for each of {sorted(names)}, got {sorted(optimizers)}")
    for name in groups:
        optimizers[name].build(groups[name])
