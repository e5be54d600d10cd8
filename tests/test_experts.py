"""Expert training: snapshots per epoch, resumable generation, mid-expert resume is exact."""
import numpy as np
import pytest

from conftest import fake_real, tiny_net
from esp_tf import experts
from esp_tf.trajectories import TrajectoryError, TrajectoryStore

C, HW = 3, 8


def _real():
    return fake_real(C, HW, 1, 20, 4)


def _setup(epochs=3):
    net = tiny_net(HW, 1, C)
    config = experts.ExpertConfig(epochs=epochs, batch_size=16, lr=0.05)
    meta = experts.expert_meta(net, "convnet", {"width": 4, "depth": 2}, "fake", C, config)
    return net, config, meta


def test_an_expert_has_one_snapshot_per_epoch_starting_at_its_init():
    net, config, _ = _setup()
    snaps, acc = experts.train_expert(net, _real(), config, seed=1)
    assert snaps.shape == (4, net.num_params) and snaps.dtype == np.float32
    np.testing.assert_array_equal(snaps[0], net.init([1, 0]).numpy())
    assert all(not np.array_equal(snaps[i], snaps[i + 1]) for i in range(3))
    assert 0.0 <= acc <= 1.0


def test_generation_skips_finished_experts(tmp_path):
    net, config, meta = _setup(epochs=1)
    store = TrajectoryStore(str(tmp_path))
    assert len(experts.generate(store, net, _real(), meta, 2, config)) == 2
    first = store.read(0)
    assert experts.generate(store, net, _real(), meta, 3, config) != []   # only expert 2 trained
    assert store.completed() == [0, 1, 2]
    np.testing.assert_array_equal(store.read(0), first)


def test_an_expert_interrupted_mid_way_resumes_to_the_same_trajectory(tmp_path):
    net, config, meta = _setup(epochs=3)
    reference, _ = experts.train_expert(net, _real(), config, seed=5)

    class Stop(Exception):
        pass

    def stop_at_2(epoch, epochs, loss):
        if epoch == 2:
            raise Stop

    partial = str(tmp_path / "e.partial.npz")
    with pytest.raises(Stop):
        experts.train_expert(net, _real(), config, seed=5, partial_path=partial, on_epoch=stop_at_2)
    resumed, _ = experts.train_expert(net, _real(), config, seed=5, partial_path=partial)
    np.testing.assert_array_equal(resumed, reference)


def test_experts_of_another_model_are_refused(tmp_path):
    net, config, meta = _setup(epochs=1)
    store = TrajectoryStore(str(tmp_path))
    experts.generate(store, net, _real(), meta, 1, config)
    other = tiny_net(HW, 1, C, width=6)
    meta2 = experts.expert_meta(other, "convnet", {"width": 6, "depth": 2}, "fake", C, config)
    with pytest.raises(TrajectoryError, match="layout"):
        experts.generate(store, other, _real(), meta2, 1, config)
