"""The condensation loop for every method and parameterisation, and the flags that reach it."""
import json

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from conftest import fake_real
from esp_tf import cli, condense, models

C, HW = 3, 16


def _real():
    return fake_real(C, HW, 3, 12)


def _settings(tmp_path, **kw):
    from esp_tf.baselines import DMConfig, TMConfig
    from esp_tf.esp import ESPConfig
    base = dict(workdir=str(tmp_path), ipc=2, iterations=2, inner_steps=2, segment_length=1,
                max_start_epoch=2, esp=ESPConfig(real_per_class=3), dm=DMConfig(real_per_class=3),
                tm=TMConfig(inner_steps=2), ckpt_every=1, log_every=1)
    base.update(kw)
    return condense.CondenseSettings(**base)


@pytest.mark.parametrize("method,param", [("esp", "pixels"), ("esp", "latents"), ("dm", "pixels"),
                                          ("tm", "pixels")])
def test_every_method_and_parameterisation_condenses_and_checkpoints(tmp_path, method, param):
    real = _real()
    net = models.FlatModel(models.convnet((HW, HW, 3), C, width=4, depth=2))
    trajs = np.stack([np.stack([net.init([k, e]).numpy() for e in range(3)]) for k in range(2)])
    s = _settings(tmp_path, method=method, param=param, ipc=2 if param == "pixels" else 4,
                  num_decoders=2, lr_pixels=0.01)
    images, labels, syn = condense.run(real, net, None if method == "dm" else trajs, s)
    assert images.shape[0] == labels.shape[0] == C * syn.images_per_class
    if param == "latents":
        assert syn.images_per_class > s.ipc
    init = condense.make_synthetic(real, s).render()[0].numpy()
    assert not np.allclose(images, init)                      # the set was optimised
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["updates"] for r in rows] == ([2, 4] if method == "esp" else [1, 2])
    assert (tmp_path / "ckpt" / "checkpoint").exists()
    again, _, _ = condense.run(real, net, None if method == "dm" else trajs, s)   # finished: restores
    np.testing.assert_array_equal(again, images)


@pytest.mark.parametrize("argv,expect", [
    (["--method=tm", "--syn_batch=5", "--student_lr_init=0.02", "--inner_steps=7"],
     dict(method="tm", lr_pixels=100.0, tm_steps=7, batch_syn=5, init_lr=0.02)),
    (["--method=dm", "--real_per_class=9"], dict(method="dm", lr_pixels=1.0, dm_real=9)),
    (["--param=latents", "--codes_lr=0.2", "--num_decoders=3", "--beta=0.5", "--losses=proj"],
     dict(method="esp", param="latents", lr_codes=0.2, num_decoders=3, beta=0.5, losses=("proj",))),
])
def test_condensation_flags_reach_the_settings(argv, expect):
    with flagsaver.flagsaver():
        flags.FLAGS(["train", "--workdir=/tmp/x"] + argv)
        s = cli.condense_settings()
    got = dict(method=s.method, lr_pixels=s.lr_pixels, tm_steps=s.tm.inner_steps, batch_syn=s.tm.batch_syn,
               init_lr=s.tm.init_lr, dm_real=s.dm.real_per_class, param=s.param, lr_codes=s.lr_codes,
               num_decoders=s.num_decoders, beta=s.esp.beta, losses=s.esp.losses)
    for key, value in expect.items():
        assert got[key] == value, key


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_checkpoint(tmp_path):
    import tensorflow as tf
    from esp_tf import workdir as wd
    real = _real()
    net = models.FlatModel(models.convnet((HW, HW, 3), C, width=4, depth=2))
    trajs = np.stack([np.stack([net.init([k, e]).numpy() for e in range(3)]) for k in range(2)])
    # unclipped renders: clipping bounds the images, so this lr no longer blows the set up
    condense.run(real, net, trajs, _settings(tmp_path, iterations=2, clip_pixels=False))
    before = tf.train.latest_checkpoint(str(tmp_path / "ckpt"))
    blown = _settings(tmp_path, iterations=6, lr_pixels=1e38, clip_pixels=False)
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
    net = models.FlatModel(models.convnet((HW, HW, 3), C, width=4, depth=2))
    trajs = np.stack([np.stack([net.init([k, e]).numpy() for e in range(3)]) for k in range(2)])
    condense.run(real, net, trajs, _settings(tmp_path, iterations=1))
    with pytest.raises(wd.UserError, match="does not match"):
        condense.run(real, net, trajs, _settings(tmp_path, iterations=2, ipc=3))


def test_syn_batch_reaches_both_esp_and_tm():
    with flagsaver.flagsaver():
        flags.FLAGS(["train", "--workdir=/tmp/x", "--syn_batch=20"])
        s = cli.condense_settings()
    assert s.esp.batch_syn == 20 and s.tm.batch_syn == 20
    with flagsaver.flagsaver():
        flags.FLAGS(["train", "--workdir=/tmp/x"])
        s = cli.condense_settings()
    assert s.esp.batch_syn is None and s.tm.batch_syn is None      # default: every image
