"""Cheap in-process checks of the robustness rules (tests/test_interrupts.py drives the real
processes): stale locks by pid reuse and empty lock files, one chain per --out, spec rules for
init:, whole-number growth fields, an unwritable checkpoints dir, and the universal-checkpoint
completion marker."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import yaml

from compt_scale.chain import lock
from compt_scale.config import load_chain
from compt_scale.errors import CompTError
from conftest import TINY_DATA, TINY_TRAIN, run_cli


def test_a_reused_pid_or_an_empty_lock_is_stale(tmp_path):
    host = socket.gethostname()
    parent = os.getppid()          # alive; its real start time is in /proc
    assert lock.process_start(parent)
    stage = tmp_path / "reused"
    stage.mkdir()
    # The lock's pid is alive but is another process than the one that wrote it: taken over.
    (stage / ".lock").write_text(json.dumps({"host": host, "pid": parent, "start": "1"}))
    lock.StageLock(stage, "reused").acquire().release()
    # The same pid with its own start time: a live holder.
    stage.mkdir(exist_ok=True)
    (stage / ".lock").write_text(json.dumps({"host": host, "pid": parent, "start": lock.process_start(parent)}))
    with pytest.raises(CompTError, match=f"pid {parent}"):
        lock.StageLock(stage, "reused").acquire()
    # An empty lock: held for a short grace (its writer may be mid-write), then stale.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".lock").write_text("")
    with pytest.raises(CompTError, match="already running"):
        lock.StageLock(empty, "empty").acquire()
    old = time.time() - lock.EMPTY_GRACE_SECONDS - 1
    os.utime(empty / ".lock", (old, old))
    held = lock.StageLock(empty, "empty").acquire()
    assert json.loads((empty / ".lock").read_text())["start"] == lock.process_start(os.getpid())
    held.release()


def test_one_chain_per_out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    held = lock.OutLock(out).acquire()
    with pytest.raises(CompTError, match=rf"--out {out} is busy: another chain runs there \(host .* pid {os.getpid()}"):
        lock.OutLock(out).acquire()
    held.release()
    assert not (out / ".chain.lock").exists() and out.is_dir()
    lock.OutLock(out).acquire().release()


def _spec(tmp_path, stages, **data):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "s", "data": {**TINY_DATA, **data}, "train": dict(TINY_TRAIN),
                                 "stages": stages}))
    return p


def test_init_rules_at_spec_load(tmp_path):
    init = tmp_path / "m"
    init.mkdir()
    (init / "config.json").write_text("{}")
    later = _spec(tmp_path, [{"name": "a", "model": "llama-xs", "tokens": 64},
                             {"name": "b", "model": "llama-s", "init": str(init), "tokens": 64}])
    with pytest.raises(CompTError, match=r"stages\[1\]\.init: only the first stage .* grown from 'a'"):
        load_chain(later)
    trained = _spec(tmp_path, [{"name": "a", "init": str(init), "tokens": 0}], tokenizer="train")
    with pytest.raises(CompTError, match=r"data.tokenizer: 'train' would give the init: model .* a tokenizer"):
        load_chain(trained)


def test_growth_fields_must_be_whole_numbers(tmp_path):
    from compt_scale.grow.targets import derive_target
    src = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128, "num_hidden_layers": 2, "rope_theta": 10000.0}
    grown = derive_target(src, overrides={"hidden_size": 128.0, "num_hidden_layers": "4", "rope_theta": 5e5})
    assert (grown["hidden_size"], grown["num_hidden_layers"], grown["rope_theta"]) == (128, 4, 5e5)
    for bad in ({"hidden_size": 100.5}, {"num_hidden_layers": "two"}, {"intermediate_size": True}):
        with pytest.raises(CompTError, match=f"{next(iter(bad))}: expected an integer"):
            derive_target(src, overrides=bad)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / "config.json").write_text(json.dumps(src))
    r = run_cli("grow", "--from", src_dir, "--set", "hidden_size=96.5", "--out", tmp_path / "g", check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "compt-scale: error: hidden_size: expected an integer, got 96.5"], r.stderr
    assert not (tmp_path / "g").exists()


def test_unwritable_checkpoints_dir_is_one_line(tmp_path):
    from compt_scale.train.checkpoint import check_writable
    (tmp_path / "stage").mkdir()
    check_writable(tmp_path / "stage" / "checkpoints")   # before the first save: probed beside it
    assert not (tmp_path / "stage" / "checkpoints").exists() and not list((tmp_path / "stage").iterdir())
    (tmp_path / "stage" / "checkpoints").write_text("a file where the dir should be")
    with pytest.raises(CompTError, match="cannot write checkpoints to .*checkpoints: not a directory"):
        check_writable(tmp_path / "stage" / "checkpoints")
    if os.geteuid() != 0:   # root writes regardless of permissions
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro" / "checkpoints").mkdir(mode=0o555)
        with pytest.raises(CompTError, match="Permission denied"):
            check_writable(tmp_path / "ro" / "checkpoints")


def test_a_finished_universal_conversion_is_reused(tmp_path):
    from compt_scale.train import world_size_resume as wsr
    # (A junk dir under that name is rebuilt: tests/test_world_size.py, with a real conversion.)
    ckpt = tmp_path / "checkpoints"
    done = ckpt / "global_step4_universal"
    done.mkdir(parents=True)
    (done / wsr.COMPLETE_MARKER).write_text("global_step4\n")
    assert wsr.convert_to_universal(ckpt, "global_step4", tmp_path / "conv.log") == done.name
