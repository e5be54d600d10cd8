"""File access for local paths and filesystem URLs alike (gs://, s3://, hdfs://, ram://).

A path with a scheme (`<scheme>://...`) goes through `tf.io.gfile`, so the expert store, the
checkpoints and the file exports can live on a bucket. A local path goes through `os` and the
builtin `open`: no TensorFlow import (the command lines print --help before importing it), and
`fsync` before a rename (gfile has no fsync).

Renames: a local rename within one folder is atomic. Object stores have no rename: tf.io.gfile
copies the object to the new name, then deletes the old one (GCS, S3). The copy appears under
the new name whole or not at all (object stores create objects atomically), so a reader never
sees a truncated file there either; a writer killed between the copy and the delete leaves its
hidden `.<name>.<pid>.<hex>.tmp` object behind, which no reader picks up (delete such leftovers
at leisure). A directory rename on an object store copies object by object and is NOT atomic:
see `saved_models` and `export` for what that means for the directory exports.
"""
from __future__ import annotations

import builtins
import glob as _glob
import os


def is_url(path) -> bool:
    """True for `<scheme>://...` paths, which go through tf.io.gfile."""
    return "://" in os.fspath(path)


def _gfile():
    import tensorflow as tf
    return tf.io.gfile


def absolute(path: str) -> str:
    """`path` made absolute when local; URLs are absolute already."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def exists(path) -> bool:
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def makedirs(path) -> None:
    """Creates `path` and its parents; an existing directory is fine."""
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path) -> list:
    """Entry names (not paths) in directory `path`."""
    return [n.rstrip("/") for n in _gfile().listdir(path)] if is_url(path) else os.listdir(path)


def glob(pattern) -> list:
    return _gfile().glob(pattern) if is_url(pattern) else _glob.glob(pattern)


def rename(src, dst) -> None:
    """Moves file `src` to `dst` (on an object store a copy and a delete)."""
    if is_url(src):
        _gfile().rename(src, dst, overwrite=False)
    else:
        os.rename(src, dst)


def remove(path) -> None:
    if is_url(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def open(path, mode: str = "r"):        # noqa: A001 (the builtin's name on purpose)
    """A file object for `path`: builtin open locally, tf.io.gfile.GFile for URLs. Binary modes
    give bytes either way; append mode on an object store rewrites the whole object."""
    return _gfile().GFile(path, mode) if is_url(path) else builtins.open(path, mode)


def replace(src, dst) -> None:
    """Renames `src` to `dst`, replacing `dst`: atomic locally, copy + delete on object stores
    (see the module docstring)."""
    if is_url(src) or is_url(dst):
        _gfile().rename(src, dst, overwrite=True)
    else:
        os.replace(src, dst)


def fsync(path) -> None:
    """Flushes a local file's data to disk (object stores persist an object when it is closed)."""
    if not is_url(path):
        with builtins.open(path, "rb+") as f:
            os.fsync(f.fileno())


def rmtree(path) -> None:
    """Deletes directory `path` and everything in it."""
    if is_url(path):
        _gfile().rmtree(path)
    else:
        import shutil
        shutil.rmtree(path)


def move_tree(src, dst) -> None:
    """Moves directory `src` to `dst` (which must not exist). Locally one atomic rename. On a
    URL every file is copied, then `src` is deleted: object stores rename a directory object by
    object anyway (not atomic: a reader meanwhile may see part of `dst`), and some gfile
    filesystems (ram://) rename only the directory entry, not its files."""
    if not (is_url(src) or is_url(dst)):
        os.rename(src, dst)
        return
    gfile = _gfile()
    src, dst = src.rstrip("/"), dst.rstrip("/")
    for folder, _, files in gfile.walk(src):
        target = dst + folder[len(src):]
        gfile.makedirs(target)
        for name in files:
            gfile.copy(f"{folder}/{name}", f"{target}/{name}", overwrite=True)
    gfile.rmtree(src)
