"""Sharded expert generation: worker identity from TF_CONFIG or flags; two local worker processes
fill one store with every expert exactly once; a killed worker resumes its shard."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_ports, tf_config
from esp_tf import cluster, workdir as wd

TINY = ["--dataset=fashion_mnist_mini", "--nodownload", "--phases=experts", "--num_experts=6",
        "--expert_epochs=2", "--max_start_epoch=1", "--segment_length=1", "--width=8", "--depth=1"]


def test_worker_identity_comes_from_flags_then_tf_config_then_defaults():
    assert cluster.worker(environ={}) == cluster.Worker(0, 1, "default")
    env = {"TF_CONFIG": tf_config(1, [1, 2, 3])}
    assert cluster.worker(environ=env) == cluster.Worker(1, 3, "TF_CONFIG")
    assert cluster.worker(0, 2, environ=env) == cluster.Worker(0, 2, "flags")
    chief = {"TF_CONFIG": json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
                                      "task": {"type": "worker", "index": 0}})}
    assert cluster.worker(environ=chief) == cluster.Worker(1, 3, "TF_CONFIG")   # the chief is 0


@pytest.mark.parametrize("args,env,message", [
    ((1, None), {}, "go together"),
    ((2, 2), {}, "0 <= worker_index < num_workers"),
    ((None, None), {"TF_CONFIG": "{not json"}, "not a valid cluster description"),
    ((None, None), {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker",
                                                                                    "index": 1}})},
     "not in its cluster"),
    ((None, None), {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"], "evaluator": ["e:1"]},
                                             "task": {"type": "evaluator", "index": 0}})},
     "trains no experts"),
    # a string worker list would be read as one worker per character (and wait for them forever)
    ((None, None), {"TF_CONFIG": json.dumps({"cluster": {"worker": "host0:1,host1:2"},
                                             "task": {"type": "worker", "index": 0}})},
     "cluster.worker must be a list of \"host:port\" strings"),
    ((None, None), {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", 7]}, "task": {"type": "worker",
                                                                                        "index": 0}})},
     "cluster.worker must be a list"),
])
def test_a_bad_worker_description_is_one_clear_error(args, env, message):
    with pytest.raises(wd.UserError, match=message):
        cluster.worker(*args, environ=env)


def _start(index, ports, tmp_path, data_dir):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": tf_config(index, ports)}
    args = [sys.executable, "-m", "esp_tf.train", *TINY, f"--data_dir={data_dir}",
            f"--workdir={tmp_path / f'work{index}'}", f"--experts_dir={tmp_path / 'experts'}"]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc, timeout=300):          # timeout: a hang guard only
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return out


def _trained(out: str) -> list:
    return sorted(int(k) for k in re.findall(r"expert (\d+): test acc", out))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The embedded dataset prepared once, before workers read it concurrently."""
    from esp_tf import data
    path = tmp_path_factory.mktemp("tfds")
    data.load("fashion_mnist_mini", str(path))
    return str(path)


def test_two_tf_config_workers_fill_one_store_with_every_expert_once(tmp_path, data_dir):
    from esp_tf.trajectories import TrajectoryStore
    ports = free_ports(2)
    procs = [_start(i, ports, tmp_path, data_dir) for i in range(2)]
    outs = [_finish(p) for p in procs]
    assert _trained(outs[0]) == [0, 2, 4] and _trained(outs[1]) == [1, 3, 5]
    assert "worker 1 of 2 (from TF_CONFIG)" in outs[1]
    assert TrajectoryStore(str(tmp_path / "experts")).completed() == [0, 1, 2, 3, 4, 5]


def test_a_killed_worker_restarts_and_trains_only_what_it_had_not_finished(tmp_path, data_dir):
    from esp_tf.trajectories import TrajectoryStore
    ports = free_ports(2)
    first = tmp_path / "experts" / "expert_00001.tfrecord"
    proc = _start(1, ports, tmp_path, data_dir)
    deadline = time.time() + 300                       # hang guard
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()                                        # mid-way through expert 3
    proc.communicate()
    assert first.exists(), "worker 1 did not write its first expert"
    stamp = first.stat().st_mtime_ns
    done_before = TrajectoryStore(str(tmp_path / "experts")).completed()
    assert 5 not in done_before, "worker 1 finished before it was killed; the test needs slower experts"
    out = _finish(_start(1, ports, tmp_path, data_dir))
    assert 1 not in _trained(out) and _trained(out) == sorted(set([3, 5]) - set(done_before))
    assert first.stat().st_mtime_ns == stamp           # the finished expert was not rewritten
    assert TrajectoryStore(str(tmp_path / "experts")).completed() == [1, 3, 5]
