"""GPU-ready by construction: every compiled hot step (ESP, DM, TM, expert SGD) stays inside the
graph (no Python callbacks, so no host round-trip per update), traces once for fixed shapes,
and every registered method compiles with XLA (--jit_compile) to the same update as without it.
(`.numpy()` or `float()` on a tensor inside a tf.function fails at tracing, so a step that
traces is free of them; what can still reach the host is a py_function, checked below.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import fake_real, tiny_net
from esp_tf import augment, condense, data as data_lib, experts, methods, subspace
from esp_tf.methods import dm, esp, tm
from esp_tf.methods.base import Context
from esp_tf.synthetic import PARAMETERISATIONS

C, HW = 3, 8
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


def _synthetic(param="pixels"):
    """A tiny Gaussian-init set of any registered parameterisation, from its own tiny settings."""
    kind = PARAMETERISATIONS[param]
    s = condense.settings(workdir="", param=param, init="gaussian", **kind.tiny_settings)
    return kind.from_settings(s, C, (HW, HW, 1), None, None)


def _sampler():
    return data_lib.ClassBalancedSampler(fake_real(C, HW, 1, 6))


def _esp(jit, param="pixels"):
    net, syn = _net(), _synthetic(param)
    opts = {name: keras.optimizers.SGD(0.1) for name in syn.variable_groups()}
    step = esp.ESPStep(net, syn, opts, _sampler(),
                       esp.ESPConfig(real_per_class=3, beta=1e-2), jit_compile=jit)
    theta = net.init([0, 0])
    basis = subspace.basis(tf.stack([theta + 0.01 * tf.random.stateless_normal(theta.shape, [i, 1])
                                     for i in range(3)]))
    call = lambda n: step(theta, basis, [0, n])[1]                                 # noqa: E731  metrics
    concrete = lambda: step._compiled.get_concrete_function(theta, basis, tf.constant([0, 0], tf.int64))  # noqa: E731
    return step, syn, call, concrete


def _dm(jit, param="pixels"):
    net, syn = _net(), _synthetic(param)
    step = dm.DMStep(net, syn, {name: keras.optimizers.SGD(1.0) for name in syn.variable_groups()}, _sampler(),
                            dm.DMConfig(real_per_class=3), jit_compile=jit)
    call = lambda n: step([0, n])                                                  # noqa: E731
    concrete = lambda: step._compiled.get_concrete_function(  # noqa: E731
        tf.constant([0, 0], tf.int64), step.theta_for([0, 0]))
    return step, syn, call, concrete


def _tm(jit, param="pixels"):
    net, syn = _net(), _synthetic(param)
    opts = {**{name: keras.optimizers.SGD(10.0) for name in syn.variable_groups()}, "lr": keras.optimizers.SGD(1e-5)}
    step = tm.TMStep(net, syn, opts,
                            config=tm.TMConfig(inner_steps=2), jit_compile=jit)
    start = net.init([0, 0])
    target = start + 0.01
    call = lambda n: step(start, target, [0, n])                                   # noqa: E731
    concrete = lambda: step._compiled.get_concrete_function(start, target, tf.constant([0, 0], tf.int64))  # noqa: E731
    return step, syn, call, concrete


METHODS = {"esp": _esp, "dm": _dm, "tm": _tm}


def test_every_registered_method_has_its_compiled_step_checked_here():
    assert set(METHODS) == set(methods.NAMES), "add the new method's step to METHODS"


@pytest.mark.parametrize("method,param", [(m, "pixels") for m in METHODS]
                         + [("esp", p) for p in PARAMETERISATIONS if p != "pixels"])
def test_compiled_condensation_step_has_no_host_callback_and_traces_once(method, param):
    step, _, call, concrete = METHODS[method](jit=False, param=param)
    for n in range(3):                      # new seeds and new variable values, same shapes
        call(n)
    assert step.trace_count == 1
    ops = _all_op_types(concrete())
    assert ops and not ops & HOST_CALLBACK_OPS, ops & HOST_CALLBACK_OPS
    assert step.trace_count == 1            # asking for the concrete function did not retrace


# tiny settings per method (others run with their Config defaults); pixel lrs that move the set
_TINY = {"esp": dict(inner_steps=1, real_per_class=3, beta=1e-2), "dm": dict(real_per_class=3),
         "tm": dict(inner_steps=2)}
_PIXELS_LR = {"esp": 0.1, "dm": 1.0, "tm": 10.0}


def _method(name, jit):
    """Registered method `name` on a tiny set, built as the condensation loop builds it (Context
    with jit_compile), so that --jit_compile is tested for every method without naming its step."""
    cls = methods.get(name)
    config = cls.Config(**_TINY.get(name, {}))
    net, syn = _net(), _synthetic()
    opts = {"pixels": cls.pixel_optimizer(_PIXELS_LR.get(name, cls.default_lr_pixels)),
            **cls.extra_optimizers(config)}
    trajs = None
    if cls.needs_trajectories:
        trajs = np.stack([np.stack([net.init([k, e]).numpy() for e in range(3)]) for k in range(2)])
    context = Context(net=net, synthetic=syn, optimizers=opts, sampler=_sampler(), trajectories=trajs,
                      segment_length=1, max_start_epoch=2, seed=0, jit_compile=jit)
    return cls(context, config), syn


@pytest.mark.parametrize("method", methods.NAMES)
def test_jit_compile_gives_the_same_update_for_every_registered_method(method):
    (plain, plain_syn), (xla, xla_syn) = _method(method, jit=False), _method(method, jit=True)
    start = plain_syn.images.numpy()
    plain_metrics, _ = plain.iteration(0, lambda: None)
    xla_metrics, _ = xla.iteration(0, lambda: None)
    np.testing.assert_allclose(float(xla_metrics[-1]["loss"]), float(plain_metrics[-1]["loss"]), rtol=1e-4)
    moved = plain_syn.images.numpy() - start
    assert np.abs(moved).max() > 1e-4                       # the update moved the set
    np.testing.assert_allclose(xla_syn.images.numpy() - start, moved, rtol=1e-2, atol=1e-3 * np.abs(moved).max())


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
