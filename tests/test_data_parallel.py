"""Data-parallel condensation: under MirroredStrategy over 2 logical CPU devices, a few ESP and DM
updates equal the single-device updates within float32 tolerance. Logical devices must be set
before TensorFlow initialises its devices, so each check runs in a fresh process."""
import json
import textwrap

import pytest

from conftest import run_python

SETUP = """
import json, sys
import numpy as np, keras, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, "tests")
from conftest import fake_real
from esp_tf import data, data_parallel, models, subspace
from esp_tf.methods import dm, esp
from esp_tf.synthetic import LatentSynthetic, PixelSynthetic

C, HW = 3, 8
real = fake_real(C, HW, 3, 12)
net = models.FlatModel(models.convnet((HW, HW, 3), C, width=4, depth=2))
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2

def make_set(param):
    if param == "pixels":
        return PixelSynthetic(C, 3, (HW, HW, 3), init="gaussian", seed=3)   # 9 images: 5 + 4
    return LatentSynthetic(C, 2, (HW, HW, 3), init="gaussian", num_decoders=2, hidden=4)

def variables(syn):
    return [v.numpy() for v in syn.trainable_variables]

def max_rel(a, b):
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12)) for x, y in zip(a, b))
"""

ESP = SETUP + """
out = {}
# (set, replicated config, single-device config): the whole set per replica in one piece; each
# replica's block in pieces of 2 renders against one piece on one device; the sliced variant
VARIANTS = {"pixels": ("pixels", {}, {}), "latents": ("latents", {}, {}),
            "latents_pieces": ("latents", {"chunk": 2}, {"chunk": 0}),
            "pixels_sliced": ("pixels", {"batch_syn": 6}, {"batch_syn": 6}),
            # the whole class on the real side: 3 chunks of 5 rows per class, 2 on one replica
            "pixels_whole_class": ("pixels", {"real_per_class": 0}, {"real_per_class": 0})}
from esp_tf import matching
matching.WHOLE_CLASS_CHUNK_PIXELS = 5 * HW * HW
for name, (param, replicated_kw, single_kw) in VARIANTS.items():
    trajectory = np.stack([net.init([k, 0]).numpy() for k in range(3)])       # [3, P]
    basis = subspace.basis(tf.constant(trajectory))
    results = []
    for replicated in (False, True):
        if replicated:
            config = esp.ESPConfig(**{"real_per_class": 4, "inner_steps": 3, **replicated_kw})
            with strategy.scope():
                syn = make_set(param)
                opts = {k: keras.optimizers.Adam(0.05) for k in syn.variable_groups()}
            step = data_parallel.ReplicatedESPStep(strategy, net, syn, opts, data.ClassBalancedSampler(real), config)
            if "chunk" in replicated_kw:
                assert step.chunks.count > 2, step.chunks.count      # several pieces per replica
        else:
            config = esp.ESPConfig(**{"real_per_class": 4, "inner_steps": 3, **single_kw})
            syn = make_set(param)
            opts = {k: keras.optimizers.Adam(0.05) for k in syn.variable_groups()}
            step = esp.ESPStep(net, syn, opts, data.ClassBalancedSampler(real), config)
        theta = tf.constant(trajectory[0])
        for n in range(3):
            theta, m = step(theta, basis, [0, n])
        results.append((variables(syn), theta.numpy(), {k: float(v) for k, v in m.items()}, step.trace_count))
    (v1, t1, m1, _), (v2, t2, m2, traces) = results
    moved = max_rel([a - b for a, b in zip(v1, variables(make_set(param)))], [np.ones(1)])
    out[name] = {"vars": max_rel(v2, v1), "theta": max_rel([t2], [t1]), "moved": moved, "traces": traces,
                  "metrics": {k: [m1[k], m2[k]] for k in m1}}
print(json.dumps(out))
"""

DM = SETUP + """
results = []
for replicated in (False, True):
    if replicated:
        with strategy.scope():
            syn = make_set("pixels")
            opts = {"pixels": keras.optimizers.SGD(1.0, momentum=0.5)}
        step = data_parallel.ReplicatedDMStep(strategy, net, syn, opts, data.ClassBalancedSampler(real),
                                              dm.DMConfig(real_per_class=4))
    else:
        syn = make_set("pixels")
        opts = {"pixels": keras.optimizers.SGD(1.0, momentum=0.5)}
        step = dm.DMStep(net, syn, opts, data.ClassBalancedSampler(real), dm.DMConfig(real_per_class=4))
    for n in range(3):
        m = step([0, n])
    results.append((variables(syn), float(m["loss"])))
(v1, l1), (v2, l2) = results
print(json.dumps({"vars": max_rel(v2, v1), "loss": [l1, l2],
                  "moved": max_rel([a - b for a, b in zip(v1, variables(make_set("pixels")))], [np.ones(1)])}))
"""


def _run(code):
    out = run_python(["-c", textwrap.dedent(code)], check=True, timeout=600)   # timeout: hang guard
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_esp_updates_under_mirrored_strategy_equal_single_device_updates():
    out = _run(ESP)
    assert set(out) == {"pixels", "latents", "latents_pieces", "pixels_sliced", "pixels_whole_class"}
    for param, r in out.items():
        assert r["moved"] > 1e-4, f"{param}: the set did not move; the comparison would be empty"
        assert r["vars"] < 2e-4, (param, r)          # Adam after 3 updates: ~5e-5 seen (latents)
        assert r["theta"] < 1e-5, (param, r)
        assert r["traces"] == 1, (param, r)
        for name, (single, replicated) in r["metrics"].items():
            assert replicated == pytest.approx(single, rel=1e-4, abs=1e-6), (param, name)


def test_dm_updates_under_mirrored_strategy_equal_single_device_updates():
    out = _run(DM)
    assert out["moved"] > 1e-4
    assert out["vars"] < 1e-4, out
    assert out["loss"][1] == pytest.approx(out["loss"][0], rel=1e-4)


RESUME = SETUP + """
import dataclasses, pathlib, shutil
from esp_tf import condense, methods
root = pathlib.Path(sys.argv[1])
trajs = np.stack([np.stack([net.init([k, e]).numpy() for e in range(3)]) for k in range(2)])
out = {}
for method in ("esp", "dm"):
    config = methods.get(method).Config(real_per_class=4, **({"inner_steps": 2} if method == "esp" else {}))
    s = condense.settings(workdir=str(root / method / "single"), method=method, ipc=3, iterations=2,
                                  segment_length=1, max_start_epoch=2, method_config=config, ckpt_every=1,
                                  log_every=1, init="gaussian", pixels_lr=0.01)
    t = trajs if method == "esp" else None
    single, _, _ = condense.run(real, net, t, s)
    s2 = dataclasses.replace(s, workdir=str(root / method / "mirrored"))
    whole, _, syn = condense.run(real, net, t, s2, strategy)
    assert type(syn.trainable_variables[0]).__name__ == "MirroredVariable"
    # an interrupted run (a copy that lost its last checkpoint) resumes under the strategy
    cut = root / method / "cut"
    shutil.copytree(root / method / "mirrored", cut)
    for f in (cut / "ckpt").glob("ckpt-2.*"):
        f.unlink()
    (cut / "ckpt" / "checkpoint").unlink()
    (cut / "synthetic.npz").unlink()
    resumed, _, _ = condense.run(real, net, t, dataclasses.replace(s2, workdir=str(cut)), strategy)
    out[method] = {"vs_single": max_rel([whole], [single]), "resumed_equal": bool(np.array_equal(resumed, whole)),
                   "moved": max_rel([whole - condense.make_synthetic(real, s).render()[0].numpy()], [np.ones(1)])}
print(json.dumps(out))
"""


def test_condensation_under_a_strategy_matches_one_device_and_resumes_from_its_checkpoint(tmp_path):
    out = run_python(["-c", textwrap.dedent(RESUME), str(tmp_path)], check=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for method, r in result.items():
        assert r["moved"] > 1e-4, method
        assert r["vs_single"] < 2e-4, (method, r)
        assert r["resumed_equal"], (method, r)


PIPELINE = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from esp_tf import cli, pipeline
settings = cli.settings(data_dir=sys.argv[2], download=False, strategy="mirrored", num_experts=2,
                        expert_epochs=2, max_start_epoch=1, segment_length=2, iterations=2, inner_steps=2,
                        real_per_class=4, eval_epochs=2, eval_runs=1, width=8, depth=2, log_every=1,
                        ckpt_every=1, baselines=[])
print(json.dumps(pipeline.run(settings, sys.argv[1])))
"""


def test_the_pipeline_runs_under_mirrored_strategy_and_exports(tmp_path):
    out = run_python(["-c", textwrap.dedent(PIPELINE), str(tmp_path / "work"), str(tmp_path / "tfds")],
                     check=True, timeout=600)
    assert "condense: 2 replicas (MirroredStrategy)" in out.stdout
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(results) == {"esp"}
    for name in ("synthetic.npz", "ckpt/checkpoint", "saved_model/generator/saved_model.pb", "grid.png"):
        assert (tmp_path / "work" / name).exists(), name


MULTI_WORKER = """
import sys, pathlib
import numpy as np, tensorflow as tf
mode, root = sys.argv[1], pathlib.Path(sys.argv[2])
strategy = tf.distribute.MultiWorkerMirroredStrategy() if mode == "multi" else None   # before any op
sys.path.insert(0, "tests")
from conftest import fake_real
from esp_tf import condense, methods, models
C, HW = 3, 8
real = fake_real(C, HW, 3, 12)
net = models.FlatModel(models.convnet((HW, HW, 3), C, width=4, depth=2))
trajs = np.stack([np.stack([net.init([k, e]).numpy() for e in range(3)]) for k in range(2)])
s = condense.settings(workdir=str(root), method="esp", ipc=3, iterations=2, segment_length=1,
                              max_start_epoch=2, method_config=methods.get("esp").Config(real_per_class=4, inner_steps=2),
                              ckpt_every=1, log_every=1, init="gaussian", pixels_lr=0.01)
images, _, _ = condense.run(real, net, trajs, s, strategy)
np.save(root / "images.npy", images)
print("replicas", strategy.num_replicas_in_sync if strategy else 1)
"""


def test_multi_worker_mirrored_condensation_in_two_processes_matches_one_process(tmp_path):
    import os
    import subprocess
    import sys
    import numpy as np
    from conftest import REPO, free_ports, tf_config
    ports = free_ports(2)
    code = textwrap.dedent(MULTI_WORKER)
    procs = [subprocess.Popen([sys.executable, "-c", code, "multi", str(tmp_path / f"worker{i}")], cwd=REPO,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": tf_config(i, ports)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    run_python(["-c", code, "single", str(tmp_path / "single")], check=True, timeout=600)
    for p in procs:
        out, err = p.communicate(timeout=600)                  # hang guard
        assert p.returncode == 0, err[-3000:]
        assert "replicas 2" in out
    single = np.load(tmp_path / "single" / "images.npy")
    workers = [np.load(tmp_path / f"worker{i}" / "images.npy") for i in range(2)]
    np.testing.assert_array_equal(workers[0], workers[1])
    assert np.abs(workers[0] - single).max() <= 1e-4 * np.abs(single).max()
    assert (tmp_path / "worker0" / "ckpt" / "checkpoint").exists()


def test_settings_a_strategy_cannot_run_are_one_line_errors(tmp_path):
    import types
    from esp_tf import cli, condense, methods, workdir as wd
    errors = cli.validate(cli.settings(workdir=str(tmp_path), strategy="mirrored", method="tm"))
    assert any("--method=tm has no data-parallel update" in e for e in errors), errors
    errors = cli.validate(cli.settings(workdir=str(tmp_path), strategy="mirrored", jit_compile=True))
    assert any("--jit_compile is not supported under --strategy" in e for e in errors), errors
    assert cli.validate(cli.settings(workdir=str(tmp_path), strategy="mirrored")) == []
    two = types.SimpleNamespace(num_replicas_in_sync=2)           # checked before anything is built
    s = condense.CondenseSettings(workdir=str(tmp_path), method="dm",
                                  method_config=methods.get("dm").Config(real_per_class=3))
    with pytest.raises(wd.UserError, match="--real_per_class=3 must be a multiple of the 2 replicas"):
        condense.run(None, None, None, s, two)
