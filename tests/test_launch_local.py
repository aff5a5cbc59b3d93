"""Local launchers for real: launchers/torchrun.sh with 2 CPU ranks is sent SIGUSR1 mid-training,
exits 99 after a checkpoint (manifest: preempted), and `--resume` finishes with exactly the losses of
an uninterrupted run made with launchers/deepspeed.sh."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

# The cluster and the preemption reference are session fixtures: registered once as a plugin (not
# imported per module, which would start one per module).
from compt_scale.chain.manifest import Manifest
from conftest import REPO, last_step, read_metrics, train_losses
from slurm_cluster import PREEMPT_STEPS

# heavy: test_multinode proves the same wrapper's USR1 -> exit 99 -> resumed losses across two nodes
pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.heavy]


def test_torchrun_launcher_usr1_checkpoints_exits_99_and_resumes_to_same_losses(tmp_path, preempt_reference):
    ref = preempt_reference
    out = tmp_path / "out"
    cmd = ["bash", str(REPO / "launchers" / "torchrun.sh"), str(ref.spec), "--stage", "a", "--out", str(out)]
    env = dict(os.environ, NPROC="2")
    log = open(tmp_path / "run1.log", "w")
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while last_step(out / "a") < 10 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)   # the script exec's the launcher: this is the launcher's pid
    rc = p.wait(timeout=300)
    log.close()
    stopped_at = last_step(out / "a")
    assert rc == 99, (tmp_path / "run1.log").read_text()[-4000:]
    assert 10 <= stopped_at < PREEMPT_STEPS, f"must stop mid-run, stopped at {stopped_at}"
    assert Manifest(out).stage("a")["status"] == "preempted"
    assert (out / "a" / "checkpoints").is_dir() and not (out / "a" / "model").exists()

    r = subprocess.run(cmd + ["--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert train_losses(out / "a") == ref.losses
    assert read_metrics(out / "a")[-1]["val_loss"] == ref.final_val
    assert Manifest(out).stage("a")["status"] == "done"
