"""Condensation methods, by name.

A method is one module of this package (its config with the defaults, its optimizers, whether
it reads expert trajectories, and one `iteration`; see `base.Method`) plus one line in
`_REGISTRY`. The condensation loop (`esp_tf.condense`) and the command line only go through
this registry. Importing it is cheap (no TensorFlow): methods load on first `get`.
"""
from __future__ import annotations

import importlib

_REGISTRY = {
    "esp": "esp_tf.methods.esp:ESP",     # Expert Subspace Projection (the paper)
    "dm": "esp_tf.methods.dm:DM",        # distribution matching (Zhao & Bilen)
    "tm": "esp_tf.methods.tm:TM",        # trajectory matching (MTT, Cazenavette et al.)
}
NAMES = tuple(_REGISTRY)


def get(name: str):
    """The `base.Method` subclass registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown condensation method {name!r}; registered: {', '.join(NAMES)}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)
