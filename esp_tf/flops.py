"""Analytic FLOP counts of the networks, a training step and an ESP update. Pure arithmetic.

Only convolutions and dense layers are counted, as 2 x multiply-adds, a 3x3 'same' convolution
over its full window (borders included). Norms, activations, pooling, DSA and the subspace
projection (P x S) are memory-bound or small (< 1 % of the FLOPs here) and are not counted.

Per image, with F the forward FLOPs of the network, F_conv those of its convolutions (the DM
embedding) and f0 those of its first layer:

    forward                     F
    training step               F + dW (F) + dX (F - f0)          = 3F - f0   (no input gradient
                                                                                of the first layer)
    ESP, real DM forward        F_conv per real image
    ESP, synthetic image        F + G (2F - f0) + outer (4F - f0) [+ F_conv]

The outer backward is reverse over reverse: it differentiates each forward convolution w.r.t. its
input (1 unit), each input-gradient convolution of G's backward w.r.t. its incoming gradient (1)
and each weight-gradient convolution w.r.t. both its operands (2); the first layer has no
input-gradient convolution in G. With both loss terms ESPStep takes L_DM's gradient separately
(to log the pull ratio): one more first-order backward through the convolutions, + F_conv.
`hlo_flops` counts the same from XLA's optimized HLO of a function, for a cross-check
(tools/speed_bench.py prints both: they agree to 0.01 % on the ESP outer function).

A forward-over-reverse scheme (a JVP of CE along E E^T-residual directions, then one reverse
pass) would cost G (3F - f0) + a JVP forward (3F) + its reverse (3F) = 9F - f0 per synthetic image
against 7F - 2f0 here, because reverse over reverse reuses the forward and backward that G
needs anyway; by this count it does not save FLOPs.
"""
from __future__ import annotations

import re


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def layer_flops(model) -> list[tuple[str, float]]:
    """(layer name, forward FLOPs per image) of every Conv2D and Dense layer of a Keras model."""
    import keras
    return [(layer.name, 2.0 * _prod(layer.output.shape[1:-1]) * _prod(layer.kernel.shape))
            for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]


def network_flops(model, embedding_excludes: str = "classifier") -> dict:
    """Per-image FLOPs of a Keras model: forward, forward_conv (without the layer named
    `embedding_excludes`: the DM embedding), first (its first layer), train (3F - f0)."""
    layers = layer_flops(model)
    if not layers:
        raise ValueError(f"{model.name} has no Conv2D or Dense layer to count")
    f = sum(v for _, v in layers)
    f0 = layers[0][1]
    return {"forward": f, "forward_conv": sum(v for name, v in layers if name != embedding_excludes),
            "first": f0, "train": 3 * f - f0}


def render_flops(synthetic) -> float:
    """FLOPs of rendering a `synthetic.LatentSynthetic` and its backward (its `render_flops`);
    0 for pixel sets."""
    return float(synthetic.render_flops()) if hasattr(synthetic, "render_flops") else 0.0


def esp_update_flops(net: dict, syn_images: int, real_images: int, losses=("proj", "dm"),
                     render: float = 0.0) -> dict:
    """FLOPs of one ESP update by part (real, fwd_g, second_order, render) and their total.

    `net` is `network_flops(...)`; syn_images the rendered images B; real_images the DM real
    batch C*r (counted only when the dm term is on)."""
    f, fc, f0 = net["forward"], net["forward_conv"], net["first"]
    outer = 0.0
    if "proj" in losses:
        outer += 4 * f - f0            # reverse over reverse through the forward and G's backward
    if "dm" in losses:
        outer += fc                    # L_DM's own first-order backward through the convolutions
    parts = {"real": real_images * fc if "dm" in losses else 0.0,
             "fwd_g": syn_images * (3 * f - f0),
             "second_order": syn_images * outer,
             "render": render}
    parts["total"] = sum(parts.values())
    return parts


_HLO_DEF = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_HLO_CONV = re.compile(r"= \w+\[([\d,]*)\]\S* convolution\(([^)]*)\).*?dim_labels=\w+_(\w+)->\w+")
_HLO_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(([^)]*)\).*?lhs_contracting_dims=\{([\d,]*)\}")


def hlo_flops(hlo_text: str) -> float:
    """Convolution and dot FLOPs of an HLO module's text: 2 x output elements x the reduced size
    (a convolution's kernel elements over its output features; a dot's contracted dimensions).

    Each op is counted once, so an op inside a while loop (tf.map_fn) is under-counted: use it
    on loop-free functions."""
    shapes = {name: _dims(dims) for name, dims in _HLO_DEF.findall(hlo_text)}

    def operands(args):
        return [shapes[n] for n in re.findall(r"%([\w.\-]+)", args)]

    total = 0.0
    for line in hlo_text.splitlines():
        m = _HLO_CONV.search(line)
        if m:
            rhs = operands(m.group(2))[1]
            total += 2.0 * _prod(_dims(m.group(1))) * _prod(rhs) / rhs[m.group(3).index("o")]
            continue
        m = _HLO_DOT.search(line)
        if m:
            lhs = operands(m.group(2))[0]
            contracted = [lhs[int(d)] for d in m.group(3).split(",") if d]
            total += 2.0 * _prod(_dims(m.group(1))) * _prod(contracted)
    return total
