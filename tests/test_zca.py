"""--zca: ZCA whitening of the network inputs, fitted on the training images (MTT's recipe for
CIFAR at IPC 1 and 10). The transform is checked against its definition, its inverse against
the pixels, and one tiny run through every phase: what evaluation and the exports rebuild from
the stored pixels must be what condensation trained on."""
import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest

from conftest import fake_real

TINY = dict(num_experts=1, expert_epochs=2, max_start_epoch=1, segment_length=2, iterations=2,
            inner_steps=2, real_per_class=4, eval_epochs=2, eval_runs=1, width=8, depth=2,
            log_every=1, ckpt_every=1, baselines=["random"])


def _whitened_real(per_class=40, hw=4):
    from esp_tf import data
    real = fake_real(3, hw, 2, per_class)
    return dataclasses.replace(real, whitening=data.fit_whitening(real.train_images))


def test_whitening_matches_its_definition_and_inverts_to_the_pixels():
    from esp_tf import data
    real = _whitened_real()
    x = real.train_images.reshape(len(real.train_images), -1).astype(np.float64) / 255.0
    cov = np.cov(x, rowvar=False)
    values, vectors = np.linalg.eigh(cov)
    w = real.whitening
    np.testing.assert_allclose(w.mean, x.mean(0), atol=1e-6)
    np.testing.assert_allclose(w.matrix, (vectors / np.sqrt(values + 0.1)) @ vectors.T, atol=1e-4)
    np.testing.assert_allclose(w.matrix @ w.inverse, np.eye(x.shape[1]), atol=1e-4)
    z = data.to_model(real, real.train_images).numpy().reshape(len(x), -1)
    # whitened covariance: the eigenvalues S / (S + eps) of the ridge-regularised ZCA
    np.testing.assert_allclose(np.linalg.eigvalsh(np.cov(z, rowvar=False)), values / (values + 0.1), atol=1e-4)
    np.testing.assert_array_equal(data.to_pixels(real, data.to_model(real, real.test_images)), real.test_images)
    assert data.fraction_outside_pixel_range(data.to_model(real, real.test_images), real) == 0
    assert data.fraction_outside_pixel_range(z.reshape(real.train_images.shape) * 50, real) > 0.1


def test_whitened_data_have_no_pixel_box_and_the_flags_say_so():
    from esp_tf import cli, data
    with pytest.raises(ValueError, match="--noclip_pixels"):
        data.pixel_range(_whitened_real())
    errors = cli.validate(cli.settings(workdir="w", zca=True))
    assert any("--zca" in e and "--noclip_pixels" in e for e in errors)
    assert not any("--zca" in e for e in cli.validate(cli.settings(workdir="w", zca=True, clip_pixels=False)))


def test_sampler_and_input_pipelines_whiten_like_to_model():
    import tensorflow as tf
    from esp_tf import data
    real = _whitened_real()
    images, labels = data.ClassBalancedSampler(real).sample(tf.constant([1, 2]), per_class=5)
    whitened = data.to_model(real, real.train_images).numpy()
    for img, label in zip(images.numpy(), labels.numpy()):   # each draw is one whitened train image
        members = whitened[real.train_labels == label]
        assert np.min(np.abs(members - img).reshape(len(members), -1).max(1)) < 1e-5
    batch, _ = next(iter(data.test_dataset(real, batch_size=1000)))
    np.testing.assert_allclose(batch, data.to_model(real, real.test_images), atol=1e-6)
    assert "ZCA" in real.train_identity      # experts of whitened inputs are not reused for others


@pytest.fixture(scope="module")
def zca_run(tmp_path_factory):
    from esp_tf import cli, pipeline
    tmp = tmp_path_factory.mktemp("zca")
    settings = cli.settings(data_dir=str(tmp / "tfds"), download=False, zca=True, clip_pixels=False, **TINY)
    with contextlib.redirect_stdout(io.StringIO()):
        pipeline.run(settings, str(tmp / "work"))
    return tmp, tmp / "work"


def test_a_zca_run_records_it_and_its_exports_rebuild_the_set(zca_run):
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from esp_tf import condensed, data
    tmp, work = zca_run
    assert "--zca" in (work / "flags.txt").read_text().split()
    eval_cell = json.loads((work / "eval.json").read_text())["esp"]["convnet3"]
    assert np.isfinite(eval_cell["mean"])
    stored = np.load(work / "synthetic.npz")["images"]
    # the TFDS export's uint8 pixels are the un-whitened set; whitened again with the refitted
    # ZCA they give back the set up to rounding to gray levels (and clipping: --noclip_pixels)
    export_dir = next((work / "tfds").iterdir())
    cset = condensed.resolve(str(export_dir), str(tmp / "tfds"))
    assert cset.zca and cset.val_per_class == 0
    real = cset.load_source(str(tmp / "tfds"))
    version = next(p for p in export_dir.iterdir() if (p / "dataset_info.json").exists())
    pixels = tfds.as_numpy(tfds.builder_from_directory(str(version)).as_dataset(
        split="train", batch_size=-1, shuffle_files=False))["image"]
    np.testing.assert_array_equal(pixels, data.to_pixels(real, stored).numpy())
    rebuilt = dataclasses.replace(cset, images=None, pixels=pixels).normalized(real.mean, real.std, real.whitening)
    reference = data.to_model(real, data.to_pixels(real, stored)).numpy()   # the set, rounded to pixels
    np.testing.assert_allclose(rebuilt, reference, atol=1e-4)
    assert np.corrcoef(rebuilt.ravel(), stored.ravel())[0, 1] > 0.9
    # the generator SavedModel turns its renders into the same pixels
    gen = tf.saved_model.load(str(work / "saved_model" / "generator"))
    out = gen.signatures["render"]()
    np.testing.assert_array_equal(out["images_uint8"].numpy(), data.to_pixels(real, stored).numpy())
    # the classifier SavedModel whitens uint8 inputs itself
    clf = tf.saved_model.load(str(work / "saved_model" / "classifier"))
    probs = clf.signatures["serve"](tf.constant(real.test_images[:4]))["probabilities"].numpy()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_evaluate_cli_scores_a_zca_workdir_on_whitened_test_images(zca_run):
    from conftest import run_python
    tmp, work = zca_run
    out = run_python(["-m", "esp_tf.evaluate", f"--condensed={work}", f"--data_dir={tmp / 'tfds'}",
                      "--eval_epochs=2", "--eval_runs=1", "--eval_archs=convnet3",
                      f"--output={tmp / 'scores.json'}"], check=True)
    scores = json.loads((tmp / "scores.json").read_text())
    cell = next(iter(scores.values()))["convnet3"]
    assert 0 <= cell["mean"] <= 100, out.stdout
