"""Run a whole chain locally: each stage is its own launch (one process, or torchrun with nproc ranks),
exactly what a SLURM job would run, so local and cluster runs share one code path.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..config import ChainSpec
from ..errors import EXIT_PREEMPTED, CompTError
from ..train.distributed import free_port
from .lock import busy_error, live_holder
from .manifest import Manifest

SPEC_COPY = "chain.yaml"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def stage_command(spec_path: Path, name: str, out: Path, nproc: int, resume: bool) -> list[str]:
    cmd = [sys.executable]
    if nproc > 1:
        # Our torchrun wrapper: forwards USR1 and keeps exit code 99 (preempted) instead of 1.
        cmd += ["-m", "compt_scale.launch.torchrun", "--nproc_per_node", str(nproc),
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
        holder = live_holder(out / stage.name)
        if holder is not None:
            raise busy_error(out / stage.name, holder)
        # A stage re-run after an interruption continues from its own checkpoints.
        again = resume and (out / stage.name / "checkpoints").exists()
        cmd = stage_command(spec_path, stage.name, out, nproc, again)
        print(f"[chain] {stage.name}: {' '.join(cmd[1:])}", flush=True)
        rc = run_forwarding_signals(cmd, env)
        if rc == EXIT_PREEMPTED:
            print(f"[chain] {stage.name}: preempted, checkpoint kept; continue with `chain --resume`",
                  file=sys.stderr, flush=True)
            raise SystemExit(EXIT_PREEMPTED)
        if rc != 0:
            err = manifest.stage(stage.name).get("error") or f"exit code {rc}"
            if manifest.stage(stage.name).get("status") != "failed":
                manifest.update_stage(stage.name, status="failed", error=err)
            raise CompTError(f"stage {stage.name} failed: {err}")


def run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run a stage child; SIGTERM/SIGINT/SIGUSR1 to us go to it (it checkpoints and exits 99) and we
    wait for it, so stopping `chain` never leaves an orphaned stage training on."""
    # Its own session: a terminal's Ctrl-C reaches the child once, through us (a second SIGINT would
    # mean "stop now, no checkpoint" to it).
    child = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return child.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
