"""The real side over every image of a class (--real_per_class=0): the mean needs no gradient,
so it is forward passes only, in chunks, and equals the plain mean over the class."""
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_net
from esp_tf import augment, cli, data as data_lib, matching
from esp_tf.methods.dm import DMConfig, DMStep
from esp_tf.methods.esp import ESPConfig
from esp_tf.synthetic import PixelSynthetic

HW, CH = 8, 3
COUNTS = (7, 3, 5)                 # unequal classes: the last chunk of each is partly masked


def _real():
    rng = np.random.default_rng(0)
    n = sum(COUNTS)
    return data_lib.RealData(
        name="uneven", train_images=rng.integers(0, 256, (n, HW, HW, CH), dtype=np.uint8),
        train_labels=np.repeat(np.arange(len(COUNTS)), COUNTS).astype(np.int32),
        test_images=rng.integers(0, 256, (6, HW, HW, CH), dtype=np.uint8),
        test_labels=np.repeat(np.arange(len(COUNTS)), 2).astype(np.int32),
        class_names=("a", "b", "c"), mean=np.full(CH, 120.0, np.float32), std=np.full(CH, 60.0, np.float32))


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 7, 50])
@pytest.mark.parametrize("dsa", [False, True])
def test_whole_class_means_are_the_mean_over_every_image_of_each_class(monkeypatch, chunk_rows, dsa):
    monkeypatch.setattr(matching, "WHOLE_CLASS_CHUNK_PIXELS", chunk_rows * HW * HW)
    real, net = _real(), tiny_net(HW, CH, len(COUNTS))
    theta = net.init([1, 2])
    params = matching.siamese_params(tf.constant([3, 4], tf.int64), len(COUNTS), (HW, HW),
                                     augment.DSAConfig() if dsa else None)
    got = matching.real_class_means(net, theta, data_lib.ClassBalancedSampler(real), [0, 0], 0,
                                    len(COUNTS), params).numpy()
    x = data_lib.to_model(real, real.train_images)
    y = tf.constant(real.train_labels)
    feats = net.features(theta, matching.augment_by_class(x, y, params)).numpy()
    want = np.stack([feats[real.train_labels == c].mean(0) for c in range(len(COUNTS))])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_parts_of_the_replicas_cover_every_chunk_once(monkeypatch):
    monkeypatch.setattr(matching, "WHOLE_CLASS_CHUNK_PIXELS", 2 * HW * HW)
    real, net = _real(), tiny_net(HW, CH, len(COUNTS))
    theta, sampler = net.init([5, 6]), data_lib.ClassBalancedSampler(real)
    whole = matching.whole_class_sums(net, theta, sampler, len(COUNTS), None).numpy()
    for n in (2, 3, 5):
        parts = sum(matching.whole_class_sums(net, theta, sampler, len(COUNTS), None, part=(i, n)).numpy()
                    for i in range(n))
        np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)


def test_a_dm_update_on_the_whole_class_runs_and_draws_nothing(monkeypatch):
    monkeypatch.setattr(matching, "WHOLE_CLASS_CHUNK_PIXELS", 4 * HW * HW)
    real = _real()
    net = tiny_net(HW, CH, len(COUNTS))
    syn = PixelSynthetic(len(COUNTS), 1, (HW, HW, CH), init="gaussian")
    import keras
    step = DMStep(net, syn, {"pixels": keras.optimizers.SGD(1.0)}, data_lib.ClassBalancedSampler(real),
                  DMConfig(real_per_class=0, dsa=None))
    before = syn.images.numpy().copy()
    theta = step.theta_for([0, 1])
    loss = step.evaluate([0, 1]).numpy()
    # the loss is that of the plain whole-class means
    real_means = matching.real_class_means(net, theta, data_lib.ClassBalancedSampler(real), [9, 9], 0,
                                           len(COUNTS), None)
    x, y = syn.render()
    want = matching.dm_loss(real_means, net.features(theta, x), y).numpy()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    step([0, 1])
    assert not np.allclose(syn.images.numpy(), before)


def test_real_per_class_zero_is_accepted_and_negative_refused():
    assert DMConfig(real_per_class=0).real_per_class == 0 and ESPConfig(real_per_class=0).real_per_class == 0
    for config in (DMConfig, ESPConfig):
        with pytest.raises(ValueError, match="real_per_class must be >= 0"):
            config(real_per_class=-1)
    assert cli.range_errors(cli.settings(method="dm", real_per_class=0)) == []
    from esp_tf import workdir as wd
    with pytest.raises(wd.UserError, match=r"--real_per_class: real_per_class must be >= 0 \(0: the whole class\), got -2"):
        cli.settings(method="dm", real_per_class=-2)
