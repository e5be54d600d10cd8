"""SavedModel exports that reload with plain `tf.saved_model.load`, without esp_tf installed.

* The generator: the condensed set itself (pixels, or latent codes + decoders) behind a
  `render` signature returning the images as the model sees them, as viewable uint8 and the
  labels. For latents this is the compact form users ship: codes + decoders, not the renders.
* A classifier trained on the condensed set, behind a `serve` signature that takes raw uint8
  images [B, H, W, C] and normalises inside (mean/std of the source dataset, or its ZCA whitening
  for a run with --zca, baked in as constants), returning logits and class probabilities.
"""
from __future__ import annotations

import tensorflow as tf

from esp_tf import data as data_lib, fs


def _write_atomic(module: tf.Module, path: str, signatures: dict) -> str:
    """tf.saved_model.save into a sibling temp dir, then swap it into place (a SavedModel is a
    directory, so this is the directory counterpart of workdir.atomic_write). `path` may be a
    filesystem URL (gs://...): there the swap copies the files (`fs.move_tree`), so a reader
    during the swap may see a partial directory; a killed run leaves a hidden `.<name>.tmp` or
    `.<name>.old` beside it, which the next export of the same path replaces."""
    path = fs.absolute(path).rstrip("/")
    parent, name = path.rsplit("/", 1)
    # hidden names: an interrupted export leaves no second SavedModel beside the first, and the
    # next export of the same path replaces what it left
    tmp = f"{parent}/.{name}.tmp"
    if fs.exists(tmp):
        fs.rmtree(tmp)
    tf.saved_model.save(module, tmp, signatures=signatures)
    old = f"{parent}/.{name}.old"
    if fs.exists(old):
        fs.rmtree(old)
    if fs.exists(path):
        fs.move_tree(path, old)
    fs.move_tree(tmp, path)
    if fs.exists(old):
        fs.rmtree(old)
    return path


class _Generator(tf.Module):
    def __init__(self, synthetic, mean, std, whitening=None):
        super().__init__(name="esp_generator")
        self.synthetic = synthetic                           # tracks its variables
        self._prep = data_lib.preprocessing(mean, std, whitening)

    @tf.function(input_signature=[])
    def render(self):
        images, labels = self.synthetic.render()                            # [N,H,W,C], [N]
        return {"images": images, "images_uint8": data_lib.to_pixels(self._prep, images), "labels": labels}


def export_generator(synthetic, mean, std, path: str, whitening=None) -> str:
    """Saves the synthetic set's generator; `loaded.signatures['render']()` re-creates it.
    `whitening`: the run's `data.Whitening` (--zca), used to turn renders into uint8 pixels."""
    module = _Generator(synthetic, mean, std, whitening)
    return _write_atomic(module, path, {"render": module.render})


class _Classifier(tf.Module):
    def __init__(self, model, mean, std, whitening=None):
        super().__init__(name="esp_classifier")
        self.model = model
        self._prep = data_lib.preprocessing(mean, std, whitening)
        shape = [None, *model.input_shape[1:]]
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec(shape, tf.uint8)])

    def _serve(self, images):
        logits = self.model(data_lib.to_model(self._prep, images), training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}


def export_classifier(model, mean, std, path: str, whitening=None) -> str:
    """Saves a trained Keras classifier with a uint8 `serve` signature (normalises inside, or
    whitens with `whitening`, the run's `data.Whitening`, for a --zca run)."""
    module = _Classifier(model, mean, std, whitening)
    return _write_atomic(module, path, {"serving_default": module.serve, "serve": module.serve})
