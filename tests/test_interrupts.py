"""Interrupted stages with real processes: SIGTERM to `chain` (no orphan, no double run, resume once),
a second run on a locked stage, SIGINT (Ctrl-C) checkpoints like a preemption, a torn metrics line and
a garbage `latest` do not block --resume, and a preemption signal during data preparation."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compt_scale.chain.manifest import Manifest
from compt_scale.errors import EXIT_PREEMPTED
from compt_scale.launch.torchrun import _children
from conftest import REPO, last_step, read_metrics, reference_losses, run_cli, train_losses, write_spec

pytestmark = pytest.mark.slow


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compt_scale.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"process ended ({proc.returncode}) before {what}: {proc.communicate()}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    kids = _children(pid)
    return kids + [g for k in kids for g in descendants(k)]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def lock_holder(stage_dir: Path) -> int | None:
    """The pid in a stage's lock, or None while it is absent or half-written."""
    try:
        return int(json.loads((stage_dir / ".lock").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def test_sigterm_to_chain_stops_its_stage_and_resume_continues_once(tmp_path, tiny_data):
    steps = 60
    spec = write_spec(tmp_path / "c.yaml", [{"name": "a", "model": "llama-xs", "tokens": steps * 4 * 32}],
                      data_dir=tiny_data, train={"save_every": 5, "eval_every": 1000})
    out = tmp_path / "out"
    chain = start("chain", spec, "--out", out, "--no-baselines")
    wait_for(lambda: last_step(out / "a") >= 3, chain, what="step 3")
    kids = descendants(chain.pid)
    assert kids

    # While it runs, the stage is locked: a second `stage` or `chain --resume` is one line, exit 2.
    # (The holder is paused meanwhile so this tiny stage cannot finish before the checks.)
    holder = json.loads((out / "a" / ".lock").read_text())
    assert holder["pid"] in kids
    os.kill(holder["pid"], signal.SIGSTOP)
    # A second `chain` on the same --out: out dir busy (naming the chain's pid), nothing changed.
    manifest_before = (out / "manifest.json").read_text()
    for args, said in ((("stage", spec, "--stage", "a", "--out", out, "--resume"),
                        f"stage a is already running (host {socket.gethostname()} pid {holder['pid']}"),
                       (("chain", spec, "--out", out, "--resume", "--no-baselines"),
                        f"--out {out} is busy: another chain runs there (host {socket.gethostname()} pid {chain.pid}")):
        r = run_cli(*args, check=False)
        assert r.returncode == 2, (args, r.stdout[-2000:], r.stderr[-3000:])
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    assert (out / "manifest.json").read_text() == manifest_before
    assert Manifest(out).stage("a")["status"] == "running"
    assert chain.poll() is None and last_step(out / "a") < steps, "the stage must still be mid-run"

    os.kill(holder["pid"], signal.SIGCONT)
    chain.send_signal(signal.SIGTERM)
    _, err = chain.communicate(timeout=120)
    assert chain.returncode == EXIT_PREEMPTED, err[-3000:]
    assert not [k for k in kids if alive(k)], "the stage process outlived `chain`"
    assert Manifest(out).stage("a")["status"] == "preempted"
    assert not (out / "a" / ".lock").exists()
    stopped_at = last_step(out / "a")
    assert stopped_at < steps

    run_cli("chain", spec, "--out", out, "--resume", "--no-baselines")
    recs = read_metrics(out / "a")
    loss_steps = [r["step"] for r in recs if "loss" in r]
    assert loss_steps == list(range(1, steps + 1)), loss_steps      # strictly increasing, no step twice
    assert sum(bool(r.get("final")) for r in recs) == 1
    assert Manifest(out).stage("a")["status"] == "done"


def test_sigint_checkpoints_and_torn_state_falls_back_to_a_good_checkpoint(tmp_path, tiny_data):
    steps = 30
    spec = write_spec(tmp_path / "r.yaml", [{"name": "a", "model": "llama-xs", "tokens": steps * 4 * 32}],
                      data_dir=tiny_data, train={"save_every": 5, "eval_every": 1000})
    ref = reference_losses(spec, tmp_path / "ref", steps)

    out = tmp_path / "out"
    proc = start("stage", spec, "--stage", "a", "--out", out)
    wait_for(lambda: last_step(out / "a") >= 12, proc, what="step 12")
    proc.send_signal(signal.SIGINT)          # Ctrl-C: checkpoint and exit like a preemption
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert Manifest(out).stage("a")["status"] == "preempted"
    ckpt = out / "a" / "checkpoints"
    stopped = int((ckpt / "latest").read_text().removeprefix("global_step"))
    assert 12 <= stopped < steps and stopped == last_step(out / "a")

    # What a kill at the wrong moment can leave: `latest` garbage, the newest checkpoint truncated, a
    # torn last metrics line. --resume falls back to the previous kept checkpoint and says so.
    kept = sorted(int(p.name.removeprefix("global_step")) for p in ckpt.glob("global_step*"))
    assert len(kept) == 2 and kept[-1] == stopped
    (ckpt / "latest").write_text("\x00garbage")
    newest = ckpt / f"global_step{stopped}"
    states = sorted(newest.glob("*model_states.pt"))
    assert states
    states[0].write_bytes(states[0].read_bytes()[:100])
    with open(out / "a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 1.2')
    r = run_cli("stage", spec, "--stage", "a", "--out", out, "--resume")
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("[resume]")]
    assert len(said) == 1 and f"global_step{kept[0]}" in said[0], r.stderr[-3000:]
    assert train_losses(out / "a") == ref                                # same as never interrupted
    assert read_metrics(out / "a")[-1]["val_loss"] == read_metrics(tmp_path / "ref" / "a")[-1]["val_loss"]


def test_preemption_signal_during_data_preparation_is_recorded_and_resumable(tmp_path):
    # No prepared data: the stage starts by training a tokenizer and packing the corpus.
    spec = write_spec(tmp_path / "d.yaml", [{"name": "a", "model": "llama-xs", "tokens": 5 * 4 * 32}])
    out = tmp_path / "out"
    proc = start("stage", spec, "--stage", "a", "--out", out)
    wait_for(lambda: any(out.glob(".data.tmp-*")), proc, what="data preparation")
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "data preparation" in err
    assert Manifest(out).stage("a")["status"] == "preempted"
    assert not (out / "a" / "checkpoints").exists()
    run_cli("stage", spec, "--stage", "a", "--out", out, "--resume")
    assert Manifest(out).stage("a")["status"] == "done"
    assert read_metrics(out / "a")[-1].get("final")


@pytest.mark.heavy
def test_signals_between_stages_sighup_and_a_deleted_export(tmp_path, tiny_data):
    """SIGTERM after stage a's last step: a stays done, b never starts, exit 99. SIGHUP during b: b
    checkpoints (no orphan), exit 99. Resume finishes b without redoing a step; a deleted export of a
    finished stage is re-exported from its last checkpoint by the next `chain --resume`."""
    steps = 12
    spec = write_spec(tmp_path / "c.yaml", [{"name": "a", "model": "llama-xs", "tokens": 4 * 4 * 32},
                                            {"name": "b", "model": "llama-s", "tokens": steps * 4 * 32}],
                      data_dir=tiny_data, train={"save_every": 3, "eval_every": 1000}, ifd={"enabled": False})
    out = tmp_path / "out"
    chain = start("chain", spec, "--out", out, "--no-baselines")
    wait_for(lambda: lock_holder(out / "a") is not None, chain, what="stage a's lock")
    stage_pid = lock_holder(out / "a")
    # a's final record is written after its last step, before its checkpoint, export and `done`. The
    # stage is looked at only while paused, so when the record is seen it is surely between its last
    # step and its end (on a loaded machine it could otherwise finish before this test reacts).
    deadline = time.time() + 300
    while True:
        os.kill(stage_pid, signal.SIGSTOP)
        if any(r.get("final") for r in read_metrics(out / "a")):
            break
        os.kill(stage_pid, signal.SIGCONT)
        assert chain.poll() is None and time.time() < deadline, "a's last step never came"
        time.sleep(0.05)
    chain.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    os.kill(stage_pid, signal.SIGCONT)
    _, err = chain.communicate(timeout=300)
    assert chain.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "SIGTERM after stage a finished" in err, err[-3000:]
    assert Manifest(out).stage("a")["status"] == "done" and (out / "a" / "model" / "config.json").is_file()
    assert Manifest(out).stage("b")["status"] == "pending" and not (out / "b").exists()
    assert not (out / ".chain.lock").exists()

    chain = start("chain", spec, "--out", out, "--resume", "--no-baselines")
    wait_for(lambda: last_step(out / "b") >= 2, chain, what="b's step 2")
    kids = descendants(chain.pid)
    chain.send_signal(signal.SIGHUP)           # the terminal closed
    _, err = chain.communicate(timeout=300)
    assert chain.returncode == EXIT_PREEMPTED, err[-3000:]
    assert not [k for k in kids if alive(k)], "the stage process outlived `chain`"
    assert Manifest(out).stage("b")["status"] == "preempted"
    stopped = int((out / "b" / "checkpoints" / "latest").read_text().removeprefix("global_step"))
    assert 2 <= stopped < steps

    a_record = Manifest(out).stage("a")
    shutil.rmtree(out / "a" / "model")
    r = run_cli("chain", spec, "--out", out, "--resume", "--no-baselines")
    assert "re-exporting it from its last checkpoint" in r.stderr, r.stderr[-3000:]
    assert (out / "a" / "model" / "config.json").is_file()
    assert Manifest(out).stage("a")["seconds"] == a_record["seconds"]
    assert Manifest(out).stage("a")["final_val_loss"] == pytest.approx(a_record["final_val_loss"], rel=1e-6)
    recs = read_metrics(out / "b")
    assert [x["step"] for x in recs if "loss" in x] == list(range(1, steps + 1))
    assert Manifest(out).stage("b")["status"] == "done"
