"""Baselines: DM on fresh random nets, MTT's unrolled trajectory matching, herding, memory_bench."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, fake_real, run_python, tiny_net
from esp_tf import baselines, data as data_lib
from esp_tf.methods import dm, esp, tm
from esp_tf.synthetic import PixelSynthetic

C, IPC, HW, PER_CLASS = 3, 2, 8, 6


def _tiny_net(dtype="float32", act="relu"):
    return tiny_net(HW, 1, C, act=act, dtype=dtype)


def _fake_real():
    return fake_real(C, HW, 1, PER_CLASS)


def _dm(lr):
    net, real = _tiny_net(), _fake_real()
    syn = PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian", seed=0)
    cfg = dm.DMConfig(real_per_class=PER_CLASS, dsa=None)   # all reals: means fixed per net
    step = dm.DMStep(net, syn, {"pixels": keras.optimizers.SGD(lr, momentum=0.5)},
                            data_lib.ClassBalancedSampler(real), cfg)
    return net, real, syn, step


def test_dm_step_decreases_the_dm_loss_on_held_out_random_nets():
    _, _, _, step = _dm(lr=1.0)                       # DM: SGD lr 1.0, momentum 0.5
    held_out = [[100, i] for i in range(4)]
    before = np.mean([float(step.evaluate(s)) for s in held_out])
    for i in range(15):
        step([0, i])
    after = np.mean([float(step.evaluate(s)) for s in held_out])
    assert after < 0.75 * before, (before, after)
    assert step.trace_count == 1


def test_dm_step_embeds_with_a_fresh_random_net_per_seed():
    net, real, syn, step = _dm(lr=0.0)                 # lr 0: the images stay put
    x_real = data_lib.normalize(real.train_images, real.mean, real.std)
    losses = []
    for seed in ([1, 2], [3, 4]):
        theta = step.theta_for(seed)
        real_means = tf.reshape(tf.reduce_mean(tf.reshape(
            net.features(theta, x_real), [C, PER_CLASS, -1]), axis=1), [C, -1])
        x_syn, y_syn = syn.render()
        expected = esp.dm_loss(real_means, net.features(theta, x_syn), y_syn)
        loss = float(step(seed)["loss"])
        np.testing.assert_allclose(loss, float(expected), rtol=1e-5)
        losses.append(loss)
    assert not np.allclose(step.theta_for([1, 2]), step.theta_for([3, 4]))
    np.testing.assert_array_equal(step.theta_for([1, 2]), step.theta_for([1, 2]))
    assert abs(losses[0] - losses[1]) > 1e-3 * abs(losses[0])


def _tm_problem(dtype=tf.float64):
    net = _tiny_net(dtype.name, act="softplus")        # smooth: finite differences are meaningful
    theta = net.init([1, 2])
    target = theta + 0.05 * tf.random.stateless_normal(theta.shape, [3, 3], dtype=dtype)
    x = tf.random.stateless_normal([C * IPC, HW, HW, 1], [4, 4], dtype=dtype)
    y = tf.constant(np.repeat(np.arange(C), IPC), tf.int32)
    return net, theta, target, x, y


def test_tm_loss_is_one_for_a_frozen_student_and_exactly_zero_when_it_lands_on_the_target():
    net, theta, target, x, y = _tm_problem()
    cfg = tm.TMConfig(inner_steps=3, dsa=None)
    lr = tf.constant(0.5, tf.float64)
    zero = tf.constant(0.0, tf.float64)
    frozen, _ = tm.unrolled_match_loss(net, theta, target, x, y, zero, [0, 0], cfg)
    assert float(frozen) == 1.0
    _, aux = tm.unrolled_match_loss(net, theta, target, x, y, lr, [0, 0], cfg)
    manual = theta                                     # N plain SGD steps on all synthetic images
    for _ in range(3):
        with tf.GradientTape() as tape:
            tape.watch(manual)
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, net.logits(manual, x)))
        manual = manual - 0.5 * tape.gradient(ce, manual)
    np.testing.assert_allclose(aux["theta_end"].numpy(), manual.numpy(), rtol=1e-12, atol=1e-12)
    landed, _ = tm.unrolled_match_loss(net, theta, aux["theta_end"], x, y, lr, [0, 0], cfg)
    assert float(landed) == 0.0


@pytest.mark.parametrize("dsa,batch_syn", [(None, None), ("default", 4)])
def test_tm_gradient_matches_central_finite_differences_in_float64(dsa, batch_syn):
    net, theta, target, x, y = _tm_problem()
    from esp_tf import augment
    cfg = tm.TMConfig(inner_steps=2, batch_syn=batch_syn,
                             dsa=augment.DSAConfig() if dsa else None)
    lr = tf.constant(0.3, tf.float64)

    def loss_at(xx, rate):
        return tm.unrolled_match_loss(net, theta, target, xx, y, rate, [5, 6], cfg)[0]

    with tf.GradientTape() as tape:
        tape.watch([x, lr])
        loss = loss_at(x, lr)
    gx, glr = tape.gradient(loss, [x, lr])
    eps = 1e-4
    for i in range(2):
        v = tf.random.stateless_normal(x.shape, [7, i], dtype=tf.float64)
        fd = float((loss_at(x + eps * v, lr) - loss_at(x - eps * v, lr)) / (2 * eps))
        analytic = float(tf.reduce_sum(gx * v))
        assert abs(fd - analytic) <= 1e-5 * abs(analytic) + 1e-9, (fd, analytic)
    fd_lr = float((loss_at(x, lr + eps) - loss_at(x, lr - eps)) / (2 * eps))
    assert abs(fd_lr - float(glr)) <= 1e-5 * abs(float(glr)) + 1e-9, (fd_lr, float(glr))
    assert abs(float(glr)) > 0


def test_tm_step_updates_images_and_the_learnable_lr_and_is_traced_once():
    net = _tiny_net()
    syn = PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian", seed=0)
    opts = {"pixels": keras.optimizers.SGD(10.0, momentum=0.5), "lr": keras.optimizers.SGD(1e-3)}
    step = tm.TMStep(net, syn, opts, None, tm.TMConfig(inner_steps=2, batch_syn=4))
    images = syn.images.numpy().copy()
    for i in range(3):
        start = net.init([i, 0])
        target = start + 0.01 * tf.random.stateless_normal(start.shape, [i, 1])
        m = step(start, target, [i, 2])
        assert np.isfinite(float(m["loss"])) and float(m["lr_grad"]) != 0.0
    assert step.trace_count == 1
    assert float(step.syn_lr) != pytest.approx(0.01, abs=1e-9)
    assert not np.allclose(syn.images.numpy(), images)


def test_tm_step_rejects_a_missing_lr_optimizer():
    syn = PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian")
    with pytest.raises(ValueError, match="lr"):
        tm.TMStep(_tiny_net(), syn, {"pixels": keras.optimizers.SGD(1.0)})


def test_herding_picks_the_sample_nearest_the_mean_first_then_greedily_and_distinctly():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(12, 3))                  # embed_fn = identity on [n, 3]
    points[7] = points.mean(axis=0) + 1e-3             # nearest to the class mean by far
    (picked,) = baselines.herding_select(lambda x: x, [points], per_class=5, batch_size=5)
    mu = points.mean(axis=0)
    assert picked[0] == np.argmin(np.linalg.norm(points - mu, axis=1)) == 7
    assert len(set(picked.tolist())) == 5
    for k in range(1, 5):                              # each pick is the greedy argmin
        rest = [i for i in range(12) if i not in picked[:k]]
        dist = [np.linalg.norm((points[picked[:k]].sum(0) + points[i]) / (k + 1) - mu) for i in rest]
        assert picked[k] == rest[int(np.argmin(dist))]
    (everything,) = baselines.herding_select(lambda x: x, [points], per_class=12)
    assert sorted(everything.tolist()) == list(range(12))


def test_herding_subset_returns_class_major_real_images():
    real, net = _fake_real(), _tiny_net()
    x, y = baselines.herding_subset(real, net, net.init([0, 0]), per_class=2, batch_size=4)
    np.testing.assert_array_equal(y, np.repeat(np.arange(C), 2))
    for img, label in zip(x, y):
        same = [np.array_equal(img, r) for r in real.train_images[real.train_labels == label]]
        assert any(same)


def test_memory_bench_compares_tm_with_esp_and_ends_with_the_ratio_line(tmp_path):
    plot = tmp_path / "mem.png"
    out = run_python([REPO / "tools" / "memory_bench.py", "--methods=esp,tm", "--steps=2,4", "--ipc=1",
                      "--num_classes=2", "--size=8", "--width=4", "--real_per_class=2", "--nodsa",
                      f"--plot={plot}"])
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("TM/ESP peak-memory ratio at N=4: "), lines[-1]
    float(lines[-1].rsplit(":", 1)[1])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
