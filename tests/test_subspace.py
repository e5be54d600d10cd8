"""The expert subspace: basis, projection, residual, segment selection."""
import numpy as np
import tensorflow as tf

from esp_tf import subspace


def _segment(p=500, s=4, seed=0):
    return tf.random.stateless_normal([s, p], [seed, 1], dtype=tf.float64)


def test_basis_is_orthonormal_and_spans_the_segment():
    seg = _segment()
    e = subspace.basis(seg)
    np.testing.assert_allclose((tf.transpose(e) @ e).numpy(), np.eye(4), atol=1e-12)
    for row in seg:   # each snapshot is inside the subspace: zero residual
        assert float(tf.norm(subspace.residual(e, row))) < 1e-10 * float(tf.norm(row))


def test_projection_is_idempotent():
    e = subspace.basis(_segment())
    g = tf.random.stateless_normal([500], [7, 7], dtype=tf.float64)
    once = subspace.project(e, g)
    np.testing.assert_allclose(subspace.project(e, once).numpy(), once.numpy(), atol=1e-12)


def test_residual_is_orthogonal_to_the_basis_and_completes_g():
    e = subspace.basis(_segment())
    g = tf.random.stateless_normal([500], [8, 8], dtype=tf.float64)
    r = subspace.residual(e, g)
    np.testing.assert_allclose(subspace.coordinates(e, r).numpy(), np.zeros(4), atol=1e-12)
    np.testing.assert_allclose((r + subspace.project(e, g)).numpy(), g.numpy(), atol=1e-12)
    assert float(tf.norm(r)) > 0.9 * float(tf.norm(g))   # a random vector is mostly outside


def test_select_segment_is_contiguous_seeded_and_starts_below_max_start_as_mtt():
    k_, s_, p_ = 3, 10, 6
    trajs = tf.reshape(tf.range(k_ * s_ * p_, dtype=tf.float32), [k_, s_, p_])
    seen = set()
    for i in range(120):
        seg, k, t = subspace.select_segment(trajs, [0, i], length=2, max_start=7)
        k, t = int(k), int(t)
        assert 0 <= k < k_ and 0 <= t < 7        # MTT: randint(0, max_start_epoch), end excluded
        np.testing.assert_array_equal(seg.numpy(), trajs[k, t:t + 3].numpy())
        seen.add((k, t))
        again, k2, t2 = subspace.select_segment(trajs, [0, i], length=2, max_start=7)
        assert (int(k2), int(t2)) == (k, t)
    assert {t for _, t in seen} == set(range(7))
