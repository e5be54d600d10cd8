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


def real_class_means(net, theta, sampler, seed, per_class: int, num_classes: int, params) -> tf.Tensor:
    """Mean embedding [C, D] of a fresh class-balanced real batch at theta, gradient stopped.

    `net` is a models.FlatModel. Classes are embedded one at a time (map_fn) so memory is that
    of one class batch.
    """
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
