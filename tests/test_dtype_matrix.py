"""bf16 through every path a stage can take: a scratch first stage, an `init:` dir saved in fp32 or
in bf16 (used as-is or trained), a stage grown from it with clone + zero, IFD on and off, ZeRO 0/1/2/3,
on 1 rank (all cases in one process) and on 2 ranks (all cases in one torchrun launch).

Per case: every stage finishes; the grown student's first task loss equals its teacher's loss on the
same global batch, computed here with plain transformers in fp32 from the teacher's saved weights (the
oracle; the student computes in bf16, hence the tolerance); every trained stage's export is bf16, in
config.json and in every safetensors tensor. fp16: DeepSpeed's CPU accelerator has none, so a spec
asking for it stops at load time with one line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from dtype_matrix import MICRO_BATCH, SEQ, save_init_dir, write_case
from safetensors import safe_open

from compt_scale.train.distributed import free_port
from conftest import REPO, first_batch_loss, run_cli, write_spec

# bf16 keeps 8 significant bits: the student's bf16 forward and its weights rounded to bf16 (an fp32
# init dir) moved the first loss by <= 0.005 (measured, 1 rank). The init dirs' teachers are trained
# (dtype_matrix.save_init_dir), so a student that lost their function is far off; an untrained
# scratch teacher (2 steps) sits near any random model's loss: there the check is weaker.
LOSS_TOL = 0.03


def export_dtypes(model_dir: Path) -> set[str]:
    """The config's dtype and the dtype of every tensor in the export's safetensors."""
    raw = json.loads((model_dir / "config.json").read_text())
    found = {str(raw.get("torch_dtype", raw.get("dtype")))}
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            found |= {sf.get_slice(k).get_dtype() for k in sf.keys()}  # noqa: SIM118 (not a dict)
    return found


def run_matrix(tmp_path: Path, tiny_data: Path, world: int, cases: list[tuple]) -> list[dict]:
    tok_dir = tiny_data / "tokenizer"
    init_dirs = {"fp32": save_init_dir(tmp_path / "init-fp32", tok_dir, torch.float32),
                 "bf16": save_init_dir(tmp_path / "init-bf16", tok_dir, torch.bfloat16)}
    written = [write_case(tmp_path, f"r{world}-z{zero}-{first}-{'ifd' if ifd else 'noifd'}", first, zero, ifd,
                          world, tiny_data, init_dirs) for first, zero, ifd in cases]
    (tmp_path / "cases.json").write_text(json.dumps(written))
    cmd = [sys.executable]
    if world > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    cmd += [str(REPO / "tests" / "dtype_matrix.py"), str(tmp_path / "cases.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return written


def check_case(case: dict) -> dict:
    out = Path(case["out"])
    man = json.loads((out / "manifest.json").read_text())["stages"]
    assert [man[n]["status"] for n in ("a", "b")] == ["done", "done"], (case["name"], man)
    assert man["b"]["zero_stage"] == case["zero"] and man["b"]["world_size"] == case["world"], case["name"]
    assert man["b"]["teacher"] == "a"
    first = json.loads((out / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert (first["ifd_loss"] > 0) == case["ifd"], (case["name"], first)
    spec = yaml.safe_load(Path(case["spec"]).read_text())
    data_dir = Path(spec["data"]["cache_dir"])
    oracle = first_batch_loss(out / "a" / "model", data_dir, case["world"], MICRO_BATCH, SEQ)
    assert first["task_loss"] == pytest.approx(oracle, abs=LOSS_TOL), (case["name"], first["task_loss"], oracle)
    trained = ["a", "b"] if spec["stages"][0]["tokens"] > 0 else ["b"]
    for stage in trained:
        assert export_dtypes(out / stage / "model") == {"bfloat16", "BF16"}, (case["name"], stage)
    return {"case": case["name"], "student_first_loss": first["task_loss"], "teacher_loss": oracle}


def test_bf16_matrix_one_rank_one_process(tmp_path, tiny_data):
    cases = [("scratch", 0, True), ("init-fp32", 1, False), ("init-bf16", 2, True), ("init-fp32-trained", 3, True)]
    results = [check_case(c) for c in run_matrix(tmp_path, tiny_data, 1, cases)]
    print(json.dumps(results, indent=1))


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.dist
def test_bf16_matrix_two_ranks_one_launch(tmp_path, tiny_data):
    cases = [("scratch", 3, True), ("init-bf16", 3, False), ("init-fp32-trained", 2, True), ("init-fp32", 1, True),
             ("scratch", 0, False)]
    results = [check_case(c) for c in run_matrix(tmp_path, tiny_data, 2, cases)]
    print(json.dumps(results, indent=1))


def test_fp16_is_one_line_at_load(tmp_path, tiny_data):
    """DeepSpeed's CPU accelerator has no fp16 (mkldnn fp16 absent): the spec is refused before any
    set-up, with one line, exit 2, nothing written."""
    spec = write_spec(tmp_path / "fp16.yaml", [{"name": "a", "model": "llama-xs", "tokens": 256}],
                      data_dir=tiny_data, train={"precision": "fp16"})
    for cmd in (("plan", spec), ("chain", spec, "--out", tmp_path / "out")):
        proc = run_cli(*cmd, check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("compt-scale: error: ") and "fp16" in lines[0], lines
    assert not (tmp_path / "out").exists()
