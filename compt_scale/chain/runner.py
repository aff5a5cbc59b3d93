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
from .lock import HEARTBEAT_SECONDS, OutLock, busy_error, live_holder
from .manifest import Manifest

SPEC_COPY = "chain.yaml"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def stage_command(spec_path: Path, name: str, out: Path, nproc: int, resume: bool) -> list[str]:
    cmd = [sys.executable]
    if nproc > 1:
        # Our torchrun wrapper: forwards USR1 and keeps exit code 99 (preempted) instead of 1.
        cmd += ["-m", "compt_scale.launch.torchrun", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += ["-m", "compt_scale.cli", "stage", str(spec_path), "--stage", name, "--out", str(out)]
    return cmd + (["--resume"] if resume else [])


def make_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CompTError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the dir should be, a read-only or full filesystem
        raise CompTError(f"--out {out}: cannot create the output directory: {e.strerror}") from None


def prepare_out(spec: ChainSpec, spec_path: Path, out: Path, resume: bool) -> Path:
    """Check the output dir and keep a copy of the spec next to the results."""
    make_out_dir(out)
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
    make_out_dir(out)
    # One chain per --out, taken before anything is written there (a second one changes nothing).
    out_lock = OutLock(out).acquire()
    try:
        with ChainSignals() as signals:
            _run_stages(spec, spec_path, out, resume, include_baselines, nproc, signals, out_lock)
    finally:
        out_lock.release()


def _run_stages(spec, spec_path, out, resume, include_baselines, nproc, signals, out_lock) -> None:
    prepare_out(spec, spec_path, out, resume)
    manifest = Manifest(out)
    nproc = nproc or spec.nproc
    stages = spec.stages + (spec.baselines if include_baselines else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for stage in stages:
        signals.stop_if_received("before stage " + stage.name)
        re_export = manifest.is_done(stage.name) and needs_re_export(out, stage.name)
        if manifest.is_done(stage.name) and not re_export:
            print(f"[chain] {stage.name}: done, skipped", flush=True)
            continue
        holder = live_holder(out / stage.name)
        if holder is not None:
            raise busy_error(out / stage.name, holder)
        before = manifest.stage(stage.name)
        # A stage re-run after an interruption continues from its own checkpoints.
        again = resume and (out / stage.name / "checkpoints").exists()
        cmd = stage_command(spec_path, stage.name, out, nproc, again)
        print(f"[chain] {stage.name}: {' '.join(cmd[1:])}", flush=True)
        rc = signals.run(cmd, env, out_lock)
        after = manifest.stage(stage.name)
        if rc == EXIT_PREEMPTED:
            print(f"[chain] {stage.name}: preempted, checkpoint kept; continue with `chain --resume`",
                  file=sys.stderr, flush=True)
            raise SystemExit(EXIT_PREEMPTED)
        if after.get("status") == "done":
            if re_export:   # the re-run only exported: the record keeps the training's own time
                manifest.update_stage(stage.name, seconds=before.get("seconds"))
            signals.stop_if_received(f"after stage {stage.name} finished")
            continue
        if signals.received:   # stopped by the signal before it could checkpoint: resumable
            if after.get("status") in ("running", "pending", "preempted"):
                manifest.update_stage(stage.name, status="preempted")
            signals.stop_if_received(f"during stage {stage.name} (exit {rc})")
        err = after.get("error") or f"exit code {rc}"
        # Not over a live run's record (a stage started by hand meanwhile) nor a failure it recorded.
        if after.get("status") != "failed" and live_holder(out / stage.name) is None:
            manifest.update_stage(stage.name, status="failed", error=err)
        raise CompTError(f"stage {stage.name} failed: {err}")


def needs_re_export(out: Path, name: str) -> bool:
    """A finished stage whose export was deleted: re-exported from its last checkpoint (`stage
    --resume` at the last step trains nothing, evaluates and exports), else one line."""
    if (out / name / "model").is_dir():
        return False
    from ..train.checkpoint import candidates
    if not candidates(out / name / "checkpoints"):
        raise CompTError(f"stage {name}: its export {out / name / 'model'} is missing and it has no "
                         f"checkpoint to re-export from; run the chain again in a new --out")
    print(f"[chain] {name}: done, but its export {out / name / 'model'} is missing: re-exporting it "
          f"from its last checkpoint", file=sys.stderr, flush=True)
    return True


class ChainSignals:
    """SIGTERM/SIGINT/SIGUSR1/SIGHUP to `chain`, for its whole run: forwarded to the running stage (it
    checkpoints and exits 99; SIGHUP goes as SIGTERM: the stage runs in its own session, so a closed
    terminal would otherwise leave it training on, orphaned) and remembered, so that a signal that
    lands after a stage's last step, or between stages, still stops the chain with exit 99 before the
    next stage (the finished stage stays done; `chain --resume` continues)."""

    def __init__(self):
        self.received: str | None = None
        self.child: subprocess.Popen | None = None

    def __enter__(self) -> ChainSignals:
        self.old = {sig: signal.signal(sig, self._handler) for sig in FORWARDED}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        if self.child is not None and self.child.poll() is None:
            try:
                self.child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
            except ProcessLookupError:
                pass

    def run(self, cmd: list[str], env: dict, out_lock) -> int:
        """Run a stage child and wait for it (never leaving it orphaned), keeping --out's lock fresh."""
        # Its own session: a terminal's Ctrl-C reaches the child once, through us (a second SIGINT
        # would mean "stop now, no checkpoint" to it).
        self.stop_if_received("before the next stage")   # none is started once a signal came
        self.child = subprocess.Popen(cmd, env=env, start_new_session=True)
        if self.received:   # arrived while it was being started
            self._handler(signal.Signals[self.received], None)
        try:
            while True:
                try:
                    return self.child.wait(timeout=HEARTBEAT_SECONDS)
                except subprocess.TimeoutExpired:
                    out_lock.heartbeat()
        finally:
            self.child = None

    def stop_if_received(self, when: str) -> None:
        if self.received:
            print(f"[chain] {self.received} {when}: stopping here (exit {EXIT_PREEMPTED}); continue with "
                  f"`chain --resume`", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_PREEMPTED)

