"""The typed, nested configuration (esp_tf/config.py): the command line is generated from it,
it round-trips with the flat settings, and it imports neither TensorFlow nor absl."""
import dataclasses

import pytest

from conftest import run_python
from esp_tf import cli, config


def test_config_imports_neither_tensorflow_nor_absl():
    out = run_python(["-c", "import sys; import esp_tf.config; "
                            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'absl', 'keras')))"],
                     check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_flag_is_generated_from_a_setting_with_its_default_help_and_identity():
    specs = {spec.name: (spec, default) for spec, default in config.flag_specs()}
    assert set(specs) == set(cli.NAMES)
    kinds = {"str": str, "int": int, "float": float, "bool": bool, "list": tuple, "enum": str}
    for _, field in config.run_fields():
        assert field.metadata["identity"] in (config.RUN, config.EXPERTS, config.RERUN_SAFE,
                                              config.EVALUATION, config.NOT_RECORDED), field.name
        assert field.metadata["help"], field.name
        assert field.default is None or isinstance(field.default, kinds[field.metadata["flag"]]), field.name
        flag_default = cli.FLAGS[field.name].default
        assert (tuple(flag_default) if isinstance(flag_default, list) else flag_default) == field.default
    for spec in config.METHOD_FLAGS + config.PARAM_FLAGS:
        assert cli.FLAGS[spec.name].default is None, spec.name       # the Config's default


def test_the_method_and_parameterisation_flags_are_the_registries_settings():
    from esp_tf import methods, synthetic
    method_flags = {flag for name in methods.names() for flag in methods.get(name).flag_fields}
    param_flags = {f for kind in synthetic.PARAMETERISATIONS.values() for f in synthetic.setting_names(kind)}
    assert {s.name for s in config.METHOD_FLAGS} == method_flags
    assert {s.name for s in config.PARAM_FLAGS} == param_flags


def test_a_run_config_round_trips_with_the_flat_settings_and_is_built_without_absl():
    from esp_tf import workdir as wd
    from esp_tf.methods.dm import DMConfig
    from esp_tf.synthetic import LatentsConfig, PixelsConfig
    s = cli.settings(param="latents", num_decoders=8, method="dm", real_per_class=32, phases=["condense"],
                     dataset="cifar10", baselines=[])
    c = cli.run_config(s)
    # the size-dependent default is filled in for the run's IPC (1: codes at H/4)
    assert c.param == LatentsConfig(num_decoders=8, latent_downsample=4) and c.method.real_per_class == 32
    assert cli.run_config(cli.settings(param="latents", ipc=10)).param.latent_downsample == 2
    assert cli.run_config(cli.settings(param="latents", ipc=10, latent_downsample=8)).param.latent_downsample == 8
    assert c.phases == ("condense",) and c.eval.baselines == () and c.data.dataset == "cifar10"
    assert cli.settings_from(c) == s
    by_hand = config.RunConfig(data=config.DataConfig(dataset="cifar10"),
                               condense=config.CondenseConfig(method="dm", param="latents"),
                               method=DMConfig(real_per_class=64), param=LatentsConfig(decoder="transposed"))
    flat = cli.settings_from(by_hand)
    assert (flat.real_per_class, flat.decoder, flat.codes_lr, flat.beta) == (64, "transposed", 0.1, 1e-5)
    assert cli.run_config(flat) == dataclasses.replace(by_hand, method=DMConfig(real_per_class=64),
                                                       param=LatentsConfig(decoder="transposed").for_ipc(1))
    from esp_tf.methods.esp import ESPConfig
    readme = config.RunConfig(                                        # README "Library"
        experts=config.ExpertsConfig(num_experts=2, expert_epochs=3, max_start_epoch=2),
        condense=config.CondenseConfig(param="latents", iterations=20),
        method=ESPConfig(real_per_class=32), param=LatentsConfig(num_decoders=8),
        eval=config.EvalConfig(eval_epochs=50, eval_runs=1))
    flat = cli.settings_from(readme)
    assert cli.validate(dataclasses.replace(flat, workdir="runs/lib_typed")) == []
    assert (flat.num_experts, flat.param, flat.real_per_class, flat.num_decoders, flat.eval_runs) == (
        2, "latents", 32, 8, 1)
    with pytest.raises(wd.UserError, match="PixelsConfig is not the Config of LatentSynthetic"):
        cli.settings_from(dataclasses.replace(by_hand, param=PixelsConfig()))


def test_parse_reads_a_command_line_in_a_registry_of_its_own(tmp_path):
    from absl import flags
    from esp_tf import workdir as wd
    flagfile = tmp_path / "a.flags"
    flagfile.write_text("--ipc=3\n--param=latents\n")
    before = {name: flags.FLAGS[name].value for name in ("ipc", "param")} if "ipc" in flags.FLAGS else {}
    s = cli.parse([f"--flagfile={flagfile}", "--lr_codes=0.2", "--workdir=~/w"])
    from esp_tf.synthetic import LatentsConfig
    assert (s.ipc, s.param, s.codes_lr, s.num_decoders) == (3, "latents", 0.2, LatentsConfig.num_decoders)
    assert not s.workdir.startswith("~")
    assert cli.parse([]) == cli.settings()                             # nothing left over
    if before:
        assert {name: flags.FLAGS[name].value for name in before} == before
    with pytest.raises(wd.UserError, match="no_such_flag"):
        cli.parse(["--no_such_flag=1"])
