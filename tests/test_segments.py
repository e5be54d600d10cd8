"""Expert segments read from the store one iteration at a time equal the in-memory ones."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import fake_real, tiny_net
from esp_tf import data as data_lib, segments, subspace
from esp_tf.methods.base import Context
from esp_tf.methods.esp import ESP, ESPConfig
from esp_tf.synthetic import PixelSynthetic
from esp_tf.trajectories import TrajectoryError, TrajectoryMeta, TrajectoryStore

C, HW, K, EPOCHS = 3, 8, 5, 4


def _store(tmp_path, net, k=K):
    meta = TrajectoryMeta(model="convnet", model_config={}, dataset="fake", input_shape=(HW, HW, 1),
                          num_classes=C, layout=net.layout, epochs=EPOCHS)
    store = TrajectoryStore(str(tmp_path))
    store.initialize(meta)
    trajs = np.random.default_rng(0).normal(size=(k, EPOCHS + 1, net.num_params)).astype(np.float32)
    for i in range(k):
        store.write(i, trajs[i])
    return store, meta, trajs


def _esp(net, trajectories):
    syn = PixelSynthetic(C, 2, (HW, HW, 1), init="gaussian")
    ctx = Context(net=net, synthetic=syn, optimizers={"pixels": keras.optimizers.Adam(0.01)},
                  sampler=data_lib.ClassBalancedSampler(fake_real(C, HW, 1, 6)), trajectories=trajectories,
                  segment_length=2, max_start_epoch=3, seed=7)
    return ESP(ctx, ESPConfig(real_per_class=2, inner_steps=1))


def test_segments_read_from_the_store_equal_the_in_memory_segments_bit_for_bit(tmp_path):
    net = tiny_net(HW, 1, C)
    store, meta, trajs = _store(tmp_path, net)
    in_memory = _esp(net, trajs)._segment
    streamed = _esp(net, segments.StoreSource(store, meta, K, 4))._segment
    seen = set()
    for it in [0, 1, 2, 5, 3, 3, 40]:                      # in order, skipping, repeating
        a, b = in_memory(it), streamed(it)
        assert (a[2], a[3]) == (b[2], b[3])
        seen.add(a[2])
        for x, y in zip(a[:2], b[:2]):
            assert x.numpy().tobytes() == y.numpy().tobytes()
        k, t = b[2], b[3]
        np.testing.assert_array_equal(b[0].numpy(), trajs[k, t])
    assert len(seen) > 1                                    # several experts were drawn
    # the draw is the one subspace.select_segment makes on the array
    seg, k, t = subspace.select_segment(tf.constant(trajs), tf.constant([7, 5], tf.int64), 2, 3)
    assert (int(k), int(t)) == (in_memory(5)[2], in_memory(5)[3])


def test_read_range_checks_every_record_and_the_bounds(tmp_path):
    net = tiny_net(HW, 1, C)
    store, meta, trajs = _store(tmp_path, net, k=2)
    np.testing.assert_array_equal(store.read_range(1, 2, 3), trajs[1, 2:5])
    with pytest.raises(TrajectoryError, match="snapshots 3..5 asked for"):
        store.read_range(1, 3, 3)


def test_a_store_source_needs_every_expert_and_a_matching_recipe(tmp_path):
    net = tiny_net(HW, 1, C)
    store, meta, _ = _store(tmp_path, net, k=2)
    with pytest.raises(TrajectoryError, match="--num_experts=3 but 1 of them are not in"):
        segments.StoreSource(store, meta, 3, 4)
    with pytest.raises(TrajectoryError, match="epochs: found 4, need at least 5"):
        segments.StoreSource(store, meta, 2, 6)
