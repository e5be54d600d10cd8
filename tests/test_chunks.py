"""The exact whole-set gradient in chunks (esp_tf/chunks.py): equal to the one-piece gradient."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import fake_real, tiny_net
from esp_tf import augment, chunks, data as data_lib, subspace
from esp_tf.matching import augment_by_class, siamese_params
from esp_tf.methods import dm, esp
from esp_tf.synthetic import LatentSynthetic, PixelSynthetic

C, HW = 3, 8


# -- the plan ---------------------------------------------------------------------------------
@pytest.mark.parametrize("units,per_unit,chunk", [(12, 1, 5), (12, 4, 8), (7, 3, 4), (10, 2, 100), (5, 1, 0)])
def test_chunks_cover_every_unit_exactly_once_within_the_chunk_size(units, per_unit, chunk):
    count, per = chunks.plan(units, per_unit, chunk)
    seen = []
    for k in range(count):
        index, mask = chunks.units(k, per, units)
        seen += [int(i) for i, m in zip(index.numpy(), mask.numpy()) if m == 1]
    assert seen == list(range(units))
    if chunk and chunk < units * per_unit:
        assert count > 1 and per * per_unit <= max(chunk, per_unit)
    else:
        assert count == 1


# -- the gradient, float64 ---------------------------------------------------------------------
def _float64_pixels(ipc):
    """A pixel set whose images are a float64 variable (rendering and labels as PixelSynthetic)."""
    syn = PixelSynthetic(C, ipc, (HW, HW, 1), init="gaussian", seed=2)
    syn.images = tf.Variable(tf.cast(syn.images, tf.float64) * 1.5, name="images")
    return syn


def _direct(net, syn, theta, basis, real_means, params, cfg):
    with tf.GradientTape() as tape:
        x, y = syn.render()
        loss, aux = esp.outer_loss(net, theta, basis, augment_by_class(x, y, params), y, real_means, cfg)
    return loss, aux, tape.gradient(loss, syn.images)


def _chunked(net, syn, theta, basis, real_means, params, cfg, chunk):
    pieces = chunks.ChunkedRenders(net, syn, chunk)
    sums, g, ce, acc = pieces.totals(theta, params, with_g=True)

    def term(name):
        def value(g_, means):
            p = esp.Pieces(cfg, means, tf.range(C), g_, subspace.project(basis, g_), real_means)
            return esp.LOSS_TERMS[name].value(p)
        return esp.LOSS_TERMS[name].weight(cfg), value

    values, duals = chunks.reduced_duals({n: term(n) for n in cfg.losses}, g, sums, pieces.per_class)
    grads = pieces.gradients(theta, params, [syn.images], duals)
    loss = sum(esp.LOSS_TERMS[n].weight(cfg) * values[n] for n in cfg.losses)
    return pieces.count, loss, ce, tf.add_n([grads[n][0] for n in cfg.losses])


@pytest.mark.parametrize("losses", [("proj", "dm"), ("proj",), ("dm",)])
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunked_outer_gradient_equals_the_whole_set_gradient_in_float64(losses, chunk):
    net = tiny_net(HW, 1, C, act="softplus", dtype="float64")
    theta = net.init([1, 2])
    basis = subspace.basis(tf.stack([theta + 0.1 * tf.random.stateless_normal(theta.shape, [i, 9], dtype=tf.float64)
                                     for i in range(3)]))
    real_means = tf.random.stateless_normal([C, net.feature_dim], [5, 5], dtype=tf.float64)
    syn = _float64_pixels(ipc=5)                       # 15 renders: chunks of 1, 2 and 4 (with a remainder)
    params = siamese_params(tf.constant([3, 4]), C, (HW, HW), augment.DSAConfig())
    cfg = esp.ESPConfig(beta=0.5, losses=losses)
    loss, aux, grad = _direct(net, syn, theta, basis, real_means, params, cfg)
    count, chunked_loss, ce, chunked_grad = _chunked(net, syn, theta, basis, real_means, params, cfg, chunk)
    assert count == -(-15 // chunk) > 1
    assert float(tf.norm(grad)) > 0
    np.testing.assert_allclose(float(chunked_loss), float(loss), rtol=1e-12)
    np.testing.assert_allclose(float(ce), float(aux["ce"]), rtol=1e-12)
    np.testing.assert_allclose(chunked_grad.numpy(), grad.numpy(), rtol=1e-9, atol=1e-12 * float(tf.norm(grad)))


def test_chunks_refuse_a_network_that_mixes_the_images_of_a_batch():
    class Net:                      # any layer outside the per-image list, e.g. batch normalisation
        model = keras.Sequential([keras.Input((HW, HW, 1)), keras.layers.BatchNormalization()], name="bn")
    syn = PixelSynthetic(C, 4, (HW, HW, 1), init="gaussian")
    with pytest.raises(ValueError, match="BatchNormalization.*--syn_chunk=0"):
        chunks.ChunkedRenders(Net(), syn, 2)
    assert chunks.ChunkedRenders(Net(), syn, 0).count == 1       # one piece: nothing to refuse


# -- the steps, float32: chunked and whole-set updates agree ----------------------------------
def _latents():
    return LatentSynthetic(C, 2, (HW, HW, 1), init="gaussian", num_decoders=2, hidden=4, seed=1)


def _variables(syn):
    return [v.numpy().copy() for v in syn.trainable_variables]


def _esp_after_two_updates(chunk, syn_fn):
    net = tiny_net(HW, 1, C)
    syn = syn_fn()
    groups = syn.variable_groups()
    opts = {name: keras.optimizers.SGD(0.05) for name in groups}
    step = esp.ESPStep(net, syn, opts, data_lib.ClassBalancedSampler(fake_real(C, HW, 1, 6)),
                       esp.ESPConfig(real_per_class=4, beta=0.3, chunk=chunk))
    theta = net.init([0, 0])
    basis = subspace.basis(tf.stack([theta + 0.01 * tf.random.stateless_normal(theta.shape, [i, 3])
                                     for i in range(3)]))
    out = []
    for n in range(2):
        theta, metrics = step(theta, basis, [0, n])
        out.append({k: float(v) for k, v in metrics.items()})
    return step, theta.numpy(), _variables(syn), out


@pytest.mark.parametrize("syn_fn", [_latents, lambda: PixelSynthetic(C, 3, (HW, HW, 1), init="gaussian")],
                         ids=["latents", "pixels"])
def test_esp_step_in_chunks_makes_the_whole_set_update(syn_fn):
    whole, theta_w, vars_w, m_w = _esp_after_two_updates(0, syn_fn)
    split, theta_s, vars_s, m_s = _esp_after_two_updates(2, syn_fn)
    assert whole.chunks.count == 1 and split.chunks.count > 1 and split.trace_count == 1
    for a, b in zip(vars_s, vars_w):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(theta_s, theta_w, rtol=1e-4, atol=1e-6)
    for name in ("loss", "dm", "proj", "ce", "syn_acc", "grad_norm", "in_subspace", "pull"):
        np.testing.assert_allclose(m_s[1][name], m_w[1][name], rtol=2e-4, err_msg=name)


def _dm_after_two_updates(chunk):
    net = tiny_net(HW, 1, C)
    syn = _latents()
    opts = {name: keras.optimizers.SGD(0.05) for name in syn.variable_groups()}
    step = dm.DMStep(net, syn, opts, data_lib.ClassBalancedSampler(fake_real(C, HW, 1, 6)),
                     dm.DMConfig(real_per_class=4, chunk=chunk))
    losses = [float(step([0, n])["loss"]) for n in range(2)]
    return step, _variables(syn), losses


def test_dm_step_in_chunks_makes_the_whole_set_update():
    whole, vars_w, loss_w = _dm_after_two_updates(0)
    split, vars_s, loss_s = _dm_after_two_updates(3)       # 3 renders: one code (2 renders) a chunk
    assert whole.chunks.count == 1 and split.trace_count == 1
    assert split.chunks.count == split.synthetic.num_units > 1
    np.testing.assert_allclose(loss_s, loss_w, rtol=1e-5)
    for a, b in zip(vars_s, vars_w):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_the_default_piece_is_256_renders_at_32x32_scaled_by_the_image_area():
    assert [chunks.default_chunk((s, s, 3)) for s in (32, 64, 128, 28)] == [256, 64, 16, 334]
    big = PixelSynthetic(2, 40, (64, 64, 1), init="gaussian")            # 80 renders of 64x64
    net = tiny_net(64, 1, 2)
    assert chunks.ChunkedRenders(net, big, None).count == 2           # pieces of at most 64
    assert chunks.ChunkedRenders(net, big, 0).count == 1
