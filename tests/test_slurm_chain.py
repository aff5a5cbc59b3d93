"""Chains on a real one-node SLURM cluster (slurm-wlm + munge, started by the fixture; CPUs=2):
a 2-stage chain submitted with `compt-scale slurm --submit`, preemption (USR1 -> checkpoint ->
requeue -> same losses), a failing first stage and a killed stage, both recorded in the manifest."""
from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import last_step, read_metrics, run_cli, train_losses, write_spec

# The cluster and the preemption reference are session fixtures: registered once as a plugin (not
# imported per module, which would start one per module).
pytest_plugins = ["slurm_cluster"]

from compt_scale.chain.manifest import Manifest

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TWO_STAGES = [{"name": "s1", "model": "llama-xs", "tokens": 10 * 4 * 32},
              {"name": "s2", "model": "llama-s", "tokens": 10 * 4 * 32}]


def slurm_cli(cluster, *args, check=True):
    return run_cli("slurm", *args, env={"SLURM_CONF": cluster.env["SLURM_CONF"]}, check=check)


def job_ids(out: Path) -> dict:
    return {k: v.get("job_id") for k, v in Manifest(out).read()["stages"].items()}


def when(t: str) -> datetime:
    return datetime.fromisoformat(t)


def log_of(out: Path, stage: str, job: str) -> str:
    p = out / "slurm" / f"{stage}-{job}.out"
    return p.read_text() if p.exists() else f"(no log {p})"


def test_two_stage_chain_runs_as_dependent_jobs(tmp_path, tiny_data, slurm_cluster):
    spec = write_spec(tmp_path / "c.yaml", TWO_STAGES, data_dir=tiny_data)
    out = tmp_path / "out"
    r = slurm_cli(slurm_cluster, spec, "--out", out, "--submit")
    jobs = job_ids(out)
    assert f"s1: submitted job {jobs['s1']}" in r.stdout
    assert f"s2: submitted job {jobs['s2']} (after job {jobs['s1']})" in r.stdout
    assert slurm_cluster.job(jobs["s2"])["Dependency"].startswith(f"afterok:{jobs['s1']}")
    states = slurm_cluster.wait(jobs.values(), timeout=400)
    for name, job in jobs.items():
        assert states[job]["JobState"] == "COMPLETED", (states[job], log_of(out, name, job))
    # The second job started only after the first had finished.
    assert when(states[jobs["s2"]]["StartTime"]) >= when(states[jobs["s1"]]["EndTime"])
    m = Manifest(out).read()["stages"]
    for name in ("s1", "s2"):
        assert m[name]["status"] == "done" and m[name]["job_id"] == jobs[name]
        assert (out / name / "model" / "config.json").is_file()
        assert read_metrics(out / name)[-1]["final"]
    assert m["s2"]["teacher"] == "s1"
    # Re-running skips what is done: nothing new is submitted.
    r = slurm_cli(slurm_cluster, spec, "--out", out, "--submit")
    assert "s1: done, skipped" in r.stdout and "s2: done, skipped" in r.stdout
    assert job_ids(out) == jobs


@pytest.mark.heavy
def test_preempted_job_checkpoints_requeues_and_matches_uninterrupted_losses(tmp_path, slurm_cluster,
                                                                             preempt_reference):
    ref = preempt_reference
    out = tmp_path / "out"
    slurm_cli(slurm_cluster, ref.spec, "--out", out, "--nproc-per-node", "2", "--cpus-per-task", "2",
              "--warn-seconds", "60", "--submit")
    job = job_ids(out)["a"]
    deadline = time.time() + 300
    while last_step(out / "a") < 10 and time.time() < deadline:
        assert slurm_cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), log_of(out, "a", job)
        time.sleep(0.1)
    # What SLURM does --warn-seconds before the time limit (--signal=B:USR1@...), sent right now.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    state = slurm_cluster.wait([job], timeout=400)[job]
    log = log_of(out, "a", job)
    assert state["JobState"] == "COMPLETED", (state, log)
    assert state["Restarts"] == "1", (state, log)                   # it requeued itself once
    assert "requeueing job" in log and "try 1]" in log              # same log, appended
    resumed_from = [ln for ln in log.splitlines() if "stage processes exited 99" in ln]
    assert resumed_from, log
    assert train_losses(out / "a") == ref.losses
    assert read_metrics(out / "a")[-1]["val_loss"] == ref.final_val
    rec = Manifest(out).stage("a")
    assert rec["status"] == "done" and rec["job_id"] == job


def test_failing_first_stage_stops_the_chain_and_says_why(tmp_path, tiny_data, slurm_cluster):
    # A DeepSpeed config that contradicts the spec: valid when submitted, fails inside the job.
    bad = tmp_path / "bad_ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    stages = [dict(TWO_STAGES[0], train={"ds_config": str(bad)}), TWO_STAGES[1]]
    spec = write_spec(tmp_path / "f.yaml", stages, data_dir=tiny_data)
    out = tmp_path / "out"
    slurm_cli(slurm_cluster, spec, "--out", out, "--submit")
    jobs = job_ids(out)
    states = slurm_cluster.wait(jobs.values(), timeout=300)
    assert states[jobs["s1"]]["JobState"] == "FAILED", log_of(out, "s1", jobs["s1"])
    assert states[jobs["s2"]]["JobState"] == "PENDING"
    assert states[jobs["s2"]]["Reason"] == "DependencyNeverSatisfied"     # it never started
    assert not (out / "s2").exists()
    m = Manifest(out).read()["stages"]
    assert m["s1"]["status"] == "failed" and m["s1"]["job_id"] == jobs["s1"]
    assert "train_micro_batch_size_per_gpu" in m["s1"]["error"] and "contradicts" in m["s1"]["error"]
    assert m["s2"]["status"] == "submitted"
    status = slurm_cli(slurm_cluster, spec, "--out", out, "--status").stdout
    line = {ln.split()[0]: ln for ln in status.splitlines()}
    assert "failed" in line["s1"] and "contradicts" in line["s1"]
    assert "never started" in line["s2"] and "stage s1" in line["s2"]
    slurm_cluster.run("scancel", jobs["s2"])


def _pids_of(out: Path) -> list[int]:
    """The stage worker processes of this test (their command line names its own --out dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"stage" in argv and str(out).encode() in argv and b"compt_scale.launch.torchrun" not in argv:
                pids.append(int(d.name))
    return pids


def test_stage_killed_without_writing_is_recorded_by_the_job(tmp_path, tiny_data, slurm_cluster):
    spec = write_spec(tmp_path / "k.yaml", [dict(TWO_STAGES[0], tokens=2000 * 4 * 32)], data_dir=tiny_data)
    out = tmp_path / "out"
    slurm_cli(slurm_cluster, spec, "--out", out, "--submit")
    job = job_ids(out)["s1"]
    deadline = time.time() + 300
    while last_step(out / "s1") < 3 and time.time() < deadline:
        time.sleep(0.1)
    pids = _pids_of(out)
    assert pids, log_of(out, "s1", job)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)     # like the OOM killer: no chance to write anything
    state = slurm_cluster.wait([job], timeout=120)[job]
    assert state["JobState"] == "FAILED", (state, log_of(out, "s1", job))
    rec = Manifest(out).stage("s1")
    assert rec["status"] == "failed" and rec["job_id"] == job
    assert "without recording an error" in rec["error"] and f"s1-{job}.out" in rec["error"]
