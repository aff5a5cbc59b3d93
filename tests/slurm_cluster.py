"""A real one-node SLURM cluster for the tests (Debian's slurm-wlm + munge), started and stopped here.

Everything lives in one temp dir: its own munge key and socket, a generated slurm.conf with free
ports, state/spool/log dirs. So it neither needs nor touches /etc/munge, /etc/slurm or a system munged,
and two test sessions on one machine do not collide. Needs root (slurmd runs jobs as their user).

Registered as a plugin by tests/conftest.py: ask for the `slurm_cluster` fixture (session-scoped);
then `slurm_cluster.env` is the environment for sbatch/scontrol/compt-scale (SLURM_CONF set).
`python tests/slurm_cluster.py DIR` starts one by hand and prints its SLURM_CONF.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from compt_scale.train.distributed import free_port
from conftest import read_metrics, train_losses

CPUS = 2  # the node line says CPUs=2: one 2-rank job, or two 1-rank jobs, at a time



class SlurmCluster:
    """`nodes=1`: one node named after this host. `nodes=N`: N slurmd daemons on this one host
    (`slurmd -N c1` ...; Debian's build has --enable-multiple-slurmd), nodes c1..cN, each with its
    own port, spool, log and pid file, all with this host's own address as NodeAddr: SLURM then
    schedules, signals and requeues N-node jobs across them like across real machines."""

    def __init__(self, root: Path, nodes: int = 1, cpus: int = CPUS):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.names = [self.host] if nodes == 1 else [f"c{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pidfiles: list[Path] = []

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60) -> "SlurmCluster":
        r = self.root
        for d in ("munge", "state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)  # munged refuses a socket dir others can write
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        munge_pid = r / "run" / "munged.pid"
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={self.socket}",
                        f"--pid-file={munge_pid}", f"--log-file={r / 'log' / 'munged.log'}",
                        f"--seed-file={r / 'munge' / 'seed'}"], check=True, capture_output=True)
        self.pidfiles.append(munge_pid)
        self.conf.write_text(self._slurm_conf())
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True, capture_output=True)
        self.pidfiles.append(r / "run" / "slurmctld.pid")
        for name in self.names:
            (r / "spool" / name).mkdir(exist_ok=True)
            node = ["-N", name] if len(self.names) > 1 else []
            subprocess.run(["slurmd", "-f", str(self.conf), *node], env=self.env, check=True, capture_output=True)
            self.pidfiles.append(r / "run" / (f"slurmd-{name}.pid" if node else "slurmd.pid"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
            states = out.stdout.split()
            if out.returncode == 0 and len(states) == len(self.names) and \
                    all(st in ("idle", "mix", "alloc") for st in states):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"slurm node did not come up; see {r / 'log'}")

    def stop(self) -> None:
        # Cancel what is left so slurmd does not leave job processes behind, then stop the daemons
        # by the pids in their pid files (never by name: other sessions may run their own).
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
        time.sleep(0.5)
        for pf in reversed(self.pidfiles):
            try:
                pid = int(pf.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        self.pidfiles.clear()

    def _node_lines(self) -> list[str]:
        if len(self.names) == 1:
            return [f"NodeName={self.host} CPUs={self.cpus} RealMemory=20000 State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP"]
        # NodeAddr: this host's own non-loopback address (what the rendezvous code looks up, as on a
        # real cluster); 127.0.0.1 where there is none (the jobs then need COMPT_RDZV_ADDR, set in env).
        own = [a for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
               if "." in a and not a.startswith("127.")]
        addr = own[0] if own else "127.0.0.1"
        if not own:
            self.env["COMPT_RDZV_ADDR"] = addr
        lines = [f"NodeName={n} NodeHostname={self.host} NodeAddr={addr} Port={free_port()} CPUs={self.cpus} "
                 "RealMemory=10000 State=UNKNOWN" for n in self.names]
        return lines + [f"PartitionName=debug Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP"]

    def _slurm_conf(self) -> str:
        r = self.root
        many = len(self.names) > 1
        return "\n".join([
            "ClusterName=compttest",
            # Job ids (and with them the rendezvous ports stage.sbatch derives, 29500 + id % 1000)
            # start at a random point with free ports: two test clusters on one machine (two
            # sessions, or the one- and two-node clusters) would otherwise both run job 1 on 29501.
            f"FirstJobId={_first_job_id()}",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again
            # (default 120 s); short here so the preemption test does not sit idle.
            f"AuthInfo=socket={self.socket},cred_expire=5",
            f"StateSaveLocation={r / 'state'}",
            # %n: the node's name, one spool/pid/log per slurmd when several run on this host.
            f"SlurmdSpoolDir={r / 'spool' / ('%n' if many else '')}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / ('slurmd-%n.pid' if many else 'slurmd.pid')}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / ('slurmd-%n.log' if many else 'slurmd.log')}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",  # start requeued/released jobs soon
            "MinJobAge=600",            # finished jobs stay visible to scontrol for the status checks
            "KillWait=10",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            *self._node_lines(),
            "",
        ])

    # ------------------------------------------------------------------ helpers for tests
    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check)

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o` as a dict (JobState, Reason, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        fields = {}
        for tok in out.split():
            k, _, v = tok.partition("=")
            fields.setdefault(k, v)
        return fields

    def wait(self, job_ids, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
             timeout: float = 300) -> dict:
        """Wait until every job is in a state of `until`, or pending with a dependency that can never
        be satisfied; returns {job_id: fields}."""
        deadline = time.time() + timeout
        while True:
            states = {j: self.job(j) for j in job_ids}
            if all(s.get("JobState") in until or s.get("Reason") == "DependencyNeverSatisfied"
                   for s in states.values()):
                return states
            if time.time() > deadline:
                raise TimeoutError(f"jobs not finished: {states}")
            time.sleep(1)


def _first_job_id(span: int = 50) -> int:
    """A first job id whose next `span` rendezvous ports (29500 + id % 1000) can be bound now."""
    for _ in range(100):
        first = random.randrange(1000, 1000 + 1000 - span)
        try:
            for port in range(29500 + first % 1000, 29500 + first % 1000 + span):
                with socket.socket() as s:
                    s.bind(("", port))
        except OSError:
            continue
        return first
    return random.randrange(1000, 2000 - span)


def slurm_available() -> str | None:
    """None when a cluster can be started here, else why not (the tests are skipped with it)."""
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol") if not shutil.which(b)]
    if missing:
        return f"not installed: {', '.join(missing)} (run `make slurm-deps`)"
    if os.geteuid() != 0:
        return "a test SLURM cluster needs root"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    why = slurm_available()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="compt-slurm-"))
    cluster = SlurmCluster(root).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_two_nodes():
    """Two SLURM nodes (c1, c2: two slurmd on this host, CPUs=2 each, so two 2-node jobs of one CPU
    rank per node fit at once): `sbatch --nodes=2` runs the project's stage.sbatch across them."""
    why = slurm_available()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="compt-slurm2-"))
    cluster = SlurmCluster(root, nodes=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- preemption reference run
PREEMPT_STEPS = 80   # llama-s, 2 ranks: long enough to be signalled mid-run on a busy 2-core box


@pytest.fixture(scope="session")
def preempt_reference(tmp_path_factory, tiny_data):
    """A 1-stage, 2-rank spec and its uninterrupted losses, run with launchers/deepspeed.sh (so the
    preempted torchrun/SLURM runs are also checked against the other launcher)."""
    from conftest import REPO, write_spec
    d = tmp_path_factory.mktemp("preempt")
    spec = write_spec(d / "p.yaml", [{"name": "a", "model": "llama-s", "tokens": PREEMPT_STEPS * 4 * 2 * 32}],
                      data_dir=tiny_data, train={"save_every": 1000, "eval_every": 1000}, nproc=2)
    r = subprocess.run(["bash", str(REPO / "launchers" / "deepspeed.sh"), str(spec), "--stage", "a",
                        "--out", str(d / "ref")], env=dict(os.environ, NPROC="2"), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    losses = train_losses(d / "ref" / "a")
    assert sorted(losses) == list(range(1, PREEMPT_STEPS + 1))
    final = read_metrics(d / "ref" / "a")[-1]
    assert final.get("final")
    return SimpleNamespace(spec=spec, losses=losses, final_val=final["val_loss"], dir=d)


if __name__ == "__main__":
    import sys
    c = SlurmCluster(Path(sys.argv[1]).resolve()).start()
    print(f"export SLURM_CONF={c.conf}")
