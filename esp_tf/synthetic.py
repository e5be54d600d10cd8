"""The learnable condensed set. It renders images and labels; it owns no optimizer and no loss.

Pixel parameterisation: one learnable image per stored slot, IPC per class, initialised
from Gaussian noise (the paper, section 3.3) or from real images of the class.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

INITS = ("gaussian", "real")


class PixelSynthetic(tf.Module):
    """IPC learnable images per class, in normalised pixel space; labels are fixed, class-major."""

    def __init__(self, num_classes: int, ipc: int, image_shape, *, init: str = "real",
                 real_images: np.ndarray | None = None, seed: int = 0, name: str = "synthetic"):
        super().__init__(name=name)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if ipc < 1:
            raise ValueError(f"ipc must be >= 1, got {ipc}")
        shape = (num_classes * ipc, *image_shape)
        if init == "real":
            if real_images is None or tuple(real_images.shape) != shape:
                raise ValueError(f"init='real' needs real_images of shape {shape} (class-major), "
                                 f"got {None if real_images is None else real_images.shape}")
            start = tf.convert_to_tensor(real_images, tf.float32)
        else:
            start = tf.random.stateless_normal(shape, [seed, 7919])
        self.num_classes, self.ipc, self.image_shape = num_classes, ipc, tuple(image_shape)
        self.images = tf.Variable(start, name="images")                    # [C*ipc, H, W, Ch]
        self.labels = tf.constant(np.repeat(np.arange(num_classes), ipc), tf.int32)  # [C*ipc]

    def render(self) -> tuple[tf.Tensor, tf.Tensor]:
        """All synthetic images [C*ipc, H, W, Ch] and their labels [C*ipc] (no slicing)."""
        return tf.identity(self.images), self.labels

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
