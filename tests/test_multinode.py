"""One stage on two SLURM nodes: two slurmd on this host (c1, c2; tests/slurm_cluster.py), the
project's own stage.sbatch submitted with `compt-scale slurm --nodes 2`, one CPU rank per node, two
torchrun agents meeting at the c10d rendezvous on c1's address.

One chain fixture (s1 on one node, then s2 on two, ZeRO-3) is shared: its s1 export is what the
other tests grow from. Oracles: a 1-node 2-rank run of the same s2 (`compt-scale stage` under
torchrun, no SLURM) for the losses; SLURM's own job records; the checkpoint files on disk.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from compt_scale.chain.manifest import Manifest
from compt_scale.chain.runner import stage_command
from conftest import REPO, last_step, read_metrics, run_cli, train_losses, write_spec

pytest_plugins = ["slurm_cluster"]
# Whole stages on a 2-core box shared with other work: more than the suite's 600 s per test.
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.dist, pytest.mark.heavy, pytest.mark.timeout(1800)]

S2_STEPS = 40          # long enough to be signalled / killed mid-run on a busy 2-core box
S2 = {"name": "s2", "model": "llama-s", "tokens": S2_STEPS * 4 * 2 * 32}   # global batch: 4 x 2 ranks
STAGES = [{"name": "s1", "model": "llama-xs", "tokens": 6 * 4 * 32, "train": {"zero_stage": 2}},
          dict(S2, train={"zero_stage": 3})]
TRAIN = {"save_every": 1000, "eval_every": 1000}
RDZV_TIMEOUT = 15      # COMPT_RDZV_TIMEOUT for the wrong-rendezvous jobs


def slurm_cli(cluster, *args, check=True):
    return run_cli("slurm", *args, env={"SLURM_CONF": cluster.env["SLURM_CONF"]}, check=check)


def log_of(out: Path, stage: str, job: str) -> str:
    p = out / "slurm" / f"{stage}-{job}.out"
    return p.read_text(errors="replace") if p.exists() else f"(no log {p})"


def seconds(state: dict) -> float:
    return (datetime.fromisoformat(state["EndTime"]) - datetime.fromisoformat(state["StartTime"])).total_seconds()


def copy_first_stage(chain, dst: Path) -> Path:
    """A chain dir holding only the fixture's finished s1 (export + manifest record)."""
    shutil.copytree(chain.out / "s1", dst / "s1")
    Manifest(dst).update_stage("s1", **{k: v for k, v in Manifest(chain.out).stage("s1").items() if k != "history"})
    return dst


def wait_until(cond, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_data, slurm_two_nodes):
    """s1 (1 node) then s2 (2 nodes, ZeRO-3) submitted as one chain; returns once s1 is done, with
    s2's job queued behind it, and the 1-node 2-rank reference losses of the same s2."""
    d = tmp_path_factory.mktemp("multinode")
    spec = write_spec(d / "chain.yaml", STAGES, data_dir=tiny_data, train=TRAIN)
    out = d / "out"
    r = slurm_cli(slurm_two_nodes, spec, "--out", out, "--nodes", "2", "--nodes-per-stage", "s1=1",
                  "--warn-seconds", "60", "--submit")
    jobs = {k: v["job_id"] for k, v in Manifest(out).read()["stages"].items()}
    assert f"s2: submitted job {jobs['s2']} (after job {jobs['s1']})" in r.stdout, r.stdout
    # Held until the chain test releases it, so that it runs (and is signalled) alone, not beside
    # the reference run below.
    slurm_two_nodes.run("scontrol", "hold", jobs["s2"])
    s1 = slurm_two_nodes.wait([jobs["s1"]], timeout=300)[jobs["s1"]]
    assert s1["JobState"] == "COMPLETED", (s1, log_of(out, "s1", jobs["s1"]))
    # The reference: the same s2 on one node, 2 ranks, no SLURM, from a copy of s1's export.
    ref = copy_first_stage(SimpleNamespace(out=out), d / "ref")
    p = subprocess.run(stage_command(spec, "s2", ref, 2, False), cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    ref_losses = train_losses(ref / "s2")
    assert sorted(ref_losses) == list(range(1, S2_STEPS + 1))
    return SimpleNamespace(spec=spec, out=out, jobs=jobs, ref=ref, ref_losses=ref_losses, dir=d)


def test_chain_second_stage_on_two_nodes_preempted_and_requeued(chain, slurm_two_nodes):
    """s2 across c1+c2: the USR1 warning reaches both nodes, both ranks checkpoint, the job exits 99,
    requeues itself and resumes; its losses equal the uninterrupted 1-node 2-rank run's, it grew from
    s1's export, and the manifest's stage records were written by global rank 0 (on c1) only."""
    cluster, out, job = slurm_two_nodes, chain.out, chain.jobs["s2"]
    cluster.run("scontrol", "release", job)
    wait_until(lambda: last_step(out / "s2") >= 5 or cluster.job(job).get("JobState") not in ("PENDING", "RUNNING"),
               "s2 step 5")
    assert cluster.job(job)["NodeList"] == "c[1-2]", cluster.job(job)
    cluster.run("scancel", "--signal=USR1", "--batch", job)   # what SLURM does --warn-seconds before the end
    state = cluster.wait([job], timeout=400)[job]
    log = log_of(out, "s2", job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, log)
    assert "stage s2: 2 node(s) [c1 c2] x 1 process(es)" in log, log
    for node in ("c1", "c2"):                                   # the warning reached both launchers
        assert f"USR1 on {node}: asking workers to checkpoint" in log, log
    assert "per node: c1=99 c2=99" in log and "requeueing job" in log and "try 1]" in log, log
    # Both ranks (one per node) wrote their shard of the checkpoint taken on the signal.
    ckpts = sorted((out / "s2" / "checkpoints").glob("global_step*"), key=lambda p: int(p.name[11:]))
    first = ckpts[0]
    assert 5 <= int(first.name[11:]) < S2_STEPS, [p.name for p in ckpts]
    shards = sorted(p.name for p in first.glob("zero_pp_rank_*_optim_states.pt"))
    assert [s.split("_mp_")[0] for s in shards] == ["zero_pp_rank_0", "zero_pp_rank_1"], shards
    # Same losses as the uninterrupted 1-node run: same weights from s1, same samples, same steps.
    assert train_losses(out / "s2") == chain.ref_losses
    assert read_metrics(out / "s2")[-1]["val_loss"] == read_metrics(chain.ref / "s2")[-1]["val_loss"]
    # s1's export loaded on both nodes (the losses above depend on it); s2's own export loads.
    rec = Manifest(out).stage("s2")
    assert rec["status"] == "done" and rec["teacher"] == "s1" and rec["world_size"] == 2, rec
    cfg = json.loads((out / "s2" / "model" / "config.json").read_text())
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "s2" / "model").config.hidden_size == cfg["hidden_size"]
    # Every status the stage itself set came from global rank 0, once per attempt. Which node holds
    # rank 0 is torchrun's choice (order of joining the rendezvous, not SLURM_NODEID; seen on c2).
    by_ranks = [(h["status"], h["rank"]) for h in rec["history"] if h["rank"] is not None]
    assert by_ranks == [("running", 0), ("preempted", 0), ("running", 0), ("done", 0)], rec["history"]
    assert {h["node"] for h in rec["history"] if h["rank"] is not None} <= {"c1", "c2"}, rec["history"]
    assert [h["node"] for h in rec["history"] if h["rank"] is None][1:] == ["c1"] * 3, rec["history"]  # the job script


def _kill_node(job: str, node: str) -> list[int]:
    """SIGKILL every process of `job` on `node` (its torchrun agent and worker): what a node that
    dies leaves behind. Found by the environment SLURM gave them."""
    killed = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job.encode() and env.get(b"SLURMD_NODENAME") == node.encode() \
                and b"compt_scale" in cmd and env.get(b"SLURM_STEP_ID", b"batch") != b"batch":
            os.kill(int(d.name), signal.SIGKILL)
            killed.append(int(d.name))
    return killed


def test_node_lost_mid_stage_is_named_and_resumed_on_the_node_left(chain, slurm_two_nodes, tmp_path, tiny_data):
    """ZeRO-3 s2 on c1+c2 (as the reference: a grown model's new weights are initialised differently
    under ZeRO-3's partitioned construction, so a ZeRO-2 run is not an oracle for it); c2's agent and worker are killed after a checkpoint: the job fails with one
    line naming c2; resubmitted with --nodes-per-stage s2=1 (c2 drained), it resumes on c1 alone from
    the 2-rank checkpoint (world-size resume, global batch kept)."""
    cluster = slurm_two_nodes
    spec = write_spec(tmp_path / "lost.yaml", [STAGES[0], dict(S2, train={"zero_stage": 3, "save_every": 4})],
                      data_dir=tiny_data, train=TRAIN)
    out = copy_first_stage(chain, tmp_path / "out")
    r = slurm_cli(cluster, spec, "--out", out, "--nodes", "2", "--submit")
    assert "s1: done, skipped" in r.stdout, r.stdout
    job = Manifest(out).stage("s2")["job_id"]
    ckpt = out / "s2" / "checkpoints"
    wait_until(lambda: (ckpt / "latest").exists() and last_step(out / "s2") >= 6
               or cluster.job(job).get("JobState") not in ("PENDING", "RUNNING"), "s2 checkpoint")
    assert cluster.job(job)["JobState"] == "RUNNING", (cluster.job(job), log_of(out, "s2", job))
    assert _kill_node(job, "c2"), log_of(out, "s2", job)
    state = cluster.wait([job], timeout=300)[job]
    log = log_of(out, "s2", job)
    assert state["JobState"] == "FAILED", (state, log)
    rec = Manifest(out).stage("s2")
    assert rec["status"] == "failed" and "\n" not in rec["error"], rec
    assert f"job {job}: lost node c2 (node 1 of 2)" in rec["error"] and "--nodes-per-stage s2=" in rec["error"], rec
    assert "per node: c1=1 c2=none" in log, log
    saved = int((ckpt / "latest").read_text().removeprefix("global_step"))

    cluster.run("scontrol", "update", "NodeName=c2", "State=DRAIN", "Reason=lost")
    try:
        r = slurm_cli(cluster, spec, "--out", out, "--nodes", "2", "--nodes-per-stage", "s2=1", "--submit")
        job2 = Manifest(out).stage("s2")["job_id"]
        state = cluster.wait([job2], timeout=400)[job2]
    finally:
        cluster.run("scontrol", "update", "NodeName=c2", "State=RESUME")
    log2 = log_of(out, "s2", job2)
    assert state["JobState"] == "COMPLETED" and state["NodeList"] == "c1", (state, log2)
    assert "written on 2 ranks" in log2 and "grad_accum 2" in log2, log2
    losses = train_losses(out / "s2")
    assert sorted(losses) == list(range(1, S2_STEPS + 1))
    # 2 ranks, then 1 rank after the resume: only the summation order differs from the reference.
    for step, (loss, lr) in chain.ref_losses.items():
        assert losses[step][0] == pytest.approx(loss, rel=2e-4), (step, saved)
        assert losses[step][1] == pytest.approx(lr, rel=1e-9)
    assert Manifest(out).stage("s2")["status"] == "done" and Manifest(out).stage("s2")["world_size"] == 1


def test_wrong_rendezvous_is_one_line_exit_2_within_the_timeout(chain, slurm_two_nodes, tmp_path):
    """Port taken on the first node / first node unreachable: each node's launcher gives up within
    COMPT_RDZV_TIMEOUT with one line, the job exits 2, the stage is recorded failed (not running)."""
    cluster = slurm_two_nodes
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()                        # a process that holds the port and never speaks c10d
    port = taken.getsockname()[1]
    cases = {"port": [f"COMPT_RDZV_PORT={port}"],
             "unreachable": ["COMPT_RDZV_ADDR=198.51.100.1"]}   # TEST-NET-2: no host answers
    outs, jobs = {}, {}
    try:
        for case, env in cases.items():
            outs[case] = copy_first_stage(chain, tmp_path / case)
            extra = [f"--env={e}" for e in env + [f"COMPT_RDZV_TIMEOUT={RDZV_TIMEOUT}"]]
            slurm_cli(cluster, chain.spec, "--out", outs[case], "--nodes", "2", *extra, "--submit")
            jobs[case] = Manifest(outs[case]).stage("s2")["job_id"]
        states = cluster.wait(list(jobs.values()), timeout=300)
    finally:
        taken.close()
    for case, job in jobs.items():
        state, log, out = states[job], log_of(outs[case], "s2", job), outs[case]
        assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", (case, state, log)
        # Each launcher gives up within the timeout (its own measure, from the start of the
        # rendezvous); the job with the launchers' start-up on a busy machine, far below torch's 600 s.
        errors = [ln for ln in log.splitlines() if ln.startswith("compt-scale: error: node c")]
        assert {e.split()[3] for e in errors} == {"c1", "c2"} and "Traceback" not in log, (case, log)
        for e in errors:
            assert int(re.search(r"gave up after (\d+) s", e).group(1)) <= RDZV_TIMEOUT + 15, e   # torch's own: 60
        assert seconds(state) <= 300, (case, state, log)
        rec = Manifest(out).stage("s2")
        assert rec["status"] == "failed" and "\n" not in rec["error"], (case, rec)
        assert "could not complete the rendezvous" in rec["error"] and "COMPT_RDZV_PORT" in rec["error"], rec
        assert not (out / "s2").exists()
        status = slurm_cli(cluster, chain.spec, "--out", out, "--status").stdout
        assert "running" not in status, status
    assert f":{port}" in Manifest(outs["port"]).stage("s2")["error"]
    assert "198.51.100.1:" in Manifest(outs["unreachable"]).stage("s2")["error"]
