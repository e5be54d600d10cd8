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
(--syn_batch) is the same path on the update's slice: every replica renders the whole set,
draws the same slice and runs the network on its share of it (chunks.SlicedRenders). This module
holds no step of its own: only the replicated real side and the strategy.run wrappers.
`--jit_compile` is not supported here yet.
"""
from __future__ import annotations

import tensorflow as tf

from esp_tf.chunks import replica as _replica
from esp_tf.matching import augment_by_class, whole_class_sums
from esp_tf.methods.dm import DMStep
from esp_tf.methods.esp import ESPStep

SUM = tf.distribute.ReduceOp.SUM


def real_class_means(net, theta, sampler, seed, per_class: int, num_classes: int, params):
    """matching.real_class_means with the real batch split across replicas: each embeds its
    block of every class's draw; the block means are all-reduced. [C, D], gradient stopped.
    per_class 0 (every real image): each replica sums its share of each class's chunks."""
    index, count = _replica()
    ctx = tf.distribute.get_replica_context()
    if per_class == 0:
        sums = whole_class_sums(net, theta, sampler, num_classes, params, part=(index, count))
        counts = tf.cast(sampler.class_counts, theta.dtype)[:, None]
        return tf.stop_gradient(ctx.all_reduce(SUM, sums) / counts)
    x, y = sampler.sample(seed, per_class, part=(index, count))      # [C*r/R, H, W, Ch]
    k = per_class // count
    x = tf.reshape(x, [num_classes, k, *x.shape[1:]])
    y = tf.reshape(y, [num_classes, k])

    def one_class(args):
        xc, yc = args
        return tf.reduce_mean(net.features(theta, augment_by_class(xc, yc, params)), axis=0)

    means = tf.map_fn(one_class, (x, y), fn_output_signature=theta.dtype, parallel_iterations=1)
    return tf.stop_gradient(ctx.all_reduce(SUM, means) / count)


def _first(strategy, out):
    """The first local replica's values of a nested `strategy.run` result (all replicas compute
    the same values from all-reduced pieces, so no further communication is needed)."""
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], out)


def _check(strategy, jit_compile):
    if strategy is None:
        raise ValueError("a data-parallel step needs a tf.distribute strategy")
    if jit_compile:
        raise ValueError("--jit_compile is not supported under a tf.distribute strategy yet; drop "
                         "--jit_compile or --strategy")


class Replicated:
    """Makes a method's step class data-parallel (`replicated`): the same call and the same
    result, with each update split across the replicas of `strategy`. The step's own `_update`
    runs in every replica with `in_pieces=True` (its chunked path, chunks.py: each replica takes
    its block of the set's units, or its share of a sliced batch, and the pieces' sums are
    all-reduced), and its real class means come from `real_class_means` (each replica embeds its
    block of the real draw). The synthetic set and the optimizers must be created under
    strategy.scope()."""

    _class_means = staticmethod(real_class_means)

    def __init__(self, strategy, net, synthetic, optimizers, sampler, config, *, jit_compile=False):
        _check(strategy, jit_compile)
        self.strategy = strategy
        with strategy.scope():
            super().__init__(net, synthetic, optimizers, sampler, config,
                             replicas=strategy.num_replicas_in_sync)

    def _step(self, *args):
        self.trace_count += 1       # Python side effect: runs only while tracing
        return _first(self.strategy, self.strategy.run(self._update, args=args,
                                                       kwargs={"in_pieces": True}))


_REPLICATED = {}


def replicated(step_class):
    """`step_class` (a method's single-device step: `_update(*args, in_pieces=False)`, a
    `_class_means` hook, a `replicas` argument) made data-parallel; one class per step class."""
    if step_class not in _REPLICATED:
        _REPLICATED[step_class] = type(f"Replicated{step_class.__name__}", (Replicated, step_class),
                                       {"__doc__": f"{step_class.__name__}, data-parallel (Replicated)."})
    return _REPLICATED[step_class]


ReplicatedESPStep = replicated(ESPStep)
ReplicatedDMStep = replicated(DMStep)
