"""DM, distribution matching (Zhao & Bilen), the baseline ESP's L_DM comes from.

Every update draws a FRESH random network theta = net.init(seed) and minimises
sum_c ||mean real embedding_c - mean synthetic embedding_c||^2 (`matching.dm_loss`), the real and
synthetic images of a class sharing one DSA draw (as in ESP). No expert trajectories.
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from esp_tf import augment, chunks
from esp_tf.matching import (apply_grads, augment_by_class, build_optimizers, dm_loss, ordered_variables,
                             real_class_means, siamese_params)
from esp_tf.methods.base import Method


@dataclasses.dataclass(frozen=True)
class DMConfig:
    real_per_class: int = 256        # real images per class per update (DM's batch_real); 0: every
    #                                  real image of the class (forward passes only, in chunks)
    dsa: augment.DSAConfig | None = augment.DSAConfig()   # DM uses DSA; None disables it
    chunk: int | None = None         # renders per piece of the exact whole-set gradient (chunks.py);
    #                                  None: 256 at 32x32, scaled by the image area; 0: one piece

    def __post_init__(self):
        if self.real_per_class < 0:
            raise ValueError(f"real_per_class must be >= 0 (0: the whole class), got {self.real_per_class}")
        if self.chunk is not None and self.chunk < 0:
            raise ValueError(f"chunk must be >= 0 (0: the whole set at once), got {self.chunk}")


class DMStep:
    """Compiled DM update: `metrics = step(seed)`; seed [2] int picks the net, the DSA draw, the reals.

    DM itself trains pixels with SGD(lr 1.0, momentum 0.5); any Keras optimizer per group works.
    """

    def __init__(self, net, synthetic, optimizers: dict, sampler, config: DMConfig = DMConfig(),
                 *, jit_compile: bool = False, replicas: int = 1):
        self.net, self.synthetic, self.sampler, self.config = net, synthetic, sampler, config
        self.groups = synthetic.variable_groups()
        build_optimizers(optimizers, self.groups)
        self.optimizers = optimizers
        self.chunks = chunks.ChunkedRenders(net, synthetic, config.chunk, replicas)
        self.trace_count = 0
        self._compiled = tf.function(self._step, jit_compile=jit_compile)
        self._evaluate = tf.function(self._loss)
        # The fresh network is drawn outside the (possibly XLA-compiled) step: XLA's float
        # stateless_uniform differs from the CPU kernel's, and the same seed must give the
        # same network either way. It is one device-side op, no host round-trip.
        self._theta_for = tf.function(lambda seed: self.net.init(self._seeds(seed)[0]))

    # real class means [C, D] at theta: this device's (data_parallel swaps in the replicated one)
    _class_means = staticmethod(real_class_means)

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

    def _real_side(self, seed, theta):
        """The update's DSA draw (one per class) and real class means [C, D] at theta."""
        _, aug_seed, real_seed = self._seeds(seed)                         # theta: [P] fresh random net
        c = self.synthetic.num_classes
        params = siamese_params(aug_seed, c, self.synthetic.image_shape[:2], self.config.dsa)
        return params, self._class_means(self.net, theta, self.sampler, real_seed,
                                         self.config.real_per_class, c, params)

    def _loss(self, seed, theta):
        params, real_means = self._real_side(seed, theta)
        x_syn, y_syn = self.synthetic.render()                             # [C*ipc, H, W, Ch]
        feats = self.net.features(theta, augment_by_class(x_syn, y_syn, params))   # [C*ipc, D]
        return dm_loss(real_means, feats, y_syn)

    def _step(self, seed, theta):
        self.trace_count += 1       # Python side effect: runs only while tracing
        return self._update(seed, theta)

    def _update(self, seed, theta, in_pieces: bool = False):
        """One update; `in_pieces`: through the chunked path even when the set is one chunk
        (each replica of a strategy then takes its share of the pieces)."""
        variables = ordered_variables(self.groups)
        if in_pieces or self.chunks.count > 1:   # the same gradient chunk by chunk (chunks.py)
            params, real_means = self._real_side(seed, theta)
            c = self.synthetic.num_classes
            sums, _, _, _ = self.chunks.totals(theta, params, with_g=False)
            dm = (1.0, lambda g, means: dm_loss(real_means, means, tf.range(c, dtype=tf.int32)))
            values, duals = chunks.reduced_duals({"dm": dm}, None, sums, self.chunks.per_class)
            grads = self.chunks.gradients(theta, params, variables, duals)["dm"]
            loss = values["dm"]
        else:
            with tf.GradientTape() as tape:
                loss = self._loss(seed, theta)
            grads = tape.gradient(loss, variables)
        apply_grads(self.optimizers, self.groups, grads)    # Keras sums the replicas' grads
        return {"loss": loss, "dm": loss}




class DM(Method):
    """One update per iteration, each against a fresh random network."""

    Config = DMConfig
    flag_fields = {"real_per_class": "real_per_class", "syn_chunk": "chunk"}
    needs_trajectories = False
    default_lr_pixels = 1.0          # SGD with momentum 0.5, DM's pixel optimizer
    data_parallel = True             # data_parallel.replicated(DMStep) under a strategy

    def __init__(self, context, config: DMConfig):
        super().__init__(context, config)
        self.step = self.make_step(DMStep)

    @classmethod
    def pixel_optimizer(cls, lr):
        return keras.optimizers.SGD(lr, momentum=0.5)

    def iteration(self, it, after_update):
        metrics = self.step(self.update_seed(it))
        after_update()
        return [metrics], {}
