"""A method and a parameterisation defined outside the package, each its own class plus one
registry entry (nothing else of esp_tf changes), run through the command line's settings,
condensation, evaluation, resume and the TFDS export."""
import contextlib
import dataclasses
import io
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from esp_tf import augment, cli, methods, pipeline, synthetic
from esp_tf.matching import apply_grads, build_optimizers, ordered_variables
from esp_tf.methods.base import Method


@dataclasses.dataclass(frozen=True)
class PixelMeanConfig:
    real_per_class: int = 8
    dsa: augment.DSAConfig | None = None


class PixelMean(Method):
    """Toy method: each class's mean synthetic image moves towards the mean of a real batch."""

    Config = PixelMeanConfig
    flag_fields = {"real_per_class": "real_per_class"}
    needs_trajectories = False

    def __init__(self, context, config):
        super().__init__(context, config)
        self.groups = context.synthetic.variable_groups()
        build_optimizers(context.optimizers, self.groups)
        self._step = tf.function(self._update)

    def _update(self, seed):
        ctx, n = self.context, self.context.synthetic.num_classes
        x_real, y_real = ctx.sampler.sample(seed, self.config.real_per_class)
        target = tf.math.unsorted_segment_mean(x_real, y_real, n)
        variables = ordered_variables(self.groups)
        with tf.GradientTape() as tape:
            x, y = ctx.synthetic.render()
            loss = tf.reduce_mean(tf.square(tf.math.unsorted_segment_mean(x, y, n) - target))
        apply_grads(ctx.optimizers, self.groups, tape.gradient(loss, variables))
        return {"loss": loss}

    def iteration(self, it, after_update):
        metrics = self._step(tf.constant(self.update_seed(it), tf.int64))
        after_update()
        return [metrics], {}


class MirroredPixels(synthetic.PixelSynthetic):
    """Toy parameterisation: every stored image renders twice, as itself and mirrored."""

    tiny_settings = {"ipc": 1}
    renders_per_unit = 2

    def _pairs(self, x, y):
        both = tf.stack([x, tf.reverse(x, axis=[2])], axis=1)      # class-major stays class-major
        return tf.reshape(both, [-1, *self.image_shape]), tf.repeat(y, 2)

    def render(self):
        return self._pairs(*super().render())

    def render_units(self, index):
        return self._pairs(*super().render_units(index))

    @property
    def images_per_class(self):
        return 2 * self.ipc

    def budget(self):
        return {**super().budget(), "images_per_class": self.images_per_class}

    @classmethod
    def learning_rates(cls, s, method):
        return {"pixels": (keras.optimizers.Adam, 0.05)}


@pytest.fixture
def registered():
    methods.register("pixel_mean", PixelMean)          # the one line each needs
    synthetic.PARAMETERISATIONS["mirrored"] = MirroredPixels
    yield
    del methods._REGISTRY["pixel_mean"], synthetic.PARAMETERISATIONS["mirrored"]


def test_a_method_and_a_parameterisation_from_outside_condense_resume_and_export(registered, tmp_path):
    settings = cli.settings(data_dir=str(tmp_path / "tfds"), download=False, method="pixel_mean",
                            param="mirrored", ipc=1, iterations=4, real_per_class=4, eval_epochs=2,
                            eval_runs=1, width=8, depth=2, log_every=1, ckpt_every=2, baselines=[],
                            phases=["condense", "evaluate", "export"])
    assert cli.validate(dataclasses.replace(settings, workdir=str(tmp_path))) == []
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = pipeline.run(settings, str(tmp_path / "a"))
    assert "pixel_mean" in results
    saved = np.load(tmp_path / "a" / "synthetic.npz")
    images, labels = saved["images"], saved["labels"]
    assert images.shape[0] == 20 and labels.tolist() == np.repeat(np.arange(10), 2).tolist()
    np.testing.assert_array_equal(images[1::2], images[0::2][:, :, ::-1])
    assert "--method=pixel_mean" in (tmp_path / "a" / "flags.txt").read_text()
    export = next((tmp_path / "a" / "tfds").rglob("dataset_info.json")).parent
    ds = tfds.builder_from_directory(str(export)).as_dataset(split="train", as_supervised=True)
    assert sum(1 for _ in ds) == 20

    # finished: a rerun resumes without redoing anything
    with contextlib.redirect_stdout(printed):
        pipeline.run(settings, str(tmp_path / "a"))
    assert "already in eval.json" in printed.getvalue()

    # interrupted after its first checkpoint: resumes to the same set
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for f in (tmp_path / "b" / "ckpt").glob("ckpt-4.*"):
        f.unlink()
    (tmp_path / "b" / "ckpt" / "checkpoint").unlink()
    for name in ("synthetic.npz", "eval.json"):
        (tmp_path / "b" / name).unlink()
    shutil.rmtree(tmp_path / "b" / "tfds")
    shutil.rmtree(tmp_path / "b" / "saved_model")
    with contextlib.redirect_stdout(printed):
        pipeline.run(dataclasses.replace(settings, phases=["condense"]), str(tmp_path / "b"))
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "synthetic.npz")["images"], images)


def test_an_unknown_method_or_parameterisation_is_one_line_naming_the_registered_ones(tmp_path):
    from esp_tf import workdir as wd
    with pytest.raises(wd.UserError, match="--method: unknown 'nope'; registered: esp, dm, tm"):
        cli.settings(method="nope")
    errors = cli.validate(cli.settings(param="nope", workdir=str(tmp_path)))
    assert errors == ["--param: unknown 'nope'; registered: pixels, latents"]
