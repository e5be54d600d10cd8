"""The ESP step: exact outer gradients, single trace, the update rules of Algorithm 1."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import fake_real, tiny_net
from esp_tf import chunks, data as data_lib, subspace
from esp_tf.methods import esp
from esp_tf.synthetic import PixelSynthetic

C, IPC, HW = 3, 2, 8


def _tiny_net(dtype="float32", act="relu"):
    return tiny_net(HW, 1, C, act=act, dtype=dtype)


def _float64_problem():
    net = _tiny_net("float64", act="softplus")    # smooth: finite differences are meaningful
    theta = net.init([1, 2])
    segment = tf.stack([theta + 0.1 * tf.random.stateless_normal(theta.shape, [i, 9], dtype=tf.float64)
                        for i in range(3)])
    basis = subspace.basis(segment)
    x = tf.random.stateless_normal([C * IPC, HW, HW, 1], [4, 4], dtype=tf.float64)
    y = tf.constant(np.repeat(np.arange(C), IPC), tf.int32)
    d = net.features(theta, x).shape[-1]
    real_means = tf.random.stateless_normal([C, d], [5, 5], dtype=tf.float64)
    return net, theta, basis, x, y, real_means


@pytest.mark.parametrize("losses,beta", [(("proj", "dm"), 0.5), (("proj",), 1.0), (("dm",), 1.0)])
def test_outer_gradient_matches_central_finite_differences_in_float64(losses, beta):
    net, theta, basis, x, y, real_means = _float64_problem()
    cfg = esp.ESPConfig(beta=beta, losses=losses, dsa=None)

    def loss_at(xx):
        return esp.outer_loss(net, theta, basis, xx, y, real_means, cfg)[0]

    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = loss_at(x)
    grad = tape.gradient(loss, x)
    assert float(tf.norm(grad)) > 0
    for i in range(3):
        v = tf.random.stateless_normal(x.shape, [6, i], dtype=tf.float64)
        eps = 1e-4
        fd = float((loss_at(x + eps * v) - loss_at(x - eps * v)) / (2 * eps))
        analytic = float(tf.reduce_sum(grad * v))
        assert abs(fd - analytic) <= 1e-5 * abs(analytic) + 1e-9, (fd, analytic)


def test_projection_loss_is_the_l1_norm_of_the_gradient_outside_the_subspace():
    net, theta, basis, x, y, real_means = _float64_problem()
    cfg = esp.ESPConfig(beta=1.0, losses=("proj",), dsa=None)
    loss, aux = esp.outer_loss(net, theta, basis, x, y, real_means, cfg)
    with tf.GradientTape() as tape:
        tape.watch(theta)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, net.logits(theta, x)))
    g = tape.gradient(ce, theta)
    np.testing.assert_allclose(float(loss), float(tf.reduce_sum(tf.abs(subspace.residual(basis, g)))),
                               rtol=1e-10)
    np.testing.assert_allclose(aux["g_in"].numpy(), subspace.project(basis, g).numpy(), atol=1e-12)


def _fake_real(n_per_class=6):
    return fake_real(C, HW, 1, n_per_class)


def _step(cfg, lr=0.01):
    net = _tiny_net()
    real = _fake_real()
    syn = PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian", seed=0)
    opt = {"pixels": keras.optimizers.Adam(lr)}
    return net, syn, esp.ESPStep(net, syn, opt, data_lib.ClassBalancedSampler(real), cfg)


def _basis_at(net, theta):
    seg = tf.stack([theta + 0.01 * tf.random.stateless_normal(theta.shape, [i, 3]) for i in range(3)])
    return subspace.basis(seg)


def test_esp_step_is_traced_once_across_steps_and_subspaces():
    cfg = esp.ESPConfig(real_per_class=4)
    net, syn, step = _step(cfg)
    for it in range(2):
        theta = net.init([it, 0])
        basis = _basis_at(net, theta)
        for n in range(3):
            theta, metrics = step(theta, basis, [it, n])
    assert step.trace_count == 1
    assert np.isfinite(float(metrics["loss"]))


def test_student_moves_only_inside_the_subspace_by_inner_lr_times_projected_gradient():
    cfg = esp.ESPConfig(real_per_class=4, inner_lr=0.1, dsa=None)
    net, syn, step = _step(cfg)
    theta = net.init([0, 0])
    basis = _basis_at(net, theta)
    x0, y0 = syn.render()
    with tf.GradientTape() as tape:
        tape.watch(theta)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y0, net.logits(theta, x0)))
    expected = theta - 0.1 * subspace.project(basis, tape.gradient(ce, theta))
    theta_next, _ = step(theta, basis, [0, 0])
    np.testing.assert_allclose(theta_next.numpy(), expected.numpy(), atol=1e-6)
    # the move is inside span(E): zero residual
    assert float(tf.norm(subspace.residual(basis, theta_next - theta))) < 1e-5 * float(tf.norm(theta_next - theta))


def test_each_step_updates_the_synthetic_images_and_nothing_else_is_trainable():
    net, syn, step = _step(esp.ESPConfig(real_per_class=4))
    before = syn.images.numpy().copy()
    theta = net.init([0, 0])
    step(theta, _basis_at(net, theta), [0, 0])
    assert not np.allclose(syn.images.numpy(), before)
    assert [v.name for v in syn.trainable_variables] == [syn.images.name]


def test_unknown_loss_names_are_rejected():
    with pytest.raises(ValueError, match="losses"):
        esp.ESPConfig(losses=("proj", "tm"))


def test_class_balanced_slice_takes_distinct_images_of_every_class():
    x = tf.reshape(tf.range(4 * 5, dtype=tf.float32), [20, 1, 1, 1])     # 4 classes x 5 images
    y = tf.constant(np.repeat(np.arange(4), 5), tf.int32)
    xs, ys = chunks.class_balanced_slice(x, y, 4, 2, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(ys.numpy(), np.repeat(np.arange(4), 2))
    values = xs.numpy().ravel().astype(int)
    assert len(set(values)) == 8 and all(v // 5 == c for v, c in zip(values, ys.numpy()))


def test_sliced_batch_variant_updates_only_the_sliced_images():
    cfg = esp.ESPConfig(real_per_class=4, dsa=None, batch_syn=C)            # one image per class
    net, syn, step = _step(cfg)
    before = syn.images.numpy().copy()
    theta = net.init([0, 0])
    step(theta, _basis_at(net, theta), [0, 0])
    changed = [not np.allclose(a, b) for a, b in zip(syn.images.numpy(), before)]
    assert sum(changed) == C                                                # IPC 2: half of them
    with pytest.raises(ValueError, match="multiple"):
        _step(esp.ESPConfig(batch_syn=C + 1))


def test_esp_step_compiles_with_xla():
    net = _tiny_net()
    syn = PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian", seed=0)
    step = esp.ESPStep(net, syn, {"pixels": keras.optimizers.Adam(0.01)},
                       data_lib.ClassBalancedSampler(_fake_real()), esp.ESPConfig(real_per_class=4),
                       jit_compile=True)
    theta = net.init([0, 0])
    theta_next, metrics = step(theta, _basis_at(net, theta), [0, 0])
    assert np.isfinite(float(metrics["loss"])) and theta_next.shape == theta.shape


def test_dm_reductions_differ_by_the_class_and_feature_counts():
    net, theta, basis, x, y, real_means = _float64_problem()
    feats = net.features(theta, x)
    total = float(esp.dm_loss(real_means, feats, y, "sum"))
    np.testing.assert_allclose(float(esp.dm_loss(real_means, feats, y, "class_mean")), total / C, rtol=1e-12)
    np.testing.assert_allclose(float(esp.dm_loss(real_means, feats, y, "element_mean")),
                               total / (C * real_means.shape[1]), rtol=1e-12)
    with pytest.raises(ValueError, match="dm_reduction"):
        esp.ESPConfig(dm_reduction="max")


def _pull_after_one_step(**cfg):
    net, syn, step = _step(esp.ESPConfig(real_per_class=2, dsa=None, **cfg))
    theta = net.init([0, 1])
    _, metrics = step(theta, _basis_at(net, theta), [3, 4])
    return float(metrics["pull"]), syn.images.numpy()


def test_pull_ratio_scales_with_beta_and_the_dm_reduction_and_the_update_is_the_sum():
    pull, pixels = _pull_after_one_step(beta=1e-3, dm_reduction="sum")
    assert np.isfinite(pull) and pull > 0
    np.testing.assert_allclose(_pull_after_one_step(beta=2e-3, dm_reduction="sum")[0], 2 * pull, rtol=1e-4)
    # class_mean divides L_DM (so its gradient) by C: the projection pulls C times harder
    np.testing.assert_allclose(_pull_after_one_step(beta=1e-3, dm_reduction="class_mean")[0], C * pull,
                               rtol=1e-4)
    # beta -> 0: the step is the pure-DM step (the split gradients are summed, not replaced)
    _, dm_only = _pull_after_one_step(beta=0.0, dm_reduction="sum")
    net, syn, step = _step(esp.ESPConfig(real_per_class=2, dsa=None, losses=("dm",), dm_reduction="sum"))
    theta = net.init([0, 1])
    step(theta, _basis_at(net, theta), [3, 4])
    np.testing.assert_allclose(dm_only, syn.images.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(pixels, dm_only)       # and beta > 0 does move them differently
