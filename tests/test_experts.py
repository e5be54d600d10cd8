"""Expert training: snapshots per epoch, resumable generation, mid-expert resume is exact. The
fake data here are random (chance accuracy), so the store-mechanics tests accept weak experts."""
import os

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
    assert len(experts.generate(store, net, _real(), meta, 2, config, accept_weak=True)) == 2
    first = store.read(0)
    assert experts.generate(store, net, _real(), meta, 3, config, accept_weak=True) != []   # only expert 2 trained
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
    experts.generate(store, net, _real(), meta, 1, config, accept_weak=True)
    other = tiny_net(HW, 1, C, width=6)
    meta2 = experts.expert_meta(other, "convnet", {"width": 6, "depth": 2}, "fake", C, config)
    with pytest.raises(TrajectoryError, match="layout"):
        experts.generate(store, other, _real(), meta2, 1, config, accept_weak=True)


def test_worker_shards_are_disjoint_and_cover_every_expert():
    shards = [experts.shard(10, i, 3) for i in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert experts.shard(10) == list(range(10))
    with pytest.raises(ValueError, match="0 <= index < workers"):
        experts.shard(10, 3, 3)


def test_a_worker_trains_only_its_shard_and_the_experts_equal_a_single_workers(tmp_path):
    net, config, meta = _setup(epochs=1)
    one, two = TrajectoryStore(str(tmp_path / "one")), TrajectoryStore(str(tmp_path / "two"))
    experts.generate(one, net, _real(), meta, 3, config, accept_weak=True)
    assert len(experts.generate(two, net, _real(), meta, 3, config, worker_index=1, num_workers=2, accept_weak=True)) == 1
    assert two.completed() == [1]
    assert len(experts.generate(two, net, _real(), meta, 3, config, worker_index=0, num_workers=2, accept_weak=True)) == 2
    assert two.completed() == [0, 1, 2]
    for k in range(3):
        np.testing.assert_array_equal(two.read(k), one.read(k))


def test_experts_are_generated_into_a_non_local_store(tmp_path, monkeypatch):
    """Expert generation (with its per-epoch partial files) through tf.io.gfile on ram://."""
    import uuid
    monkeypatch.chdir(tmp_path)
    net, config, meta = _setup(epochs=2)
    store = TrajectoryStore(f"ram://esp_tf_test_{uuid.uuid4().hex}/experts")
    experts.generate(store, net, _real(), meta, 2, config, accept_weak=True)
    assert store.completed() == [0, 1] and store.read(1).shape == (3, net.num_params)
    assert os.listdir(tmp_path) == []


def test_an_expert_at_chance_is_refused_unless_accepted_and_a_diverged_one_always(tmp_path):
    net, config, meta = _setup(epochs=1)
    store = TrajectoryStore(str(tmp_path))
    with pytest.raises(experts.WeakExpertError, match=r"expert 0 reached .*within 1.5x of chance.*--accept_weak_experts"):
        experts.generate(store, net, _real(), meta, 1, config)          # random labels: chance
    assert store.completed() == []
    blown = experts.ExpertConfig(epochs=1, batch_size=16, lr=1e12)
    with pytest.raises(experts.WeakExpertError, match="diverged.*lower --expert_lr"):
        experts.train_expert(net, _real(), blown, seed=1)


@pytest.mark.parametrize("damage", ["garbage", "other_recipe", "other_shape", "no_recipe"])
def test_an_untrusted_partial_expert_is_moved_aside_and_the_expert_starts_over(tmp_path, damage):
    net, config, meta = _setup(epochs=3)
    reference, _ = experts.train_expert(net, _real(), config, seed=5, recipe="R")
    partial = tmp_path / "e.partial.npz"
    if damage == "garbage":
        partial.write_bytes(b"\x00not an npz")
    else:
        snaps = np.stack([reference[0], reference[1] + 1.0])            # a wrong trajectory so far
        kw = {"recipe": np.array("OTHER\nseed 5") if damage == "other_recipe" else np.array("R\nseed 5")}
        if damage == "other_shape":
            snaps = snaps[:, :5]
        if damage == "no_recipe":
            kw = {}
        np.savez(partial, snapshots=snaps, velocity=np.zeros(snaps.shape[1], np.float32), step=3, **kw)
    resumed, _ = experts.train_expert(net, _real(), config, seed=5, partial_path=str(partial), recipe="R")
    np.testing.assert_array_equal(resumed, reference)                  # trained from the start
    aside = [p for p in tmp_path.iterdir() if ".partial.npz.bad-" in p.name]
    assert len(aside) == 1                                             # kept, not deleted


SHARED_STORE = """
import sys
sys.path.insert(0, "tests")
from conftest import fake_real, tiny_net
from esp_tf import experts
from esp_tf.trajectories import TrajectoryStore
net = tiny_net(8, 1, 3)
config = experts.ExpertConfig(epochs=3, batch_size=16, lr=0.05)
meta = experts.expert_meta(net, "convnet", {"width": 4, "depth": 2}, "fake", 3, config)
accs = experts.generate(TrajectoryStore(sys.argv[1]), net, fake_real(3, 8, 1, 20, 4), meta, 3, config,
                        accept_weak=True)
print("TRAINED", len(accs))
"""


def test_two_processes_sharing_a_store_never_train_the_same_expert_twice(tmp_path):
    import subprocess
    import sys
    from conftest import REPO
    procs = [subprocess.Popen([sys.executable, "-c", SHARED_STORE, str(tmp_path / "store")], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trained = [int(o[0].split("TRAINED")[1]) for o in outs]
    assert sum(trained) == 3, trained                     # each expert once, whoever got it first
    assert TrajectoryStore(str(tmp_path / "store")).completed() == [0, 1, 2]
