"""Run a whole chain locally: each stage is its own launch (one process, or torchrun with nproc ranks),
exactly what a SLURM job would run, so local and cluster runs share one code path.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..config import ChainSpec
from ..errors import CompTError
from ..train.distributed import free_port
from .manifest import Manifest

SPEC_COPY = "chain.yaml"


def stage_command(spec_path: Path, name: str, out: Path, nproc: int, resume: bool) -> list[str]:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += ["-m", "compt_scale.cli", "stage", str(spec_path), "--stage", name, "--out", str(out)]
    return cmd + (["--resume"] if resume else [])


def prepare_out(spec: ChainSpec, spec_path: Path, out: Path, resume: bool) -> Path:
    """Check the output dir and keep a copy of the spec next to the results."""
    if out.exists() and not out.is_dir():
        raise CompTError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the dir should be, a read-only or full filesystem
        raise CompTError(f"--out {out}: cannot create the output directory: {e.strerror}") from None
    for s in spec.stages + spec.baselines:
        # An empty stage dir is what a stage that failed during set-up leaves: it holds nothing to keep.
        if (out / s.name).is_dir() and not any((out / s.name).iterdir()):
            (out / s.name).rmdir()
    existing = [s.name for s in spec.stages + spec.baselines if (out / s.name).exists()]
    if existing and not resume:
        raise CompTError(f"{out} already holds stage output ({', '.join(existing)}); pass --resume or use a new --out")
    copy = out / SPEC_COPY
    if Path(spec_path).resolve() != copy.resolve():
        shutil.copy(spec_path, copy)
    Manifest(out).init(spec)
    return copy


def run_chain(spec: ChainSpec, spec_path: Path, out: Path, resume: bool = False,
              include_baselines: bool = True, nproc: int | None = None) -> None:
    out = Path(out)
    prepare_out(spec, spec_path, out, resume)
    manifest = Manifest(out)
    nproc = nproc or spec.nproc
    stages = spec.stages + (spec.baselines if include_baselines else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for stage in stages:
        if manifest.is_done(stage.name):
            print(f"[chain] {stage.name}: done, skipped", flush=True)
            continue
        # A stage re-run after an interruption continues from its own checkpoints.
        again = resume and (out / stage.name / "checkpoints").exists()
        cmd = stage_command(spec_path, stage.name, out, nproc, again)
        print(f"[chain] {stage.name}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            err = manifest.stage(stage.name).get("error") or f"exit code {rc}"
            if manifest.stage(stage.name).get("status") != "failed":
                manifest.update_stage(stage.name, status="failed", error=err)
            raise CompTError(f"stage {stage.name} failed: {err}")
