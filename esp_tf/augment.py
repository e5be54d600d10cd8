"""Differentiable Siamese Augmentation (DSA), pure and stateless.

DSA (Zhao & Bilen, 2021) augments real and synthetic images with the *same* random
parameters so that matching losses compare like with like, while keeping the
augmentation differentiable w.r.t. the (synthetic) pixels.  This module splits the
reference's single stateful call into three pure steps:

* ``sample(seed, n, image_size)`` draws per-sample parameters from an explicit
  ``[2]`` seed (``tf.random.stateless_*``; no global RNG, no wall clock);
* ``take(params, idx)`` gathers parameters per sample, e.g. by class label, which is
  how two batches are made Siamese (same class -> same parameters);
* ``apply(x, params)`` is a fixed, fully vectorised function of ``x`` (NHWC), affine
  in ``x`` for fixed parameters, XLA-compilable, with gradients w.r.t. ``x``.

'S' mode: each sample draws ONE family of the strategy ('color' is one family made of
brightness, saturation, contrast applied in that order); families not drawn get
identity parameters.  ``apply`` runs color -> one affine warp (crop, flip, scale and
rotate composed, bilinear, zero padding, torch ``align_corners=True`` convention) ->
cutout.  With one geometric family active (always the case for sampled parameters)
the composed warp equals the reference's sequential ops; flip and integer crop are
exact (bilinear weights are exactly 0/1).  Keras' random layers are not usable here:
they cannot share parameters between batches, and RandomBrightness fails on a tf.Variable
input (Keras 3.15).

``cutmix(seed, x, y, prob)`` (IDC's evaluation augmentation) is stateless in the same way.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")  # global family ids = index here
NO_FAMILY = -1  # params['family'] for identity parameters
# Fixed RNG algorithm; floats are derived from int draws because XLA's float conversion of
# stateless_uniform differs from the CPU kernel's, while int draws agree (so sample() gives
# the same parameters eagerly and under jit_compile=True).
_ALG = "philox"


@dataclasses.dataclass(frozen=True)
class DSAConfig:
    """Strategy and magnitudes of DSA (defaults: the DSA reference code's
    `color_crop_cutout_flip_scale_rotate`)."""

    strategy: str = DEFAULT_STRATEGY
    flip: float = 0.5  # probability of horizontal flip
    scale: float = 1.2  # sx, sy ~ U[1/scale, scale]
    rotate: float = 15.0  # degrees, angle ~ U[-rotate, rotate]
    crop: float = 0.125  # integer translation up to int(crop*size + 0.5) px per axis, zero fill
    cutout: float = 0.5  # one zeroed square of side int(cutout*size + 0.5) per axis
    brightness: float = 1.0  # x + (U - 0.5) * brightness
    saturation: float = 2.0  # (x - mean_over_channels) * (U * saturation) + mean_over_channels
    contrast: float = 0.5  # (x - mean_over_CHW) * (U + contrast) + mean_over_CHW

    def __post_init__(self):
        bad = [f for f in self.families if f not in FAMILIES]
        if bad:
            raise ValueError(f"unknown DSA families {bad} in strategy {self.strategy!r}; "
                             f"valid families: {', '.join(FAMILIES)} (or 'none')")
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"repeated family in strategy {self.strategy!r}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"flip is a probability, got {self.flip}")
        if self.scale < 1.0:
            raise ValueError(f"scale must be >= 1 (range [1/scale, scale]), got {self.scale}")

    @property
    def families(self) -> tuple[str, ...]:
        """Family names of the strategy in order; 'none' or '' means no augmentation."""
        if self.strategy.lower() in ("", "none"):
            return ()
        return tuple(self.strategy.split("_"))


def identity_params(n: int, image_size: tuple[int, int]) -> dict[str, tf.Tensor]:
    """Parameters for which ``apply`` returns its input bit for bit.

    Exactness holds because every op is written so that identity values reduce to
    ``x*1 + m*0``, ``x + 0`` or an integer-aligned warp with 0/1 bilinear weights.
    ``image_size`` is accepted for symmetry with ``sample`` (identity needs no size).
    """
    del image_size
    z, o = tf.zeros([n], tf.float32), tf.ones([n], tf.float32)
    return {
        "family": tf.fill([n], NO_FAMILY),
        "brightness": z,  # [n] additive offset
        "saturation": o,  # [n] factor around the per-pixel channel mean
        "contrast": o,  # [n] factor around the per-image mean
        "shift": tf.zeros([n, 2], tf.int32),  # [n, (dx, dy)] integer crop translation
        "flip": z,  # [n] 1.0 = mirror the width axis
        "scale": tf.ones([n, 2], tf.float32),  # [n, (sx, sy)]
        "rotate": z,  # [n] degrees
        "cutout_center": tf.zeros([n, 2], tf.int32),  # [n, (cx, cy)]
        "cutout_size": tf.zeros([n, 2], tf.int32),  # [n, (sw, sh)]; 0 = no cutout
    }


def sample(seed, n: int, image_size: tuple[int, int], config: DSAConfig = DSAConfig(),
           one_family: bool = False) -> dict[str, tf.Tensor]:
    """Draw per-sample DSA parameters (every entry has leading dim ``n``).

    ``seed`` is an int32/int64 ``[2]`` tensor; each random quantity uses its own
    sub-seed from ``stateless_split`` so the draws are independent and reproducible.
    With ``one_family`` the family draw is shared by all samples (values stay per sample).
    """
    height, width = int(image_size[0]), int(image_size[1])
    params = identity_params(n, image_size)
    if not config.families:
        return params
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer:
        raise TypeError(f"seed must be an integer tensor of shape [2], got {seed.dtype}")
    # int64 so that equal seed values give equal draws whatever the caller's int dtype.
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=12, alg=_ALG)

    def randint(k, lo, hi, shape=(n,)):  # ints uniform in [lo, hi) from sub-seed slot k
        return tf.random.stateless_uniform(list(shape), seeds[k], minval=lo, maxval=hi,
                                           dtype=tf.int32, alg=_ALG)

    def uniform(k, lo, hi, shape=(n,)):  # U[lo, hi) on a 2^24-point grid, built from ints
        # int * (float32 step) is exact in float64, so the single rounding of "+ lo" is the
        # same with or without XLA's fused multiply-add (bit-identical eager and jit).
        step = float(np.float32(hi - lo)) * 2.0 ** -24
        k_int = tf.cast(randint(k, 0, 1 << 24, shape), tf.float64)
        return tf.cast(k_int * step + lo, tf.float32)

    def randint2(k, lo, hi):  # [n, 2] ints, column j uniform in [lo[j], hi[j])
        cols = []
        for j in range(2):
            sub = tf.random.experimental.stateless_fold_in(seeds[k], j, alg=_ALG)
            cols.append(tf.random.stateless_uniform([n], sub, minval=lo[j], maxval=hi[j],
                                                    dtype=tf.int32, alg=_ALG))
        return tf.stack(cols, axis=1)

    ids = tf.constant([FAMILIES.index(f) for f in config.families], tf.int32)  # [F]
    draw = randint(0, 0, len(config.families), [] if one_family else [n])  # [] or [n]
    family = tf.broadcast_to(tf.gather(ids, draw), [n])  # [n] global family ids
    params["family"] = family

    def on(name):  # [n] bool: family drawn for this sample
        return tf.equal(family, FAMILIES.index(name))

    def pick(name, value, ident):  # value where drawn, identity elsewhere
        mask = on(name)
        if value.shape.rank == 2:
            mask = mask[:, None]
        return tf.where(mask, value, ident)

    c = config
    half = 0.5 * c.brightness
    params["brightness"] = pick("color", uniform(1, -half, half), params["brightness"])
    params["saturation"] = pick("color", uniform(2, 0.0, c.saturation), params["saturation"])
    params["contrast"] = pick("color", uniform(3, c.contrast, c.contrast + 1.0), params["contrast"])

    rx, ry = int(c.crop * width + 0.5), int(c.crop * height + 0.5)
    params["shift"] = pick("crop", randint2(4, (-rx, -ry), (rx + 1, ry + 1)), params["shift"])

    flip = tf.cast(uniform(5, 0.0, 1.0) < c.flip, tf.float32)
    params["flip"] = pick("flip", flip, params["flip"])

    scale = uniform(6, 1.0 / c.scale, c.scale, (n, 2))  # [n, (sx, sy)]
    params["scale"] = pick("scale", scale, params["scale"])
    params["rotate"] = pick("rotate", uniform(7, -c.rotate, c.rotate), params["rotate"])

    sw, sh = int(c.cutout * width + 0.5), int(c.cutout * height + 0.5)
    center = randint2(8, (0, 0), (width + 1 - sw % 2, height + 1 - sh % 2))  # [n, (cx, cy)]
    size = tf.broadcast_to(tf.constant([sw, sh], tf.int32), [n, 2])
    params["cutout_center"] = pick("cutout", center, params["cutout_center"])
    params["cutout_size"] = pick("cutout", size, params["cutout_size"])
    return params


def take(params: dict, idx) -> dict:
    """Gather every parameter along axis 0: ``take(p, labels)[i] = p[labels[i]]``.

    Giving the real and the synthetic batch ``take(p, their_labels)`` makes them
    Siamese: all images of one class see the same transformation.
    """
    return {k: tf.gather(v, idx, axis=0) for k, v in params.items()}


def _color(x, params):
    """brightness -> saturation -> contrast; written as x*f + m*(1-f) so f=1 is exact."""
    dt = x.dtype
    b, s, c = (tf.cast(params[k], dt)[:, None, None, None]  # [n,1,1,1]
               for k in ("brightness", "saturation", "contrast"))
    x = x + b
    mean_c = tf.reduce_mean(x, axis=3, keepdims=True)  # [n,H,W,1]
    x = x * s + mean_c * (1.0 - s)
    mean_chw = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)  # [n,1,1,1]
    return x * c + mean_chw * (1.0 - c)


def _warp(x, params):
    """One bilinear affine warp per sample implementing crop, flip, scale and rotate.

    In pixel coordinates centred on the image centre (cx, cy) = ((W-1)/2, (H-1)/2),
    the reference's normalised ``align_corners=True`` map becomes
        src = M @ dst + t,   M = diag(fx*sx, sy) @ R,   t = (dx, dy)
    with fx = -1 for flip and R = [[cos a, sin a*rw/rh], [-sin a*rh/rw, cos a]], where
    rw, rh = (W-1)/2, (H-1)/2 (the reference rotates in normalised coordinates).
    Composition order matches the reference (crop, flip, scale, rotate as successive
    ops on the image means their coordinate maps compose rotate-first).
    """
    _, height, width, channels = x.shape
    n = tf.shape(x)[0]
    rw, rh = (width - 1) / 2.0, (height - 1) / 2.0
    a = params["rotate"] * (math.pi / 180.0)  # [n] radians
    cos, sin = tf.cos(a), tf.sin(a)
    fx = 1.0 - 2.0 * params["flip"]  # [n] +1 or -1
    sx, sy = params["scale"][:, 0] * fx, params["scale"][:, 1]
    m00, m01 = sx * cos, sx * sin * (rw / rh)  # [n] each
    m10, m11 = -sy * sin * (rh / rw), sy * cos
    shift = tf.cast(params["shift"], tf.float32)  # [n, 2]

    def col(v):
        return v[:, None, None]  # [n] -> [n,1,1]

    xc = tf.range(width, dtype=tf.float32)[None, None, :] - rw  # [1,1,W] centred dst col
    yc = tf.range(height, dtype=tf.float32)[None, :, None] - rh  # [1,H,1] centred dst row
    src_x = col(m00) * xc + col(m01) * yc + col(shift[:, 0] + rw)  # [n,H,W] source col
    src_y = col(m10) * xc + col(m11) * yc + col(shift[:, 1] + rh)  # [n,H,W] source row
    src_x = tf.clip_by_value(src_x, -2.0, width + 1.0)  # beyond this only zero padding is hit
    src_y = tf.clip_by_value(src_y, -2.0, height + 1.0)
    x0, y0 = tf.floor(src_x), tf.floor(src_y)
    wx, wy = src_x - x0, src_y - y0  # [n,H,W] bilinear weights of the +1 neighbours
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)

    # Zero-padded image: pixel (r, c) lives at padded (r+1, c+1); indices clipped into
    # [-1, size] land on the zero border, which gives grid_sample's zero padding.
    padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])  # [n,H+2,W+2,C]
    flat = tf.reshape(padded, [n, (height + 2) * (width + 2), channels])

    def index(yy, xx):  # [n,H,W] -> [n,H*W] flat index into padded
        yy = tf.clip_by_value(yy, -1, height) + 1
        xx = tf.clip_by_value(xx, -1, width) + 1
        return tf.reshape(yy * (width + 2) + xx, [n, height * width])

    idx = tf.concat([index(y0, x0), index(y0, x0 + 1), index(y0 + 1, x0), index(y0 + 1, x0 + 1)],
                    axis=1)  # [n, 4*H*W]
    v = tf.reshape(tf.gather(flat, idx, batch_dims=1), [n, 4, height, width, channels])
    wx, wy = tf.cast(wx, x.dtype)[..., None], tf.cast(wy, x.dtype)[..., None]  # [n,H,W,1]
    top = v[:, 0] * (1.0 - wx) + v[:, 1] * wx
    bottom = v[:, 2] * (1.0 - wx) + v[:, 3] * wx
    return top * (1.0 - wy) + bottom * wy  # [n,H,W,C]


def _cutout(x, params):
    """Zero rows [cy - sh//2, cy - sh//2 + sh) x cols [cx - sw//2, ...) clipped to the image."""
    _, height, width, _ = x.shape
    center, size = params["cutout_center"], params["cutout_size"]  # [n, (x, y)]
    lo = center - size // 2  # [n, 2]

    def inside(length, k):  # [n, length] bool
        r = tf.range(length, dtype=tf.int32)[None, :]
        return (r >= lo[:, k:k + 1]) & (r < lo[:, k:k + 1] + size[:, k:k + 1])

    hole = inside(height, 1)[:, :, None] & inside(width, 0)[:, None, :]  # [n,H,W]
    return x * tf.cast(~hole, x.dtype)[..., None]


def apply(x, params) -> tf.Tensor:
    """Augment ``x`` [n,H,W,C] with per-sample ``params``; same shape, differentiable in x.

    Order: color -> geometric warp -> cutout (cutout last, so the zeroed square is in
    output coordinates).  For fixed params the map is affine in ``x``.
    """
    x = tf.convert_to_tensor(x)  # also accepts tf.Variable
    if x.shape.rank != 4 or x.shape[1] is None or x.shape[2] is None:
        raise ValueError(f"apply expects NHWC with static H, W; got shape {x.shape}")
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"apply needs H, W >= 2 (align_corners grid); got shape {x.shape}")
    return _cutout(_warp(_color(x, params), params), params)


# -- CutMix: the IDC evaluation protocol's augmentation (it mixes labels, so it trains networks
# on a set; it is not Siamese and no matching loss uses it) ----------------------------------
def cutmix_box(seed, n: int, height: int, width: int, prob: float, beta: float) -> dict:
    """Random CutMix parameters (IDC's rand_bbox): applied with `prob`, lam ~ Beta(beta, beta),
    a batch permutation, and a box of side floor(size*sqrt(1-lam)) (halved, rounded down, on each
    side of a uniform centre, clipped to the image). Rows [y1, y2), columns [x1, x2)."""
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    applied = tf.random.stateless_uniform([], s[0]) < prob
    g1, g2 = (tf.random.stateless_gamma([], s[i], alpha=beta) for i in (1, 2))
    lam = g1 / (g1 + g2)
    perm = tf.argsort(tf.random.stateless_uniform([n], s[3]))
    cut = tf.sqrt(1.0 - lam)
    half_h = tf.cast(tf.floor(height * cut), tf.int32) // 2
    half_w = tf.cast(tf.floor(width * cut), tf.int32) // 2
    cy = tf.random.stateless_uniform([], s[4], 0, height, tf.int32)
    cx = tf.random.stateless_uniform([], s[5], 0, width, tf.int32)
    y1, y2 = tf.clip_by_value(cy - half_h, 0, height), tf.clip_by_value(cy + half_h, 0, height)
    x1, x2 = tf.clip_by_value(cx - half_w, 0, width), tf.clip_by_value(cx + half_w, 0, width)
    y2, x2 = tf.where(applied, y2, y1), tf.where(applied, x2, x1)  # not applied: empty box
    return {"applied": applied, "lam": lam, "perm": perm, "y1": y1, "y2": y2, "x1": x1, "x2": x2}


def cutmix(seed, x, y, prob: float, beta: float = 1.0):
    """CutMix: pastes a box of a permuted batch into x. Returns (mixed x [B,H,W,C], permuted
    labels [B], ratio): the loss is ratio * CE(y) + (1 - ratio) * CE(permuted labels)."""
    _, h, w, _ = x.shape
    box = cutmix_box(seed, x.shape[0], h, w, prob, beta)
    rows, cols = tf.range(h), tf.range(w)
    inside = (((rows >= box["y1"]) & (rows < box["y2"]))[:, None]
              & ((cols >= box["x1"]) & (cols < box["x2"]))[None, :])          # [H, W]
    mixed = tf.where(inside[None, :, :, None], tf.gather(x, box["perm"]), x)
    area = tf.cast((box["y2"] - box["y1"]) * (box["x2"] - box["x1"]), tf.float32)
    return mixed, tf.gather(y, box["perm"]), 1.0 - area / float(h * w)
