"""Condensation methods, by name.

A method is one module of this package (its config with the defaults, its optimizers, whether
it reads expert trajectories, and one `iteration`; see `base.Method`) plus one line in
`_REGISTRY` (or a `register` call, for one defined outside the package). The condensation loop (`esp_tf.condense`) and the command line only go through
this registry. Importing it is cheap (no TensorFlow): methods load on first `get`.
"""
from __future__ import annotations

import importlib

_REGISTRY = {
    "esp": "esp_tf.methods.esp:ESP",     # Expert Subspace Projection (the paper)
    "dm": "esp_tf.methods.dm:DM",        # distribution matching (Zhao & Bilen)
    "tm": "esp_tf.methods.tm:TM",        # trajectory matching (MTT, Cazenavette et al.)
}
NAMES = tuple(_REGISTRY)            # the built-in methods; `names()` includes registered ones


def names() -> tuple:
    """Every registered method's name, the built-in ones first."""
    return tuple(_REGISTRY)


def register(name: str, method) -> None:
    """Registers a method (a `base.Method` subclass, or "module:Class" to import on first use)
    under `name`: the command line (--method), the condensation loop, the workdir identity and
    the shared test harnesses then take it like the built-in ones."""
    if not name.isidentifier():
        raise ValueError(f"a method name is a Python identifier, got {name!r}")
    _REGISTRY[name] = method


def get(name: str):
    """The `base.Method` subclass registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown condensation method {name!r}; registered: {', '.join(names())}")
    target = _REGISTRY[name]
    if not isinstance(target, str):
        return target
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)
