"""The baselines ESP is compared with: distribution matching (DM), trajectory matching (MTT), herding.

The two learned baselines are compiled steps with the calling style of `esp.ESPStep`: the
constructor takes (net, synthetic, optimizers, sampler, config), `__call__` updates the
synthetic set once and returns metrics, and the step is traced once for fixed shapes
(`trace_count` counts traces).

* `DMStep`  - DM alone: every call draws a FRESH random network theta = net.init(seed) and
  minimises sum_c ||mean real embedding_c - mean synthetic embedding_c||^2 (`esp.dm_loss`),
  the real and synthetic images of a class sharing one DSA draw (as in `ESPStep`).
* `TMStep`  - MTT: the student starts at theta*_t, takes N SGD steps on the synthetic set with a
  learnable lr, and the loss ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 is
  differentiated through the WHOLE unrolled graph of N steps. That graph is the point of the
  comparison: its memory grows with N, where ESP's (one step at a time) does not.
* `herding_select` - greedy herding of real images per class on a network's embeddings, the
  classic coreset baseline beside the random subset.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from esp_tf import augment
from esp_tf.esp import apply_grads as _apply, augment_by_class, dm_loss, real_class_means, siamese_params
from esp_tf.models import FlatModel


def _check_optimizers(optimizers: dict, names) -> None:
    if set(optimizers) != set(names):
        raise ValueError(f"need one optimizer for each of {sorted(names)}, got {sorted(optimizers)}")


# -- DM -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DMConfig:
    real_per_class: int = 256        # real images per class per update (DM's batch_real)
    dsa: augment.DSAConfig | None = augment.DSAConfig()   # DM uses DSA; None disables it

    def __post_init__(self):
        if self.real_per_class < 1:
            raise ValueError(f"real_per_class must be >= 1, got {self.real_per_class}")


class DMStep:
    """Compiled DM update: `metrics = step(seed)`; seed [2] int picks the net, the DSA draw, the reals.

    DM itself trains pixels with SGD(lr 1.0, momentum 0.5); any Keras optimizer per group works.
    """

    def __init__(self, net: FlatModel, synthetic, optimizers: dict, sampler, config: DMConfig = DMConfig(),
                 *, jit_compile: bool = False):
        self.net, self.synthetic, self.sampler, self.config = net, synthetic, sampler, config
        self.groups = synthetic.variable_groups()
        _check_optimizers(optimizers, self.groups)
        self.optimizers = optimizers
        for name, opt in optimizers.items():
            opt.build(self.groups[name])
        self.trace_count = 0
        self._compiled = tf.function(self._step, jit_compile=jit_compile)
        self._evaluate = tf.function(self._loss)
        # The fresh network is drawn outside the (possibly XLA-compiled) step: XLA's float
        # stateless_uniform differs from the CPU kernel's, and the same seed must give the
        # same network either way. It is one device-side op, no host round-trip.
        self._theta_for = tf.function(lambda seed: self.net.init(self._seeds(seed)[0]))

    def __call__(self, seed):
        seed = tf.cast(seed, tf.int64)
        return self._compiled(seed, self._theta_for(seed))

    def evaluate(self, seed) -> tf.Tensor:
        """The DM loss `step(seed)` would minimise, without updating anything."""
        seed = tf.cast(seed, tf.int64)
        return self._evaluate(seed, self._theta_for(seed))

    def theta_for(self, seed) -> tf.Tensor:
        """The random network [P] that `step(seed)` embeds with (a fresh init per seed)."""
        return self._theta_for(tf.cast(seed, tf.int64))

    @staticmethod
    def _seeds(seed):
        # init, augment, real; Philox fixed so that --jit_compile draws the same numbers
        return tf.unstack(tf.random.experimental.stateless_split(seed, 3, alg="philox"))

    def _loss(self, seed, theta):
        _, aug_seed, real_seed = self._seeds(seed)                         # theta: [P] fresh random net
        c = self.synthetic.num_classes
        params = siamese_params(aug_seed, c, self.synthetic.image_shape[:2], self.config.dsa)
        real_means = real_class_means(self.net, theta, self.sampler, real_seed,
                                      self.config.real_per_class, c, params)   # [C, D]
        x_syn, y_syn = self.synthetic.render()                             # [C*ipc, H, W, Ch]
        feats = self.net.features(theta, augment_by_class(x_syn, y_syn, params))   # [C*ipc, D]
        return dm_loss(real_means, feats, y_syn)

    def _step(self, seed, theta):
        self.trace_count += 1       # Python side effect: runs only while tracing
        variables = [v for name in sorted(self.groups) for v in self.groups[name]]
        with tf.GradientTape() as tape:
            loss = self._loss(seed, theta)
        _apply(self.optimizers, self.groups, tape.gradient(loss, variables))
        return {"loss": loss, "dm": loss}


# -- TM (MTT) -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TMConfig:
    inner_steps: int = 30            # N student steps per update (MTT, CIFAR-10 IPC10/50)
    batch_syn: int | None = None     # synthetic images per student step; None = all (MTT's default)
    init_lr: float = 0.01            # initial learnable student lr (MTT's lr_teacher)
    dsa: augment.DSAConfig | None = augment.DSAConfig()   # fresh draw per student batch; None: off

    def __post_init__(self):
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if self.batch_syn is not None and self.batch_syn < 1:
            raise ValueError(f"batch_syn must be None or >= 1, got {self.batch_syn}")


def unrolled_match_loss(net: FlatModel, theta_start, theta_target, x_syn, y_syn, lr, seed,
                        config: TMConfig):
    """MTT's loss after N unrolled SGD steps from theta_start; differentiable in x_syn and lr.

    Student step i: batch B_i of `batch_syn` synthetic images (a fresh seeded permutation per
    pass over the set, MTT's chunking; all images when batch_syn is None), DSA with one family
    per batch and per-sample values (MTT's non-Siamese mode), then
        theta_{i+1} = theta_i - lr * d mean CE(f(theta_i, A(x_{B_i})), y_{B_i}) / d theta_i
    with the inner gradient taken by an inner tape INSIDE the caller's tape, so every step's
    graph is kept for the outer gradient (memory grows linearly with N).
    Returns (loss, aux) with aux = theta_end [P], ce (mean inner CE), start_distance.
    """
    n_img = int(x_syn.shape[0])
    b = min(config.batch_syn or n_img, n_img)
    chunks = math.ceil(n_img / b)                    # student steps per pass over the set
    n_steps = config.inner_steps
    passes = math.ceil(n_steps / chunks)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n_steps + passes)
    lr = tf.cast(lr, theta_start.dtype)
    theta, perms, ces = theta_start, {}, []
    for i in range(n_steps):                         # Python loop: the unrolled graph
        xb, yb = x_syn, y_syn
        if b < n_img:
            p, chunk = divmod(i, chunks)
            if p not in perms:
                perms[p] = tf.argsort(tf.random.stateless_uniform([n_img], seeds[n_steps + p]))
            idx = perms[p][chunk * b:min((chunk + 1) * b, n_img)]          # [<=b]
            xb, yb = tf.gather(x_syn, idx), tf.gather(y_syn, idx)
        if config.dsa is not None:
            params = augment.sample(seeds[i], int(xb.shape[0]), tuple(xb.shape[1:3]), config.dsa,
                                    one_family=True)
            xb = augment.apply(xb, params)
        with tf.GradientTape() as inner:
            inner.watch(theta)
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, net.logits(theta, xb)))
        theta = theta - lr * inner.gradient(ce, theta)                     # [P]
        ces.append(ce)
    start_distance = tf.reduce_sum(tf.square(theta_start - theta_target))
    loss = tf.reduce_sum(tf.square(theta - theta_target)) / start_distance
    return loss, {"theta_end": theta, "ce": tf.add_n(ces) / n_steps, "start_distance": start_distance}


class TMStep:
    """Compiled MTT update: `metrics = step(theta_start, theta_target, seed)`.

    theta_start = theta*_t and theta_target = theta*_{t+M} are [P] float32 expert snapshots.
    `optimizers` maps each of `synthetic.variable_groups()` AND "lr" (the learnable student lr
    `self.syn_lr`, MTT: SGD lr_lr 1e-5 momentum 0.5) to a Keras optimizer. One outer tape
    records all N inner gradient computations; a single `gradient` call serves every variable,
    so the tape need not be persistent. Checkpoint `syn_lr` with the synthetic set.
    """

    LR = "lr"

    def __init__(self, net: FlatModel, synthetic, optimizers: dict, sampler=None,
                 config: TMConfig = TMConfig(), *, jit_compile: bool = False):
        del sampler                  # MTT reads no real images while condensing; kept for the signature
        self.net, self.synthetic, self.config = net, synthetic, config
        self.groups = synthetic.variable_groups()
        if self.LR in self.groups:
            raise ValueError(f"synthetic variable group name {self.LR!r} clashes with the student lr")
        _check_optimizers(optimizers, [*self.groups, self.LR])
        self.syn_lr = tf.Variable(config.init_lr, dtype=tf.float32, name="syn_lr")   # []
        self.optimizers = optimizers
        for name, opt in optimizers.items():
            opt.build([self.syn_lr] if name == self.LR else self.groups[name])
        self.trace_count = 0
        self._compiled = tf.function(self._step, jit_compile=jit_compile)

    def __call__(self, theta_start, theta_target, seed):
        return self._compiled(theta_start, theta_target, tf.cast(seed, tf.int64))

    def _step(self, theta_start, theta_target, seed):
        self.trace_count += 1       # Python side effect: runs only while tracing
        variables = [v for name in sorted(self.groups) for v in self.groups[name]]
        with tf.GradientTape() as outer:
            x_syn, y_syn = self.synthetic.render()                          # [C*ipc, H, W, Ch]
            loss, aux = unrolled_match_loss(self.net, theta_start, theta_target, x_syn, y_syn,
                                            self.syn_lr, seed, self.config)
        grads = outer.gradient(loss, variables + [self.syn_lr])
        lr_used = tf.identity(self.syn_lr)
        _apply(self.optimizers, self.groups, grads[:-1])
        self.optimizers[self.LR].apply([grads[-1]], [self.syn_lr])
        return {"loss": loss, "syn_lr": lr_used, "lr_grad": grads[-1], "ce": aux["ce"],
                "start_distance": aux["start_distance"]}


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
    embed = tf.function(lambda x: net.features(theta, data_lib.normalize(x, real.mean, real.std)))
    counts = real.train_counts
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    by_class = [real.train_images[o:o + n] for o, n in zip(offsets, counts)]
    picks = herding_select(lambda x: embed(x).numpy(), by_class, per_class, batch_size)
    index = np.concatenate([o + p for o, p in zip(offsets, picks)])
    return real.train_images[index], real.train_labels[index].astype(np.int32)
