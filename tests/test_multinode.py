"""One stage on two SLURM nodes: two slurmd on this host (c1, c2; tests/slurm_cluster.py), the
project's own stage.sbatch submitted with `compt-scale slurm --nodes 2`, one CPU rank per node, two
torchrun agents meeting at the c10d rendezvous on c1's address.

Two module fixtures drive the jobs once; the tests read what they left. `chain`: s1 (1 node, ZeRO-2)
runs with s2 (2 nodes, ZeRO-3) held behind it; meanwhile the two wrong-rendezvous jobs fail (they
mostly wait, so they overlap s1 and the reference run). `second_stage`: s2 released, signalled,
requeued and resumed on both nodes, then one node killed, then resubmitted on the node left: one job
sequence, so the two-node start-up is paid twice (not four times) for the preemption and node-lost
cases. Oracles: a 1-node 2-rank run of the same s2 (`compt-scale stage` under torchrun, no SLURM)
for the losses; SLURM's own job records; the checkpoint files on disk.
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
from conftest import REPO, cli_in_process, last_step, train_losses, write_spec

pytest_plugins = ["slurm_cluster"]
# Whole stages on a 2-core box shared with other work: more than the suite's 600 s per test.
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.dist, pytest.mark.timeout(1200)]

S2_STEPS = 30          # room to be signalled, resumed and killed mid-run on a busy 2-core box
STAGES = [{"name": "s1", "model": "llama-xs", "tokens": 4 * 4 * 32, "train": {"zero_stage": 2}},
          {"name": "s2", "model": "llama-s", "tokens": S2_STEPS * 4 * 2 * 32,   # global batch: 4 x 2 ranks
           "train": {"zero_stage": 3}}]
TRAIN = {"save_every": 1000, "eval_every": 1000}
RDZV_TIMEOUT = 10      # COMPT_RDZV_TIMEOUT for the wrong-rendezvous jobs


def slurm_cli(cluster, *args) -> str:
    """`compt-scale slurm ARGS` in this process with the cluster's SLURM_CONF (its stdout);
    tests/test_slurm_chain.py runs the console script itself."""
    return cli_in_process("slurm", *args, env={"SLURM_CONF": cluster.env["SLURM_CONF"]}).stdout


def log_of(out: Path, stage: str, job: str) -> str:
    p = out / "slurm" / f"{stage}-{job}.out"
    return p.read_text(errors="replace") if p.exists() else f"(no log {p})"


def seconds(state: dict) -> float:
    return (datetime.fromisoformat(state["EndTime"]) - datetime.fromisoformat(state["StartTime"])).total_seconds()


def wait_until(cond, what: str, timeout: float = 300, give_up=lambda: False):
    """Poll `cond` (cheap: files) often, `give_up` (scontrol) every 2 s: on a 2-core box a
    scontrol process every poll would slow the very stage being watched."""
    deadline, next_check = time.time() + timeout, time.time() + 2
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        if time.time() > next_check:
            if give_up():
                return
            next_check = time.time() + 2
        time.sleep(0.2)


def submit_wrong_rendezvous(cluster, d: Path, data_dir: Path, taken: socket.socket) -> tuple[dict, Path]:
    """One 2-node job per case, of a one-stage chain (the stage never starts, so it needs no s1):
    {case: (out, job)} and the spec."""
    cases = {"port": f"COMPT_RDZV_PORT={taken.getsockname()[1]}",
             "unreachable": "COMPT_RDZV_ADDR=198.51.100.1"}   # TEST-NET-2: no host answers
    spec = write_spec(d / "rdzv.yaml", [{"name": "r", "model": "llama-xs", "tokens": 4 * 4 * 32}],
                      data_dir=data_dir, train=TRAIN)
    jobs = {}
    for case, env in cases.items():
        out = d / case
        slurm_cli(cluster, spec, "--out", out, "--nodes", "2", f"--env={env}",
                  f"--env=COMPT_RDZV_TIMEOUT={RDZV_TIMEOUT}", "--submit")
        jobs[case] = (out, Manifest(out).stage("r")["job_id"])
    return jobs, spec


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_data, slurm_two_nodes):
    """s1 (1 node) then s2 (2 nodes, ZeRO-3) submitted as one chain, s2 held behind s1; the 1-node
    2-rank reference losses of the same s2; and the two wrong-rendezvous jobs, run to their end
    meanwhile (they mostly wait, beside s1 and the reference run)."""
    cluster = slurm_two_nodes
    d = tmp_path_factory.mktemp("multinode")
    spec = write_spec(d / "chain.yaml", STAGES, data_dir=tiny_data, train=TRAIN)
    out = d / "out"
    r = slurm_cli(cluster, spec, "--out", out, "--nodes", "2", "--nodes-per-stage", "s1=1",
                  "--warn-seconds", "60", "--submit")
    jobs = {k: v["job_id"] for k, v in Manifest(out).read()["stages"].items()}
    assert f"s2: submitted job {jobs['s2']} (after job {jobs['s1']})" in r, r
    # Held until `second_stage` releases it, so that it runs (and is signalled) alone.
    cluster.run("scontrol", "hold", jobs["s2"])
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()                    # a process that holds the port and never speaks c10d
        rdzv, rdzv_spec = submit_wrong_rendezvous(cluster, d, tiny_data, taken)
        s1 = cluster.wait([jobs["s1"]], timeout=300)[jobs["s1"]]
        assert s1["JobState"] == "COMPLETED", (s1, log_of(out, "s1", jobs["s1"]))
        # The reference: the same s2 on one node, 2 ranks, no SLURM, from a copy of s1's export.
        ref = d / "ref"
        shutil.copytree(out / "s1", ref / "s1")
        Manifest(ref).update_stage("s1", **{k: v for k, v in Manifest(out).stage("s1").items() if k != "history"})
        p = subprocess.run(stage_command(spec, "s2", ref, 2, False), cwd=REPO, capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 0, p.stderr[-3000:]
        # Done by now on a working launcher (start-up + COMPT_RDZV_TIMEOUT + 10 s each, begun beside s1);
        # a hung one (no watchdog) shows here.
        rdzv_states = cluster.wait([job for _, job in rdzv.values()], timeout=180)
        port = taken.getsockname()[1]
    ref_losses = train_losses(ref / "s2")
    assert sorted(ref_losses) == list(range(1, S2_STEPS + 1))
    return SimpleNamespace(spec=spec, out=out, jobs=jobs, ref=ref, ref_losses=ref_losses,
                           rdzv=rdzv, rdzv_spec=rdzv_spec, rdzv_states=rdzv_states, taken_port=port)


def test_wrong_rendezvous_is_one_line_exit_2_within_the_timeout(chain, slurm_two_nodes):
    """Port taken on the first node / first node unreachable: each node's launcher gives up within
    COMPT_RDZV_TIMEOUT with one line, the job exits 2, the stage is recorded failed (not running)."""
    for case, (out, job) in chain.rdzv.items():
        state, log = chain.rdzv_states[job], log_of(out, "r", job)
        assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", (case, state, log)
        # Each launcher gives up within the timeout (its own measure, from the start of the
        # rendezvous); the job with the launchers' start-up on a busy machine, far below torch's 600 s.
        errors = [ln for ln in log.splitlines() if ln.startswith("compt-scale: error: node c")]
        assert {e.split()[3] for e in errors} == {"c1", "c2"} and "Traceback" not in log, (case, log)
        for e in errors:
            assert int(re.search(r"gave up after (\d+) s", e).group(1)) <= RDZV_TIMEOUT + 15, e   # torch's own: 60
        assert seconds(state) <= 300, (case, state, log)
        rec = Manifest(out).stage("r")
        assert rec["status"] == "failed" and "\n" not in rec["error"], (case, rec)
        assert "could not complete the rendezvous" in rec["error"] and "COMPT_RDZV_PORT" in rec["error"], rec
        assert not (out / "r").exists()
        status = slurm_cli(slurm_two_nodes, chain.rdzv_spec, "--out", out, "--status")
        assert "running" not in status, status
    assert f":{chain.taken_port}" in Manifest(chain.rdzv["port"][0]).stage("r")["error"]
    assert "198.51.100.1:" in Manifest(chain.rdzv["unreachable"][0]).stage("r")["error"]


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


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


@pytest.fixture(scope="module")
def second_stage(chain, slurm_two_nodes):
    """s2 on c1+c2, one job sequence: released; at step 2 the USR1 warning (what SLURM sends
    --warn-seconds before the end): it checkpoints, exits 99, requeues itself and resumes on both
    nodes; 3 steps after the resume c2's agent and worker are killed (a node lost): the job fails;
    resubmitted with --nodes-per-stage s2=1 (c2 drained), it resumes on c1 alone. Returns what each
    phase left (job records, logs, and the losses, manifest history and checkpoint at the kill)."""
    cluster, out, job = slurm_two_nodes, chain.out, chain.jobs["s2"]
    s2, latest = out / "s2", out / "s2" / "checkpoints" / "latest"
    cluster.run("scontrol", "release", job)
    ended = lambda: cluster.job(job).get("JobState") in ENDED   # noqa: E731
    wait_until(lambda: last_step(s2) >= 2, "s2 step 2", give_up=ended)
    on_two = cluster.job(job)
    cluster.run("scancel", "--signal=USR1", "--batch", job)

    def preempted_at() -> int:   # the one checkpoint before the end (save_every is 1000): the signal's
        return int(latest.read_text().removeprefix("global_step")) if latest.exists() else S2_STEPS
    # Steps past the checkpoint: only the requeued attempt logs them (the first stopped there).
    wait_until(lambda: last_step(s2) >= preempted_at() + 3, "the requeued s2 3 steps past its checkpoint", 400,
               give_up=ended)
    resumed = SimpleNamespace(state=cluster.job(job), step=preempted_at(), losses=train_losses(s2),
                              history=Manifest(out).stage("s2")["history"], log=log_of(out, "s2", job))
    assert resumed.state["JobState"] == "RUNNING" and resumed.state["Restarts"] == "1", (resumed.state, resumed.log)
    killed = _kill_node(job, "c2")
    lost = cluster.wait([job], timeout=300)[job]
    lost_log, lost_rec = log_of(out, "s2", job), Manifest(out).stage("s2")
    assert killed, lost_log

    cluster.run("scontrol", "update", "NodeName=c2", "State=DRAIN", "Reason=lost")
    try:
        r = slurm_cli(cluster, chain.spec, "--out", out, "--nodes", "2", "--nodes-per-stage", "s2=1", "--submit")
        job2 = Manifest(out).stage("s2")["job_id"]
        final = cluster.wait([job2], timeout=400)[job2]
    finally:
        cluster.run("scontrol", "update", "NodeName=c2", "State=RESUME")
    return SimpleNamespace(job=job, on_two=on_two, resumed=resumed, lost=lost, lost_log=lost_log, lost_rec=lost_rec,
                           resubmit=r, job2=job2, final=final, final_log=log_of(out, "s2", job2))


def test_chain_second_stage_on_two_nodes_preempted_and_requeued(chain, second_stage):
    """s2 across c1+c2: it grew from s1's export; the USR1 warning reached both nodes, both ranks
    checkpointed, the job exited 99, requeued itself and resumed; the losses of the uninterrupted
    steps and of the resumed ones equal the 1-node 2-rank run's; the manifest's stage records were
    written by global rank 0 only, once per change."""
    run, out = second_stage, chain.out
    assert run.on_two["NodeList"] == "c[1-2]", run.on_two
    log = run.resumed.log
    assert "stage s2: 2 node(s) [c1 c2] x 1 process(es)" in log, log
    for node in ("c1", "c2"):                                   # the warning reached both launchers
        assert f"USR1 on {node}: asking workers to checkpoint" in log, log
    assert "per node: c1=99 c2=99" in log and "requeueing job" in log and "try 1]" in log, log
    # Both ranks (one per node) wrote their shard of the checkpoint taken on the signal.
    step = run.resumed.step
    assert 2 <= step < S2_STEPS - 3, step
    shards = sorted(p.name for p in (out / "s2" / "checkpoints" / f"global_step{step}").glob("zero_pp_rank_*_optim_states.pt"))
    assert [s.split("_mp_")[0] for s in shards] == ["zero_pp_rank_0", "zero_pp_rank_1"], shards
    # Steps 1..step ran before the signal, the next ones after the requeue, from the checkpoint: both
    # equal the uninterrupted 1-node run (same weights from s1's export, same samples, same ranks).
    assert sorted(run.resumed.losses) == list(range(1, len(run.resumed.losses) + 1)), run.resumed.losses
    assert len(run.resumed.losses) >= step + 3, (step, sorted(run.resumed.losses))
    assert run.resumed.losses == {s: chain.ref_losses[s] for s in run.resumed.losses}
    # Every status the stage itself set came from global rank 0, once per attempt. Which node holds
    # rank 0 is torchrun's choice (order of joining the rendezvous, not SLURM_NODEID; seen on c2).
    by_ranks = [(h["status"], h["rank"]) for h in run.resumed.history if h["rank"] is not None]
    assert by_ranks == [("running", 0), ("preempted", 0), ("running", 0)], run.resumed.history
    assert {h["node"] for h in run.resumed.history if h["rank"] is not None} <= {"c1", "c2"}, run.resumed.history
    assert [h["node"] for h in run.resumed.history if h["rank"] is None][1:] == ["c1"] * 3, run.resumed.history  # the job script
    # The stage grew from s1 (its losses above depend on s1's export); its own export loads.
    rec = Manifest(out).stage("s2")
    assert rec["teacher"] == "s1" and all(h["rank"] in (None, 0) for h in rec["history"]), rec
    cfg = json.loads((out / "s2" / "model" / "config.json").read_text())
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "s2" / "model").config.hidden_size == cfg["hidden_size"]


def test_node_lost_mid_stage_is_named_and_resumed_on_the_node_left(chain, second_stage):
    """c2's agent and worker killed mid-stage (after the requeue): the job fails with one line naming
    c2; resubmitted with --nodes-per-stage s2=1, it resumes on c1 alone from the 2-rank checkpoint
    (world-size resume, global batch kept) and ends with the reference's losses."""
    run, out = second_stage, chain.out
    assert run.lost["JobState"] == "FAILED", (run.lost, run.lost_log)
    rec = run.lost_rec
    assert rec["status"] == "failed" and "\n" not in rec["error"], rec
    assert f"job {run.job}: lost node c2 (node 1 of 2)" in rec["error"] and "--nodes-per-stage s2=" in rec["error"], rec
    assert "per node: c1=1 c2=none" in run.lost_log, run.lost_log
    assert "s1: done, skipped" in run.resubmit, run.resubmit
    assert run.final["JobState"] == "COMPLETED" and run.final["NodeList"] == "c1", (run.final, run.final_log)
    assert "written on 2 ranks" in run.final_log and "grad_accum 2" in run.final_log, run.final_log
    losses = train_losses(out / "s2")
    assert sorted(losses) == list(range(1, S2_STEPS + 1))
    # 2 ranks up to the checkpoint, then 1 rank: only the summation order differs from the reference.
    for step, (loss, lr) in chain.ref_losses.items():
        if step <= run.resumed.step:
            assert losses[step] == (loss, lr), step
        assert losses[step][0] == pytest.approx(loss, rel=2e-4), (step, run.resumed.step)
        assert losses[step][1] == pytest.approx(lr, rel=1e-9)
    final = Manifest(out).stage("s2")
    assert final["status"] == "done" and final["world_size"] == 1, final
    assert [(h["status"], h["rank"]) for h in final["history"][-2:]] == [("running", 0), ("done", 0)], final
