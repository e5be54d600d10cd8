"""Properties of esp_tf.augment (DSA): reproducibility, Siamese sharing, per-family
agreement with independent numpy references, 'S'-mode sampling, linearity and
gradients, XLA equivalence and parameter ranges."""
import numpy as np
import pytest
import tensorflow as tf

from esp_tf import augment as A

SIZE = (32, 32)


def seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def to_np(params):
    return {k: v.numpy() for k, v in params.items()}


def images(n, h=32, w=32, c=3, s=0):
    return np.random.default_rng(s).normal(size=(n, h, w, c)).astype(np.float32)


# ---------------------------------------------------------------- numpy references

def np_affine_sample(img, theta):
    """torch affine_grid + grid_sample(align_corners=True, zeros) for one [H,W,C] image."""
    h, w, _ = img.shape
    gx, gy = np.meshgrid(np.linspace(-1, 1, w), np.linspace(-1, 1, h))  # [H,W] normalised
    ix = ((theta[0, 0] * gx + theta[0, 1] * gy + theta[0, 2]) + 1) / 2 * (w - 1)
    iy = ((theta[1, 0] * gx + theta[1, 1] * gy + theta[1, 2]) + 1) / 2 * (h - 1)
    x0, y0 = np.floor(ix).astype(int), np.floor(iy).astype(int)
    out = np.zeros(img.shape, np.float64)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            weight = (1 - np.abs(ix - xx)) * (1 - np.abs(iy - yy))
            valid = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            val = img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)] * valid[..., None]
            out += weight[..., None] * val
    return out


def np_shift(img, dx, dy):
    """out[i, j] = img[i + dy, j + dx], zero outside."""
    h, w, _ = img.shape
    r = max(abs(dx), abs(dy))
    pad = np.pad(img, [(r, r), (r, r), (0, 0)])
    return pad[r + dy:r + dy + h, r + dx:r + dx + w]


def np_cutout(img, cx, cy, sw, sh):
    out = img.copy()
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            if cy - sh // 2 <= i < cy - sh // 2 + sh and cx - sw // 2 <= j < cx - sw // 2 + sw:
                out[i, j] = 0
    return out


def np_color(img, b, s, c):
    x = img.astype(np.float64) + b
    m = x.mean(axis=-1, keepdims=True)
    x = (x - m) * s + m
    m = x.mean()
    return (x - m) * c + m


# ---------------------------------------------------------------- reproducibility

def test_same_seed_gives_identical_params_and_outputs():
    x = images(16)
    p, q = A.sample(seed(3), 16, SIZE), A.sample(seed(3), 16, SIZE)
    for k in p:
        np.testing.assert_array_equal(p[k].numpy(), q[k].numpy())
    np.testing.assert_array_equal(A.apply(x, p).numpy(), A.apply(x, q).numpy())


def test_seed_dtype_does_not_change_draws():
    p = to_np(A.sample(tf.constant([5, 1], tf.int32), 8, SIZE))
    q = to_np(A.sample(tf.constant([5, 1], tf.int64), 8, SIZE))
    for k in p:
        np.testing.assert_array_equal(p[k], q[k])


def test_different_seeds_give_different_params_and_outputs():
    x = images(16)
    p, q = A.sample(seed(3), 16, SIZE), A.sample(seed(4), 16, SIZE)
    assert any(not np.array_equal(p[k].numpy(), q[k].numpy()) for k in p)
    assert not np.allclose(A.apply(x, p).numpy(), A.apply(x, q).numpy())


@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (3, 32, 32, 3), (2, 64, 64, 3), (2, 24, 32, 3)])
def test_identity_params_are_exact_identity(shape):
    x = images(*shape)
    y = A.apply(x, A.identity_params(shape[0], shape[1:3])).numpy()
    np.testing.assert_array_equal(y, x)


# ---------------------------------------------------------------- Siamese

def test_siamese_same_class_gets_same_transform_at_any_position():
    p = A.sample(seed(11), 10, SIZE)  # one parameter set per class
    shared = images(1, s=1)[0]
    a, b = images(6, s=2), images(5, s=3)
    labels_a, labels_b = np.array([0, 1, 7, 2, 3, 4]), np.array([5, 6, 8, 9, 7])
    a[2], b[4] = shared, shared  # same class-7 image at different batch positions
    ya = A.apply(a, A.take(p, labels_a)).numpy()
    yb = A.apply(b, A.take(p, labels_b)).numpy()
    np.testing.assert_allclose(ya[2], yb[4], atol=1e-6)
    assert not np.allclose(ya[2], shared, atol=1e-3)  # class 7 is not the identity here
    # another class's parameters transform the same image differently
    yc = A.apply(shared[None], A.take(p, [0])).numpy()[0]
    assert not np.allclose(yc, ya[2], atol=1e-3)


# ---------------------------------------------------------------- per family vs numpy

def single(strategy, n, size, s=0):
    return to_np(A.sample(seed(s), n, size, A.DSAConfig(strategy=strategy)))


@pytest.mark.parametrize("shape", [(8, 28, 28, 1), (8, 32, 32, 3), (8, 64, 64, 3)])
def test_flip_is_exact_width_mirror(shape):
    x = images(*shape)
    p = single("flip", shape[0], shape[1:3])
    assert 0 < p["flip"].sum() < shape[0]  # both outcomes occur in this draw
    y = A.apply(x, p).numpy()
    for i in range(shape[0]):
        np.testing.assert_array_equal(y[i], x[i, :, ::-1] if p["flip"][i] else x[i])


@pytest.mark.parametrize("shape", [(16, 32, 32, 3), (8, 28, 28, 1)])
def test_crop_is_exact_integer_shift_with_zero_fill(shape):
    x = images(*shape)
    p = single("crop", shape[0], shape[1:3])
    assert np.any(p["shift"] != 0)
    y = A.apply(x, p).numpy()
    for i in range(shape[0]):
        np.testing.assert_array_equal(y[i], np_shift(x[i], *p["shift"][i]))


@pytest.mark.parametrize("shape", [(8, 32, 32, 3), (6, 28, 28, 1)])
def test_cutout_zeroes_expected_square(shape):
    x = images(*shape) + 5.0  # no accidental zeros
    p = single("cutout", shape[0], shape[1:3])
    side = int(0.5 * shape[2] + 0.5)
    np.testing.assert_array_equal(p["cutout_size"], side)
    y = A.apply(x, p).numpy()
    for i in range(shape[0]):
        np.testing.assert_array_equal(y[i], np_cutout(x[i], *p["cutout_center"][i], side, side))


@pytest.mark.parametrize("channels", [1, 3])
def test_color_matches_brightness_saturation_contrast_formulas(channels):
    x = images(8, c=channels)
    p = single("color", 8, SIZE)
    y = A.apply(x, p).numpy()
    for i in range(8):
        ref = np_color(x[i], p["brightness"][i], p["saturation"][i], p["contrast"][i])
        np.testing.assert_allclose(y[i], ref, atol=2e-5)


@pytest.mark.parametrize("shape", [(6, 32, 32, 3), (4, 28, 28, 1), (4, 24, 32, 2)])
def test_scale_matches_numpy_bilinear_align_corners(shape):
    x = images(*shape)
    p = single("scale", shape[0], shape[1:3])
    y = A.apply(x, p).numpy()
    for i in range(shape[0]):
        sx, sy = p["scale"][i]
        theta = np.array([[sx, 0, 0], [0, sy, 0]], np.float64)
        np.testing.assert_allclose(y[i], np_affine_sample(x[i], theta), atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 32, 32, 3), (4, 28, 28, 1), (4, 24, 32, 2)])
def test_rotate_matches_numpy_bilinear_align_corners(shape):
    x = images(*shape)
    p = single("rotate", shape[0], shape[1:3])
    y = A.apply(x, p).numpy()
    for i in range(shape[0]):
        a = np.deg2rad(np.float64(p["rotate"][i]))
        theta = np.array([[np.cos(a), np.sin(a), 0], [-np.sin(a), np.cos(a), 0]])
        np.testing.assert_allclose(y[i], np_affine_sample(x[i], theta), atol=1e-4)


# ---------------------------------------------------------------- 'S' mode sampling

def active_families(p, i):
    """Families whose parameters differ from identity for sample i."""
    act = set()
    if p["brightness"][i] != 0 or p["saturation"][i] != 1 or p["contrast"][i] != 1:
        act.add("color")
    if np.any(p["shift"][i] != 0):
        act.add("crop")
    if np.any(p["cutout_size"][i] != 0):
        act.add("cutout")
    if p["flip"][i] != 0:
        act.add("flip")
    if np.any(p["scale"][i] != 1):
        act.add("scale")
    if p["rotate"][i] != 0:
        act.add("rotate")
    return act


def test_s_mode_one_family_per_sample_with_uniform_frequency():
    n = 6000
    p = to_np(A.sample(seed(21), n, SIZE))
    for i in range(n):
        assert active_families(p, i) <= {A.FAMILIES[p["family"][i]]}
    counts = np.bincount(p["family"], minlength=6)
    assert counts.min() > 850 and counts.max() < 1150, counts  # expected 1000, sd ~29


def test_strategy_subset_only_draws_its_families():
    p = to_np(A.sample(seed(2), 500, SIZE, A.DSAConfig(strategy="flip_rotate")))
    assert set(np.unique(p["family"])) == {A.FAMILIES.index("flip"), A.FAMILIES.index("rotate")}
    q = to_np(A.sample(seed(2), 5, SIZE, A.DSAConfig(strategy="none")))
    assert all(not active_families(q, i) for i in range(5))


def test_one_family_is_shared_but_values_stay_per_sample():
    seen = set()
    for s in range(24):
        p = to_np(A.sample(seed(s), 32, SIZE, one_family=True))
        assert len(np.unique(p["family"])) == 1
        fam = A.FAMILIES[p["family"][0]]
        seen.add(fam)
        if fam == "rotate":
            assert len(np.unique(p["rotate"])) > 1
        if fam == "scale":
            assert len(np.unique(p["scale"][:, 0])) > 1
    assert len(seen) >= 4  # the shared family still varies between calls


def test_unknown_family_raises_listing_valid_ones():
    with pytest.raises(ValueError, match="valid families: color, crop, cutout, flip, scale"):
        A.DSAConfig(strategy="color_blur")


# ---------------------------------------------------------------- linearity and gradients

def mixed_params():
    """All families active at once on a 4x4 image (non-integer warp, color, cutout)."""
    p = A.identity_params(1, (4, 4))
    p.update(brightness=tf.constant([0.3]), saturation=tf.constant([1.7]),
             contrast=tf.constant([0.8]), shift=tf.constant([[1, 0]]), flip=tf.constant([1.0]),
             scale=tf.constant([[1.1, 0.9]]), rotate=tf.constant([12.0]),
             cutout_center=tf.constant([[0, 3]]), cutout_size=tf.constant([[2, 2]]))
    return p


def test_apply_is_affine_and_tape_gradient_is_its_linear_map():
    p = mixed_params()
    f = lambda v: A.apply(tf.reshape(v, [1, 4, 4, 1]), p)  # noqa: E731  [16] -> [1,4,4,1]
    b = f(tf.zeros([16])).numpy().ravel()
    lin = np.stack([f(tf.one_hot(k, 16)).numpy().ravel() - b for k in range(16)], axis=1)
    assert np.abs(lin).sum() > 1.0  # non-trivial map
    v = tf.constant(np.random.default_rng(0).normal(size=16), tf.float32)
    np.testing.assert_allclose(f(v).numpy().ravel(), lin @ v.numpy() + b, atol=1e-5)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(v)
        y = tf.reshape(f(v), [16])
        w = tf.constant(np.arange(16.0) - 7.5, tf.float32)
        s = tf.reduce_sum(w * y)
    np.testing.assert_allclose(tape.jacobian(y, v).numpy(), lin, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(s, v).numpy(), lin.T @ w.numpy(), atol=1e-4)


def test_second_order_gradient_through_a_network_on_a_variable():
    x = tf.Variable(images(4, 8, 8, 3))  # tf.Variable input (Keras' RandomBrightness fails on one)
    p = A.sample(seed(1), 4, (8, 8))
    kernel = tf.Variable(tf.random.stateless_normal([8 * 8 * 3, 2], seed=[0, 1]))
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            z = tf.reshape(A.apply(x, p), [4, -1]) @ kernel
            loss = tf.reduce_sum(tf.tanh(z) ** 2)
        g = inner.gradient(loss, kernel)
        match = tf.reduce_sum(g ** 2)
    gx = outer.gradient(match, x)
    assert gx is not None and np.all(np.isfinite(gx.numpy())) and np.abs(gx.numpy()).sum() > 0


# ---------------------------------------------------------------- XLA and ranges

def test_jit_compiled_apply_and_sample_match_eager():
    x = images(16)
    s = seed(9)
    p = A.sample(s, 16, SIZE)
    jit_sample = tf.function(lambda t: A.sample(t, 16, SIZE), jit_compile=True)
    for k, v in jit_sample(s).items():
        np.testing.assert_array_equal(v.numpy(), p[k].numpy())
    y = tf.function(A.apply, jit_compile=True)(tf.constant(x), p).numpy()
    np.testing.assert_allclose(y, A.apply(x, p).numpy(), atol=1e-5)


def test_param_ranges_at_32px():
    p = to_np(A.sample(seed(5), 4000, SIZE))
    fam = p["family"]
    rot = p["rotate"][fam == A.FAMILIES.index("rotate")]
    assert np.all(np.abs(rot) <= 15.0) and rot.min() < -14 and rot.max() > 14
    sc = p["scale"][fam == A.FAMILIES.index("scale")]
    assert np.all((sc >= 1 / 1.2 - 1e-6) & (sc <= 1.2 + 1e-6))
    assert sc.min() < 0.85 and sc.max() > 1.18
    sh = p["shift"][fam == A.FAMILIES.index("crop")]
    np.testing.assert_array_equal(sh.min(axis=0), -4)  # per axis (dx, dy)
    np.testing.assert_array_equal(sh.max(axis=0), 4)
    cc = p["cutout_center"][fam == A.FAMILIES.index("cutout")]
    np.testing.assert_array_equal(cc.min(axis=0), 0)  # even side 16: centres in [0, 32]
    np.testing.assert_array_equal(cc.max(axis=0), 32)
    col = fam == A.FAMILIES.index("color")
    assert np.all(np.abs(p["brightness"][col]) <= 0.5)
    assert np.all((p["saturation"][col] >= 0) & (p["saturation"][col] <= 2))
    assert np.all((p["contrast"][col] >= 0.5) & (p["contrast"][col] <= 1.5))
    flips = p["flip"][fam == A.FAMILIES.index("flip")]
    assert 0.4 < flips.mean() < 0.6


# ---------------------------------------------------------------- CutMix (IDC's evaluation)
def test_cutmix_pastes_one_box_of_the_permuted_batch_and_ratio_is_the_kept_area():
    x = tf.reshape(tf.range(6 * 8 * 8 * 2, dtype=tf.float32), (6, 8, 8, 2))
    y = tf.range(6)
    for s in range(5):
        mixed, y_b, ratio = A.cutmix(tf.constant([s, 1]), x, y, prob=1.0)
        box = A.cutmix_box(tf.constant([s, 1]), 6, 8, 8, 1.0, 1.0)
        perm = box["perm"].numpy()
        assert sorted(perm) == list(range(6)) and np.array_equal(y_b.numpy(), perm)
        changed = np.any(mixed.numpy() != x.numpy(), axis=(0, 3))       # [H, W]
        r0, r1, c0, c1 = (int(box[k]) for k in ("y1", "y2", "x1", "x2"))
        inside = np.zeros((8, 8), bool)
        inside[r0:r1, c0:c1] = True
        assert np.array_equal(changed, inside) or perm.tolist() == list(range(6))
        np.testing.assert_array_equal(mixed.numpy()[:, inside], x.numpy()[perm][:, inside])
        assert float(ratio) == pytest.approx(1 - inside.sum() / 64)
    same, _, ratio = A.cutmix(tf.constant([0, 1]), x, y, prob=0.0)
    assert np.array_equal(same.numpy(), x.numpy()) and float(ratio) == 1.0


def test_cutmix_happens_with_its_probability_and_beta_one_draws_uniform_lambda():
    draw = tf.function(lambda s: A.cutmix_box(s, 8, 32, 32, 0.5, 1.0))
    boxes = [draw(tf.constant([s, 7])) for s in range(400)]
    applied = np.mean([bool(b["applied"]) for b in boxes])
    lam = np.array([float(b["lam"]) for b in boxes])
    assert 0.42 < applied < 0.58
    assert abs(lam.mean() - 0.5) < 0.04 and abs(np.quantile(lam, 0.25) - 0.25) < 0.06
