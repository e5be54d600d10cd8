"""The ESP synthetic-update step (paper section 3, Algorithm 1). No I/O, no flags.

One call = one inner step n of Algorithm 1 for the current expert subspace E:

    x_syn, y_syn = synthetic.render()                    # every synthetic image, no slicing
    G     = d CE(f(theta, A(x_syn)), y_syn) / d theta    # eq. 4, recorded by the outer tape
    G_in  = E E^T G                                      # eq. 5
    L     = L_DM(theta) + beta * ||G - G_in||_1          # eqs. 7-9
    synthetic <- Adam(dL / d synthetic)                  # eq. 10, the only variable update
    theta <- theta - alpha * G_in                        # eq. 6, a tensor, gradient stopped

The student theta is a plain tensor driven through `FlatModel` (stateless_call), so each
call builds and frees its own graph: memory does not grow with the number of inner steps.
A is differentiable Siamese augmentation: the real and synthetic images of a class share
one parameter draw per call.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

from esp_tf import augment, subspace
from esp_tf.models import FlatModel

LOSSES = ("proj", "dm")
# How L_DM reduces the per-class squared distances of mean embeddings [C, D]:
#   sum          over classes and features (DM's reference code);
#   class_mean   mean over classes of the squared L2 norm (eq. 8 as the paper writes it);
#   element_mean mean over classes and features (the usual MSE reduction).
# The paper's beta = 1e-5 balances L_DM against L_proj only under some unstated convention,
# so the convention is a setting and every run logs the measured pull ratio (`pull`). The DM
# baseline keeps DM's own "sum" (its SGD lr of 1.0 assumes it).
DM_REDUCTIONS = ("sum", "class_mean", "element_mean")


@dataclasses.dataclass(frozen=True)
class ESPConfig:
    beta: float = 1e-5               # weight of the projection loss (paper 4.2)
    inner_lr: float = 0.1            # alpha: constant lr of the projected SGD student (paper 4.2)
    losses: tuple = LOSSES           # ("proj",), ("dm",) or both: the paper's Table 4 ablation
    real_per_class: int = 256        # real images per class for L_DM per update (DM's default)
    dsa: augment.DSAConfig | None = augment.DSAConfig()   # None disables augmentation
    batch_syn: int | None = None     # None: every synthetic image each update (the paper's point);
    #                                  k: a random class-balanced slice of k images (Figure 8 study)
    dm_reduction: str = "element_mean"   # see DM_REDUCTIONS; chosen on a validation split: at
    #                                  beta 1e-5 it lets L_proj pull about as hard as L_DM
    #                                  (pull ~1 vs ~1e-4 under "sum"), and scored 41.65 +- 0.40
    #                                  against 40.05 +- 0.37 (CIFAR-10 IPC 1 latents, 3 seeds)

    def __post_init__(self):
        if self.dm_reduction not in DM_REDUCTIONS:
            raise ValueError(f"dm_reduction must be one of {DM_REDUCTIONS}, got {self.dm_reduction!r}")
        if self.batch_syn is not None and self.batch_syn < 1:
            raise ValueError(f"batch_syn must be None or >= 1, got {self.batch_syn}")
        bad = [l for l in self.losses if l not in LOSSES]
        if bad or not self.losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {self.losses}")
        if self.real_per_class < 1 and "dm" in self.losses:
            raise ValueError("real_per_class must be >= 1 when the dm loss is used")


def class_balanced_slice(x, y, num_classes: int, per_class: int, seed):
    """per_class random images of each class from a class-major set x [C*M, ...], y [C*M]."""
    m = x.shape[0] // num_classes
    keys = tf.random.stateless_uniform([num_classes, m], seed, minval=0, maxval=2**31 - 1, dtype=tf.int32,
                                       alg="philox")        # int Philox: the same draw under XLA
    pick = tf.argsort(keys, axis=1)[:, :per_class]                          # [C, k] within-class
    index = tf.reshape(pick + tf.range(num_classes)[:, None] * m, [-1])     # [C*k] global
    return tf.gather(x, index), tf.gather(y, index)


def dm_loss(real_means: tf.Tensor, syn_features: tf.Tensor, syn_labels: tf.Tensor,
            reduction: str = "sum") -> tf.Tensor:
    """||mean real embedding - mean synthetic embedding||^2 per class, reduced over classes and
    features by `reduction` (DM_REDUCTIONS; "sum" is DM's code, "class_mean" eq. 8)."""
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


# -- Siamese augmentation and DM pieces, shared with the baselines (DMStep, TMStep) ----------
def siamese_params(seed, num_classes: int, image_size, dsa):
    """One DSA parameter draw per class ([C]-leading dict), or None when dsa is None."""
    if dsa is None:
        return None
    return augment.sample(seed, num_classes, tuple(image_size), dsa)


def augment_by_class(x, labels, params):
    """Augments x [B, H, W, Ch] with the draw of each sample's class (identity if params is None)."""
    return x if params is None else augment.apply(x, augment.take(params, labels))


def real_class_means(net: FlatModel, theta, sampler, seed, per_class: int, num_classes: int,
                     params) -> tf.Tensor:
    """Mean embedding [C, D] of a fresh class-balanced real batch at theta, gradient stopped.

    Classes are embedded one at a time (map_fn) so memory is that of one class batch.
    """
    x, y = sampler.sample(seed, per_class)                        # [C*r, H, W, Ch], [C*r]
    x = tf.reshape(x, [num_classes, per_class, *x.shape[1:]])     # [C, r, H, W, Ch]
    y = tf.reshape(y, [num_classes, per_class])                   # [C, r]

    def one_class(args):
        xc, yc = args
        return tf.reduce_mean(net.features(theta, augment_by_class(xc, yc, params)), axis=0)

    means = tf.map_fn(one_class, (x, y), fn_output_signature=theta.dtype, parallel_iterations=1)
    return tf.stop_gradient(means)


def apply_grads(optimizers: dict, groups: dict, grads: list) -> None:
    """Applies grads (ordered as sorted(groups), then each group's variables) group by group."""
    start = 0
    for name in sorted(groups):
        n = len(groups[name])
        optimizers[name].apply(grads[start:start + n], groups[name])
        start += n


def outer_loss(net: FlatModel, theta, basis, x_aug, y_syn, real_means, config: ESPConfig):
    """L_out = L_DM + beta * ||G - E E^T G||_1 at theta for the (augmented) synthetic images.

    Differentiable w.r.t. x_aug (second order through G). real_means [C, D] is the
    gradient-stopped mean real embedding per class (unused without the dm loss).
    Returns (loss, aux) where aux holds the terms, diagnostics and G_in = E E^T G.
    """
    with tf.GradientTape() as inner:
        inner.watch(theta)
        feats, logits = net.features_and_logits(theta, x_aug)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y_syn, logits))
    g = inner.gradient(ce, theta)                                       # [P]  eq. 4
    g_in = subspace.project(basis, g)                                   # [P]  eq. 5
    proj = tf.reduce_sum(tf.abs(g - g_in))                              #      eq. 7
    zero = tf.zeros([], theta.dtype)
    match = dm_loss(real_means, feats, y_syn, config.dm_reduction) if "dm" in config.losses else zero  # eq. 8
    loss = zero
    if "dm" in config.losses:
        loss += match
    if "proj" in config.losses:
        loss += config.beta * proj                                      #      eq. 9
    acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y_syn),
                                 theta.dtype))
    g_norm = tf.norm(g)
    return loss, {"dm": match, "proj": proj, "ce": ce, "syn_acc": acc, "grad_norm": g_norm,
                  "in_subspace": tf.norm(g_in) / (g_norm + 1e-12), "g_in": g_in}


def _dense(grads, variables):
    """Gradients with None (a variable the loss does not reach) replaced by zeros."""
    return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]


class ESPStep:
    """Compiled ESP update: `theta_next, metrics = step(theta, basis, seed)`.

    theta [P] float32, basis E [P, S] orthonormal, seed [2] int. Traced once for fixed shapes.
    `optimizers` maps each of `synthetic.variable_groups()` to its Keras optimizer.
    """

    def __init__(self, net: FlatModel, synthetic, optimizers: dict, sampler, config: ESPConfig,
                 *, jit_compile: bool = False):
        self.net, self.synthetic, self.sampler, self.config = net, synthetic, sampler, config
        self.groups = synthetic.variable_groups()
        if set(optimizers) != set(self.groups):
            raise ValueError(f"need one optimizer per group {sorted(self.groups)}, got {sorted(optimizers)}")
        self.optimizers = optimizers
        for name, opt in optimizers.items():
            opt.build(self.groups[name])
        if config.batch_syn is not None:
            c, m = synthetic.num_classes, synthetic.images_per_class
            if config.batch_syn % c or not 0 < config.batch_syn // c <= m:
                raise ValueError(f"batch_syn {config.batch_syn} must be a multiple of the {c} classes "
                                 f"and at most {c * m} (the images rendered)")
            self._per_class = config.batch_syn // c
        self.trace_count = 0
        self._compiled = tf.function(self._step, jit_compile=jit_compile)

    def __call__(self, theta, basis, seed):
        return self._compiled(theta, basis, tf.cast(seed, tf.int64))

    def _step(self, theta, basis, seed):
        self.trace_count += 1       # Python side effect: runs only while tracing
        cfg = self.config
        # a fixed algorithm: XLA would otherwise auto-select another one and draw other numbers
        aug_seed, real_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg="philox"))
        num_classes = self.synthetic.num_classes
        # one draw per class, shared by its real and synthetic images
        params = siamese_params(aug_seed, num_classes, self.synthetic.image_shape[:2], cfg.dsa)
        real_means = None
        if "dm" in cfg.losses:
            real_means = real_class_means(self.net, theta, self.sampler, real_seed,
                                          cfg.real_per_class, num_classes, params)

        variables = [v for name in sorted(self.groups) for v in self.groups[name]]
        both = len(cfg.losses) == 2
        with tf.GradientTape(persistent=both) as outer:
            x_syn, y_syn = self.synthetic.render()
            if cfg.batch_syn is not None:      # sliced-batch variant: a biased, cheaper gradient
                slice_seed = tf.random.experimental.stateless_fold_in(seed, 7, alg="philox")
                x_syn, y_syn = class_balanced_slice(x_syn, y_syn, num_classes, self._per_class, slice_seed)
            x_aug = augment_by_class(x_syn, y_syn, params)
            loss, aux = outer_loss(self.net, theta, basis, x_aug, y_syn, real_means, cfg)
            weighted_proj = cfg.beta * aux["proj"]
        if both:
            # The two terms' gradients separately (their sum is the update): the only extra cost
            # is a second first-order backward through the DM features. pull = how hard beta *
            # L_proj pulls on the synthetic variables against L_DM (1: equally).
            g_dm = _dense(outer.gradient(aux["dm"], variables), variables)
            g_proj = _dense(outer.gradient(weighted_proj, variables), variables)
            del outer
            grads = [a + b for a, b in zip(g_dm, g_proj)]
            aux["pull"] = tf.linalg.global_norm(g_proj) / (tf.linalg.global_norm(g_dm) + 1e-30)
        else:
            grads = outer.gradient(loss, variables)
        apply_grads(self.optimizers, self.groups, grads)
        theta_next = theta - cfg.inner_lr * tf.stop_gradient(aux.pop("g_in"))   # eq. 6
        return theta_next, {"loss": loss, **aux}
