"""SLURM's own requeue (`scontrol requeue`: SIGTERM, then SIGKILL after KillWait) of a running stage
job on the real one-node cluster: the stage checkpoints and exits 99 (recorded `preempted`, not
`failed`), the job runs again and ends with the uninterrupted losses, and `slurm --submit` meanwhile
keeps that job instead of starting a second one."""
from __future__ import annotations

import time

import pytest

from compt_scale.chain.manifest import Manifest
from conftest import last_step, read_metrics, reference_losses, run_cli, train_losses, write_spec

pytest_plugins = ["slurm_cluster"]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 120


def slurm_cli(cluster, *args, check=True):
    return run_cli("slurm", *args, env={"SLURM_CONF": cluster.env["SLURM_CONF"]}, check=check)


@pytest.mark.heavy
def test_slurm_requeue_sigterm_checkpoints_and_is_not_submitted_twice(tmp_path, tiny_data, slurm_cluster):
    spec = write_spec(tmp_path / "q.yaml", [{"name": "a", "model": "llama-xs", "tokens": STEPS * 4 * 32}],
                      data_dir=tiny_data, train={"save_every": 1000, "eval_every": 1000})
    ref = reference_losses(spec, tmp_path / "ref", STEPS)

    out = tmp_path / "out"
    slurm_cli(slurm_cluster, spec, "--out", out, "--submit")
    job = Manifest(out).stage("a")["job_id"]
    log = lambda: (out / "slurm" / f"a-{job}.out").read_text(errors="replace") if (out / "slurm" / f"a-{job}.out").exists() else ""
    deadline = time.time() + 300
    while last_step(out / "a") < 5:
        assert time.time() < deadline and slurm_cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), log()
        time.sleep(0.1)
    slurm_cluster.run("scontrol", "requeue", job)

    # The stage checkpoints and records the interruption as a preemption (not a failure; SLURM itself
    # ends the batch script of the attempt)...
    deadline = time.time() + 120
    while "[a] preempted (" not in log():
        assert time.time() < deadline, (Manifest(out).stage("a"), log())
        time.sleep(0.2)
    assert Manifest(out).stage("a")["status"] in ("preempted", "submitted", "running"), (Manifest(out).stage("a"), log())
    # ... and a re-submit while SLURM has the job queued again keeps it.
    r = slurm_cli(slurm_cluster, spec, "--out", out, "--submit")
    assert f"a: job {job} already" in r.stdout and "submitted job" not in r.stdout, r.stdout
    assert Manifest(out).stage("a")["job_id"] == job
    queue = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    assert queue == [job], queue

    state = slurm_cluster.wait([job], timeout=400)[job]
    assert state["JobState"] == "COMPLETED", (state, log())
    assert state["Restarts"] == "1", (state, log())
    assert train_losses(out / "a") == ref
    # It went on from the checkpoint written on SIGTERM (save_every is larger than the run).
    kept = sorted(int(p.name.removeprefix("global_step")) for p in (out / "a" / "checkpoints").glob("global_step*"))
    assert kept[-1] == STEPS and 5 <= kept[0] < STEPS, kept
    assert read_metrics(out / "a")[-1]["val_loss"] == read_metrics(tmp_path / "ref" / "a")[-1]["val_loss"]
    assert Manifest(out).stage("a")["status"] == "done"
