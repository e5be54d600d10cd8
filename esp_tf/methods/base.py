"""The interface every condensation method implements (see `esp_tf.methods`)."""
from __future__ import annotations

import dataclasses
import functools

import keras
import tensorflow as tf

from esp_tf import segments


@dataclasses.dataclass(frozen=True)
class Context:
    """What the condensation loop hands a method: the student network (`models.FlatModel`), the
    learnable synthetic set, one optimizer per optimizer group (`Method.optimizer_groups`), the
    real-data sampler, the expert trajectories (an array [K, S, P] or a `segments` source such as
    `segments.StoreSource`; None for methods that need none), and
    the run's segment and seed settings, and the tf.distribute strategy the updates are split
    across (None: one device; only methods with `data_parallel` accept one)."""
    net: object
    synthetic: object
    optimizers: dict
    sampler: object
    trajectories: object = None
    segment_length: int = 2
    max_start_epoch: int = 20
    seed: int = 0
    jit_compile: bool = False
    strategy: object = None


class Method:
    """A condensation method. Subclasses set the class attributes and implement `iteration`.

    Class attributes:
      Config               frozen dataclass of the method's own settings; its defaults are the
                           method's defaults (the command line passes only what a user set).
      flag_fields          command-line flag -> Config field, for the flags this method reads.
      needs_trajectories   whether the method reads expert trajectories.
      default_lr_pixels    learning rate of pixel variables under `pixel_optimizer`.
      data_parallel        whether the method's updates run split across the replicas of
                           `Context.strategy` (esp_tf.data_parallel).
    """

    Config: type = None
    flag_fields: dict = {}
    needs_trajectories: bool = True
    default_lr_pixels: float = 0.01
    data_parallel: bool = False

    def __init__(self, context: Context, config):
        self.context, self.config = context, config

    # -- what the loop asks before building the method --------------------------------------
    @classmethod
    def updates_per_iteration(cls, config) -> int:
        """Synthetic-set updates made by one `iteration` (the lr schedules count updates)."""
        return 1

    @classmethod
    def pixel_optimizer(cls, lr):
        """Optimizer of parameterisations that take the method's own (pixels): Adam here."""
        return keras.optimizers.Adam(lr)

    @classmethod
    def extra_optimizers(cls, config) -> dict:
        """Optimizers of the method's own variables (e.g. MTT's learnable lr), by name."""
        return {}

    @classmethod
    def describe(cls, config) -> str:
        """A few words for the run's start line."""
        return ""

    # -- the method at work -------------------------------------------------------------------
    def state(self) -> dict:
        """The method's own variables: checkpointed with the set and checked for NaN/inf."""
        return {}

    def iteration(self, it: int, after_update) -> tuple[list, dict]:
        """Runs iteration `it`: one or more updates of the synthetic set, calling
        `after_update()` after each. Returns (per-update metric dicts, info ints to log)."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------
    def make_step(self, step_class):
        """The method's compiled step: `step_class(net, synthetic, optimizers, sampler, config,
        jit_compile=...)` on one device, or its data-parallel form (`data_parallel.replicated`)
        under `Context.strategy`."""
        c = self.context
        if c.strategy is not None:
            from esp_tf import data_parallel
            step_class = functools.partial(data_parallel.replicated(step_class), c.strategy)
        return step_class(c.net, c.synthetic, c.optimizers, c.sampler, self.config, jit_compile=c.jit_compile)

    def update_seed(self, n: int) -> list:
        """The seed of update n of the run (every random draw of an update derives from it)."""
        return [self.context.seed + 1_000_003, n]

    def segment_fn(self, transform):
        """`f(it) -> (theta_start, transform(segment), expert, start_epoch)`: the expert segment
        of iteration `it` (drawn from (seed, it), `segments.draw`), its first snapshot, and
        `transform` of the whole segment [T+1, P] (e.g. its orthonormal basis; compiled once).
        Only that segment is read from the trajectories' source (an expert store is read one
        segment at a time, the next one in the background)."""
        ctx = self.context
        reader = segments.Reader(segments.as_source(ctx.trajectories), ctx.seed, ctx.segment_length,
                                 ctx.max_start_epoch)
        compiled = tf.function(lambda segment: (segment[0], transform(segment)))

        def segment_for(it):
            segment, k, t = reader.get(it)
            first, out = compiled(tf.constant(segment))
            return first, out, k, t

        return segment_for
