"""The learnable condensed set. It renders images and labels; it owns no optimizer and no loss.

Two parameterisations share one interface (render, labels, num_parameters, images_per_class,
variable_groups, budget, num_classes, ipc, image_shape), both at the storage budget of IPC
images per class (IPC x H x W x Ch floats per class):

* PixelSynthetic: one learnable image per stored slot, IPC per class, initialised from
  Gaussian noise (the paper, section 3.3) or from real images of the class.
* LatentSynthetic: learnable latent codes plus a few tiny decoders shared by all classes
  (the paper, section 4.2, after KFS); every code x decoder pair is one rendered image, so a
  class renders more images than IPC at the same float count.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from esp_tf.choices import DECODERS, INITS, RANGE_MAPS  # noqa: F401  (named once, TF-free)


# Each parameterisation's own settings, with their defaults (the only place they are set). Field
# names are the command line's flag names (esp_tf/cli.py declares the flags, default None: the
# parameterisation's own); a run's identity holds the chosen parameterisation's fields only.
@dataclasses.dataclass(frozen=True)
class PixelsConfig:
    pixels_lr: float | None = None   # lr of the pixels (normalised units); None: the method's own
    #                                  (Method.default_lr_pixels, with Method.pixel_optimizer)


@dataclasses.dataclass(frozen=True)
class LatentsConfig:
    codes_lr: float = 0.1            # Adam lr of the latent codes (paper 4.2)
    decoders_lr: float = 0.01        # Adam lr of the shared decoders (paper 4.2)
    num_decoders: int = 4            # D: decoders shared by all classes; renders per code
    latent_downsample: int | None = None   # f: codes are H/f x W/f; None: default_downsample(ipc)
    latent_channels: int | None = None   # k: channels of a code (None: the image's)
    decoder: str = "residual"        # decoder architecture (DECODERS)
    decoder_hidden: int = 16         # channels inside each decoder
    decoder_init: float = 0.1        # scale of each decoder's residual branch at init (normalised units)

    def for_ipc(self, ipc: int) -> "LatentsConfig":
        """This config with the settings whose default depends on the set size filled in."""
        if self.latent_downsample is not None:
            return self
        return dataclasses.replace(self, latent_downsample=default_downsample(ipc))


def default_downsample(ipc: int) -> int:
    """The code resolution H/f of the latent parameterisation when --latent_downsample is unset:
    f = 4 at IPC 1, f = 2 above. Chosen with DM on the validation splits of CIFAR-10 and
    Fashion-MNIST, 3 seeds, equal updates and equal evaluation steps (BENCHMARKS.md, "The
    synthetic set's design"). At IPC 1 codes at H/4 render 56 images per class on CIFAR-10
    (48.37 against 38.83 at H/2, whose 3 codes render 12) and lose 0.5 on Fashion-MNIST (79.53
    against 80.05): +4.5 on the two datasets' mean. At IPC 10 codes at H/2 win on both
    (CIFAR-10 57.26 against 55.85, Fashion-MNIST 85.69 against 81.37). Sizes between 1 and 10,
    and above 10, were not measured; they take H/2. Codes at H/4 cost 2.5-3.5x the time per
    update (every render passes through the network)."""
    return 4 if int(ipc) <= 1 else 2


def _pixel_range(pixel_range, channels: int, range_map: str = "clip"):
    """(lo, hi, range_map): per-channel bounds as float32 constants [Ch] and how renders are
    kept inside them (RANGE_MAPS), or None (unbounded)."""
    if range_map not in RANGE_MAPS:
        raise ValueError(f"range_map must be one of {RANGE_MAPS}, got {range_map!r}")
    if pixel_range is None:
        return None
    lo, hi = (np.broadcast_to(np.asarray(b, np.float32), (channels,)) for b in pixel_range)
    if not np.all(lo < hi):
        raise ValueError(f"pixel_range: every lower bound must be below its upper bound, got {lo}, {hi}")
    return tf.constant(lo), tf.constant(hi), range_map


def _tanh_parts(bounds):
    lo, hi, _ = bounds
    return (lo + hi) / 2, (hi - lo) / 2          # centre and half-width [Ch]


def _from_range(x, bounds) -> np.ndarray:
    """The stored values whose render is the image x (inverse of `_clip`; real-image init). With
    "tanh", x is pulled inside the open range by 1e-3 of its half-width first (atanh(+-1) is
    infinite), so a real pixel at 0 or 255 renders within 0.13 grey levels of itself."""
    x = np.asarray(x, np.float32)
    if bounds is None or bounds[2] == "clip":
        return x
    mid, half = (t.numpy() for t in _tanh_parts(bounds))
    return mid + half * np.arctanh(np.clip((x - mid) / half, -0.999, 0.999))


def _clip(x, bounds):
    """Rendered images kept inside [lo, hi] per channel (identity without bounds).

    Why: the images ARE the product, exported as uint8 pictures, and they train networks
    that did not condense them. Unbounded, latent renders drift far outside the real pixel
    range (measured: CIFAR-10 ESP latents at std 6.8 and values to +-44 normalised units,
    against about +-2 for real images). ConvNet-3's instance norm does not mind the scale,
    but BatchNorm networks then keep statistics no real image has, and the uint8 export
    clips the set into another one. Clipping (as IDC clamps its pixels) keeps every render
    a valid image. A clipped pixel passes no gradient; pixels inside the range are unchanged.

    range_map "tanh" is the smooth alternative: mid + half * tanh((x - mid) / half) maps every
    value strictly inside the range with slope 1 at the centre, so no value ever loses its
    gradient (measured: clipping leaves 49-68 % of a latent set's values at a bound).
    """
    if bounds is None:
        return x
    if bounds[2] == "tanh":
        mid, half = _tanh_parts(bounds)
        return mid + half * tf.tanh((x - mid) / half)
    return tf.clip_by_value(x, bounds[0], bounds[1])


class PixelSynthetic(tf.Module):
    """IPC learnable images per class, in normalised pixel space; labels are fixed, class-major."""

    def __init__(self, num_classes: int, ipc: int, image_shape, *, init: str = "real",
                 real_images: np.ndarray | None = None, seed: int = 0,
                 pixel_range=None, range_map: str = "clip", name: str = "synthetic"):
        super().__init__(name=name)
        self._bounds = _pixel_range(pixel_range, int(image_shape[-1]), range_map)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if ipc < 1:
            raise ValueError(f"ipc must be >= 1, got {ipc}")
        shape = (num_classes * ipc, *image_shape)
        if init == "real":
            if real_images is None or tuple(real_images.shape) != shape:
                raise ValueError(f"init='real' needs real_images of shape {shape} (class-major), "
                                 f"got {None if real_images is None else real_images.shape}")
            start = tf.convert_to_tensor(_from_range(real_images, self._bounds), tf.float32)
        else:
            start = tf.random.stateless_normal(shape, [seed, 7919])
        self.num_classes, self.ipc, self.image_shape = num_classes, ipc, tuple(image_shape)
        self.images = tf.Variable(start, name="images")                    # [C*ipc, H, W, Ch]
        self.labels = tf.constant(np.repeat(np.arange(num_classes), ipc), tf.int32)  # [C*ipc]

    def render(self) -> tuple[tf.Tensor, tf.Tensor]:
        """All synthetic images [C*ipc, H, W, Ch] and their labels [C*ipc] (no slicing)."""
        return _clip(tf.identity(self.images), self._bounds), self.labels

    # Rendering by units (chunks.py): a unit is the smallest piece of the set that renders on
    # its own; rendering every unit in order, one after another, gives `render()`.
    @property
    def num_units(self) -> int:
        """Stored images [C*ipc]; each renders one image."""
        return self.num_classes * self.ipc

    renders_per_unit = 1

    def render_units(self, index) -> tuple[tf.Tensor, tf.Tensor]:
        """The images of units `index` [k] (int32): [k, H, W, Ch] and their labels [k]."""
        return _clip(tf.gather(self.images, index), self._bounds), tf.gather(self.labels, index)

    @property
    def num_parameters(self) -> int:
        """Stored floats: the condensed set's storage budget."""
        return int(np.prod(self.images.shape))

    @property
    def images_per_class(self) -> int:
        return self.ipc

    def variable_groups(self) -> dict[str, list[tf.Variable]]:
        """Named groups that may get their own learning rate."""
        return {"pixels": [self.images]}

    # -- the parameterisation interface of the condensation loop (see PARAMETERISATIONS) --------
    @classmethod
    def real_images_needed(cls, s, image_shape, num_classes: int) -> int:
        """Distinct real images per class that init='real' under settings `s` takes."""
        return s.ipc

    @classmethod
    def from_settings(cls, s, num_classes: int, image_shape, real_images, pixel_range):
        """The set for condensation settings `s` (condense.CondenseSettings)."""
        return cls(num_classes, s.ipc, image_shape, init=s.init, real_images=real_images, seed=s.seed,
                   pixel_range=pixel_range, range_map=s.range_map)

    # The parameterisation's own settings (s.param_config); their fields are flags of the same
    # name, part of a run's identity only when the run uses this parameterisation
    # (pipeline.identity_flags).
    Config = PixelsConfig
    # settings (flag names; condense.settings) that make a tiny set of this kind, for the shared
    # test harnesses (tests/test_condense.py, tests/test_gpu_ready.py)
    tiny_settings = {"ipc": 2}

    @classmethod
    def learning_rates(cls, s, method) -> dict:
        """Group -> (optimizer factory, learning rate): pixels take the method's own optimizer
        (Adam for ESP, SGD with momentum for DM and MTT) at --pixels_lr or the method's lr."""
        lr = s.param_config.pixels_lr
        lr = lr if lr is not None else method.default_lr_pixels
        return {"pixels": (method.pixel_optimizer, lr)}

    def budget(self) -> dict:
        """Budget per class and parameters used per class (equal: one image per IPC slot)."""
        per_class = self.ipc * int(np.prod(self.image_shape))
        return {"budget_per_class": per_class, "params_per_class": per_class,
                "images_per_class": self.ipc}


# -- latent codes + shared decoders (paper section 4.2, after KFS) ----------------------------

def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out_size, in_size] matrix U with U @ z = 1-D bilinear resize of z (half-pixel centres).

    The same sampling rule as `tf.image.resize(..., "bilinear")` without antialiasing: output
    pixel o reads source position (o + 0.5) * in/out - 0.5, clamped to the border. Rows sum
    to 1, so U commutes with per-pixel affine maps (used to run the decoders' 1x1 skip at low
    resolution). Written as a matrix so rendering is two einsums (plain, twice-differentiable
    ops that XLA compiles) and so real images can be encoded with its pseudo-inverse.
    """
    src = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0, in_size - 1)
    lo = np.floor(src).astype(int)                                       # [out]
    hi = np.minimum(lo + 1, in_size - 1)                                 # [out]
    frac = src - lo                                                      # [out]
    u = np.zeros((out_size, in_size), np.float64)
    np.add.at(u, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(u, (np.arange(out_size), hi), frac)
    return u


# Decoder architectures of LatentSynthetic (--decoder); both add a residual branch to the same
# identity-initialised linear skip  U(z S + s)  (U: bilinear x f upsampling):
#   residual    conv3x3 (k -> m) on the code, SiLU, bilinear x f, conv3x3 (m -> Ch)
#   transposed  transposed conv f x f, stride f (k -> m: a learned x f upsampling), SiLU,
#               conv3x3 (m -> Ch)  (KFS builds its decoders from transposed convolutions)


def decoder_size(decoder: str, k: int, ch: int, hidden: int, downsample: int) -> int:
    """Stored floats of one decoder (weights and biases)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    skip = k * ch + ch                                   # 1x1 skip map k -> Ch, weights + bias
    out = 9 * hidden * ch + ch                           # conv3x3 at full resolution m -> Ch
    taps = 9 if decoder == "residual" else downsample ** 2   # conv3x3, or the f x f transposed conv
    return skip + taps * k * hidden + hidden + out


def latent_plan(ipc: int, image_shape, num_classes: int, *, num_decoders: int = LatentsConfig.num_decoders,
                downsample: int | None = None, code_channels: int | None = None,
                hidden: int = LatentsConfig.decoder_hidden, decoder: str = LatentsConfig.decoder) -> dict:
    """How LatentSynthetic spends the budget of `ipc` images per class (pure arithmetic).

    Budget: ipc * H * W * Ch floats per class, i.e. C * ipc * H * W * Ch in total. Every
    stored float counts: the codes of all classes plus ALL decoder weights and biases (the
    decoders are shared, so each class carries 1/C of them). The number of codes per class is
    the largest n with  C * n * code_size + num_decoders * decoder_size <= total budget.
    Raises ValueError when not even one code per class fits.
    """
    if len(tuple(image_shape)) != 3:
        raise ValueError(f"image_shape must be (H, W, Ch), got {image_shape}")
    downsample = default_downsample(ipc) if downsample is None else downsample
    h, w, ch = (int(d) for d in image_shape)
    k = ch if code_channels is None else int(code_channels)
    for name, value in (("ipc", ipc), ("num_classes", num_classes), ("num_decoders", num_decoders),
                        ("downsample", downsample), ("hidden", hidden)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if h % downsample or w % downsample:
        raise ValueError(f"downsample={downsample} must divide the image size {h}x{w}")
    if k < ch:
        raise ValueError(f"code_channels={k} must be >= the image channels ({ch}): the decoders' "
                         "identity skip (and the real-image init) carries the first Ch code channels")
    code_shape = (h // downsample, w // downsample, k)
    code_size = int(np.prod(code_shape))
    each = decoder_size(decoder, k, ch, hidden, downsample)
    per_class = ipc * h * w * ch
    total = num_classes * per_class
    decoders = num_decoders * each
    n = (total - decoders) // (num_classes * code_size)
    if n < 1:
        raise ValueError(
            f"latent budget too small: IPC {ipc} of {h}x{w}x{ch} for {num_classes} classes allows "
            f"{total} floats, but {num_decoders} decoders x {each} + one {code_shape} code per "
            f"class need {decoders + num_classes * code_size}. Use fewer decoders (num_decoders), a "
            f"smaller decoder (hidden), a larger downsample or fewer code_channels, or param=pixels.")
    used = num_classes * n * code_size + decoders
    return {
        "budget_per_class": per_class,                        # ipc * H * W * Ch floats
        "params_per_class": used / num_classes,               # codes + decoders / C
        "code_params_per_class": n * code_size,
        "decoder_share_per_class": decoders / num_classes,
        "budget_total": total,
        "params_total": used,
        "codes_per_class": int(n),
        "code_shape": code_shape,                             # (H/f, W/f, k)
        "num_decoders": num_decoders,
        "decoder_params_each": each,
        "decoder": decoder,
        "images_per_class": int(n) * num_decoders,            # every code x every decoder
        # codes come in whole (H/f x W/f x k) blocks, so up to one code per class stays unspent
        # (CIFAR-10 IPC 1: 2,662 of 3,072 floats used); stated here rather than hidden
        "unused_per_class": (total - used) / num_classes,
        "unused_fraction": round((total - used) / total, 4),
    }


class LatentSynthetic(tf.Module):
    """Learnable latent codes per class + a few tiny decoders shared by all classes.

    Storage (the paper's section 4.2 uses KFS's codes-and-decoders at the pixel budget):
      codes    [C*n, H/f, W/f, k]   n codes per class, class-major (n from `latent_plan`)
      decoders D of them, each  x = U(z S + s) + conv3(U(silu(conv3(z) + b1))) + b2
    where U is the bilinear x f upsampling. Every code goes through every decoder, so a class
    renders M = n * D images, class-major, then code-major, decoder fastest:
      rendered index  c*M + i*D + d  =  decoder d applied to code i of class c.

    Design choices, and why:
    * k = Ch by default, and f by set size (`default_downsample`): at IPC > 1, f = 2, a code is
      a half-resolution image, 4x fewer floats than a pixel image, so the budget buys ~4 codes
      per IPC slot; with D = 4 decoders a class renders ~16x IPC images. At IPC 1, f = 4: 16x
      fewer floats, ~14 codes once the decoders are paid, 56 renders per class on CIFAR-10
      (f = 2 leaves 3 codes, 12 renders, and scored 9.5 points lower there). Real images stay
      recognisable at both, so the real init starts from meaningful images.
    * Decoder = identity-initialised linear skip (1x1 map S, bias s, then bilinear upsampling)
      plus a small residual branch (conv3x3 k->hidden, SiLU, upsample, conv3x3 hidden->Ch).
      The skip makes the initial render the bilinear upsampling of the code; the residual
      branch adds learnable detail and style at full resolution. SiLU is smooth (no kinks) and
      every op is a standard differentiable TF op (einsum, conv2d), so the outer loss, itself a
      gradient of a gradient, differentiates through rendering like any other input path.
    * Decoders start near-identical but NOT identical: their residual branches get different
      small random weights (output scale `residual_init`). Identical decoders would receive
      identical gradients forever (the loss is symmetric in them) and render duplicates.
    * Real init: code channels :Ch are the least-squares encoding pinv(U) x pinv(U)^T of a real
      image (the best half-resolution code for the skip path), extra channels 0. The initial
      render is then that image up to its finest detail plus the small residual. Gaussian init:
      codes ~ N(0, 1) in normalised units (the paper's Gaussian init, at code resolution).

    Decoder weights are stacked over decoders in plain tf.Variables (no Keras layers), so the
    module checkpoints with tf.train.Checkpoint and gets gradients like any variable.
    """

    def __init__(self, num_classes: int, ipc: int, image_shape, *, init: str = "real",
                 real_images: np.ndarray | None = None,
                 num_decoders: int = LatentsConfig.num_decoders,   # D: images per code (class docstring)
                 downsample: int | None = None,  # f: code resolution H/f x W/f; None: default_downsample(ipc)
                 code_channels: int | None = None,                   # k: None -> image channels Ch
                 hidden: int = LatentsConfig.decoder_hidden,         # residual-branch width of each decoder
                 residual_init: float = LatentsConfig.decoder_init,  # initial residual output scale
                 decoder: str = LatentsConfig.decoder,                # residual-branch architecture (DECODERS)
                 seed: int = 0,
                 pixel_range=None,               # (lo, hi) per channel: renders are kept inside it
                 range_map: str = "clip",        # ... by clipping, or by a smooth tanh map
                 name: str = "synthetic"):
        super().__init__(name=name)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self._bounds = _pixel_range(pixel_range, int(image_shape[-1]), range_map)
        downsample = default_downsample(ipc) if downsample is None else downsample
        if not np.isfinite(residual_init) or residual_init < 0:
            raise ValueError(f"residual_init must be a finite number >= 0, got {residual_init}")
        self.design = dict(num_decoders=num_decoders, downsample=downsample,
                           code_channels=code_channels, hidden=hidden, decoder=decoder)
        self._plan = latent_plan(ipc, image_shape, num_classes, **self.design)
        h, w, ch = (int(d) for d in image_shape)
        n, (hc, wc, k) = self._plan["codes_per_class"], self._plan["code_shape"]
        self.num_classes, self.ipc, self.image_shape = num_classes, ipc, (h, w, ch)
        self.num_decoders, self.codes_per_class = num_decoders, n
        self.decoder, self.downsample = decoder, downsample
        uh, uw = bilinear_matrix(h, hc), bilinear_matrix(w, wc)          # [H, H/f], [W, W/f]
        self._uh, self._uw = tf.constant(uh, tf.float32), tf.constant(uw, tf.float32)

        shape = (num_classes * n, h, w, ch)
        if init == "real":
            if real_images is None or tuple(real_images.shape) != shape:
                raise ValueError(f"init='real' needs real_images of shape {shape} (class-major, "
                                 f"codes_per_class={n} per class), "
                                 f"got {None if real_images is None else real_images.shape}")
            x = np.asarray(_from_range(real_images, self._bounds), np.float64)   # [C*n, H, W, Ch]
            z = np.einsum("hH,nHWc,wW->nhwc", np.linalg.pinv(uh), x, np.linalg.pinv(uw))
            codes = np.concatenate([z, np.zeros((*z.shape[:3], k - ch))], -1)  # [C*n, H/f, W/f, k]
            codes = tf.constant(codes, tf.float32)
        else:
            codes = tf.random.stateless_normal((num_classes * n, hc, wc, k), [seed, 7919])
        self.codes = tf.Variable(codes, name="codes")                        # [C*n, H/f, W/f, k]

        d, m = num_decoders, hidden
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split([seed, 104729], 2))
        eye = np.eye(k, ch, dtype=np.float32)                                # first Ch channels
        self.skip_w = tf.Variable(np.tile(eye, (d, 1, 1)), name="skip_w")    # [D, k, Ch]
        self.skip_b = tf.Variable(tf.zeros((d, ch)), name="skip_b")          # [D, Ch]
        if decoder == "residual":
            he = np.sqrt(2.0 / (9 * k))                                      # He init, fan-in 9k
            self.conv1_w = tf.Variable(he * tf.random.stateless_normal((d, 3, 3, k, m), s1),
                                       name="conv1_w")                       # [D, 3, 3, k, m]
            self.conv1_b = tf.Variable(tf.zeros((d, m)), name="conv1_b")     # [D, m]
        else:      # transposed conv f x f, stride f: each output pixel reads one tap per channel
            f = downsample
            self.up_w = tf.Variable(np.sqrt(2.0 / k) * tf.random.stateless_normal((d, f, f, m, k), s1),
                                    name="up_w")                             # [D, f, f, m, k]
            self.up_b = tf.Variable(tf.zeros((d, m)), name="up_b")           # [D, m]
        small = residual_init / np.sqrt(9 * m)                               # residual ~ residual_init
        self.conv2_w = tf.Variable(small * tf.random.stateless_normal((d, 3, 3, m, ch), s2),
                                   name="conv2_w")                           # [D, 3, 3, m, Ch]
        self.conv2_b = tf.Variable(tf.zeros((d, ch)), name="conv2_b")        # [D, Ch]
        self.labels = tf.constant(np.repeat(np.arange(num_classes), n * d), tf.int32)  # [C*M]
        self._code_labels = tf.constant(np.repeat(np.arange(num_classes), n), tf.int32)  # [C*n]

    @classmethod
    def codes_per_class_for(cls, ipc: int, image_shape, num_classes: int, **design) -> int:
        """Codes per class the budget allows: the number of real images per class init='real' needs."""
        return latent_plan(ipc, image_shape, num_classes, **design)["codes_per_class"]

    def _upsample(self, z):
        """Bilinear x f upsampling [N, H/f, W/f, c] -> [N, H, W, c] as two matrix products."""
        z = tf.einsum("Hh,nhwc->nHwc", self._uh, z)
        return tf.einsum("Ww,nHwc->nHWc", self._uw, z)

    def decode(self, d: int, z) -> tf.Tensor:
        """Decoder d applied to codes z [N, H/f, W/f, k] -> images [N, H, W, Ch]."""
        ch = self.image_shape[-1]
        skip = tf.einsum("nhwk,kc->nhwc", z, self.skip_w[d]) + self.skip_b[d]     # [N, h, w, Ch]
        if self.decoder == "transposed":
            h, w, _ = self.image_shape
            m = self.up_w.shape[3]
            a = tf.nn.conv2d_transpose(z, self.up_w[d], tf.stack([tf.shape(z)[0], h, w, m]),
                                       self.downsample, "VALID") + self.up_b[d]    # [N, H, W, m]
            res = tf.nn.conv2d(tf.nn.silu(a), self.conv2_w[d], 1, "SAME") + self.conv2_b[d]
            return self._upsample(skip) + res
        a = tf.nn.conv2d(z, self.conv1_w[d], 1, "SAME") + self.conv1_b[d]          # [N, h, w, m]
        up = self._upsample(tf.concat([skip, tf.nn.silu(a)], -1))                  # [N, H, W, Ch+m]
        res = tf.nn.conv2d(up[..., ch:], self.conv2_w[d], 1, "SAME") + self.conv2_b[d]  # [N, H, W, Ch]
        return up[..., :ch] + res

    def _decode_all(self, z) -> tf.Tensor:
        """Every decoder on codes z [N, ...] -> [N*D, H, W, Ch], code-major, decoder fastest."""
        x = tf.stack([self.decode(d, z) for d in range(self.num_decoders)], 1)    # [N, D, H, W, Ch]
        return _clip(tf.reshape(x, (-1, *self.image_shape)), self._bounds)

    def render(self) -> tuple[tf.Tensor, tf.Tensor]:
        """All C*M images [C*M, H, W, Ch] (code x decoder, class-major) and labels [C*M]."""
        return self._decode_all(self.codes), self.labels

    # Rendering by units (chunks.py): a unit is one code with its D renders; rendering every
    # unit in order, one after another, gives `render()`.
    @property
    def num_units(self) -> int:
        """Codes [C*n]; each renders D images."""
        return self.num_classes * self.codes_per_class

    @property
    def renders_per_unit(self) -> int:
        return self.num_decoders

    def render_units(self, index) -> tuple[tf.Tensor, tf.Tensor]:
        """The D renders of each code in `index` [k] (int32): [k*D, H, W, Ch] and labels [k*D]."""
        labels = tf.repeat(tf.gather(self._code_labels, index), self.num_decoders)
        return self._decode_all(tf.gather(self.codes, index)), labels

    def render_flops(self) -> float:
        """FLOPs of rendering every image and its backward (the decoders' convolutions: forward
        and both gradients, 3 units). The bilinear upsampling and 1x1 skip einsums are not counted."""
        n, hc, wc, k = (int(d) for d in self.codes.shape)
        h, w, ch = self.image_shape
        m = int(self.conv2_w.shape[-2])
        if self.decoder == "transposed":
            first = h * w * k * m                  # one tap per input channel and output pixel
        else:
            first = hc * wc * 9 * k * m
        return 3 * self.num_decoders * 2.0 * n * (first + h * w * 9 * m * ch)

    @property
    def num_parameters(self) -> int:
        """Stored floats: codes plus every decoder weight and bias."""
        return int(sum(np.prod(v.shape) for v in self.trainable_variables))

    @property
    def images_per_class(self) -> int:
        """M = codes_per_class x num_decoders rendered images per class."""
        return self.codes_per_class * self.num_decoders

    def budget(self) -> dict:
        """Budget per class, parameters used per class (codes + decoders / C), shapes, counts."""
        return dict(self._plan)

    def variable_groups(self) -> dict[str, list[tf.Variable]]:
        """Codes and decoders: the paper trains them with Adam at lr 0.1 and 0.01."""
        first = ([self.conv1_w, self.conv1_b] if self.decoder == "residual" else [self.up_w, self.up_b])
        return {"codes": [self.codes],
                "decoders": [self.skip_w, self.skip_b, *first, self.conv2_w, self.conv2_b]}

    # -- the parameterisation interface of the condensation loop (see PARAMETERISATIONS) --------
    @classmethod
    def real_images_needed(cls, s, image_shape, num_classes: int) -> int:
        """Distinct real images per class that init='real' takes: one per code."""
        return cls.codes_per_class_for(s.ipc, image_shape, num_classes, **cls._design(s))

    @staticmethod
    def _design(s) -> dict:
        """The design arguments of condensation settings `s` (condense.CondenseSettings)."""
        c = s.param_config
        return dict(num_decoders=c.num_decoders, downsample=c.latent_downsample,
                    code_channels=c.latent_channels, hidden=c.decoder_hidden, decoder=c.decoder)

    @classmethod
    def from_settings(cls, s, num_classes: int, image_shape, real_images, pixel_range):
        return cls(num_classes, s.ipc, image_shape, init=s.init, real_images=real_images, seed=s.seed,
                   pixel_range=pixel_range, range_map=s.range_map, residual_init=s.param_config.decoder_init,
                   **cls._design(s))

    Config = LatentsConfig
    tiny_settings = {"ipc": 4, "num_decoders": 2}

    @classmethod
    def learning_rates(cls, s, method) -> dict:
        """Codes and decoders: Adam, whatever the method (paper 4.2), at --codes_lr/--decoders_lr."""
        return {"codes": (keras.optimizers.Adam, s.param_config.codes_lr),
                "decoders": (keras.optimizers.Adam, s.param_config.decoders_lr)}


# Parameterisations by name (--param). Each class gives the condensation loop the same interface:
# real_images_needed, from_settings, learning_rates, variable_groups, render, budget, the
# render_units / num_units / renders_per_unit of the whole-set gradient in pieces (chunks.py),
# and the class attributes Config (its settings, a frozen dataclass whose fields are flags of
# the same name; optionally a `for_ipc(ipc)` method returning the config with the defaults that
# depend on the set size filled in, which cli.resolve calls) and tiny_settings. A new one is its class plus one entry here
# (`PARAMETERISATIONS[name] = cls` from outside the package).
PARAMETERISATIONS = {"pixels": PixelSynthetic, "latents": LatentSynthetic}


def setting_names(kind) -> tuple:
    """The settings (flag names) parameterisation class `kind` reads: its Config's fields."""
    return tuple(f.name for f in dataclasses.fields(kind.Config))


def parameterisation(name: str):
    if name not in PARAMETERISATIONS:
        raise ValueError(f"param must be one of {', '.join(PARAMETERISATIONS)}, got {name!r}")
    return PARAMETERISATIONS[name]
