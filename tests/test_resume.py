"""A condensation killed with SIGKILL resumes from its checkpoint and ends where an uninterrupted run ends."""
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import REPO

FLAGS = ["--num_experts=1", "--expert_epochs=2", "--max_start_epoch=1", "--segment_length=2",
         "--iterations=150", "--inner_steps=2", "--real_per_class=4", "--width=8", "--depth=2",
         "--phases=experts,condense", "--ckpt_every=10", "--log_every=10"]


def _cmd(work, tmp_path):
    return [sys.executable, "-m", "esp_tf.train", f"--workdir={work}", f"--data_dir={tmp_path / 'tfds'}",
            f"--experts_dir={tmp_path / 'experts'}", "--nodownload"] + FLAGS


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _latest_checkpoint_number(work):
    index = work / "ckpt" / "checkpoint"
    if not index.exists():
        return 0
    text = index.read_text()
    return int(text.split('"')[1].rsplit("-", 1)[1]) if '"' in text else 0


def test_sigkilled_condensation_resumes_and_matches_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "uninterrupted"
    subprocess.run(_cmd(ref, tmp_path), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)

    work = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(work, tmp_path), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _latest_checkpoint_number(work) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed; raise --iterations"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _latest_checkpoint_number(work)
    assert 10 <= killed_at < 150
    assert not (work / "synthetic.npz").exists()

    out = subprocess.run(_cmd(work, tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout
    a, b = np.load(ref / "synthetic.npz"), np.load(work / "synthetic.npz")
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["images"], b["images"])
