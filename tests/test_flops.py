"""The analytic FLOP counts (esp_tf.flops) behind tools/speed_bench.py and BUILD.md's costs."""

import tensorflow as tf

from conftest import tiny_net
from esp_tf import flops, models, subspace
from esp_tf.methods import esp


def test_convnet3_forward_flops_are_the_hand_count_on_cifar10_shapes():
    net = flops.network_flops(models.build("convnet3", (32, 32, 3), 10))
    macs = [32 * 32 * 27 * 128, 16 * 16 * 9 * 128 * 128, 8 * 8 * 9 * 128 * 128]     # conv0..conv2
    assert net["forward_conv"] == 2 * sum(macs)
    assert net["forward"] == 2 * (sum(macs) + 2048 * 10)                               # + classifier
    assert net["first"] == 2 * macs[0] and net["train"] == 3 * net["forward"] - net["first"]


def test_esp_update_counts_real_forwards_and_seven_forward_units_per_synthetic_image():
    net = {"forward": 10.0, "forward_conv": 9.0, "first": 2.0, "train": 28.0}
    f = flops.esp_update_flops(net, syn_images=5, real_images=7)
    assert f["real"] == 7 * 9.0
    assert f["fwd_g"] + f["second_order"] == 5 * (7 * 10.0 - 2 * 2.0 + 9.0)
    assert f["total"] == f["real"] + f["fwd_g"] + f["second_order"]
    proj_only = flops.esp_update_flops(net, 5, 7, losses=("proj",))
    assert proj_only["real"] == 0 and proj_only["second_order"] == 5 * (4 * 10.0 - 2.0)


def test_the_count_of_the_esp_outer_gradient_matches_xla_optimized_hlo():
    net = tiny_net(16, 3, 4, width=8, depth=2)
    theta = net.init([0, 0])
    basis = subspace.basis(tf.stack([theta + 0.01 * i for i in range(3)]))
    x = tf.random.stateless_normal([8, 16, 16, 3], [1, 2])
    y = tf.constant([0, 1, 2, 3] * 2)
    real_means = tf.random.stateless_normal([4, net.features(theta, x).shape[-1]], [3, 4])
    cfg = esp.ESPConfig(dsa=None)

    def outer(x):                      # G, then one outer gradient per loss term (as ESPStep)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            _, aux = esp.outer_loss(net, theta, basis, x, y, real_means, cfg)
        return tf.add_n([tape.gradient(w, x) for w in aux["weighted"].values()])

    hlo = tf.function(outer, jit_compile=True).experimental_get_compiler_ir(x)(stage="optimized_hlo")
    counted = flops.hlo_flops(hlo)
    f = flops.esp_update_flops(flops.network_flops(net.model), syn_images=8, real_images=0)
    analytic = f["fwd_g"] + f["second_order"]
    assert abs(counted - analytic) <= 0.02 * analytic, (counted, analytic)
