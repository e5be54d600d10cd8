"""Cross-architecture evaluation networks: ResNet-10, DenseNet-121 (CIFAR forms), EfficientNetV2-S.

The field judges a condensed set by how well it trains networks it was NOT condensed with
(ESP paper, Tables 2 and 3). These are the nets of those tables, as functional Keras models
returning logits, registered into `models.ARCHS` so that `models.build(name, shape, classes)`
builds them like ConvNet-3. All use BatchNorm, so they are stateful: they are trained through
their Keras variables (evaluate.py), never through `models.FlatModel`.

- `resnet10`: the CIFAR ResNet-10 of IDC's code: 3x3 stem of 32 channels, no
  max-pool, one basic block per stage, widths 32/64/128/256, global average pool, Dense.
  `resnet10_w64` is IDC's ResNet-10 for its non-CIFAR datasets (widths 64..512, same 3x3 stem):
  4.90 M trainable parameters, the number the ESP paper quotes for ResNet-10.
- `densenet121`: the CIFAR DenseNet-BC (bottleneck blocks [6, 12, 24, 16], growth rate 12,
  compression 0.5, 3x3 stem of 2*growth channels) that IDC trains. `densenet121_g32` is the same
  with growth 32 (pytorch-cifar's "DenseNet121"): 6.96 M, the number the ESP paper quotes.
- `efficientnetv2s`: keras-cv's `EfficientNetV2Backbone` from an explicit stack configuration
  (keras-cv 0.9's named EfficientNetV2 classes and presets download their architecture config,
  even with load_weights=False, and fail offline; keras-cv is unmaintained), rescaling off
  (inputs are already normalised), global average pool, dropout 0.2, Dense.

Inputs of any size >= 28 work (28x28x1, 32x32x3, 64x64x3 tested): pooling at the end is global.
Initialisers follow the PyTorch references (IDC / pytorch-cifar), so that results are comparable.
"""
from __future__ import annotations

import math
from typing import Callable

import keras
import numpy as np

_BN = {"momentum": 0.9, "epsilon": 1e-5}  # PyTorch BatchNorm2d defaults (momentum 0.1 there)


def _torch_default(fan_in: int):
    """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kernels and biases)."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


def _dense_head(x, num_classes: int, name: str = "classifier"):
    """nn.Linear with PyTorch's default init, returning logits."""
    fan_in = int(x.shape[-1])
    return keras.layers.Dense(num_classes, kernel_initializer=_torch_default(fan_in),
                              bias_initializer=_torch_default(fan_in), name=name)(x)


def _conv(x, filters: int, kernel: int, stride: int, init, name: str):
    """Bias-free conv with PyTorch's symmetric zero padding of (kernel - 1) // 2.

    Keras 'same' pads stride-2 convs on the bottom/right only; explicit padding keeps the
    sampling grid of the references.
    """
    pad = (kernel - 1) // 2
    if pad and stride > 1:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same" if pad else "valid"
    fan_in, fan_out = kernel * kernel * int(x.shape[-1]), kernel * kernel * filters
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False,
                               kernel_initializer=init(fan_in, fan_out), name=name)(x)


def _bn(x, name: str):
    return keras.layers.BatchNormalization(**_BN, name=name)(x)


def _bn_relu(x, name: str):
    return keras.layers.ReLU(name=f"{name}_relu")(_bn(x, f"{name}_bn"))


# ======================================================================================
# ResNet (IDC's models/resnet.py, 'small' input size: 3x3 stem, no max-pool)
# ======================================================================================
def _he_fan_out(fan_in: int, fan_out: int):
    """IDC's ResNet conv init: N(0, sqrt(2 / (k*k*out_channels))), not truncated."""
    del fan_in
    return keras.initializers.RandomNormal(0.0, math.sqrt(2.0 / fan_out))


def resnet(input_shape, num_classes: int, *, width: int = 32, blocks=(1, 1, 1, 1),
           name: str | None = None) -> keras.Model:
    """ResNet with basic blocks; stage widths width * (1, 2, 4, 8), strides (1, 2, 2, 2).

    Defaults are IDC's CIFAR ResNet-10: width 32, one block per stage (depth 2 + 2 * 4 = 10).
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _bn_relu(_conv(inputs, width, 3, 1, _he_fan_out, "stem_conv"), "stem")
    for stage, repeats in enumerate(blocks):
        filters = width * 2 ** stage
        for b in range(repeats):
            stride = 2 if stage > 0 and b == 0 else 1
            p = f"stage{stage + 1}_block{b + 1}"
            shortcut = x
            if stride != 1 or int(x.shape[-1]) != filters:
                shortcut = _bn(_conv(x, filters, 1, stride, _he_fan_out, f"{p}_down_conv"), f"{p}_down_bn")
            y = _bn_relu(_conv(x, filters, 3, stride, _he_fan_out, f"{p}_conv1"), f"{p}_conv1")
            y = _bn(_conv(y, filters, 3, 1, _he_fan_out, f"{p}_conv2"), f"{p}_bn2")
            x = keras.layers.ReLU(name=f"{p}_relu2")(keras.layers.Add(name=f"{p}_add")([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    depth = 2 + 2 * sum(blocks)
    return keras.Model(inputs, _dense_head(x, num_classes), name=name or f"resnet{depth}_w{width}")


# ======================================================================================
# DenseNet-BC for CIFAR (pytorch-cifar's densenet.py, as used by IDC): pre-activation layers
# ======================================================================================
def _torch_conv_init(fan_in: int, fan_out: int):
    del fan_out
    return _torch_default(fan_in)


def densenet(input_shape, num_classes: int, *, blocks=(6, 12, 24, 16), growth_rate: int = 12,
             reduction: float = 0.5, name: str | None = None) -> keras.Model:
    """DenseNet-BC: 3x3 stem (2*growth channels), bottleneck layers BN-ReLU-1x1(4g)-BN-ReLU-3x3(g)
    whose output is concatenated in front of their input, transitions BN-ReLU-1x1-avgpool2.

    Defaults are IDC's `densenet_cifar`: DenseNet-121's blocks (6, 12, 24, 16), growth 12, and
    DenseNet-BC's compression 0.5 at each transition.
    """
    g = growth_rate
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv(inputs, 2 * g, 3, 1, _torch_conv_init, "stem_conv")
    for d, repeats in enumerate(blocks):
        for i in range(repeats):
            p = f"dense{d + 1}_layer{i + 1}"
            y = _conv(_bn_relu(x, f"{p}_1"), 4 * g, 1, 1, _torch_conv_init, f"{p}_conv1")
            y = _conv(_bn_relu(y, f"{p}_2"), g, 3, 1, _torch_conv_init, f"{p}_conv2")
            x = keras.layers.Concatenate(name=f"{p}_concat")([y, x])
        if d < len(blocks) - 1:
            p = f"transition{d + 1}"
            out = int(math.floor(int(x.shape[-1]) * reduction))
            x = _conv(_bn_relu(x, p), out, 1, 1, _torch_conv_init, f"{p}_conv")
            x = keras.layers.AveragePooling2D(2, name=f"{p}_pool")(x)
    x = _bn_relu(x, "final")
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, _dense_head(x, num_classes), name=name or f"densenet_g{g}")


# ======================================================================================
# EfficientNetV2-S (keras-cv backbone from an explicit stack: works offline)
# ======================================================================================
# The stack of EfficientNetV2-S (Tan & Le 2021, Table 4), as keras.applications.EfficientNetV2S.
EFFICIENTNETV2_S = dict(
    stackwise_kernel_sizes=[3, 3, 3, 3, 3, 3],
    stackwise_num_repeats=[2, 4, 4, 6, 9, 15],
    stackwise_input_filters=[24, 24, 48, 64, 128, 160],
    stackwise_output_filters=[24, 48, 64, 128, 160, 256],
    stackwise_expansion_ratios=[1, 4, 4, 4, 6, 6],
    stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.0, 0.25, 0.25, 0.25],
    stackwise_strides=[1, 2, 2, 2, 1, 2],
    stackwise_conv_types=["fused", "fused", "fused", "unfused", "unfused", "unfused"],
    width_coefficient=1.0,
    depth_coefficient=1.0,
)


def efficientnetv2(input_shape, num_classes: int, *, stack: dict | None = None, dropout: float = 0.2,
                   name: str | None = None) -> keras.Model:
    """keras-cv EfficientNetV2 backbone + global average pool + dropout + Dense logits.

    `stack` defaults to EFFICIENTNETV2_S. `dropout` 0.2 is EfficientNetV2-S's top dropout
    (keras.applications and torchvision); the backbone keeps its stochastic depth (0.2 max).
    """
    import keras_cv  # late import: slow, and only this net needs it

    backbone = keras_cv.models.EfficientNetV2Backbone(
        include_rescaling=False,  # inputs are normalised already; True expects [0, 255]
        input_shape=tuple(input_shape), **(stack or EFFICIENTNETV2_S))
    x = keras.layers.GlobalAveragePooling2D(name="features")(backbone.output)
    if dropout:
        x = keras.layers.Dropout(dropout, name="top_dropout")(x)
    # keras.applications' classifier init for EfficientNets: U(+-sqrt(1/fan_out)), zero bias.
    init = keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_out", distribution="uniform")
    logits = keras.layers.Dense(num_classes, kernel_initializer=init, name="classifier")(x)
    return keras.Model(backbone.input, logits, name=name or "efficientnetv2s")


# name -> builder(input_shape, num_classes, **overrides); merged into models.ARCHS.
ARCHS: dict[str, Callable[..., keras.Model]] = {
    "resnet10": lambda s, c, **kw: resnet(s, c, **{"width": 32, "blocks": (1, 1, 1, 1), **kw}),
    "resnet10_w64": lambda s, c, **kw: resnet(s, c, **{"width": 64, "blocks": (1, 1, 1, 1), **kw}),
    "densenet121": lambda s, c, **kw: densenet(s, c, **{"growth_rate": 12, **kw}),
    "densenet121_g32": lambda s, c, **kw: densenet(s, c, **{"growth_rate": 32, **kw}),
    "efficientnetv2s": lambda s, c, **kw: efficientnetv2(s, c, **kw),
}


def param_counts(model: keras.Model) -> dict:
    """{'trainable': what PyTorch counts, 'total': + BatchNorm moving statistics (Keras' count)}.

    Random-generator states (keras-cv's dropout seeds) are variables but not parameters.
    """
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    stats = sum(int(np.prod(v.shape)) for v in model.non_trainable_variables
                if v.path.rsplit("/", 1)[-1] in ("moving_mean", "moving_variance"))
    return {"trainable": trainable, "total": trainable + stats}
