"""Shared fixtures: one tiny prepared corpus per test session, and spec writing helpers."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

# The SLURM cluster fixtures (session-scoped: one cluster for the whole run).
pytest_plugins = ["slurm_cluster"]

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds a small CPU comm op on first use; a cache per checkout keeps checkouts with
# different torch builds from rebuilding each other's copy in every stage process.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
# SLURM jobs build into a fresh dir per job id unless told of a pre-built one (stage.sbatch): on a
# busy 2-core box that build takes minutes per job, so the test jobs share the checkout's cache.
os.environ.setdefault("COMPT_TORCH_EXTENSIONS_DIR", os.environ["TORCH_EXTENSIONS_DIR"])
TINY_DATA = {"vocab_size": 512, "seq_len": 32, "max_chars": 300_000}
TINY_TRAIN = {"micro_batch_size": 4, "eval_every": 5, "eval_batches": 2, "save_every": 5, "log_every": 1,
              "warmup_steps": 2, "lr": 3.0e-3}


def pytest_collection_modifyitems(items):
    """Every test that uses the SLURM cluster is a `slurm` test, marked or not."""
    for item in items:
        if {"slurm_cluster", "slurm_two_nodes"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared data dir (SentencePiece tokenizer + packed memmaps) built once from the stdlib corpus."""
    from compt_scale.config import TextDataSpec
    from compt_scale.data.packed import prepare_data
    return prepare_data(TextDataSpec(**TINY_DATA), tmp_path_factory.mktemp("data") / "data")


def write_spec(path: Path, stages, data_dir: Path | None = None, **top) -> Path:
    spec = {"name": path.stem, "seed": 0, "data": dict(TINY_DATA), "train": dict(TINY_TRAIN), "stages": stages}
    if data_dir is not None:
        spec["data"]["cache_dir"] = str(data_dir)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k].update(v)
        else:
            spec[k] = v
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(*args, check=True, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`compt-scale ARGS` in a fresh process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "compt_scale.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"compt-scale {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_ranks(script: Path, *args, world: int = 2, timeout: int = 240) -> None:
    """`script ARGS` on `world` CPU ranks under torch.distributed.run (gloo, one thread each, a free
    port); fails the test with the tail of its output unless every rank exits 0."""
    from compt_scale.train.distributed import free_port
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
                        *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])


def cli_in_process(*args, check=True, env=None) -> subprocess.CompletedProcess:
    """`compt-scale ARGS` run in this process, as from the repo root: the same parser and command as
    the console script, without a fresh interpreter importing torch and transformers per call (~9 s
    each). For commands that train nothing (slurm, plan); run_cli keeps the console script covered."""
    from compt_scale.cli import main
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        mp.chdir(REPO)
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:   # argparse's own errors, as the console script would exit
            code = e.code if isinstance(e.code, int) else 1
    proc = subprocess.CompletedProcess(["compt-scale", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"compt-scale {' '.join(map(str, args))} exited {code}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def first_batch_loss(model_dir: Path, data_dir: Path, world: int, micro_batch: int, seq_len: int) -> float:
    """The oracle for a grown or init: stage's first loss: plain transformers in fp32 on the saved
    model, step 1's global batch (the logged loss is the mean of the ranks' micro-batch losses)."""
    import torch
    from transformers import AutoModelForCausalLM

    from compt_scale.data.packed import PackedTokens, sample_indices
    train = PackedTokens(data_dir, "train", seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = []
    for rank in range(world):
        x, y = train.batch(sample_indices(len(train), 0, 0, 0, 1, micro_batch, rank, world))
        with torch.no_grad():
            logits = model(input_ids=x).logits
        losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item())
    return sum(losses) / world


# ---------------------------------------------------------------- metrics.jsonl readers
def read_metrics(stage_dir: Path) -> list[dict]:
    """The stage's metric records; a missing file or a line torn by a kill mid-write is skipped
    (tests poll this file while the stage writes it)."""
    try:
        lines = (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            pass
    return out


def train_losses(stage_dir: Path) -> dict:
    return {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(stage_dir) if "loss" in r}


def reference_losses(spec: Path, out: Path, steps: int, stage: str = "a") -> dict:
    """The uninterrupted run a resumed one is compared with: `stage` of `spec` in one go; its losses
    by step, every step of 1..steps present."""
    run_cli("stage", spec, "--stage", stage, "--out", out)
    ref = train_losses(out / stage)
    assert sorted(ref) == list(range(1, steps + 1))
    return ref


def last_step(stage_dir: Path) -> int:
    return max((r.get("step", 0) for r in read_metrics(stage_dir)), default=0)
