"""TM, trajectory matching (MTT, Cazenavette et al.), the baseline ESP replaces.

The student starts at an expert snapshot theta*_t, takes N SGD steps on the synthetic set with
a learnable lr, and the loss ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 is
differentiated through the WHOLE unrolled graph of N steps. That graph is the point of the
comparison: its memory grows with N, where ESP's (one step at a time) does not.
"""
from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from esp_tf import augment
from esp_tf.matching import apply_grads, build_optimizers, ordered_variables
from esp_tf.methods.base import Method


@dataclasses.dataclass(frozen=True)
class TMConfig:
    inner_steps: int = 30            # N student steps per update (MTT, CIFAR-10 IPC10/50)
    batch_syn: int | None = None     # synthetic images per student step; None = all (MTT's default)
    init_lr: float = 0.01            # initial learnable student lr (MTT's lr_teacher)
    lr_lr: float = 1e-5              # SGD lr (momentum 0.5) of the learnable student lr (MTT)
    dsa: augment.DSAConfig | None = augment.DSAConfig()   # fresh draw per student batch; None: off

    def __post_init__(self):
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if self.batch_syn is not None and self.batch_syn < 1:
            raise ValueError(f"batch_syn must be None or >= 1, got {self.batch_syn}")


def unrolled_match_loss(net, theta_start, theta_target, x_syn, y_syn, lr, seed,
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

    def __init__(self, net, synthetic, optimizers: dict, sampler=None,
                 config: TMConfig = TMConfig(), *, jit_compile: bool = False):
        del sampler                  # MTT reads no real images while condensing; kept for the signature
        self.net, self.synthetic, self.config = net, synthetic, config
        self.groups = synthetic.variable_groups()
        if self.LR in self.groups:
            raise ValueError(f"synthetic variable group name {self.LR!r} clashes with the student lr")
        build_optimizers(optimizers, self.groups, extra=[self.LR])
        self.syn_lr = tf.Variable(config.init_lr, dtype=tf.float32, name="syn_lr")   # []
        optimizers[self.LR].build([self.syn_lr])
        self.optimizers = optimizers
        self.trace_count = 0
        self._compiled = tf.function(self._step, jit_compile=jit_compile)

    def __call__(self, theta_start, theta_target, seed):
        return self._compiled(theta_start, theta_target, tf.cast(seed, tf.int64))

    def _step(self, theta_start, theta_target, seed):
        self.trace_count += 1       # Python side effect: runs only while tracing
        variables = ordered_variables(self.groups)
        with tf.GradientTape() as outer:
            x_syn, y_syn = self.synthetic.render()                          # [C*ipc, H, W, Ch]
            loss, aux = unrolled_match_loss(self.net, theta_start, theta_target, x_syn, y_syn,
                                            self.syn_lr, seed, self.config)
        grads = outer.gradient(loss, variables + [self.syn_lr])
        lr_used = tf.identity(self.syn_lr)
        apply_grads(self.optimizers, self.groups, grads[:-1])
        self.optimizers[self.LR].apply([grads[-1]], [self.syn_lr])
        return {"loss": loss, "syn_lr": lr_used, "lr_grad": grads[-1], "ce": aux["ce"],
                "start_distance": aux["start_distance"]}




class TM(Method):
    """One update per iteration: N unrolled student steps from theta*_t, matched to theta*_{t+M}."""

    Config = TMConfig
    flag_fields = {"inner_steps": "inner_steps", "syn_batch": "batch_syn", "student_lr_init": "init_lr",
                   "student_lr_lr": "lr_lr"}
    needs_trajectories = True
    default_lr_pixels = 100.0        # SGD with momentum 0.5 (MTT's pixel lr is 100-1000)

    def __init__(self, context, config: TMConfig):
        super().__init__(context, config)
        c = context
        self.step = TMStep(c.net, c.synthetic, c.optimizers, c.sampler, config, jit_compile=c.jit_compile)
        self._segment = self.segment_fn(lambda segment: segment[-1])      # the target snapshot

    @classmethod
    def pixel_optimizer(cls, lr):
        return keras.optimizers.SGD(lr, momentum=0.5)

    @classmethod
    def extra_optimizers(cls, config) -> dict:
        return {TMStep.LR: keras.optimizers.SGD(config.lr_lr, momentum=0.5)}

    @classmethod
    def describe(cls, config) -> str:
        return f"x {config.inner_steps} unrolled student steps"

    def state(self) -> dict:
        return {"syn_lr": self.step.syn_lr}

    def iteration(self, it, after_update):
        theta, target, k, t = self._segment(it)
        metrics = self.step(theta, target, self.update_seed(it))
        after_update()
        return [metrics], {"expert": k, "start_epoch": t}
