"""Who this process is in a cluster, by TensorFlow's own convention (`TF_CONFIG`), and the
tf.distribute strategy condensation runs under.

TF_CONFIG is the JSON that TF launchers set (Kubernetes TFJob, Vertex AI custom jobs, SLURM
scripts), e.g. for the second of two workers:

    {"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 1}}

Expert generation counts the tasks of type "chief" and "worker" (chief first, as
MultiWorkerMirroredStrategy numbers them): worker i of n trains experts k with k % n == i
(`experts.shard`). Explicit --worker_index/--num_workers override TF_CONFIG. No TensorFlow
import at module level: the command line reads this before importing TensorFlow.
"""
from __future__ import annotations

import dataclasses
import json
import os

from esp_tf import workdir as wd

STRATEGIES = ("none", "mirrored", "multi_worker")


@dataclasses.dataclass(frozen=True)
class Worker:
    index: int = 0        # 0..count-1
    count: int = 1
    source: str = "default"   # "flags", "TF_CONFIG" or "default" (a single worker)


def worker(worker_index: int | None = None, num_workers: int | None = None,
           environ=os.environ) -> Worker:
    """This process's place among the expert-generation workers: from the explicit arguments
    (both or neither), else from TF_CONFIG, else the only worker. Raises UserError on a bad or
    incomplete description."""
    if (worker_index is None) != (num_workers is None):
        raise wd.UserError("--worker_index and --num_workers go together: give both, or neither "
                           "(then TF_CONFIG, if set, says which worker this is)")
    if num_workers is not None:
        if num_workers < 1 or not 0 <= worker_index < num_workers:
            raise wd.UserError(f"--worker_index={worker_index} --num_workers={num_workers}: need "
                               "num_workers >= 1 and 0 <= worker_index < num_workers")
        return Worker(worker_index, num_workers, "flags")
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        return Worker()
    shape = ('it needs {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
             '"index": i}} (an optional "chief": ["host:port"])')
    try:
        config = json.loads(text)
        cluster, task = config.get("cluster") or {}, config["task"]
        kind, index = task["type"], int(task["index"])
        chiefs, workers = cluster.get("chief", []), cluster.get("worker", [])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise wd.UserError(f"TF_CONFIG is not a valid cluster description ({type(e).__name__}: {e}); "
                           f"{shape}") from None
    for name, tasks in (("chief", chiefs), ("worker", workers)):
        # a string would be read as one task per character, and the run would wait for them forever
        if not isinstance(tasks, list) or not all(isinstance(t, str) and ":" in t for t in tasks):
            raise wd.UserError(f"TF_CONFIG cluster.{name} must be a list of \"host:port\" strings, got "
                               f"{json.dumps(tasks)[:200]}; {shape}")
    if kind not in ("chief", "worker"):
        raise wd.UserError(f"TF_CONFIG task type {kind!r} trains no experts: expert generation runs "
                           "on tasks of type chief and worker")
    tasks = chiefs if kind == "chief" else workers
    if not 0 <= index < len(tasks):
        raise wd.UserError(f"TF_CONFIG task {kind} {index} is not in its cluster ({len(tasks)} "
                           f"{kind} task(s) listed)")
    position = index if kind == "chief" else len(chiefs) + index
    return Worker(position, len(chiefs) + len(workers), "TF_CONFIG")


def make_strategy(name: str):
    """The tf.distribute strategy of --strategy: None for "none" (one device, no strategy),
    MirroredStrategy over every local GPU (or the local CPU devices when there is no GPU), or
    MultiWorkerMirroredStrategy across the TF_CONFIG cluster (create it before any other
    TensorFlow work: it configures the runtime's collectives)."""
    if name not in STRATEGIES:
        raise wd.UserError(f"--strategy={name}: choose from {', '.join(STRATEGIES)}")
    if name == "none":
        return None
    import tensorflow as tf
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if not os.environ.get("TF_CONFIG"):
        raise wd.UserError("--strategy=multi_worker needs TF_CONFIG describing the cluster (see "
                           "README, 'Scaling out')")
    return tf.distribute.MultiWorkerMirroredStrategy()
