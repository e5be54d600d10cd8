"""Properties of the expert trajectory store: exact round trips, atomic writes, loud corruption."""
import os
import struct

import numpy as np
import pytest
import tensorflow as tf

from esp_tf import trajectories as tj
from esp_tf.trajectories import TrajectoryError, TrajectoryMeta, TrajectoryStore

LAYOUT = (("conv/kernel", (3, 3, 1, 4)), ("conv/bias", (4,)), ("dense/kernel", (16, 3)),
          ("dense/bias", (3,)))
P = 36 + 4 + 48 + 3
EPOCHS = 4   # 5 snapshots per expert


def make_meta(**overrides):
    fields = dict(model="convnet", model_config={"width": 4, "depth": 1, "norm": "instancenorm"},
                  dataset="mnist", input_shape=(8, 8, 1), num_classes=3, layout=LAYOUT,
                  epochs=EPOCHS, train_config={"lr": 0.01, "batch_size": 256})
    fields.update(overrides)
    return TrajectoryMeta(**fields)


def awkward_snapshots(seed, rows=EPOCHS + 1, cols=P):
    """Random float32 plus values that lossy encodings get wrong: -0.0, subnormals, huge, inf."""
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    special = np.array([-0.0, 1e-45, -1.4e-40, 3.0e38, -3.4028235e38, np.inf, 1.0 + 2 ** -23],
                       np.float32)
    x[:, :special.size] = special
    return x


@pytest.fixture
def store(tmp_path):
    s = TrajectoryStore(str(tmp_path / "experts"))
    s.initialize(make_meta())
    return s


def record_offsets(path):
    """(start of data, data length) of every record in a TFRecord file (8B len, 4B crc, data, 4B crc)."""
    blob, pos, out = open(path, "rb").read(), 0, []
    while pos < len(blob):
        (n,) = struct.unpack("<Q", blob[pos:pos + 8])
        out.append((pos + 12, n))
        pos += 12 + n + 4
    return out


def test_tfrecord_round_trip_is_exact(store):
    x = awkward_snapshots(0)
    path = store.write(3, x)
    assert path == store.expert_path(3) and os.path.basename(path) == "expert_00003.tfrecord"
    y = store.read(3)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.tobytes() == x.tobytes()   # bitwise: keeps the sign of -0.0 and subnormals


def test_each_snapshot_is_one_serialized_tensor_record(store):
    x = awkward_snapshots(1)
    path = store.write(0, x)
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    assert len(records) == EPOCHS + 1
    ex = tf.train.Example.FromString(records[2]).features.feature
    assert ex["epoch"].int64_list.value == [2] and ex["expert"].int64_list.value == [0]
    theta = tf.io.parse_tensor(ex["theta"].bytes_list.value[0], tf.float32).numpy()
    assert theta.tobytes() == x[2].tobytes()


def test_num_snapshots_returns_the_leading_snapshots(store):
    x = awkward_snapshots(2)
    store.write(0, x)
    assert store.read(0, num_snapshots=2).tobytes() == x[:2].tobytes()
    assert store.read(0, num_snapshots=EPOCHS + 1).tobytes() == x.tobytes()
    with pytest.raises(TrajectoryError, match="asked for 6 snapshots"):
        store.read(0, num_snapshots=EPOCHS + 2)


def test_metadata_json_round_trip_is_exact():
    meta = make_meta(model_config={"width": 4, "kernel": (3, 3)}, input_shape=[8, 8, 1],
                     layout=[["w", [2, 3]], ["b", []]])
    back = TrajectoryMeta.from_json(meta.to_json())
    assert back == meta
    assert back.layout == (("w", (2, 3)), ("b", ())) and back.input_shape == (8, 8, 1)
    assert back.num_params == 7 and make_meta().num_params == P
    assert back.format_version == tj.FORMAT_VERSION


def test_store_metadata_is_what_was_initialized(store):
    assert store.read_meta() == make_meta()
    store.initialize(make_meta())


def test_a_store_trained_with_another_recipe_is_refused_naming_the_fields(store):
    with pytest.raises(TrajectoryError, match=r"train_config.lr: found 0.01, expected 0.5") as err:
        store.initialize(make_meta(train_config={"lr": 0.5, "batch_size": 256}))
    assert "batch_size" not in str(err.value)
    with pytest.raises(TrajectoryError, match=r"train_config.batch_size: found 256, expected 64"):
        store.load(make_meta(train_config={"lr": 0.01, "batch_size": 64}), num_snapshots=2)


def test_recipe_fields_a_store_does_not_record_are_unknown_and_accepted(store, caplog):
    # stores written before the recipe was checked lack e.g. the seed: reused, with a warning
    store.initialize(make_meta(train_config={"lr": 0.01, "batch_size": 256, "seed": 3}))
    assert store.read_meta().train_config == {"lr": 0.01, "batch_size": 256}   # not rewritten
    assert "does not record the recipe field(s) seed" in caplog.text


def test_missing_or_unparsable_metadata_is_a_trajectory_error(tmp_path):
    s = TrajectoryStore(str(tmp_path / "nothing"))
    with pytest.raises(TrajectoryError, match="metadata.json not found"):
        s.read_meta()
    s.initialize(make_meta())
    with open(s.meta_path, "w") as f:
        f.write('{"model": "convnet", ')
    with pytest.raises(TrajectoryError, match="metadata.json is unreadable"):
        s.read_meta()


def test_flipped_byte_in_a_record_is_a_trajectory_error_naming_the_file(store):
    path = store.write(0, awkward_snapshots(3))
    start, n = record_offsets(path)[2]
    blob = bytearray(open(path, "rb").read())
    blob[start + n // 2] ^= 0x10
    open(path, "wb").write(bytes(blob))
    with pytest.raises(TrajectoryError) as err:
        store.read(0)
    assert path in str(err.value) and "delete it and rerun expert generation" in str(err.value)


@pytest.mark.parametrize("cut", ["mid_record", "record_boundary"])
def test_truncated_file_is_a_trajectory_error(store, cut):
    path = store.write(0, awkward_snapshots(4))
    start, n = record_offsets(path)[-1]
    size = start + n // 2 if cut == "mid_record" else start - 12
    with open(path, "r+b") as f:
        f.truncate(size)
    with pytest.raises(TrajectoryError, match="expert_00000.tfrecord"):
        store.read(0)
    assert store.read(0, num_snapshots=EPOCHS).shape == (EPOCHS, P)   # intact prefix still reads


def test_extra_records_after_the_last_epoch_are_rejected(store):
    path = store.write(0, awkward_snapshots(12))
    start, n = record_offsets(path)[-1]
    blob = open(path, "rb").read()
    open(path, "ab").write(blob[start - 12:start + n + 4])   # a valid duplicate of the last record
    with pytest.raises(TrajectoryError, match="more than 5 records"):
        store.read(0)


def test_record_for_the_wrong_expert_or_length_is_rejected(store, tmp_path):
    store.write(1, awkward_snapshots(5))
    os.replace(store.expert_path(1), store.expert_path(2))
    with pytest.raises(TrajectoryError, match="expert 1; expected epoch 0, expert 2"):
        store.read(2)
    other = TrajectoryStore(str(tmp_path / "other"))
    other.initialize(make_meta(layout=LAYOUT + (("extra", (2,)),)))
    store.write(2, awkward_snapshots(5))
    os.replace(store.expert_path(2), other.expert_path(2))
    with pytest.raises(TrajectoryError, match=r"expected \(93,\) = num_params"):
        other.read(2)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((EPOCHS + 1, P + 1), np.float32), r"shape \(5, 92\), expected \(5, 91\)"),
    (np.zeros((EPOCHS, P), np.float32), r"shape \(4, 91\), expected \(5, 91\)"),
    (np.zeros((EPOCHS + 1, P), np.float64), "must be a float32"),
])
def test_write_rejects_wrong_shape_or_dtype_and_leaves_nothing(store, bad, message):
    with pytest.raises(TrajectoryError, match=message):
        store.write(0, bad)
    assert sorted(os.listdir(store.directory)) == ["metadata.json"]


def test_mismatched_metadata_lists_every_mismatched_field(store):
    expected = make_meta(dataset="cifar10", input_shape=(32, 32, 3), layout=LAYOUT[:2])
    with pytest.raises(TrajectoryError) as err:
        store.initialize(expected)
    msg = str(err.value)
    for line in ["dataset: found 'mnist', expected 'cifar10'",
                 "input_shape: found (8, 8, 1), expected (32, 32, 3)", "layout: found"]:
        assert line in msg
    assert "model:" not in msg and "num_classes" not in msg and "train_config" not in msg
    assert store.meta_path in msg and "--experts_dir" in msg
    with pytest.raises(TrajectoryError, match="dataset: found") as err:
        store.load(expected, num_snapshots=2)
    assert "layout: found" in str(err.value) and "input_shape: found" in str(err.value)


def test_writing_into_a_directory_needs_the_same_epochs(store):
    with pytest.raises(TrajectoryError, match="epochs: found 4, expected 10"):
        store.initialize(make_meta(epochs=10))


def test_too_few_epochs_for_the_requested_snapshots_is_a_trajectory_error(store):
    store.write(0, awkward_snapshots(6))
    with pytest.raises(TrajectoryError, match="epochs: found 4, need at least 5"):
        store.load(make_meta(), num_snapshots=EPOCHS + 2)
    # Reading fewer epochs than generated is fine, even if the caller's meta says more epochs.
    assert store.load(make_meta(epochs=20), num_snapshots=3).shape == (1, 3, P)


def test_failure_during_write_leaves_no_final_and_no_temp_file(store, monkeypatch):
    real_writer = tf.io.TFRecordWriter

    class FailingWriter:
        """Writes two records for real, then fails like a full disk would."""
        def __init__(self, path):
            self._w, self._n = real_writer(path), 0

        def write(self, record):
            self._n += 1
            if self._n == 3:
                raise OSError("disk full (simulated)")
            self._w.write(record)

        def flush(self):
            self._w.flush()

        def close(self):
            self._w.close()

    monkeypatch.setattr(tf.io, "TFRecordWriter", FailingWriter)
    with pytest.raises(TrajectoryError, match=r"could not write .*expert_00000.tfrecord \(disk full "
                       r"\(simulated\)\).*disk space"):
        store.write(0, awkward_snapshots(7))
    assert sorted(os.listdir(store.directory)) == ["metadata.json"]
    assert store.completed() == []


def test_completed_ignores_temp_and_foreign_files(store):
    store.write(5, awkward_snapshots(8))
    store.write(1, awkward_snapshots(9))
    for junk in [".expert_00002.tfrecord.abc123.tmp", "expert_00003.tfrecord.tmp",
                 "expert_4.tfrecord", "notes.txt"]:
        open(os.path.join(store.directory, junk), "wb").close()
    assert store.completed() == [1, 5]


def test_load_stacks_experts_in_index_order(store):
    xs = {k: awkward_snapshots(10 + k) for k in (2, 0, 7)}
    for k, x in xs.items():
        store.write(k, x)
    got = store.load(make_meta(), num_snapshots=3)
    assert got.shape == (3, 3, P) and got.dtype == np.float32
    want = np.stack([xs[0][:3], xs[2][:3], xs[7][:3]])
    assert got.tobytes() == want.tobytes()
    assert store.load(make_meta(), num_snapshots=EPOCHS + 1, max_experts=2).tobytes() == \
        np.stack([xs[0], xs[2]]).tobytes()


def test_load_without_experts_says_to_generate_them(store, tmp_path):
    with pytest.raises(TrajectoryError, match="generate them"):
        store.load(make_meta(), num_snapshots=2)
    with pytest.raises(TrajectoryError, match="generate the experts first"):
        TrajectoryStore(str(tmp_path / "missing")).load(make_meta(), num_snapshots=2)


def test_expert_files_without_metadata_are_not_adopted(tmp_path, store):
    store.write(0, awkward_snapshots(11))
    os.remove(store.meta_path)
    with pytest.raises(TrajectoryError, match="no metadata.json"):
        store.initialize(make_meta())


def test_the_store_round_trips_through_a_non_local_gfile_filesystem(tmp_path, monkeypatch):
    """ram:// is TensorFlow's in-memory filesystem: what works there goes through tf.io.gfile,
    as gs:// or s3:// would. Nothing may land on the local disk (cwd is an empty folder)."""
    import uuid
    monkeypatch.chdir(tmp_path)
    root = f"ram://esp_tf_test_{uuid.uuid4().hex}/experts"
    ram = TrajectoryStore(root)
    ram.initialize(make_meta())
    xs = {k: awkward_snapshots(20 + k) for k in (3, 0)}
    for k, x in xs.items():
        ram.write(k, x)
    tf.io.gfile.GFile(f"{root}/.expert_00001.tfrecord.1.abc.tmp", "wb").close()   # a killed writer's
    assert ram.completed() == [0, 3]
    assert tf.io.gfile.exists(f"{root}/expert_00003.tfrecord")
    assert ram.read(3).tobytes() == xs[3].tobytes()
    assert ram.load(make_meta(), num_snapshots=EPOCHS + 1).tobytes() == np.stack([xs[0], xs[3]]).tobytes()
    assert TrajectoryStore(root).read_meta() == make_meta()
    with pytest.raises(TrajectoryError, match="layout"):
        TrajectoryStore(root).initialize(make_meta(layout=LAYOUT[:2]))
    assert os.listdir(tmp_path) == []
