"""The condensation loop for every method and parameterisation, and the flags that reach it."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from conftest import fake_real, tiny_net
from esp_tf import cli, condense, methods
from esp_tf.synthetic import PARAMETERISATIONS

C, HW = 3, 16


def _real():
    return fake_real(C, HW, 3, 12)


# tiny per-method settings: 2 updates per ESP iteration, 2 unrolled MTT steps, 3 reals per class
_TINY = {"esp": dict(inner_steps=2, real_per_class=3), "dm": dict(real_per_class=3), "tm": dict(inner_steps=2)}


def _settings(tmp_path, method="esp", **kw):
    base = dict(workdir=str(tmp_path), method=method, ipc=2, iterations=2, segment_length=1,
                max_start_epoch=2, method_config=methods.get(method).Config(**_TINY.get(method, {})),
                ckpt_every=1, log_every=1)
    base.update(kw)
    return condense.settings(**base)


def _tiny_run(tmp_path, method, param, **kw):
    """A tiny real set, net, trajectories and settings for `method` x `param` (any registered)."""
    real = _real()
    net = tiny_net(HW, 3, C)
    trajs = np.stack([np.stack([net.init([k, e]).numpy() for e in range(3)]) for k in range(2)])
    config = methods.get(method).Config(**_TINY.get(method, {}))
    s = _settings(tmp_path, method=method, param=param, pixels_lr=0.01, method_config=config,
                  **{**PARAMETERISATIONS[param].tiny_settings, **kw})
    return real, net, trajs if methods.get(method).needs_trajectories else None, s


# The harness every registered method x parameterisation passes (a new one is tested by registering it).
@pytest.mark.parametrize("method,param", [(m, p) for m in methods.NAMES for p in PARAMETERISATIONS])
def test_every_method_and_parameterisation_condenses_checkpoints_and_resumes(tmp_path, method, param):
    real, net, trajs, s = _tiny_run(tmp_path / "whole", method, param)
    images, labels, syn = condense.run(real, net, trajs, s)
    assert images.shape[0] == labels.shape[0] == C * syn.images_per_class
    assert syn.images_per_class >= s.ipc
    init = condense.make_synthetic(real, s).render()[0].numpy()
    assert not np.allclose(images, init)                      # the set was optimised
    per_it = s.updates_per_iteration
    rows = [json.loads(l) for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["updates"] for r in rows] == [per_it, 2 * per_it]
    assert all(np.isfinite(r["loss"]) for r in rows)
    again, _, _ = condense.run(real, net, trajs, s)             # finished: restores, no update
    np.testing.assert_array_equal(again, images)
    # an interrupted run (a copy that lost its last checkpoint) resumes from the first, identically
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    s2 = dataclasses.replace(s, workdir=str(tmp_path / "cut"))
    ckpt = tmp_path / "cut" / "ckpt"
    for f in ckpt.glob("ckpt-2.*"):
        f.unlink()
    (ckpt / "checkpoint").unlink()
    (tmp_path / "cut" / "synthetic.npz").unlink()
    resumed, _, _ = condense.run(real, net, trajs, s2)
    np.testing.assert_array_equal(resumed, images)


@pytest.mark.parametrize("argv,expect", [
    (["--method=tm", "--syn_batch=5", "--student_lr_init=0.02", "--inner_steps=7"],
     dict(method="tm", lr_pixels=100.0, inner_steps=7, batch_syn=5, init_lr=0.02)),
    (["--method=dm", "--real_per_class=9"], dict(method="dm", lr_pixels=1.0, real_per_class=9)),
    (["--param=latents", "--codes_lr=0.2", "--num_decoders=3", "--beta=0.5", "--losses=proj"],
     dict(method="esp", param="latents", codes_lr=0.2, num_decoders=3, beta=0.5, losses=("proj",))),
    (["--param=latents", "--decoder=transposed", "--decoder_hidden=5", "--latent_channels=4",
      "--decoder_init=0.5", "--syn_chunk=64"],
     dict(decoder="transposed", decoder_hidden=5, latent_channels=4, decoder_init=0.5, chunk=64)),
    (["--method=dm", "--syn_chunk=0"], dict(method="dm", chunk=0)),
])
def test_condensation_flags_reach_the_settings(argv, expect):
    with flagsaver.flagsaver():
        flags.FLAGS(["train", "--workdir=/tmp/x"] + argv)
        s = cli.condense_settings(cli.from_flags())
    lr_pixels = condense.make_optimizers(s).get("pixels")
    got = dict(method=s.method, param=s.param,
               lr_pixels=None if lr_pixels is None else float(lr_pixels.learning_rate),   # at update 0
               **dataclasses.asdict(s.method_config), **dataclasses.asdict(s.param_config))
    for key, value in expect.items():
        assert got[key] == value, key


def test_unset_method_settings_take_the_methods_own_defaults_and_are_recorded():
    from esp_tf.methods.esp import ESPConfig
    from esp_tf.methods.tm import TMConfig
    with flagsaver.flagsaver():
        flags.FLAGS(["train", "--workdir=/tmp/x", "--method=tm"])
        settings = cli.from_flags()
        assert cli.validate(settings) == []
        assert cli.condense_settings(settings).method_config.inner_steps == TMConfig.inner_steps
        recorded = cli.values(settings)
    assert recorded["inner_steps"] == str(TMConfig.inner_steps)      # tm's own N
    assert recorded["beta"] == str(ESPConfig.beta)                    # esp's, the first reader
    with flagsaver.flagsaver():
        flags.FLAGS(["train", "--workdir=/tmp/x"])
        assert cli.values(cli.from_flags())["inner_steps"] == str(ESPConfig.inner_steps)


def test_a_method_setting_its_config_rejects_names_the_flag():
    from esp_tf import workdir as wd
    with flagsaver.flagsaver():
        flags.FLAGS(["train", "--workdir=/tmp/x", "--losses=proj,tm"])
        with pytest.raises(wd.UserError, match=r"--losses: losses must be a non-empty subset of proj,dm"):
            cli.from_flags()
    with pytest.raises(wd.UserError, match=r"--inner_steps: inner_steps must be >= 1"):
        cli.settings(method="tm", inner_steps=0)
    with pytest.raises(wd.UserError, match="unknown settings lr_pixel"):
        cli.settings(lr_pixel=0.1)


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_checkpoint(tmp_path):
    import tensorflow as tf
    from esp_tf import workdir as wd
    real = _real()
    net = tiny_net(HW, 3, C)
    trajs = np.stack([np.stack([net.init([k, e]).numpy() for e in range(3)]) for k in range(2)])
    # unclipped renders: clipping bounds the images, so this lr no longer blows the set up
    condense.run(real, net, trajs, _settings(tmp_path, iterations=2, clip_pixels=False))
    before = tf.train.latest_checkpoint(str(tmp_path / "ckpt"))
    blown = _settings(tmp_path, iterations=6, pixels_lr=1e38, clip_pixels=False)
    with pytest.raises(wd.UserError, match=r"(loss|set) became non-finite.* at iteration 3;"
                       r" it was not checkpointed or saved.*--inner_lr, --pixels_lr.* or --beta"):
        condense.run(real, net, trajs, blown)
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")) == before
    assert before.endswith("-2")
    assert condense._checkpoint_problem(before) is None          # finite and intact
    assert not (tmp_path / "synthetic.npz").exists() or np.isfinite(
        np.load(tmp_path / "synthetic.npz")["images"]).all()


def test_a_checkpoint_of_another_configuration_is_refused_clearly(tmp_path):
    from esp_tf import workdir as wd
    real = _real()
    net = tiny_net(HW, 3, C)
    trajs = np.stack([np.stack([net.init([k, e]).numpy() for e in range(3)]) for k in range(2)])
    condense.run(real, net, trajs, _settings(tmp_path, iterations=1))
    with pytest.raises(wd.UserError, match="does not match"):
        condense.run(real, net, trajs, _settings(tmp_path, iterations=2, ipc=3))


@pytest.mark.parametrize("method", ["esp", "tm"])
def test_syn_batch_reaches_both_esp_and_tm(method):
    with flagsaver.flagsaver():
        flags.FLAGS(["train", "--workdir=/tmp/x", "--syn_batch=20", f"--method={method}"])
        assert cli.condense_settings(cli.from_flags()).method_config.batch_syn == 20
    with flagsaver.flagsaver():
        flags.FLAGS(["train", "--workdir=/tmp/x", f"--method={method}"])
        assert cli.condense_settings(cli.from_flags()).method_config.batch_syn is None      # default: every image


def test_library_and_command_line_defaults_agree():
    """CondenseSettings' fields carry their flag's name; a library caller gets the CLI's defaults,
    and each method's and parameterisation's settings have one default, in its Config (the flags
    default to None; the resolved settings take the Config's)."""
    checked = 0
    for field in dataclasses.fields(condense.CondenseSettings):
        if field.name in cli.NAMES and field.default is not dataclasses.MISSING:
            assert field.default == cli.FLAGS[field.name].default, field.name
            checked += 1
    assert checked >= 14
    for name in methods.NAMES:
        for flag in methods.get(name).flag_fields:
            assert cli.FLAGS[flag].default is None, flag
    resolved = cli.settings(param="latents")
    for kind in PARAMETERISATIONS.values():
        defaults = kind.Config()      # with the defaults that depend on the set size filled in
        defaults = defaults.for_ipc(resolved.ipc) if hasattr(defaults, "for_ipc") else defaults
        for field in dataclasses.fields(kind.Config):
            assert cli.FLAGS[field.name].default is None, field.name
            assert getattr(resolved, field.name) == getattr(defaults, field.name), field.name
            if getattr(defaults, field.name) != field.default:
                assert field.default is None, field.name       # only an unset default is filled in
    assert cli.condense_settings(resolved).param_config == PARAMETERISATIONS["latents"].Config().for_ipc(resolved.ipc)
