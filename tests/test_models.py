"""ConvNet-3 and the flat parameter view."""
import numpy as np
import pytest
import tensorflow as tf

from esp_tf import models


def test_convnet3_parameter_count_matches_the_field():
    assert models.FlatModel(models.build("convnet3", (32, 32, 3), 10)).num_params == 320_010


def test_28x28_inputs_are_padded_to_32x32_feature_maps():
    net = models.FlatModel(models.build("convnet3", (28, 28, 1), 10))
    feats = net.features(net.init([0, 0]), tf.zeros([2, 28, 28, 1]))
    assert feats.shape == (2, 128 * 4 * 4)


def test_flatten_unflatten_round_trip_is_exact():
    net = models.FlatModel(models.build("convnet_tiny", (32, 32, 3), 10))
    theta = net.init([3, 4])
    back = net.flatten(net.unflatten(theta))
    np.testing.assert_array_equal(back.numpy(), theta.numpy())
    net.set_flat(theta)
    np.testing.assert_array_equal(net.get_flat().numpy(), theta.numpy())


def test_functional_forward_equals_the_keras_model_with_the_same_weights():
    net = models.FlatModel(models.build("convnet_tiny", (32, 32, 3), 10))
    theta = net.init([5, 6])
    net.set_flat(theta)
    x = tf.random.stateless_normal([3, 32, 32, 3], [1, 2])
    np.testing.assert_allclose(net.logits(theta, x).numpy(), net.model(x).numpy(), atol=1e-6)


def test_init_is_reproducible_and_follows_the_fan_in_bound():
    net = models.FlatModel(models.build("convnet3", (32, 32, 3), 10))
    a, b, c = net.init([1, 1]), net.init([1, 1]), net.init([1, 2])
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())
    conv1 = net.unflatten(a)[4]                     # conv1/kernel, fan_in = 3*3*128
    assert float(tf.reduce_max(tf.abs(conv1))) <= 1 / np.sqrt(3 * 3 * 128)


def test_stateful_models_are_refused_by_the_flat_view():
    import keras
    inp = keras.Input((4, 4, 1))
    out = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.BatchNormalization()(inp)))
    with pytest.raises(ValueError, match="stateless"):
        models.FlatModel(keras.Model(inp, out))


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match="convnet3"):
        models.build("resnet999", (32, 32, 3), 10)


def _second_order(norm_fn, x, w):
    """d/dx of ||d/dw sum(softplus(norm(x * w)))||^2: a gradient of a gradient, like ESP's."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(w)
            y = tf.reduce_sum(tf.nn.softplus(norm_fn(x * w)) * tf.range(1.0, 5.0, dtype=x.dtype))
        g = inner.gradient(y, w)
        z = tf.reduce_sum(g ** 2)
    return z, outer.gradient(z, x)


def _fd_directional(norm_fn, x, w, v, eps=1e-4):
    plus, _ = _second_order(norm_fn, x + eps * v, w)
    minus, _ = _second_order(norm_fn, x - eps * v, w)
    return float((plus - minus) / (2 * eps))


def _stopped_mean_norm(x, eps=1e-5):
    """What tf.nn.moments-based Keras norms do: variance around a gradient-stopped mean."""
    mean = tf.reduce_mean(x, axis=(1, 2), keepdims=True)
    var = tf.reduce_mean(tf.square(x - tf.stop_gradient(mean)), axis=(1, 2), keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + eps)


@pytest.mark.parametrize("exact", [True, False])
def test_instance_norm_second_order_gradient_matches_finite_differences(exact):
    norm = models.InstanceNorm(dtype="float64")
    norm.build((None, 3, 3, 4))
    norm_fn = norm if exact else _stopped_mean_norm
    x = tf.random.stateless_normal([2, 3, 3, 4], [1, 1], dtype=tf.float64)
    w = tf.random.stateless_normal([4], [2, 2], dtype=tf.float64)
    errs = []
    for i in range(4):
        v = tf.random.stateless_normal(x.shape, [3, i], dtype=tf.float64)
        _, grad = _second_order(norm_fn, x, w)
        analytic = float(tf.reduce_sum(grad * v))
        errs.append(abs(analytic - _fd_directional(norm_fn, x, w, v)) / (abs(analytic) + 1e-12))
    if exact:
        assert max(errs) < 1e-4, errs   # float64 central differences: ~2e-6 here
    else:   # the check has the power to reject the stopped-mean variant
        assert max(errs) > 1e-2, errs
