"""Every shipped flagfile starts with the command that runs it and holds valid flags."""

import pytest
from absl import flags
from absl.testing import flagsaver

from conftest import REPO
from esp_tf import cli

CONFIGS = sorted((REPO / "configs").glob("*.flags"))


def test_there_is_a_config_per_paper_dataset_plus_quickstart():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "svhn", "cifar10", "cifar100", "tiny_imagenet", "fashion_mnist"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_starts_with_its_command_and_parses_into_valid_flags(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# python -m esp_tf.train --flagfile=configs/" + path.name,
                             "# python tools/compare.py --flagfile_base=configs/" + path.name)), first
    with flagsaver.flagsaver():
        argv = flags.FLAGS.read_flags_from_files([f"--flagfile={path}"], force_gnu=True)
        flags.FLAGS(["esp_tf.train"] + argv, known_only=False)
        assert cli.validate() == []
