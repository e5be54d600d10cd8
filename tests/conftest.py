"""Shared pytest set-up: quiet TensorFlow, parse absl flags once, keep tests off the network."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pathlib

import pytest
from absl import flags

# The command lines' flags live in their own registries (importing the library defines none);
# tests that parse them do so through absl's global registry, as the command lines do.
from esp_tf import cli, evaluate_cli  # noqa: E402,F401  (evaluate_cli installs its flags on import)

cli.install()

# absl flags are unparsed under pytest: parse once with a fake argv (never pytest's own).
if not flags.FLAGS.is_parsed():
    flags.FLAGS(["pytest"])

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = REPO.parent / "shared" / "data" / "tfds"


@pytest.fixture(scope="session")
def shared_tfds_dir():
    """The prepared real datasets beside the repo (slow tests only)."""
    if not (SHARED_TFDS / "fashion_mnist").is_dir():
        pytest.fail(f"real data not found at {SHARED_TFDS}; slow tests need ../shared/data/tfds")
    return str(SHARED_TFDS)


def fake_real(num_classes: int, hw: int, channels: int, per_class: int, test_per_class: int = 2):
    """A tiny random RealData (class-sorted uint8 images) for fast tests of the loops."""
    import numpy as np
    from esp_tf import data as data_lib
    rng = np.random.default_rng(0)
    return data_lib.RealData(
        name="fake", train_images=rng.integers(0, 256, (num_classes * per_class, hw, hw, channels), dtype=np.uint8),
        train_labels=np.repeat(np.arange(num_classes), per_class).astype(np.int32),
        test_images=rng.integers(0, 256, (num_classes * test_per_class, hw, hw, channels), dtype=np.uint8),
        test_labels=np.repeat(np.arange(num_classes), test_per_class).astype(np.int32),
        class_names=tuple("abcdefghijklmnopqrstuvwxyz"[:num_classes]),
        mean=np.full(channels, 0.5, np.float32), std=np.full(channels, 0.25, np.float32))


def tiny_net(hw: int, channels: int, num_classes: int, width: int = 4, depth: int = 2, **kw):
    """A tiny ConvNet (models.convnet) behind the flat parameter view, for fast loop tests."""
    from esp_tf import models
    return models.FlatModel(models.convnet((hw, hw, channels), num_classes, width=width, depth=depth, **kw))


def run_python(args, *, cwd=REPO, env=None, timeout=600, check=False):
    """Runs `python <args>` (a module with -m, a tool script, or -c code) with TensorFlow quiet;
    returns the CompletedProcess with text output. `timeout` is a hang guard, not a time limit.
    check=True raises with the tail of both outputs on a non-zero exit."""
    import subprocess
    import sys
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    out = subprocess.run([sys.executable, *[str(a) for a in args]], cwd=cwd, env=full_env,
                         capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}")
    return out


def free_ports(n: int) -> list:
    """n free localhost ports (bound to port 0, then released)."""
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(index: int, ports: list) -> str:
    """TF_CONFIG of worker `index` in a cluster of localhost workers on `ports`."""
    import json
    hosts = [f"localhost:{p}" for p in ports]
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})
