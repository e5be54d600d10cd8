"""Shared pytest set-up: quiet TensorFlow, parse absl flags once, keep tests off the network."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pathlib

import pytest
from absl import flags

# absl flags are unparsed under pytest: parse once with a fake argv (pitfalls.md item 9).
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
