"""Networks used by esp_tf, and a flat-parameter view that drives them from one vector.

ConvNet-3 is the field's standard student/expert network (MTT, DC/DM; 320,010 parameters on CIFAR-10):
3 x [Conv3x3(128, same) -> InstanceNorm -> ReLU -> AvgPool2], Flatten, Dense(classes).

ESP needs the student as a *function* of an explicit parameter vector theta (so that
theta can be a plain tensor updated by projected SGD while the synthetic images receive
second-order gradients). `FlatModel` provides that: it flattens the Keras model's
trainable variables in a fixed layout and runs the model through `stateless_call`.
"""
from __future__ import annotations

import math
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import ops

FEATURES_LAYER = "features"


@keras.saving.register_keras_serializable(package="esp_tf")
class InstanceNorm(keras.layers.Layer):
    """Per-sample, per-channel normalisation over H and W with an affine transform.

    Written with the mean AND the variance both differentiable: Keras' GroupNormalization
    computes the variance around a gradient-stopped mean, which makes second-order
    gradients wrong (a float64 finite-difference check showed 0.5-3 % relative error with
    TF 2.21 / Keras 3.15), and ESP's projection loss is second order.
    """

    def __init__(self, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

    def call(self, x):
        mean = ops.mean(x, axis=(1, 2), keepdims=True)                      # [B,1,1,C]
        var = ops.mean(ops.square(x - mean), axis=(1, 2), keepdims=True)    # [B,1,1,C]
        return (x - mean) * ops.rsqrt(var + self.epsilon) * self.gamma + self.beta

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


_ACTIVATIONS = {"relu": "relu", "softplus": "softplus", "tanh": "tanh", "gelu": "gelu",
                "sigmoid": "sigmoid"}
_NORMS = ("instancenorm", "none")
_POOLS = ("avgpool", "maxpool", "none")


def convnet(input_shape, num_classes: int, *, width: int = 128, depth: int = 3,
            norm: str = "instancenorm", act: str = "relu", pool: str = "avgpool",
            name: str | None = None, dtype: str = "float32") -> keras.Model:
    """ConvNet-`depth` of the DC/DM/MTT papers as a functional Keras model returning logits.

    28x28 inputs are zero-padded by 2 before the first conv (the reference pads the first
    conv by 3), so feature maps are 32x32 as for CIFAR. The layer named "features" is the
    flattened embedding used by distribution matching.
    """
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if pool not in _POOLS:
        raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
    if act not in _ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
    inputs = keras.Input(shape=tuple(input_shape), name="image", dtype=dtype)
    kw = {"dtype": dtype}
    x = inputs
    if tuple(input_shape[:2]) == (28, 28):
        x = keras.layers.ZeroPadding2D(2, name="pad28to32", **kw)(x)
    for d in range(depth):
        x = keras.layers.Conv2D(width, 3, padding="same", name=f"conv{d}", **kw)(x)
        if norm == "instancenorm":
            x = InstanceNorm(name=f"norm{d}", **kw)(x)
        x = keras.layers.Activation(_ACTIVATIONS[act], name=f"act{d}", **kw)(x)
        if pool == "avgpool":
            x = keras.layers.AveragePooling2D(2, name=f"pool{d}", **kw)(x)
        elif pool == "maxpool":
            x = keras.layers.MaxPooling2D(2, name=f"pool{d}", **kw)(x)
    features = keras.layers.Flatten(name=FEATURES_LAYER, **kw)(x)
    logits = keras.layers.Dense(num_classes, name="classifier", **kw)(features)
    return keras.Model(inputs, logits, name=name or f"convnet{depth}_w{width}")


# name -> builder(input_shape, num_classes, **overrides). Variants are partials of one model.
ARCHS: dict[str, Callable[..., keras.Model]] = {
    "convnet": convnet,
    "convnet3": lambda s, c, **kw: convnet(s, c, **{"depth": 3, **kw}),
    "convnet4": lambda s, c, **kw: convnet(s, c, **{"depth": 4, **kw}),   # 64x64 inputs (Tiny ImageNet)
    "convnet5": lambda s, c, **kw: convnet(s, c, **{"depth": 5, **kw}),   # 128x128 (ImageNet subsets, MTT)
    "convnet_tiny": lambda s, c, **kw: convnet(s, c, **{"width": 8, "depth": 2, **kw}),
}
from esp_tf import archs as _archs  # noqa: E402  (ResNet-10, DenseNet-121, EfficientNetV2-S)
ARCHS.update(_archs.ARCHS)


def build(name: str, input_shape, num_classes: int, **kwargs) -> keras.Model:
    """Builds architecture `name` (see ARCHS) for `input_shape` (H, W, C) and `num_classes`."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[name](tuple(input_shape), num_classes, **kwargs)


class FlatModel:
    """A stateless Keras model driven by one flat float32 parameter vector theta.

    `layout` lists (variable path, shape) in the order theta concatenates them; it is what
    trajectory files record so that a mismatched model is caught when they are read.
    """

    def __init__(self, model: keras.Model):
        if model.non_trainable_variables:
            raise ValueError(
                f"{model.name} has non-trainable state ({[v.path for v in model.non_trainable_variables]}); "
                "a flat-parameter student must be stateless (use instance norm, not batch norm)")
        self.model = model
        self.variables = list(model.trainable_variables)
        self.layout = tuple((v.path, tuple(int(d) for d in v.shape)) for v in self.variables)
        self.sizes = [int(np.prod(s)) for _, s in self.layout]
        self.num_params = int(sum(self.sizes))
        self.dtype = tf.as_dtype(self.variables[0].dtype)
        # Same layers, two outputs: the embedding and the logits, in one forward pass.
        both = keras.Model(model.inputs, [model.get_layer(FEATURES_LAYER).output, model.outputs[0]])
        if [v.path for v in both.trainable_variables] != [p for p, _ in self.layout]:
            raise ValueError("feature model does not share the classifier's parameter order")
        self._both = both

    @property
    def feature_dim(self) -> int:
        """D: the size of the embedding `features` returns."""
        return int(self._both.outputs[0].shape[-1])

    # -- flat <-> structured ------------------------------------------------------------
    def unflatten(self, theta) -> list[tf.Tensor]:
        """theta [P] -> list of tensors shaped like the model's trainable variables."""
        parts = tf.split(theta, self.sizes)
        return [tf.reshape(p, s) for p, (_, s) in zip(parts, self.layout)]

    def flatten(self, tensors) -> tf.Tensor:
        """List of tensors in layout order -> theta [P]."""
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    def get_flat(self) -> tf.Tensor:
        return self.flatten([v.value for v in self.variables])

    def set_flat(self, theta) -> None:
        for v, t in zip(self.variables, self.unflatten(tf.cast(theta, self.dtype))):
            v.assign(t)

    # -- functional forward ---------------------------------------------------------------
    def logits(self, theta, x) -> tf.Tensor:
        """f(theta, x): logits [B, classes] with parameters taken from theta."""
        out, _ = self.model.stateless_call(self.unflatten(theta), [], x, training=True)
        return out

    def features_and_logits(self, theta, x) -> tuple[tf.Tensor, tf.Tensor]:
        """Embedding [B, D] (flattened features before the classifier) and logits [B, classes]."""
        (feat, out), _ = self._both.stateless_call(self.unflatten(theta), [], x, training=True)
        return feat, out

    def features(self, theta, x) -> tf.Tensor:
        return self.features_and_logits(theta, x)[0]

    # -- initialisation -----------------------------------------------------------------
    def init(self, seed) -> tf.Tensor:
        """Fresh parameters, PyTorch's default init (the field's reference nets use it).

        Conv/Dense kernels and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm gamma 1,
        beta 0. `seed` is a [2] int tensor (stateless RNG), so inits are reproducible.
        """
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64),
                                                       len(self.layout))
        parts, fan_in = [], 1
        for i, (path, shape) in enumerate(self.layout):
            leaf = path.rsplit("/", 1)[-1]
            if leaf == "kernel":
                fan_in = int(np.prod(shape[:-1]))
            if leaf in ("kernel", "bias"):
                bound = 1.0 / math.sqrt(fan_in)
                parts.append(tf.random.stateless_uniform(shape, seeds[i], -bound, bound, dtype=self.dtype))
            elif leaf == "gamma":
                parts.append(tf.ones(shape, self.dtype))
            elif leaf == "beta":
                parts.append(tf.zeros(shape, self.dtype))
            else:
                raise ValueError(f"no init rule for parameter {path}")
        return self.flatten(parts)
