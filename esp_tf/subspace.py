"""The expert subspace: an orthonormal basis of a trajectory segment, projection, residual.

The paper (eq. 2-3) spans the raw snapshots theta*_t .. theta*_{t+T}; the basis E [P, T+1]
comes from a reduced QR decomposition (Gram-Schmidt done stably). Pure TensorFlow.
"""
import tensorflow as tf


def basis(segment: tf.Tensor) -> tf.Tensor:
    """Orthonormal basis E [P, S] of span(segment rows); segment is [S, P] (S = T+1 snapshots)."""
    segment = tf.convert_to_tensor(segment)
    q, _ = tf.linalg.qr(tf.transpose(segment), full_matrices=False)   # [P, S]
    return q


def coordinates(e: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """E^T g: coordinates [S] of vector g [P] in the basis."""
    return tf.linalg.matvec(e, g, transpose_a=True)


def project(e: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """E E^T g: orthogonal projection [P] of g [P] onto the subspace (eq. 5)."""
    return tf.linalg.matvec(e, coordinates(e, g))


def residual(e: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """g - E E^T g: the part of g [P] outside the subspace (what eq. 7 penalises)."""
    return g - project(e, g)


def select_segment(trajectories: tf.Tensor, seed, length: int, max_start: int) -> tuple:
    """Random segment of `length`+1 snapshots of a random expert, inside the graph.

    trajectories: [K, S, P]; start t ~ U{0..max_start-1} (exclusive, as MTT's max_start_epoch:
    `randint(0, max_start_epoch)`), so the last snapshot used is max_start - 1 + length < S.
    Returns (segment [length+1, P], expert index, start epoch).
    """
    from esp_tf.segments import draw        # the draw of condensation's segment readers
    k, t = draw(seed, tf.shape(trajectories)[0], max_start)
    p = tf.shape(trajectories)[2]
    segment = tf.slice(trajectories, tf.stack([k, t, 0]), tf.stack([1, length + 1, p]))[0]
    return segment, k, t
