"""SLURM scripts and launch helpers without running a chain: rendering, `bash -n`, the rendezvous of a
fake 3-node allocation (real scontrol and our fallback expander), the torchrun wrapper's USR1
forwarding and exit codes (real torchrun, dummy workers), the manifest helper, CLI errors."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

# The cluster and the preemption reference are session fixtures: registered once as a plugin (not
# imported per module, which would start one per module).
from compt_scale.chain.manifest import Manifest
from compt_scale.launch.hostlist import expand
from compt_scale.launch.torchrun import PREEMPTED, exit_code_of
from conftest import REPO, run_cli, write_spec

# Every test runs the CLI or bash scripts in subprocesses (the `scripts` fixture alone takes ~30 s).
pytestmark = [pytest.mark.slow]

FAKE_ALLOC = {"SLURM_JOB_NODELIST": "node[01-03]", "SLURM_NNODES": "3", "SLURM_JOB_ID": "4242",
              "COMPT_DRY_RUN": "1"}


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    d = tmp_path_factory.mktemp("render")
    spec = write_spec(d / "two.yaml", [{"name": "s1", "model": "llama-xs", "tokens": 1280},
                                       {"name": "s2", "model": "llama-s", "tokens": 1280}])
    out = d / "out"
    r = run_cli("slurm", spec, "--out", out, "--nodes", "2", "--gpus-per-node", "8", "--nodes-per-stage", "s2=3",
                "--time", "2:00:00", "--time-per-stage", "s1=0:30:00", "--partition", "gpu", "--cpus-per-task", "64",
                "--warn-seconds", "600", "--env", "NCCL_SOCKET_IFNAME=ib0", "--sbatch-arg=--qos=high")
    assert "s1: wrote" in r.stdout and "s2: wrote" in r.stdout
    return SimpleNamespace(spec=spec, out=out, s1=out / "slurm" / "s1.sbatch", s2=out / "slurm" / "s2.sbatch")


def directives(path: Path) -> list[str]:
    return [ln[len("#SBATCH "):] for ln in path.read_text().splitlines() if ln.startswith("#SBATCH ")]


def test_generated_scripts_pass_bash_n_and_carry_per_stage_resources(scripts):
    for p in (scripts.s1, scripts.s2, REPO / "slurm" / "stage.sbatch", REPO / "launchers" / "torchrun.sh",
              REPO / "launchers" / "deepspeed.sh", REPO / "slurm" / "install-deps.sh"):
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p}: {r.stderr}"
    d1, d2 = directives(scripts.s1), directives(scripts.s2)
    assert "--nodes=2" in d1 and "--nodes=3" in d2                  # nodes differ per stage
    assert "--time=0:30:00" in d1 and "--time=2:00:00" in d2        # so do time limits
    for d in (d1, d2):
        for want in ("--gpus-per-node=8", "--ntasks-per-node=1", "--partition=gpu", "--cpus-per-task=64",
                     "--requeue", "--open-mode=append", "--signal=B:USR1@600", "--qos=high",
                     "--exclusive", "--mem=0"):                   # GPU jobs: whole nodes by default
            assert want in d, (want, d)
    assert f"--output={scripts.out.resolve()}/slurm/s2-%j.out" in d2
    assert "export NCCL_SOCKET_IFNAME=ib0" in scripts.s2.read_text()
    assert "{{" not in scripts.s2.read_text()


def _dry_run(script: Path, env: dict) -> list[str]:
    r = subprocess.run(["bash", str(script)], env={**os.environ, **FAKE_ALLOC, **env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def _check_rendezvous(cmd: list[str], spec: Path, out: Path):
    def arg(flag):
        return cmd[cmd.index(flag) + 1]
    assert cmd[0] == "srun" and "--nodes=3" in cmd and "--ntasks=3" in cmd and "--ntasks-per-node=1" in cmd
    assert "--gpus-per-node=8" in cmd
    assert cmd[cmd.index("-m") + 1] == "compt_scale.launch.torchrun"
    assert arg("--nnodes") == "3" and arg("--nproc_per_node") == "8"
    assert arg("--rdzv_backend") == "c10d"
    # First node of node[01-03] (no such host here: its name, with a warning), port 29500 + job id % 1000.
    assert arg("--rdzv_endpoint") == "node01:29742"
    assert arg("--rdzv_id") == "4242"
    stage = cmd[cmd.index("compt_scale.cli"):]
    assert stage[1:] == ["stage", str(spec.resolve()), "--stage", "s2", "--out", str(out.resolve()), "--resume"]


def test_rendezvous_of_fake_3_node_allocation_with_fallback_expander(scripts, tmp_path):
    # An scontrol that cannot run (as on a machine without slurm.conf, where the real one would first
    # spend a minute on DNS lookups): the script falls back to compt_scale.launch.hostlist.
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'scontrol: fatal: no config' >&2\nexit 1\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    _check_rendezvous(_dry_run(scripts.s2, env), scripts.spec, scripts.out)


def test_rendezvous_of_fake_3_node_allocation_with_real_scontrol(scripts, slurm_cluster):
    _check_rendezvous(_dry_run(scripts.s2, {"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}), scripts.spec, scripts.out)


def test_hostlist_expander_matches_scontrol(slurm_cluster):
    for nl in ("node[01-03]", "gpu-a[7,9-10],login1", "r[1-2]n[08-10]", "single", "n[098-101]"):
        real = slurm_cluster.run("scontrol", "show", "hostnames", nl).stdout.split()
        assert expand(nl) == real, nl


def test_cli_errors_are_one_line(scripts):
    r = run_cli("slurm", scripts.spec, "--out", scripts.out, "--nodes-per-stage", "nope=2", check=False)
    assert r.returncode == 2 and "--nodes-per-stage: no stage named 'nope'" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("slurm", scripts.spec, "--out", scripts.out, "--time-per-stage", "s1", check=False)
    assert r.returncode == 2 and "expected name=value" in r.stderr


def test_jobstate_keeps_the_stages_own_error(tmp_path):
    m = Manifest(tmp_path)
    m.update_stage("s1", status="failed", error="stage s1: the real reason")
    js = [sys.executable, "-m", "compt_scale.launch.jobstate", str(tmp_path), "s1", "--job-id", "7"]
    subprocess.run(js + ["--status", "failed", "--unless", "failed,done", "--error", "generic"], check=True)
    assert m.stage("s1")["error"] == "stage s1: the real reason" and m.stage("s1")["job_id"] == "7"
    subprocess.run(js + ["--status", "running", "--unless", "done"], check=True)
    assert m.stage("s1")["status"] == "running" and m.stage("s1")["error"] is None


def test_exit_code_mapping():
    f = lambda code, ts=0: SimpleNamespace(exitcode=code, timestamp=ts)   # noqa: E731
    assert exit_code_of({0: f(99), 1: f(99)}) == PREEMPTED
    assert exit_code_of({0: f(99, 1), 1: f(-15, 2)}) == PREEMPTED     # the agent SIGTERMed the slower rank
    assert exit_code_of({0: f(99, 1), 1: f(3, 2)}) == 3                # a real error is never "preempted"
    assert exit_code_of({0: f(-9)}) == 1
    assert exit_code_of({0: f(2, 5), 1: f(1, 3)}) == 1                 # earliest real failure


WORKER = """
import os, signal, sys, time
time.sleep(float(os.environ["HANDLER_DELAY"]))   # USR1 arriving before this would kill a naive worker
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(time.time()))
open(os.path.join(os.environ["MARK"], "ready" + os.environ["RANK"]), "w").close()
for _ in range(600):
    time.sleep(0.05)
    if got:
        open(os.path.join(os.environ["MARK"], "usr1-" + os.environ["RANK"]), "w").close()
        time.sleep(2)   # like the stage's all-rank agreement: no rank leaves before all have the signal
        sys.exit(99)
sys.exit(0)
"""


@pytest.mark.dist
def test_torchrun_wrapper_forwards_usr1_to_every_worker_and_keeps_99(tmp_path):
    (tmp_path / "w.py").write_text(WORKER)
    env = {**os.environ, "MARK": str(tmp_path), "HANDLER_DELAY": "3"}
    exit_file = tmp_path / "exit" / "node-{node}"
    p = subprocess.Popen([sys.executable, "-m", "compt_scale.launch.torchrun", "--exit-file", str(exit_file),
                          "--standalone", "--nproc_per_node", "2", str(tmp_path / "w.py")],
                         env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    p.send_signal(signal.SIGUSR1)   # early: workers are not catching USR1 yet; must be held, not lost
    out, _ = p.communicate(timeout=120)
    assert p.returncode == PREEMPTED, out[-3000:]
    assert (tmp_path / "usr1-0").exists() and (tmp_path / "usr1-1").exists(), out[-3000:]
    assert (tmp_path / "exit" / "node-0").read_text().strip() == "99"


FAKE_SLURM = {
    "sbatch": """#!/bin/sh
n=$(cat "$FAKE/next"); echo $((n + 1)) > "$FAKE/next"
echo "sbatch $*" >> "$FAKE/calls"; echo "$n;cluster"
""",
    "scancel": """#!/bin/sh
echo "scancel $*" >> "$FAKE/calls"
""",
    "scontrol": """#!/bin/sh
line=$(grep "^$4 " "$FAKE/jobs" | cut -d' ' -f2-) || exit 1
[ -n "$line" ] || { echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }
echo "JobId=$4 $line"
""",
}


def test_resubmission_skips_done_keeps_queued_and_replaces_stale_jobs(tmp_path, monkeypatch):
    """Re-running `--submit` against fake sbatch/scontrol/scancel (the logic, not SLURM itself)."""
    from compt_scale.chain.resolve import load_resolved as load_chain
    from compt_scale.launch.slurm import SlurmOptions, submit, write_scripts
    for name, text in FAKE_SLURM.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE", str(tmp_path))
    (tmp_path / "next").write_text("100\n")
    stages = [{"name": f"s{i}", "model": m, "tokens": 1280} for i, m in enumerate(["llama-xs", "llama-s", "llama-m", "llama-l"], 1)]
    spec = load_chain(write_spec(tmp_path / "c.yaml", stages))
    out = tmp_path / "out"
    scripts = write_scripts(spec, out, SlurmOptions())
    m = Manifest(out)

    # s1 done; s2 failed (job 11); s3 never startable (12); s4 waiting on 12 (13).
    m.update_stage("s1", status="done", job_id="10")
    m.update_stage("s2", status="failed", job_id="11", error="boom")
    m.update_stage("s3", status="submitted", job_id="12")
    m.update_stage("s4", status="submitted", job_id="13")
    (tmp_path / "jobs").write_text("11 JobState=FAILED Reason=NonZeroExitCode\n"
                                   "12 JobState=PENDING Reason=DependencyNeverSatisfied\n"
                                   "13 JobState=PENDING Reason=Dependency\n")
    jobs = submit(spec, out, scripts, log=lambda *a: None)
    assert jobs == {"s1": None, "s2": "100", "s3": "101", "s4": "102"}
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == f"sbatch --parsable {scripts['s2']}"                       # s1 done: no dependency
    assert f"sbatch --parsable --dependency=afterok:100 {scripts['s3']}" in calls
    assert "scancel 12" in calls and "scancel 13" in calls                        # stale jobs cleared
    assert calls[-1] == f"sbatch --parsable --dependency=afterok:101 {scripts['s4']}"
    assert m.stage("s2")["status"] == "submitted" and m.stage("s2")["error"] is None

    # Second run while s2 runs and s3/s4 wait: everything is kept, nothing submitted.
    (tmp_path / "calls").write_text("")
    (tmp_path / "jobs").write_text("100 JobState=RUNNING Reason=None\n101 JobState=PENDING Reason=Dependency\n"
                                   "102 JobState=PENDING Reason=Dependency\n")
    assert submit(spec, out, scripts, log=lambda *a: None) == {"s1": None, "s2": "100", "s3": "101", "s4": "102"}
    assert (tmp_path / "calls").read_text() == ""


LATE_WORKER = """
import os, sys, time
time.sleep(float(os.environ["LATE"]))   # this node's workers finish their checkpoint later
sys.exit(99)
"""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_launchers(tmp_path: Path, port: int, lates: list[float]) -> list[subprocess.Popen]:
    """One wrapper per node of a fake 2-node SLURM allocation, as stage.sbatch starts them under srun."""
    (tmp_path / "w.py").write_text(LATE_WORKER)
    procs = []
    for node, late in enumerate(lates):
        env = {**os.environ, "SLURM_NODEID": str(node), "SLURMD_NODENAME": f"n{node}", "LATE": str(late),
               "COMPT_RDZV_TIMEOUT": "60"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "compt_scale.launch.torchrun", "--exit-file", str(tmp_path / "node-{node}"),
             "--nnodes", str(len(lates)), "--nproc_per_node", "1", "--max_restarts", "0",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t",
             str(tmp_path / "w.py")], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    return procs


@pytest.mark.dist
def test_preempted_node_0_keeps_the_store_until_the_other_node_is_done(tmp_path):
    """Node 0's workers exit 99 first and node 1's 6 s later (a slower checkpoint). When node 0's
    launcher took the rendezvous store with it, node 1's agent lost the store, SIGTERMed its workers
    mid-checkpoint and exited 2 ("could not complete the rendezvous"): the job was not requeued."""
    procs = _node_launchers(tmp_path, _free_port(), lates=[0.0, 6.0])
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [PREEMPTED, PREEMPTED], outs[1][-3000:]
    assert [(tmp_path / f"node-{n}").read_text().strip() for n in (0, 1)] == ["99", "99"]


def test_port_taken_on_node_0_is_one_line_exit_2(tmp_path):
    """The store cannot open on node 0: one line naming the node and the endpoint, exit 2, at once."""
    import socket
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        (proc,) = _node_launchers(tmp_path, port, lates=[0.0])
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("compt-scale: error:")]
    assert len(lines) == 1 and "node n0 (node 0)" in lines[0], out
    assert f"could not complete the rendezvous at 127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in out
    assert (tmp_path / "node-0").read_text().splitlines()[0] == "2"
