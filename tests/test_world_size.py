"""Resuming at another world size (a node lost: 2 -> 1 rank; or one more granted: 1 -> 2).

The checkpoint of the first run is converted to DeepSpeed's universal format, the global batch is
kept (grad_accum re-split), and the run continues with the steps, LR schedule and global samples
the uninterrupted run had. Oracles: the uninterrupted run's own per-step losses (an independent
run, at the first world size), and for the sample stream a seeded permutation computed here.

The interrupted run is the reference run's output rewound to its step-8 checkpoint (`latest` pointed
back, the newer checkpoint removed): exactly what a run killed between its saves at 8 and 12 leaves.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from compt_scale.chain.runner import stage_command
from compt_scale.config import TrainSpec
from compt_scale.data.packed import sample_indices
from compt_scale.errors import CompTError
from compt_scale.train.world_size_resume import SavedGeometry, needs_universal, read_geometry, resplit, write_geometry
from conftest import REPO, read_metrics, write_spec

STEPS, REWIND = 12, 8


def _stage(spec, out, nproc, resume):
    r = subprocess.run(stage_command(spec, "a", out, nproc, resume), cwd=REPO, capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return r


def _losses(stage_dir):
    recs = read_metrics(stage_dir)
    return {r["step"]: r for r in recs if "task_loss" in r}, [r for r in recs if r.get("final")]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("zero,before,after", [(2, 2, 1), (3, 1, 2)])
def test_resume_on_another_world_size_continues_the_run(tmp_path, tiny_data, zero, before, after):
    mb = 2
    global_batch = mb * 2   # 2 ranks x grad_accum 1, or 1 rank x grad_accum 2
    spec = write_spec(tmp_path / "w.yaml", [{"name": "a", "model": "llama-xs", "tokens": STEPS * global_batch * 32}],
                      data_dir=tiny_data, train={"zero_stage": zero, "micro_batch_size": mb,
                                                 "grad_accum": global_batch // (mb * before), "save_every": 4,
                                                 "log_every": 1, "eval_every": 1000, "warmup_steps": 2})
    ref = tmp_path / "ref"
    r = _stage(spec, ref, before, False)
    assert r.returncode == 0, r.stderr[-3000:]
    ref_steps, ref_final = _losses(ref / "a")
    assert sorted(ref_steps) == list(range(1, STEPS + 1))

    out = tmp_path / "out"
    shutil.copytree(ref, out)
    ckpts = out / "a" / "checkpoints"
    assert (ckpts / f"global_step{REWIND}").is_dir()
    if zero == 2:
        # A broken newest checkpoint (`latest` still names it): the older one is converted instead.
        states = sorted((ckpts / f"global_step{STEPS}").glob("*model_states.pt"))
        assert states
        states[0].write_bytes(states[0].read_bytes()[:100])
    else:
        shutil.rmtree(ckpts / f"global_step{STEPS}")
        (ckpts / "latest").write_text(f"global_step{REWIND}")
        # A junk converted copy (a conversion killed mid-way by an older version): rebuilt, not trusted.
        (ckpts / f"global_step{REWIND}_universal" / "zero").mkdir(parents=True)
    shutil.rmtree(out / "a" / "model")

    r = _stage(spec, out, after, True)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("[resume]")]
    # ZeRO's per-parameter collectives are deprecated in torch: filtered at the source, not per step.
    assert "all_gather_into_tensor" not in r.stderr and "reduce_scatter_tensor" not in r.stderr
    assert r.stderr.count("FutureWarning") <= 2, r.stderr.count("FutureWarning")
    if zero == 2:
        assert len(said) == 1 and f"global_step{STEPS}: conversion" in said[0] and \
            f"resuming from {ckpts / f'global_step{REWIND}'} instead" in said[0], said
    else:
        assert len(said) == 1 and "is incomplete" in said[0] and "rebuilding it" in said[0], said
    assert f"written on {before} ranks" in r.stdout and f"grad_accum {global_batch // (mb * after)}" in r.stdout, \
        r.stdout[-2000:]
    steps, final = _losses(out / "a")
    assert sorted(steps) == list(range(1, STEPS + 1))
    for s in range(1, REWIND + 1):   # kept from the first run, untouched
        assert steps[s] == ref_steps[s]
    for s in range(REWIND + 1, STEPS + 1):
        # Same weights, optimizer moments, LR and samples; only the reduction order differs.
        assert steps[s]["lr"] == pytest.approx(ref_steps[s]["lr"], rel=1e-9)
        assert steps[s]["task_loss"] == pytest.approx(ref_steps[s]["task_loss"], rel=2e-4), s
        assert steps[s]["tokens"] == ref_steps[s]["tokens"]
    assert final[0]["val_loss"] == pytest.approx(ref_final[0]["val_loss"], rel=2e-4)
    # The loss moved after the resume: a step-9 loss equal to step 8's would not test much.
    assert abs(steps[REWIND + 1]["task_loss"] - steps[REWIND]["task_loss"]) > 1e-3

    # The new checkpoint records the new geometry; the converted copy is gone; the export loads.
    run = json.loads((ckpts / f"global_step{STEPS}" / "run.json").read_text())
    assert run == {"world": after, "micro_batch": mb, "grad_accum": global_batch // (mb * after), "zero_stage": zero}
    assert not list(ckpts.glob("*universal*"))
    assert (out / "a" / "model" / "config.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert manifest["a"]["status"] == "done" and manifest["a"]["world_size"] == after


def test_global_sample_stream_is_independent_of_the_world_size():
    """Step s reads global samples s*G .. (s+1)*G-1 of the epoch's seeded permutation, however the
    G samples are split over ranks and micro-batches (oracle: the permutation, drawn here)."""
    n, seed, G = 37, 5, 8
    perm = np.concatenate([np.random.default_rng(seed + e).permutation(n) for e in range(4)])
    for world, mb in [(1, 8), (1, 2), (2, 2), (4, 2), (8, 1), (2, 4)]:
        ga = G // (world * mb)
        for step in range(10):
            got = sorted(i for m in range(ga) for r in range(world)
                         for i in sample_indices(n, seed, step, m, ga, mb, r, world))
            assert got == sorted(perm[step * G:(step + 1) * G].tolist()), (world, mb, step)


def test_geometry_record_and_resplit(tmp_path):
    train = TrainSpec(micro_batch_size=4, grad_accum=2)
    write_geometry(tmp_path, 8, train, 3)          # global batch 64
    saved = read_geometry(tmp_path, train)
    assert saved == SavedGeometry(8, 4, 2, 3) and saved.global_batch == 64
    assert resplit(saved, 8, train, tmp_path) is train
    assert resplit(saved, 4, train, tmp_path).grad_accum == 4
    assert resplit(saved, 16, train, tmp_path).grad_accum == 1
    with pytest.raises(CompTError, match="resume on a number of ranks that divides 16"):
        resplit(saved, 3, train, tmp_path)
    assert not needs_universal(saved, 8, 3)
    assert needs_universal(saved, 4, 3) and needs_universal(saved, 8, 2)
    with pytest.raises(CompTError, match="set train.zero_stage: 3"):
        needs_universal(saved, 8, 0)
    # A checkpoint from before run.json: the world its optimizer shards show, the stage unknown.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for r in range(2):
        (legacy / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    saved = read_geometry(legacy, train)
    assert saved == SavedGeometry(2, 4, 2, None)
    assert not needs_universal(saved, 2, 3) and needs_universal(saved, 1, 3)


@pytest.mark.dist
@pytest.mark.slow
def test_global_batch_that_does_not_split_is_one_line(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "w.yaml", [{"name": "a", "model": "llama-xs", "tokens": 4 * 2 * 32}],
                      data_dir=tiny_data, train={"zero_stage": 1, "micro_batch_size": 1, "save_every": 2})
    out = tmp_path / "out"
    assert _stage(spec, out, 2, False).returncode == 0
    ckpts = sorted(p.name for p in (out / "a" / "checkpoints").iterdir())
    # Global batch 2 (1 x 1 x 2 ranks) with micro-batches of 3 cannot be re-split over 1 rank.
    spec3 = write_spec(tmp_path / "w3.yaml", [{"name": "a", "model": "llama-xs", "tokens": 4 * 2 * 32}],
                       data_dir=tiny_data, train={"zero_stage": 1, "micro_batch_size": 3, "save_every": 2})
    r = _stage(spec3, out, 1, True)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "global batch of 2 samples" in last and "micro-batches of 3" in last, last
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / "a" / "checkpoints").iterdir()) == ckpts
