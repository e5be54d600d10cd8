"""ESP and DM updates split across the replicas of a tf.distribute strategy (MirroredStrategy on
local devices, MultiWorkerMirroredStrategy across machines). No I/O, no flags.

The update is the methods' own chunked path (esp_tf/chunks.py), with the units of the synthetic
set (codes or images) split into one block per replica and each block into chunks:

    real:  block i of every class's real draw (same seed everywhere)  -> class means, all-reduced
    syn:   replica i renders its block of units, chunk by chunk (same DSA draw per class)
           G_i = d sum_{b in block i} CE_b / B / d theta     S_i = per-class feature sums  [C, D]
    G = sum_i G_i,  S = sum_i S_i                            (all-reduced, gradient stopped)
    L(G, S / M) and its duals dL/dG, dL/dS  (cheap, first order; the same on every replica)
    grads_i = d [<dL/dG, G_i> + <dL/dS, S_i>] / d synthetic variables, chunk by chunk
    optimizer.apply(grads_i): Keras sums the replicas' grads (= dL/d variables) before updating

The sum over replicas of the surrogate's gradient is the chain rule of L through G and S, so one
update equals the single-device update up to float32 summation order (tested). Each device holds
the graph of one chunk of its block and r/R real images per class. The sliced variant of ESP
(--syn_batch) keeps its own code here: every replica renders the whole set, draws the same slice
and runs the network on its share of it. `--jit_compile` is not supported here yet.
"""
from __future__ import annotations

import tensorflow as tf

from esp_tf import subspace
from esp_tf.chunks import reduced_duals, replica as _replica
from esp_tf.matching import apply_grads, augment_by_class, dense, ordered_variables, siamese_params
from esp_tf.methods.dm import DMStep
from esp_tf.methods.esp import LOSS_TERMS, ESPStep, class_balanced_slice, pull

SUM = tf.distribute.ReduceOp.SUM


def _bounds(total: int, index: int, count: int) -> tuple:
    """Slice [start, end) of replica `index` when `total` items are split as evenly as possible."""
    return total * index // count, total * (index + 1) // count


def real_class_means(net, theta, sampler, seed, per_class: int, num_classes: int, params):
    """matching.real_class_means with the real batch split across replicas: each embeds its
    block of every class's draw; the block means are all-reduced. [C, D], gradient stopped."""
    index, count = _replica()
    x, y = sampler.sample(seed, per_class, part=(index, count))      # [C*r/R, H, W, Ch]
    k = per_class // count
    x = tf.reshape(x, [num_classes, k, *x.shape[1:]])
    y = tf.reshape(y, [num_classes, k])

    def one_class(args):
        xc, yc = args
        return tf.reduce_mean(net.features(theta, augment_by_class(xc, yc, params)), axis=0)

    means = tf.map_fn(one_class, (x, y), fn_output_signature=theta.dtype, parallel_iterations=1)
    ctx = tf.distribute.get_replica_context()
    return tf.stop_gradient(ctx.all_reduce(SUM, means) / count)


def _first(strategy, out):
    """The first local replica's values of a nested `strategy.run` result (all replicas compute
    the same values from all-reduced pieces, so no further communication is needed)."""
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], out)


def _syn_slice(x, y):
    index, count = _replica()
    start, end = _bounds(x.shape[0], index, count)
    return x[start:end], y[start:end]


def _check(strategy, jit_compile):
    if strategy is None:
        raise ValueError("a data-parallel step needs a tf.distribute strategy")
    if jit_compile:
        raise ValueError("--jit_compile is not supported under a tf.distribute strategy yet; drop "
                         "--jit_compile or --strategy")


class ReplicatedESPStep(ESPStep):
    """`methods.esp.ESPStep` (same call, same result) with each update split across the replicas
    of `strategy`. The synthetic set and the optimizers must be created under strategy.scope().

    The update is ESPStep's own chunked path (chunks.py): each replica takes its block of the
    set's units, in pieces of --syn_chunk renders, and the pieces' sums are all-reduced. Only the
    sliced variant (--syn_batch: a random slice of renders, not of units) has its own code here."""

    _class_means = staticmethod(real_class_means)       # each replica embeds its block of the reals

    def __init__(self, strategy, net, synthetic, optimizers, sampler, config, *, jit_compile=False):
        _check(strategy, jit_compile)
        self.strategy = strategy
        with strategy.scope():
            super().__init__(net, synthetic, optimizers, sampler, config,
                             replicas=strategy.num_replicas_in_sync)

    def _step(self, theta, basis, seed):
        self.trace_count += 1       # Python side effect: runs only while tracing
        return _first(self.strategy, self.strategy.run(self._replica_step, args=(theta, basis, seed)))

    def _replica_step(self, theta, basis, seed):
        if self.config.batch_syn is None:
            return self._update(theta, basis, seed, in_pieces=True)
        return self._sliced_step(theta, basis, seed)

    def _sliced_step(self, theta, basis, seed):
        """The --syn_batch variant: every replica renders the whole set and draws the same slice,
        then runs the network on its share of the slice."""
        cfg, syn = self.config, self.synthetic
        ctx = tf.distribute.get_replica_context()
        aug_seed, real_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg="philox"))
        c = syn.num_classes
        params = siamese_params(aug_seed, c, syn.image_shape[:2], cfg.dsa)
        real_means = None
        if cfg.needs_real:
            real_means = real_class_means(self.net, theta, self.sampler, real_seed, cfg.real_per_class,
                                          c, params)
        variables = ordered_variables(self.groups)
        with tf.GradientTape(persistent=True) as outer:
            x_syn, y_syn = syn.render()
            slice_seed = tf.random.experimental.stateless_fold_in(seed, 7, alg="philox")
            x_syn, y_syn = class_balanced_slice(x_syn, y_syn, c, self._per_class, slice_seed)
            total = x_syn.shape[0]                                          # B, all replicas
            x_aug = augment_by_class(x_syn, y_syn, params)
            x_i, y_i = _syn_slice(x_aug, y_syn)                            # [B_i, H, W, Ch]
            with tf.GradientTape() as inner:
                inner.watch(theta)
                feats_i, logits_i = self.net.features_and_logits(theta, x_i)
                ce_i = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y_i, logits_i)) / total
            g_i = inner.gradient(ce_i, theta)                               # [P]   share of G
            sums_i = tf.math.unsorted_segment_sum(feats_i, y_i, c)          # [C, D]
            with outer.stop_recording():                 # the reduced loss and its first-order grads
                g = ctx.all_reduce(SUM, g_i)                                # G = sum_i g_i   [P]
                values, duals = reduced_duals(self.loss_terms(basis, real_means), g,
                                              ctx.all_reduce(SUM, sums_i), self._per_class)
            # each term's surrogate: its gradient w.r.t. the variables is this replica's share
            surrogates = {n: tf.reduce_sum(d_g * g_i) + tf.reduce_sum(d_s * sums_i)
                          for n, (d_g, d_s) in duals.items()}
        per_term = {n: dense(outer.gradient(v, variables), variables) for n, v in surrogates.items()}
        del outer
        grads = [tf.add_n(list(gs)) for gs in zip(*per_term.values())]
        zero = tf.zeros([], theta.dtype)
        hits = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits_i, -1, output_type=tf.int32), y_i),
                                     theta.dtype))
        g_norm, g_in = tf.norm(g), subspace.project(basis, g)
        metrics = {"loss": tf.add_n([LOSS_TERMS[n].weight(cfg) * values[n] for n in cfg.losses]),
                   **{n: values.get(n, zero) for n in LOSS_TERMS},
                   "ce": ctx.all_reduce(SUM, ce_i), "syn_acc": ctx.all_reduce(SUM, hits) / total,
                   "grad_norm": g_norm, "in_subspace": tf.norm(g_in) / (g_norm + 1e-12)}
        if "proj" in per_term and "dm" in per_term:
            metrics["pull"] = pull({n: ctx.all_reduce(SUM, gs) for n, gs in per_term.items()})
        apply_grads(self.optimizers, self.groups, grads)    # Keras sums the replicas' grads
        return theta - cfg.inner_lr * g_in, metrics                         # eq. 6


class ReplicatedDMStep(DMStep):
    """`methods.dm.DMStep` (same call, same result) with each update split across the replicas of
    `strategy`: DMStep's own chunked path, each replica on its block of the set's units. The
    synthetic set and the optimizers must be created under strategy.scope()."""

    _class_means = staticmethod(real_class_means)       # each replica embeds its block of the reals

    def __init__(self, strategy, net, synthetic, optimizers, sampler, config, *, jit_compile=False):
        _check(strategy, jit_compile)
        self.strategy = strategy
        with strategy.scope():
            super().__init__(net, synthetic, optimizers, sampler, config,
                             replicas=strategy.num_replicas_in_sync)

    def _step(self, seed, theta):
        self.trace_count += 1       # Python side effect: runs only while tracing
        return _first(self.strategy, self.strategy.run(self._update, args=(seed, theta),
                                                       kwargs={"in_pieces": True}))
