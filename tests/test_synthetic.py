"""The condensed-set parameterisations: budgets, rendering layout, gradients, checkpoints, init."""
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import fake_real, tiny_net
from esp_tf import data as data_lib, subspace
from esp_tf.methods import esp
from esp_tf.synthetic import LatentSynthetic, PixelSynthetic, bilinear_matrix, latent_plan

FMNIST_MINI = (pathlib.Path(__file__).resolve().parents[1]
               / "esp_tf" / "datasets" / "fashion_mnist_mini" / "fashion_mnist_mini.npz")
# A tiny latent set that still fits its budget: 3 classes of 8x8x1 at IPC 2 (384 floats),
# 2 decoders of width 4 (79 floats each) -> 4 codes of 4x4x1 per class, 8 images per class.
C, IPC, HW = 3, 2, 8
TINY = dict(num_decoders=2, hidden=4)


def _tiny(init="gaussian", seed=0, **kw):
    real = _smooth_images(C * LatentSynthetic.codes_per_class_for(IPC, (HW, HW, 1), C, **TINY),
                          HW, 1) if init == "real" else None
    return LatentSynthetic(C, IPC, (HW, HW, 1), init=init, real_images=real, seed=seed, **{**TINY, **kw})


def _smooth_images(n, size, ch, f=2, seed=0):
    """Images that are exact bilinear x f upsamplings of random half-resolution images."""
    u = bilinear_matrix(size, size // f)
    z = np.random.default_rng(seed).normal(size=(n, size // f, size // f, ch))
    return np.einsum("Hh,nhwc,Ww->nHWc", u, z, u).astype(np.float32)


# -- budget --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_latent_budget_is_never_exceeded_counts_decoders_and_renders_more_images_than_ipc(
        shape, classes, ipc):
    p = latent_plan(ipc, shape, classes)
    code_size = int(np.prod(p["code_shape"]))
    counted = classes * p["codes_per_class"] * code_size + p["num_decoders"] * p["decoder_params_each"]
    assert p["params_total"] == counted                           # codes AND decoders
    assert p["budget_total"] == classes * ipc * int(np.prod(shape))
    assert p["params_total"] <= p["budget_total"]
    assert p["params_per_class"] <= p["budget_per_class"] == ipc * int(np.prod(shape))
    assert p["params_total"] + classes * code_size > p["budget_total"]   # one more code would not fit
    assert p["images_per_class"] == p["codes_per_class"] * p["num_decoders"] > ipc


@pytest.mark.parametrize("shape,classes", [((28, 28, 1), 10), ((32, 32, 3), 10)])
def test_stored_variables_are_exactly_the_planned_parameters(shape, classes):
    syn = LatentSynthetic(classes, 1, shape, init="gaussian")
    b = syn.budget()
    stored = sum(int(np.prod(v.shape)) for v in syn.trainable_variables)
    grouped = sum(int(np.prod(v.shape)) for g in syn.variable_groups().values() for v in g)
    assert syn.num_parameters == stored == grouped == b["params_total"]
    assert syn.codes.shape == (classes * b["codes_per_class"], *b["code_shape"])
    assert syn.images_per_class == b["images_per_class"] > syn.ipc
    assert set(syn.variable_groups()) == {"codes", "decoders"}


def test_budget_too_small_for_one_code_raises_a_clear_value_error():
    with pytest.raises(ValueError, match="latent budget too small"):
        LatentSynthetic(1, 1, (4, 4, 1), init="gaussian")
    with pytest.raises(ValueError, match="latent budget too small"):
        LatentSynthetic.codes_per_class_for(1, (8, 8, 1), 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(init="zeros"), "init"),
    (dict(init="real", real_images=np.zeros((3, HW, HW, 1), np.float32)), "real_images"),
    (dict(init="gaussian", downsample=3), "downsample"),
    (dict(init="gaussian", code_channels=0), "code_channels"),
    (dict(init="gaussian", num_decoders=0), "num_decoders"),
])
def test_latent_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentSynthetic(C, IPC, (HW, HW, 1), **{**TINY, **kwargs})


# -- rendering ------------------------------------------------------------------------------------
def test_upsampling_matrix_is_tensorflow_bilinear_resize():
    z = np.random.default_rng(0).normal(size=(2, 7, 5, 3)).astype(np.float32)
    ours = np.einsum("Hh,nhwc,Ww->nHWc", bilinear_matrix(28, 7), z, bilinear_matrix(20, 5))
    np.testing.assert_allclose(ours, tf.image.resize(z, (28, 20), "bilinear").numpy(), atol=1e-5)


def test_render_is_class_major_with_m_images_per_class():
    syn = _tiny()
    x, y = syn.render()
    m = syn.images_per_class
    assert m == 8 and syn.codes_per_class == 4
    assert x.shape == (C * m, HW, HW, 1) and x.dtype == tf.float32
    assert y.dtype == tf.int32
    np.testing.assert_array_equal(y.numpy(), np.repeat(np.arange(C), m))
    np.testing.assert_array_equal(syn.labels.numpy(), y.numpy())


def _changed(before, after):
    return np.flatnonzero(np.abs(after - before).reshape(len(before), -1).max(1) > 0)


def test_every_code_decoder_pair_is_rendered_once():
    syn = _tiny()
    d = syn.num_decoders
    base = syn.render()[0].numpy()
    code = 5                                           # class 1, code 1
    syn.codes[code].assign(syn.codes[code] + 1.0)
    np.testing.assert_array_equal(_changed(base, syn.render()[0].numpy()), code * d + np.arange(d))
    syn = _tiny()
    syn.conv2_b[1].assign(syn.conv2_b[1] + 1.0)       # decoder 1 only
    np.testing.assert_array_equal(_changed(base, syn.render()[0].numpy()),
                                  np.arange(len(base))[1::d])
    flat = base.reshape(len(base), -1)                 # decoders start different: no duplicates
    dist = np.abs(flat[:, None] - flat[None]).max(-1) + np.eye(len(flat))
    assert dist.min() > 1e-4


# -- gradients ------------------------------------------------------------------------------------
def _all_variables(syn):
    return [v for name in sorted(syn.variable_groups()) for v in syn.variable_groups()[name]]


def test_first_order_gradients_reach_codes_and_every_decoder_tensor():
    syn = _tiny()
    with tf.GradientTape() as tape:
        x, _ = syn.render()
        loss = tf.reduce_sum(tf.square(x - 0.3))
    for v, g in zip(_all_variables(syn), tape.gradient(loss, _all_variables(syn))):
        assert g is not None and float(tf.norm(g)) > 0, v.name


@pytest.mark.parametrize("losses", [("proj",), ("proj", "dm")])
def test_esp_outer_loss_gradient_reaches_codes_and_decoders(losses):
    """The projection loss is a gradient of a gradient: its gradient must still reach decoders."""
    net = tiny_net(HW, 1, C, act="softplus")
    theta = net.init([1, 2])
    segment = tf.stack([theta + 0.1 * tf.random.stateless_normal(theta.shape, [i, 9]) for i in range(3)])
    basis = subspace.basis(segment)
    real_means = tf.random.stateless_normal([C, net.features(theta, tf.zeros([1, HW, HW, 1])).shape[-1]],
                                            [5, 5])
    syn = _tiny()
    cfg = esp.ESPConfig(beta=1.0, losses=losses, dsa=None)
    with tf.GradientTape() as tape:
        x, y = syn.render()
        loss, _ = esp.outer_loss(net, theta, basis, x, y, real_means, cfg)
    grads = tape.gradient(loss, _all_variables(syn))
    for v, g in zip(_all_variables(syn), grads):
        assert g is not None and np.isfinite(g.numpy()).all() and float(tf.norm(g)) > 0, v.name


def _fake_real(n_per_class=6):
    return fake_real(C, HW, 1, n_per_class)


def test_esp_step_with_one_optimizer_per_group_updates_codes_and_decoders_without_retracing():
    net = tiny_net(HW, 1, C)
    syn = _tiny()
    opts = {"codes": keras.optimizers.Adam(0.1), "decoders": keras.optimizers.Adam(0.01)}
    step = esp.ESPStep(net, syn, opts, data_lib.ClassBalancedSampler(_fake_real()),
                       esp.ESPConfig(real_per_class=4))
    before = [v.numpy().copy() for v in _all_variables(syn)]
    theta = net.init([0, 0])
    basis = subspace.basis(tf.stack([theta + 0.01 * tf.random.stateless_normal(theta.shape, [i, 3])
                                     for i in range(3)]))
    for n in range(2):
        theta, metrics = step(theta, basis, [0, n])
    assert step.trace_count == 1 and np.isfinite(float(metrics["loss"]))
    for v, b in zip(_all_variables(syn), before):
        assert not np.allclose(v.numpy(), b), v.name


# -- checkpoint and init --------------------------------------------------------------------------
def test_checkpoint_round_trip_reproduces_render_exactly(tmp_path):
    saved = _tiny(init="real", seed=0)
    for i, v in enumerate(_all_variables(saved)):      # move away from any init
        v.assign_add(0.1 * tf.random.stateless_normal(v.shape, [i, 1]))
    path = tf.train.Checkpoint(synthetic=saved).write(str(tmp_path / "syn"))
    restored = _tiny(init="gaussian", seed=1)
    assert not np.array_equal(restored.render()[0].numpy(), saved.render()[0].numpy())
    tf.train.Checkpoint(synthetic=restored).read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(restored.render()[0].numpy(), saved.render()[0].numpy())


def test_real_init_renders_the_init_images_up_to_the_small_residual():
    syn = _tiny(init="real")
    n, d = syn.codes_per_class, syn.num_decoders
    real = _smooth_images(C * n, HW, 1)                # exactly representable at half resolution
    x = syn.render()[0].numpy().reshape(C * n, d, HW, HW, 1)
    for k in range(d):
        assert np.linalg.norm(x[:, k] - real) / np.linalg.norm(real) < 0.15


def test_real_init_on_fashion_mnist_renders_each_image_closer_to_itself_than_to_others():
    # Codes at half resolution (IPC 1's default is H/4, whose 7x7 codes are too coarse for this).
    arrays = np.load(FMNIST_MINI)
    n = LatentSynthetic.codes_per_class_for(1, (28, 28, 1), 10, downsample=2)
    idx = np.concatenate([np.flatnonzero(arrays["train_labels"] == c)[:n] for c in range(10)])
    real = data_lib.normalize(arrays["train_images"][idx], [0.2861], [0.3530]).numpy()
    syn = LatentSynthetic(10, 1, (28, 28, 1), init="real", real_images=real, downsample=2)
    x = syn.render()[0].numpy().reshape(10 * n, syn.num_decoders, -1)
    flat = real.reshape(10 * n, -1)
    dist = np.linalg.norm(x[:, :, None] - flat[None, None], axis=-1)   # [rendered code, D, real]
    np.testing.assert_array_equal(dist.argmin(-1), np.repeat(np.arange(10 * n)[:, None], 4, 1))
    own = np.linalg.norm(x - flat[:, None], axis=-1) / np.linalg.norm(flat, axis=-1)[:, None]
    assert own.mean() < 0.4                            # half-resolution loss + residual


# -- pixels ----------------------------------------------------------------------------------------
def test_pixel_gaussian_init_shapes_labels_and_budget():
    syn = PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian", seed=3)
    x, y = syn.render()
    assert x.shape == (C * IPC, HW, HW, 1) and x.dtype == tf.float32
    np.testing.assert_array_equal(y.numpy(), np.repeat(np.arange(C), IPC))
    assert syn.num_parameters == C * IPC * HW * HW == C * syn.budget()["params_per_class"]
    assert syn.images_per_class == IPC and list(syn.variable_groups()) == ["pixels"]
    assert 0.7 < float(tf.math.reduce_std(x)) < 1.3      # unit Gaussian, normalised units
    other = PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian", seed=4).render()[0]
    assert not np.allclose(x.numpy(), other.numpy())


def test_pixel_real_init_renders_the_given_images_exactly():
    real = _smooth_images(C * IPC, HW, 1)
    syn = PixelSynthetic(C, IPC, (HW, HW, 1), init="real", real_images=real)
    np.testing.assert_array_equal(syn.render()[0].numpy(), real)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ipc=IPC, init="zeros"), "init"),
    (dict(ipc=0, init="gaussian"), "ipc"),
    (dict(ipc=IPC, init="real"), "real_images"),
    (dict(ipc=IPC, init="real", real_images=np.zeros((C, HW, HW, 1), np.float32)), "real_images"),
])
def test_pixel_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PixelSynthetic(C, image_shape=(HW, HW, 1), **kwargs)


# -- pixel range ---------------------------------------------------------------------------------
@pytest.mark.parametrize("param", ["pixels", "latents"])
def test_pixel_range_clips_renders_and_passes_no_gradient_through_clipped_pixels(param):
    lo, hi = -1.0, 1.5
    if param == "pixels":
        start = np.linspace(-3, 3, C * IPC * HW * HW).reshape(C * IPC, HW, HW, 1).astype(np.float32)
        syn = PixelSynthetic(C, IPC, (HW, HW, 1), init="real", real_images=start, pixel_range=(lo, hi))
        free = PixelSynthetic(C, IPC, (HW, HW, 1), init="real", real_images=start)
    else:
        syn, free = _tiny(seed=3, pixel_range=(lo, hi)), _tiny(seed=3)
        for v in syn.codes, free.codes:
            v.assign(3.0 * v)                                   # push part of the render outside
    with tf.GradientTape() as tape:
        x, _ = syn.render()
        loss = tf.reduce_sum(x * tf.random.stateless_normal(x.shape, [1, 2]))
    raw = free.render()[0].numpy()
    outside = (raw < lo) | (raw > hi)
    assert 0.05 < outside.mean() < 0.95                          # the test exercises both cases
    np.testing.assert_allclose(x.numpy(), np.clip(raw, lo, hi), atol=1e-6)
    if param == "pixels":                                        # d loss / d pixel is 0 where clipped
        g = tape.gradient(loss, syn.images).numpy()
        assert np.all(g[outside] == 0) and np.all(g[~outside] != 0)
    else:
        assert all(g is not None for g in tape.gradient(loss, syn.trainable_variables))


def test_pixel_range_per_channel_bounds_and_bad_bounds():
    real = np.full((C * IPC, HW, HW, 3), 5.0, np.float32)
    syn = PixelSynthetic(C, IPC, (HW, HW, 3), init="real", real_images=real,
                         pixel_range=(np.array([0, 1, 2]), np.array([1, 2, 3])))
    np.testing.assert_array_equal(syn.render()[0].numpy()[0, 0, 0], [1, 2, 3])
    with pytest.raises(ValueError, match="pixel_range"):
        PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian", pixel_range=(1.0, 1.0))


@pytest.mark.parametrize("clip", [True, False])
def test_make_synthetic_bounds_renders_to_the_real_pixel_range_unless_turned_off(tmp_path, clip):
    from esp_tf import condense
    real = fake_real(3, 8, 1, per_class=4)                       # mean 0.5, std 0.25: range -2..2
    s = condense.CondenseSettings(workdir=str(tmp_path), init="gaussian", ipc=4, clip_pixels=clip)
    syn = condense.make_synthetic(real, s)
    syn.images.assign(4.0 * syn.images)
    x = syn.render()[0].numpy()
    lo, hi = data_lib.pixel_range(real)
    np.testing.assert_allclose([lo[0], hi[0]], [-2.0, 2.0])
    assert (x.min() >= -2.0 and x.max() <= 2.0) == clip


def test_latent_plan_states_the_unspent_budget():
    from esp_tf.synthetic import latent_plan
    plan = latent_plan(1, (32, 32, 3), 10)          # CIFAR-10 IPC 1: codes at H/4 by default
    assert plan["code_shape"] == (8, 8, 3) and plan["images_per_class"] == 56
    assert plan["budget_per_class"] == 3072 and round(plan["params_per_class"]) == 3046
    assert plan["unused_per_class"] == plan["budget_per_class"] - plan["params_per_class"]
    assert plan["unused_fraction"] == round(1 - 3046 / 3072, 4)
    half = latent_plan(1, (32, 32, 3), 10, downsample=2)
    assert half["code_shape"] == (16, 16, 3) and round(half["params_per_class"]) == 2662
    assert latent_plan(10, (32, 32, 3), 10)["code_shape"] == (16, 16, 3)   # IPC 10: H/2


@pytest.mark.parametrize("param", ["pixels", "latents"])
def test_tanh_range_map_keeps_renders_inside_the_range_and_every_gradient(param):
    lo, hi = -1.0, 1.5
    if param == "pixels":
        start = np.linspace(-3, 3, C * IPC * HW * HW).reshape(C * IPC, HW, HW, 1).astype(np.float32)
        syn = PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian", pixel_range=(lo, hi), range_map="tanh")
        syn.images.assign(start)
        variables = [syn.images]
    else:
        syn = _tiny(seed=3, pixel_range=(lo, hi), range_map="tanh")
        syn.codes.assign(3.0 * syn.codes)
        variables = [syn.codes]
    with tf.GradientTape() as tape:
        x, _ = syn.render()
        loss = tf.reduce_sum(x * tf.random.stateless_normal(x.shape, [1, 2]))
    x = x.numpy()
    assert x.min() > lo and x.max() < hi                        # strictly inside, never at a bound
    g = tape.gradient(loss, variables)[0].numpy()
    assert np.all(g != 0)                                       # no value loses its gradient
    if param == "pixels":   # slope 1 at the centre of the range: the map is identity-like there
        centre = np.abs(start - 0.25) < 0.05
        np.testing.assert_allclose(x[centre], start[centre], atol=2e-3)


def test_tanh_range_map_renders_a_real_image_init_as_that_image():
    lo, hi = -1.0, 1.5
    real = np.linspace(lo, hi, C * IPC * HW * HW).reshape(C * IPC, HW, HW, 1).astype(np.float32)  # bounds included
    syn = PixelSynthetic(C, IPC, (HW, HW, 1), init="real", real_images=real, pixel_range=(lo, hi),
                         range_map="tanh")
    np.testing.assert_allclose(syn.render()[0].numpy(), real, atol=1.5e-3 * (hi - lo))
    with pytest.raises(ValueError, match="range_map"):
        PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian", pixel_range=(lo, hi), range_map="sigmoid")


# -- decoder designs and unit rendering -------------------------------------------------------------
DESIGNS = [dict(), dict(decoder="transposed"), dict(decoder="transposed", code_channels=2, hidden=3),
           dict(code_channels=3, hidden=2, num_decoders=3)]


@pytest.mark.parametrize("design", DESIGNS)
def test_every_decoder_design_stores_exactly_its_planned_floats_within_the_budget(design):
    syn = _tiny(**design)
    b = syn.budget()
    assert syn.num_parameters == b["params_total"] <= b["budget_total"]
    assert b["decoder"] == design.get("decoder", "residual")
    assert syn.codes.shape[-1] == design.get("code_channels", 1)
    x, y = syn.render()
    assert x.shape == (C * syn.images_per_class, HW, HW, 1)


@pytest.mark.parametrize("design", DESIGNS)
def test_rendering_every_unit_in_order_is_the_whole_render(design):
    syn = _tiny(init="gaussian", seed=2, **design)
    x, y = syn.render()
    n = syn.num_units
    parts = [syn.render_units(tf.constant(list(range(i, min(i + 2, n))))) for i in range(0, n, 2)]
    np.testing.assert_allclose(np.concatenate([p[0].numpy() for p in parts]), x.numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([p[1].numpy() for p in parts]), y.numpy())
    assert syn.num_units * syn.renders_per_unit == len(y)
    pixels = PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian")
    xu, yu = pixels.render_units(tf.range(pixels.num_units))
    np.testing.assert_array_equal(xu.numpy(), pixels.render()[0].numpy())
    np.testing.assert_array_equal(yu.numpy(), pixels.render()[1].numpy())


def test_transposed_decoders_render_every_pair_once_and_pass_second_order_gradients():
    syn = _tiny(decoder="transposed", seed=1)
    d = syn.num_decoders
    base = syn.render()[0].numpy()
    syn.up_b[1].assign(syn.up_b[1] + 1.0)                 # decoder 1's transposed convolution only
    np.testing.assert_array_equal(_changed(base, syn.render()[0].numpy()), np.arange(len(base))[1::d])
    net = tiny_net(HW, 1, C, act="softplus")
    theta = net.init([1, 2])
    basis = subspace.basis(tf.stack([theta + 0.1 * tf.random.stateless_normal(theta.shape, [i, 9])
                                     for i in range(3)]))
    real_means = tf.zeros([C, net.feature_dim])
    with tf.GradientTape() as tape:
        x, y = syn.render()
        loss, _ = esp.outer_loss(net, theta, basis, x, y, real_means,
                                 esp.ESPConfig(beta=1.0, losses=("proj",), dsa=None))
    for v, g in zip(_all_variables(syn), tape.gradient(loss, _all_variables(syn))):
        assert g is not None and float(tf.norm(g)) > 0, v.name


@pytest.mark.parametrize("kwargs,match", [(dict(decoder="mlp"), "decoder"), (dict(residual_init=-1.0), "residual_init")])
def test_bad_decoder_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kwargs)
