"""GPU-ready by construction: every compiled hot step (ESP, DM, TM, expert SGD) stays inside the
graph (no Python callbacks, so no host round-trip per update), traces once for fixed shapes,
and compiles with XLA (--jit_compile) to the same update as without it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import fake_real, tiny_net
from esp_tf import augment, data as data_lib, experts, subspace
from esp_tf.methods import dm, esp, tm
from esp_tf.synthetic import PixelSynthetic

C, IPC, HW = 3, 2, 8
# Graph ops that call back into the Python interpreter: each would stop a GPU step on the host.
HOST_CALLBACK_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def _all_op_types(concrete) -> set:
    graph_def = concrete.graph.as_graph_def()
    ops = {node.op for node in graph_def.node}
    for fn in graph_def.library.function:          # nested tf.functions, while/cond bodies
        ops |= {node.op for node in fn.node_def}
    return ops


def _net():
    return tiny_net(HW, 1, C)


def _synthetic():
    return PixelSynthetic(C, IPC, (HW, HW, 1), init="gaussian", seed=0)


def _sampler():
    return data_lib.ClassBalancedSampler(fake_real(C, HW, 1, 6))


def _esp(jit):
    net, syn = _net(), _synthetic()
    step = esp.ESPStep(net, syn, {"pixels": keras.optimizers.SGD(0.1)}, _sampler(),
                       esp.ESPConfig(real_per_class=3, beta=1e-2), jit_compile=jit)
    theta = net.init([0, 0])
    basis = subspace.basis(tf.stack([theta + 0.01 * tf.random.stateless_normal(theta.shape, [i, 1])
                                     for i in range(3)]))
    call = lambda n: step(theta, basis, [0, n])[1]                                 # noqa: E731  metrics
    concrete = lambda: step._compiled.get_concrete_function(theta, basis, tf.constant([0, 0], tf.int64))  # noqa: E731
    return step, syn, call, concrete


def _dm(jit):
    net, syn = _net(), _synthetic()
    step = dm.DMStep(net, syn, {"pixels": keras.optimizers.SGD(1.0)}, _sampler(),
                            dm.DMConfig(real_per_class=3), jit_compile=jit)
    call = lambda n: step([0, n])                                                  # noqa: E731
    concrete = lambda: step._compiled.get_concrete_function(  # noqa: E731
        tf.constant([0, 0], tf.int64), step.theta_for([0, 0]))
    return step, syn, call, concrete


def _tm(jit):
    net, syn = _net(), _synthetic()
    step = tm.TMStep(net, syn, {"pixels": keras.optimizers.SGD(10.0), "lr": keras.optimizers.SGD(1e-5)},
                            config=tm.TMConfig(inner_steps=2), jit_compile=jit)
    start = net.init([0, 0])
    target = start + 0.01
    call = lambda n: step(start, target, [0, n])                                   # noqa: E731
    concrete = lambda: step._compiled.get_concrete_function(start, target, tf.constant([0, 0], tf.int64))  # noqa: E731
    return step, syn, call, concrete


METHODS = {"esp": _esp, "dm": _dm, "tm": _tm}


@pytest.mark.parametrize("method", METHODS)
def test_compiled_condensation_step_has_no_host_callback_and_traces_once(method):
    step, _, call, concrete = METHODS[method](jit=False)
    for n in range(3):                      # new seeds and new variable values, same shapes
        call(n)
    assert step.trace_count == 1
    ops = _all_op_types(concrete())
    assert ops and not ops & HOST_CALLBACK_OPS, ops & HOST_CALLBACK_OPS
    assert step.trace_count == 1            # asking for the concrete function did not retrace


@pytest.mark.parametrize("method", METHODS)
def test_jit_compiled_condensation_step_gives_the_same_update(method):
    _, plain_syn, plain_call, _ = METHODS[method](jit=False)
    _, xla_syn, xla_call, _ = METHODS[method](jit=True)
    plain, xla = plain_call(0), xla_call(0)
    np.testing.assert_allclose(float(xla["loss"]), float(plain["loss"]), rtol=1e-4)
    np.testing.assert_allclose(xla_syn.images.numpy(), plain_syn.images.numpy(), rtol=1e-3, atol=1e-5)


def test_expert_sgd_step_has_no_host_callback_and_traces_once():
    net = _net()
    trainer = experts._Trainer(net, experts.ExpertConfig(batch_size=4, dsa=augment.DSAConfig()))
    theta = net.init([0, 0])
    velocity = tf.zeros_like(theta)
    x = tf.random.stateless_normal([4, HW, HW, 1], [1, 1])
    y = tf.constant([0, 1, 2, 0], tf.int32)
    for n in range(3):
        theta, velocity, _ = trainer.step(theta, velocity, x, y, tf.constant([0, n], tf.int64))
    assert trainer.step.experimental_get_tracing_count() == 1
    ops = _all_op_types(trainer.step.get_concrete_function(theta, velocity, x, y, tf.constant([0, 0], tf.int64)))
    assert ops and not ops & HOST_CALLBACK_OPS
