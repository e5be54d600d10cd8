"""Exact outer gradients over the whole synthetic set, in memory that grows with a chunk, not the set.

ESP's outer loss reads the rendered set only through two sums over its B renders:

    G       = sum_b  d CE(f(theta, A(x_b)), y_b) / d theta / B          [P]     (eq. 4)
    S_c     = sum_{b in class c}  f(theta, A(x_b))                      [C, D]  (L_DM's means = S_c / M)

and L = L_DM(S / M) + beta * ||G - E E^T G||_1 depends on nothing else of the renders. So with
dL/dG and dL/dS fixed at their full-set values (cheap: first order in G and S),

    dL / d synthetic  =  sum over chunks k of  d [ <dL/dG, G_k> + <dL/dS, S_k> ] / d synthetic

where G_k and S_k are chunk k's shares of the sums. Two passes over the chunks, each holding the
graph of one chunk only:

    pass 1  (no outer tape)   G = sum_k G_k,  S = sum_k S_k               first order in theta
    reduce                    L, dL/dG, dL/dS                               [P], [C, D]
    pass 2  (outer tape)      grads += d <dL/dG, G_k> + <dL/dS, S_k> / d synthetic   second order

For L_proj, <dL/dG, G_k> with dL/dG = beta (I - E E^T) sign(G - E E^T G) is a Hessian-vector
type product: its gradient is what the unchunked second-order backward computes, chunk by chunk.
Pass 2 repeats pass 1's forward, so a split update costs about one more forward and first-order
backward of the set than a whole one; with one chunk the caller takes the direct path instead.

Exact only for networks that treat every image on its own (ConvNet's instance norm, no batch
statistics): a batch-normalised network would see other statistics in every chunk, and
`check_per_sample` refuses it. The DSA draw is one per class (Siamese), so a render is augmented
the same way whichever chunk it is in.
"""
from __future__ import annotations

import math

import tensorflow as tf

from esp_tf.matching import augment_by_class, dense

# Renders per chunk by default: 256 at 32x32, scaled by the image area (64 at 64x64, 16 at
# 128x128). Memory of an ESP update grows with the chunk (the second-order graph of one chunk:
# measured ~14 MB per 32x32 render with ConvNet-3, ~55 MB per 64x64 render with ConvNet-4, so
# about the image area; tools/memory_bench.py --syn_chunks, BENCHMARKS.md), keeping an update
# near 4-5 GB. Sets of at most this many renders take the direct, single-pass path and cost
# nothing extra.
DEFAULT_CHUNK = 256
DEFAULT_CHUNK_PIXELS = DEFAULT_CHUNK * 32 * 32


def default_chunk(image_shape) -> int:
    """Renders per chunk when none is given: DEFAULT_CHUNK at 32x32, scaled by the image area."""
    return max(1, DEFAULT_CHUNK_PIXELS // (int(image_shape[0]) * int(image_shape[1])))

# Layers that act on every image of a batch on its own (the sums above are then exact per chunk).
_PER_SAMPLE_LAYERS = ("InputLayer", "ZeroPadding2D", "Conv2D", "InstanceNorm", "Activation",
                      "AveragePooling2D", "MaxPooling2D", "Flatten", "Dense")


def check_per_sample(net) -> None:
    """Raises ValueError unless every layer of `net` (a models.FlatModel) is per-image."""
    other = sorted({type(l).__name__ for l in net.model.layers} - set(_PER_SAMPLE_LAYERS))
    if other:
        raise ValueError(
            f"the synthetic set is split into chunks (--syn_chunk), which is exact only for a network "
            f"that treats every image on its own; {net.model.name} has {', '.join(other)} layers. "
            "Use --syn_chunk=0 (the whole set in one piece) or a ConvNet condensation model")


def plan(num_units: int, renders_per_unit: int, chunk_renders: int | None) -> tuple[int, int]:
    """(chunks, units per chunk) splitting `num_units` units as evenly as possible into chunks of
    at most `chunk_renders` renders (at least one unit each). 0 (or None here): one chunk."""
    if not chunk_renders or chunk_renders >= num_units * renders_per_unit:
        return 1, num_units
    per = max(1, chunk_renders // renders_per_unit)
    count = math.ceil(num_units / per)
    return count, math.ceil(num_units / count)


def units(k, per_chunk: int, num_units: int, start: int = 0):
    """Unit indices [per_chunk] of chunk k of the `num_units` units from `start` on (the last
    chunk repeats the final unit where it runs past them) and the mask [per_chunk] that is 1 on
    units the chunk owns, 0 on repeats."""
    index = k * per_chunk + tf.range(per_chunk)
    return start + tf.minimum(index, num_units - 1), tf.cast(index < num_units, tf.float32)


def replica() -> tuple[int, int]:
    """(index, count) of the tf.distribute replica being traced, as Python ints; (0, 1) on one
    device. Under a strategy the set's units are split across the replicas, then into chunks."""
    ctx = tf.distribute.get_replica_context()
    count = 1 if ctx is None else int(ctx.num_replicas_in_sync)
    if count == 1:
        return 0, 1
    index = tf.get_static_value(ctx.replica_id_in_sync_group)
    if index is None:
        raise ValueError("the data-parallel steps need a strategy whose replica ids are static "
                         "(MirroredStrategy, MultiWorkerMirroredStrategy)")
    return int(index), count


def all_sum(x):
    """x summed over the replicas (x itself on one device)."""
    if replica()[1] == 1:
        return x
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, x)


def loop(count: int, body, init):
    """acc = body(k, acc) for k = 0..count-1, one chunk at a time (parallel_iterations=1 keeps a
    single chunk's tensors alive). `init` and the result are nested structures of tensors."""
    _, out = tf.while_loop(lambda k, acc: k < count, lambda k, acc: (k + 1, body(k, acc)),
                           (tf.constant(0), init), parallel_iterations=1)
    return out


class ChunkedRenders:
    """The whole synthetic set in chunks of whole units (`synthetic.render_units`), each at most
    `chunk_renders` renders (None or 0: one chunk). The DSA draw `params` is one per class."""

    def __init__(self, net, synthetic, chunk_renders: int | None, replicas: int = 1):
        """`chunk_renders`: renders per chunk; None: `default_chunk` of the image size; 0: one."""
        if chunk_renders is None:
            chunk_renders = default_chunk(synthetic.image_shape)
        self.net, self.synthetic, self.chunk_renders = net, synthetic, chunk_renders
        # the plan on one device: more than one chunk means the update is split
        self.count, self.per_chunk = plan(synthetic.num_units, synthetic.renders_per_unit, chunk_renders)
        if synthetic.num_units < replicas:
            raise ValueError(f"the synthetic set has {synthetic.num_units} units (codes or images) for "
                             f"{replicas} replicas: each replica needs at least one")
        if self.count > 1 or replicas > 1:
            check_per_sample(net)
        self.total = synthetic.num_units * synthetic.renders_per_unit          # B
        self.per_class = synthetic.images_per_class                            # M

    def share(self) -> tuple[int, int, int, int]:
        """(first unit, units, chunks, units per chunk) of the replica being traced: its block of
        the units (all of them on one device), split into chunks."""
        index, count = replica()
        n = self.synthetic.num_units
        start, end = n * index // count, n * (index + 1) // count
        chunks, per = plan(end - start, self.synthetic.renders_per_unit, self.chunk_renders)
        return start, end - start, chunks, per

    def pieces(self, k, theta, params, with_g: bool, share=None):
        """Chunk k's feature sums per class S_k [C, D], share of G G_k [P] (None unless with_g),
        CE summed over the chunk / B, and count of correctly classified renders."""
        syn = self.synthetic
        start, n, _, per = share or self.share()
        index, mask = units(k, per, n, start)
        x, y = syn.render_units(index)                                          # [k*r, H, W, Ch]
        weight = tf.cast(tf.repeat(mask, syn.renders_per_unit), x.dtype)        # [k*r] 1 or 0
        return self._embed(theta, augment_by_class(x, y, params), y, weight, with_g)

    def _embed(self, theta, x, y, weight, with_g: bool):
        """The sums of one piece of renders x (augmented), labels y, each counted with `weight`
        (1, or 0 for a repeat): per-class feature sums [C, D], its share of G [P] (None unless
        with_g), CE summed / B, and correctly classified renders."""
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            inner.watch(theta)
            feats, logits = self.net.features_and_logits(theta, x)
            ce = tf.reduce_sum(weight * tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)) / self.total
        g = inner.gradient(ce, theta) if with_g else None
        sums = tf.math.unsorted_segment_sum(feats * weight[:, None], y, self.synthetic.num_classes)
        hits = tf.reduce_sum(weight * tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y),
                                              weight.dtype))
        return sums, g, ce, hits

    def totals(self, theta, params, with_g: bool):
        """Pass 1: S [C, D], G [P] (None unless with_g), mean CE and accuracy over every render
        (summed over the replicas)."""
        zero = tf.zeros([], theta.dtype)
        init = (tf.zeros([self.synthetic.num_classes, self.net.feature_dim], theta.dtype),
                tf.zeros_like(theta) if with_g else zero, zero, zero)
        share = self.share()

        def body(k, acc):
            sums, g, ce, hits = self.pieces(k, theta, params, with_g, share)
            return acc[0] + sums, (acc[1] + g) if with_g else acc[1], acc[2] + ce, acc[3] + hits

        sums, g, ce, hits = all_sum(loop(share[2], body, init))
        return sums, (g if with_g else None), ce, hits / self.total

    def gradients(self, theta, params, variables, duals: dict) -> dict:
        """Pass 2: term name -> the term's gradient w.r.t. `variables` (dense, summed over this
        replica's chunks: the replicas' gradients sum to the whole set's), from its duals
        (dL/dG or None, dL/dS) at the full-set sums."""
        with_g = any(d_g is not None for d_g, _ in duals.values())
        init = {name: [tf.zeros_like(v) for v in variables] for name in duals}
        share = self.share()

        def body(k, acc):
            with tf.GradientTape(persistent=len(duals) > 1, watch_accessed_variables=False) as outer:
                outer.watch(variables)
                sums, g, _, _ = self.pieces(k, theta, params, with_g, share)
                surrogates = {name: tf.reduce_sum(d_s * sums) + (0.0 if d_g is None else tf.reduce_sum(d_g * g))
                              for name, (d_g, d_s) in duals.items()}
            out = {name: [a + b for a, b in zip(acc[name], dense(outer.gradient(s, variables), variables))]
                   for name, s in surrogates.items()}
            del outer
            return out

        return loop(share[2], body, init)


def class_balanced_slice(x, y, num_classes: int, per_class: int, seed):
    """per_class random images of each class from a class-major set x [C*M, ...], y [C*M]."""
    m = x.shape[0] // num_classes
    keys = tf.random.stateless_uniform([num_classes, m], seed, minval=0, maxval=2**31 - 1, dtype=tf.int32,
                                       alg="philox")        # int Philox: the same draw under XLA
    pick = tf.argsort(keys, axis=1)[:, :per_class]                          # [C, k] within-class
    index = tf.reshape(pick + tf.range(num_classes)[:, None] * m, [-1])     # [C*k] global
    return tf.gather(x, index), tf.gather(y, index)


class SlicedRenders(ChunkedRenders):
    """A random class-balanced slice of `per_class` renders of every class (the sliced variant,
    --syn_batch: the paper's Figure 8 study), as one piece with ChunkedRenders' two passes. Under
    a strategy every replica renders the whole set, draws the same slice (same seed) and runs the
    network on its share of it. `at(seed)` binds the update's slice."""

    def __init__(self, net, synthetic, per_class: int, replicas: int = 1, seed=None):
        self.net, self.synthetic, self.seed = net, synthetic, seed
        self.count, self.per_chunk = 1, None
        if replicas > 1:
            check_per_sample(net)
        self.per_class = per_class                                     # k of every class
        self.total = synthetic.num_classes * per_class                 # B of the slice
        self._replicas = replicas

    def at(self, seed) -> "SlicedRenders":
        return SlicedRenders(self.net, self.synthetic, self.per_class, self._replicas, seed)

    def share(self):
        return 0, 0, 1, 0                                              # one piece per replica

    def pieces(self, k, theta, params, with_g: bool, share=None):
        syn = self.synthetic
        x, y = syn.render()
        x, y = class_balanced_slice(x, y, syn.num_classes, self.per_class, self.seed)
        x = augment_by_class(x, y, params)
        index, count = replica()                                       # this replica's share
        start, end = self.total * index // count, self.total * (index + 1) // count
        x, y = x[start:end], y[start:end]
        return self._embed(theta, x, y, tf.ones([end - start], x.dtype), with_g)


def reduced_duals(terms: dict, g, sums, per_class: int):
    """The outer loss terms at the full-set sums, and the duals pass 2 needs.

    `terms` maps a name to (weight, value(G, means [C, D]) -> scalar). Returns (unweighted
    values, {name: (d weight*value / dG or None when g is None, d weight*value / dS)}), S being
    the feature sums per class (means = S / per_class)."""
    means = sums / per_class
    watched = [means] if g is None else [g, means]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(watched)
        values = {name: value(g, means) for name, (_, value) in terms.items()}
        weighted = {name: terms[name][0] * v for name, v in values.items()}
    duals = {}
    for name, w in weighted.items():
        grads = tape.gradient(w, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        d_g, d_means = (None, grads[0]) if g is None else grads
        duals[name] = (d_g, d_means / per_class)
    del tape
    return values, duals
