"""What `compt-scale slurm` renders, checked without a cluster: odd but valid values stay quoted (bash -n,
every #SBATCH line before the first command, a dry run reads them back exactly), bad values are one
line, resource defaults and their overrides, `--warn-seconds auto`, and the rendezvous address."""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_DATA, TINY_TRAIN, cli_in_process, run_cli


def _spec(d: Path, name="odd-chain_1.0", file="my spec 'odd' $HOME `x`.yaml", stages=None) -> Path:
    spec = {"name": name, "data": TINY_DATA, "train": TINY_TRAIN,
            "stages": stages or [{"name": "s_1-a", "model": "llama-xs", "tokens": 1280},
                                 {"name": "s2", "model": "llama-s", "tokens": 1280}]}
    p = d / file
    p.write_text(yaml.safe_dump(spec))
    return p


def _directives(text: str) -> list[str]:
    return [ln[len("#SBATCH "):] for ln in text.splitlines() if ln.startswith("#SBATCH ")]


def test_odd_but_valid_values_stay_quoted(tmp_path):
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    env_value = "a b 'c' \"d\" $HOME `id` ; exit 3"
    cli_in_process("slurm", spec, "--out", out, "--partition", "gpu-a100_x", "--time", "1-00:00:00",
            "--env", f"ODD={env_value}", "--sbatch-arg=--comment=odd,value", "--gpus-per-node", "8")
    script = out / "slurm" / "s_1-a.sbatch"
    text = script.read_text()
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    # sbatch stops reading #SBATCH lines at the first command: all of them must come before it.
    lines = text.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert max(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")) < first_cmd
    d = _directives(text)
    assert "--job-name=compt-odd-chain_1.0-s_1-a" in d and "--comment=odd,value" in d
    assert "--time=1-00:00:00" in d and "--partition=gpu-a100_x" in d
    # The script reads the odd values back exactly (a dry run prints the launch command, %q-quoted).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (fake / "scontrol").chmod(0o755)
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "COMPT_DRY_RUN": "1",
                            "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "7"})
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout)
    assert cmd[cmd.index("stage") + 1] == str(spec.resolve())
    assert "export ODD=" in text
    got = subprocess.run(["bash", "-c", text.split("export ODD=")[1].splitlines()[0].join(["v=", '; printf %s "$v"'])],
                         capture_output=True, text=True, check=True).stdout
    assert got == env_value


@pytest.mark.parametrize("args, needle", [
    (["--warn-seconds", "-300"], "--warn-seconds"),
    (["--warn-seconds", "0"], "--warn-seconds"),
    (["--warn-seconds", "3600", "--time", "1:00:00"], "--warn-seconds"),
    (["--time", "soon"], "--time"),
    (["--partition", "gpu\n#SBATCH --qos=evil"], "--partition"),
    (["--sbatch-arg=--qos=a\necho hi"], "--sbatch-arg"),
    (["--mem", "1G 2G"], "--mem"),
    (["--cpus-per-task", "0"], "--cpus-per-task"),
])
def test_bad_slurm_values_are_one_line(tmp_path, args, needle):
    # in-process (the console script's one-line errors: test_spec_name_with_newline... below)
    r = cli_in_process("slurm", _spec(tmp_path, file="c.yaml"), "--out", tmp_path / "out", *args, check=False)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1 and needle in err[0], r.stderr
    assert not (tmp_path / "out" / "slurm").exists()


def test_spec_name_with_newline_never_reaches_a_script(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text('name: "x\\nexit 0"\nstages: [{name: a, model: llama-xs, tokens: 256}]\n')
    r = run_cli("slurm", p, "--out", tmp_path / "out", check=False)
    assert r.returncode == 2 and "spec.name" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resource_defaults_and_overrides(tmp_path):
    spec = _spec(tmp_path, file="c.yaml")

    def render(*args):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        cli_in_process("slurm", spec, "--out", out, *args)
        return _directives((out / "slurm" / "s2.sbatch").read_text())

    gpu = render("--gpus-per-node", "8")
    assert {"--exclusive", "--mem=0", "--cpus-per-task=32", "--gpus-per-node=8"} <= set(gpu)
    cpu = render("--nproc-per-node", "2")     # CPU ranks (tests, debugging): shared nodes
    assert "--cpus-per-task=2" in cpu and "--exclusive" not in cpu and not any(x.startswith("--mem") for x in cpu)
    over = render("--gpus-per-node", "4", "--no-exclusive", "--mem", "none", "--cpus-per-task", "48")
    assert "--exclusive" not in over and "--cpus-per-task=48" in over and not any(x.startswith("--mem") for x in over)
    assert "--mem=200G" in render("--nproc-per-node", "1", "--exclusive", "--mem", "200G")


def test_warn_seconds_auto_from_checkpoint_size(tmp_path):
    from compt_scale.launch.slurm import auto_warn_seconds
    # 7e9 params in bf16: 7e9 * (12 optimizer + 2 weight) bytes = 98 GB at 0.5 GB/s = 196 s, + 180 s margin.
    assert auto_warn_seconds(7_000_000_000, "bf16", 1) == 376
    assert auto_warn_seconds(7_000_000_000, "bf16", 4) == 180 + 49       # 4 nodes write in parallel
    assert auto_warn_seconds(1_000_000, "fp32", 1) == 181
    out = tmp_path / "out"
    cli_in_process("slurm", _spec(tmp_path, file="c.yaml"), "--out", out, "--warn-seconds", "auto", "--time", "10")
    assert "--signal=B:USR1@181" in _directives((out / "slurm" / "s2.sbatch").read_text())  # llama-s: < 1M params
    r = cli_in_process("slurm", _spec(tmp_path, file="c.yaml"), "--out", out, "--warn-seconds", "auto", "--time", "3",
                check=False)
    assert r.returncode == 2 and "time limit (180 s)" in r.stderr, r.stderr


def test_slurm_time_formats():
    from compt_scale.launch.slurm import slurm_seconds
    assert [slurm_seconds(t) for t in ("90", "90:30", "2:00:00", "1-0", "1-2:30", "1-00:00:05")] == \
        [5400, 5430, 7200, 86400, 95400, 86405]


def test_rendezvous_address_is_never_loopback(tmp_path, monkeypatch):
    from compt_scale.launch.rendezvous import head_address
    # Here (as on many Debian hosts) the machine's own name resolves to 127.0.x.x: the head node must
    # hand out its real address, the one `hostname -I` lists first.
    own = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()
    own4 = [a for a in own if "." in a and not a.startswith("127.")]
    if not own4:
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert head_address(socket.gethostname()) == own4[0]
    warned = []
    assert head_address("no-such-node.invalid", warn=warned.append) == "no-such-node.invalid"
    assert warned and "cannot resolve" in warned[0]
    # SLURM's NodeAddr wins where it is an address (a fake scontrol, as on a cluster).
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'NodeName=gpu7 Arch=x86_64 NodeAddr=10.9.8.7 NodeHostName=gpu7'\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert head_address("gpu7") == "10.9.8.7"


@pytest.mark.slurm
def test_rendezvous_cli_with_real_slurm(slurm_cluster):
    """The real test cluster's node: scontrol knows it; the address is this machine's, not loopback."""
    host = socket.gethostname().split(".")[0]
    r = subprocess.run([sys.executable, "-m", "compt_scale.launch.rendezvous", host], capture_output=True,
                       text=True, env={**slurm_cluster.env, "PYTHONPATH": str(REPO)}, check=True, timeout=60)
    assert not r.stdout.strip().startswith("127."), r.stdout
    assert r.stdout.strip() in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()


def test_node_0_hosts_the_rendezvous_store():
    """torch decides "am I the store host?" by comparing names/addresses, which fails for an address
    where the host's name maps to loopback; under SLURM the wrapper says it: node 0's launcher hosts
    the store itself (launch/store_host.py), so every agent, node 0's included, joins as a client."""
    from torch.distributed.run import parse_args

    from compt_scale.launch.torchrun import store_role, with_store_host
    base = ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "10.0.0.1:29742", "w.py"]
    assert parse_args(with_store_host(base, {"SLURM_NODEID": "0"})).rdzv_conf == \
        "is_host=0,join_timeout=300,read_timeout=300"
    assert parse_args(with_store_host(base, {"SLURM_NODEID": "1", "COMPT_RDZV_TIMEOUT": "20"})).rdzv_conf == \
        "is_host=0,join_timeout=20,read_timeout=20"
    assert [store_role(base, {"SLURM_NODEID": n}) for n in ("0", "1")] == ["host", "client"]
    assert with_store_host(base, {}) == base and store_role(base, {}) is None  # not under SLURM
    own = ["--rdzv-conf", "is_host=0", *base]
    assert store_role(own, {"SLURM_NODEID": "0"}) is None                     # the user's own wins
    assert with_store_host(own, {"SLURM_NODEID": "0"}) == own                  # the user's own wins
