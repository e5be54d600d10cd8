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
        assert cli.validate(cli.from_flags()) == []


PAPER_SETTINGS = REPO / "configs" / "PAPER_SETTINGS.md"
PAPER_CONFIGS = [p for p in CONFIGS if p.stem.split("_ipc")[0] in
                 ("svhn", "cifar10", "cifar100", "tiny_imagenet", "fashion_mnist")]


def _markdown_table(text: str, heading: str) -> list[dict]:
    """Rows (header -> cell) of the first Markdown table after `heading`."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    block = lines[start:end]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def _expected_flags(name: str) -> dict:
    text = PAPER_SETTINGS.read_text()
    shared = {r["flag"]: r["value"] for r in _markdown_table(text, "## Values shared by every paper config")}
    rows = {r["config"]: r for r in _markdown_table(text, "## Values per config")}
    assert name in rows, f"{name}.flags has no row in {PAPER_SETTINGS.name}"
    row = rows[name]
    per = {k: row[k] for k in ("dataset", "ipc", "latent_downsample", "segment_length", "max_start_epoch", "inner_steps",
                               "expert_epochs", "model", "depth")}
    return {**shared, **per, "workdir": f"runs/{name}",
            "experts_dir": f"runs/experts/{row['dataset']}_convnet{row['depth']}_e{row['expert_epochs']}"}


def test_every_paper_dataset_has_the_ipcs_the_paper_reports():
    names = {p.stem for p in PAPER_CONFIGS}
    assert {"cifar10", "cifar10_ipc10", "cifar10_ipc50", "cifar100", "cifar100_ipc10", "svhn",
            "svhn_ipc10", "svhn_ipc50", "tiny_imagenet", "tiny_imagenet_ipc10"} <= names


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_config_holds_exactly_the_values_of_the_settings_table(path):
    from esp_tf import workdir
    found = workdir.parse_flags_file(str(path))
    expected = _expected_flags(path.stem)
    assert found == expected, {k: (found.get(k), expected.get(k)) for k in set(found) | set(expected)
                               if found.get(k) != expected.get(k)}
    # experts train exactly the epochs segments reach (starts 0..max_start_epoch-1, as MTT)
    assert int(found["expert_epochs"]) == int(found["max_start_epoch"]) - 1 + int(found["segment_length"])
    with flagsaver.flagsaver():
        flags.FLAGS(["esp_tf.train", f"--flagfile={path}"])
        settings = cli.from_flags()
        assert cli.eval_arch(settings) == f"convnet{found['depth']}"     # evaluation follows the condensation net
        assert cli.condense_settings(settings).param == "latents"
        # the config writes out the library's default code resolution for its IPC
        from esp_tf.synthetic import default_downsample
        assert int(found["latent_downsample"]) == default_downsample(int(found["ipc"]))


def test_no_file_points_to_documents_outside_the_repository():
    import subprocess
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    outside = ("pitfalls.md", "anchors.md", "DESIGN.md", "shared/reference", "shared/paper")
    hits = [f"{name}: {word}" for name in tracked.stdout.split()
            if (REPO / name).suffix in (".py", ".md", ".txt", ".flags", ".toml", ".ini", "")
            and (REPO / name).is_file()
            for word in outside if word in (REPO / name).read_text(errors="ignore")
            and not name.endswith("test_configs.py")]
    assert hits == []


def test_the_package_installs_its_console_scripts():
    import importlib
    import tomllib
    from importlib import metadata
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {"esp-train": "esp_tf.train:run", "esp-evaluate": "esp_tf.evaluate_cli:run"}
    installed = {e.name: e.value for e in metadata.entry_points(group="console_scripts")
                 if e.value.startswith("esp_tf.")}
    assert set(installed) == set(declared), "install the package: pip install -e . (the README's set-up commands do)"
    for target in {**installed, **declared}.values():     # an install from before the CLI moved still runs
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target
