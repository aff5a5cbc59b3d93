"""SLURM: render one sbatch script per chain stage, submit them linked by afterok, report their state.

Scripts come from the template slurm/stage.sbatch ({{placeholders}} filled here) and are written to
<out>/slurm/<stage>.sbatch; job logs go to <out>/slurm/<stage>-<jobid>.out (appended across
requeues). Job ids are recorded in <out>/manifest.json (status "submitted", job_id).

Re-running the submitter is safe: a stage whose manifest status is "done" is skipped (its successor
gets no dependency), a stage whose job is still queued or running is kept (its successor depends on
that job), and anything else (failed, never started because a predecessor failed, job vanished) is
submitted again, after cancelling a leftover job that could never start. Once one stage is submitted
anew, every later stage is too (an old job would wait on the replaced one).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

from ..chain.manifest import Manifest
from ..errors import EXIT_PREEMPTED, CompTError
from ..resources import resource

TEMPLATE = resource("slurm", "stage.sbatch")
# States in which a job still has a future (it will run, or is running). A job pending on a
# dependency that can never be satisfied has none, whatever its state says.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
NEVER = "DependencyNeverSatisfied"


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 0               # 0: no GPU request (CPU ranks, e.g. the test cluster)
    nproc_per_node: int | None = None    # default: gpus_per_node, or the spec's nproc without GPUs
    partition: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None     # default: CPUS_PER_GPU_RANK per rank with GPUs, 1 per CPU rank
    mem: str | None = None               # default: "0" (all of the node's memory) when exclusive
    account: str | None = None
    exclusive: bool | None = None        # default: whole nodes when GPUs are requested
    warn_seconds: int | str = 300        # USR1 this long before the end; "auto": from the checkpoint size
    nodes_per_stage: dict[str, int] = field(default_factory=dict)
    time_per_stage: dict[str, str] = field(default_factory=dict)
    sbatch_args: list[str] = field(default_factory=list)   # extra "#SBATCH <arg>" lines
    env: list[str] = field(default_factory=list)           # extra "export K=V" lines
    python: str = sys.executable


def parse_per_stage(text: str | None, what: str, cast=str) -> dict:
    """`s1=1,s2=4` -> {"s1": 1, "s2": 4}; errors name the flag."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise CompTError(f"--{what}: expected name=value[,name=value...], got {item!r}")
        try:
            out[name.strip()] = cast(value.strip())
        except ValueError:
            raise CompTError(f"--{what}: bad value {value!r} for stage {name!r}") from None
    return out


# Defaults for GPU jobs (documented in slurm/README.md): a data-loading/launcher share of cores per
# GPU rank that every common 4/8-GPU node has, and the node to ourselves (no neighbour's job
# competing for PCIe, NICs and memory bandwidth while NCCL runs).
CPUS_PER_GPU_RANK = 4
# `--warn-seconds auto`: time to write one checkpoint (fp32 master weights + Adam moments, 12 bytes,
# plus the weights in the training dtype) at an assumed write rate per node, plus a margin for the
# step in flight, the all-rank agreement and the requeue. Conservative for a parallel filesystem.
WRITE_BYTES_PER_S_PER_NODE = 500e6
WARN_MARGIN_S = 180
MAX_SIGNAL_S = 65535       # sbatch --signal=...@TIME takes at most this
# What may appear inside an #SBATCH line: sbatch splits those lines itself (no shell quoting), and
# expands %-patterns in file names, so paths and values are held to a plain character set.
SAFE_DIRECTIVE = re.compile(r"[A-Za-z0-9_./+,@:=~-]*")


def slurm_seconds(text: str, what: str = "--time") -> int:
    """SLURM time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise CompTError(f"{what}: not a SLURM time limit (e.g. 90, 12:00:00, 2-00:00:00): {text!r}")
    d, b, c = (int(x) if x else None for x in m.group(1, 3, 4))
    a = int(m.group(2))   # the one group the pattern always has
    if d is not None:   # D-HH[:MM[:SS]]
        return ((d * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if b is not None and c is not None:   # HH:MM:SS (the pattern fills group 3 before group 4)
        return (a * 60 + b) * 60 + c
    return a * 60 + (b or 0)   # MM or MM:SS


def auto_warn_seconds(n_params: int, precision: str, nodes: int) -> int:
    ckpt_bytes = n_params * (12 + (2 if precision == "bf16" else 4))
    return int(WARN_MARGIN_S + -(-ckpt_bytes // (WRITE_BYTES_PER_S_PER_NODE * nodes)))


def warn_seconds_for(spec, stage: str, opts: SlurmOptions) -> int:
    if opts.warn_seconds != "auto":
        return int(opts.warn_seconds)
    from ..chain.plan import plan_stage
    plan = plan_stage(spec, stage)
    return auto_warn_seconds(plan.params, plan.train.precision, opts.nodes_per_stage.get(stage, opts.nodes))


def _check(spec, opts: SlurmOptions, out: Path) -> None:
    names = {s.name for s in spec.stages + spec.baselines}
    for flag, table in (("nodes-per-stage", opts.nodes_per_stage), ("time-per-stage", opts.time_per_stage)):
        for name in table:
            if name not in names:
                raise CompTError(f"--{flag}: no stage named {name!r} (stages: {', '.join(sorted(names))})")
    for n in [opts.nodes, *opts.nodes_per_stage.values()]:
        if n < 1:
            raise CompTError(f"--nodes: must be >= 1, got {n}")
    if opts.gpus_per_node < 0 or (opts.nproc_per_node is not None and opts.nproc_per_node < 1):
        raise CompTError("--gpus-per-node must be >= 0 and --nproc-per-node >= 1")
    for what, path_text in (("--out", str(out)), ("working directory", str(Path.cwd()))):
        if not SAFE_DIRECTIVE.fullmatch(path_text):  # it goes into --output= / --chdir= lines
            raise CompTError(f"{what}: SLURM directives cannot hold this path (use letters, digits and "
                             f"._-/+,@:=~ only): {path_text!r}")
    for flag, value in (("--partition", opts.partition), ("--time", opts.time), ("--mem", opts.mem),
                        ("--account", opts.account), *(("--time-per-stage", t) for t in opts.time_per_stage.values())):
        if value is not None and not SAFE_DIRECTIVE.fullmatch(str(value)):
            raise CompTError(f"{flag}: {value!r} cannot go into an #SBATCH line (letters, digits, ._-/+,@:=~)")
    for a in opts.sbatch_args:
        if not a.startswith("-") or re.search(r"[\r\n]", a):
            raise CompTError(f"--sbatch-arg: expected one sbatch option on one line, got {a!r}")
    if opts.cpus_per_task is not None and opts.cpus_per_task < 1:
        raise CompTError(f"--cpus-per-task: must be >= 1, got {opts.cpus_per_task}")
    for t in [opts.time] if opts.time else []:
        slurm_seconds(t, "--time")
    for t in opts.time_per_stage.values():
        slurm_seconds(t, "--time-per-stage")
    w = opts.warn_seconds
    if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= MAX_SIGNAL_S):
        raise CompTError(f"--warn-seconds: must be 'auto' or whole seconds in 1..{MAX_SIGNAL_S}, got {w!r}")
    for e in opts.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e, re.DOTALL):
            raise CompTError(f"--env: expected NAME=VALUE, got {e!r}")


def render_stage(spec, stage: str, out: Path, opts: SlurmOptions) -> str:
    """The sbatch script text for one stage."""
    out = Path(out).resolve()
    nodes = opts.nodes_per_stage.get(stage, opts.nodes)
    time_limit = opts.time_per_stage.get(stage, opts.time)
    nproc = opts.nproc_per_node or opts.gpus_per_node or spec.nproc
    exclusive = bool(opts.gpus_per_node) if opts.exclusive is None else opts.exclusive
    cpus = opts.cpus_per_task or nproc * (CPUS_PER_GPU_RANK if opts.gpus_per_node else 1)
    mem = opts.mem if opts.mem is not None else ("0" if exclusive else None)
    warn = warn_seconds_for(spec, stage, opts)
    limit_s = slurm_seconds(time_limit, "--time") if time_limit else None
    if not 0 < warn <= MAX_SIGNAL_S or (limit_s is not None and warn >= limit_s):
        raise CompTError(f"--warn-seconds: {warn} s for stage {stage} is not in 1..{MAX_SIGNAL_S} or not less "
                         f"than its time limit ({limit_s} s); give a longer --time or a shorter --warn-seconds")
    d = [f"--job-name=compt-{spec.name}-{stage}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if opts.gpus_per_node:
        d.append(f"--gpus-per-node={opts.gpus_per_node}")
    if exclusive:
        d.append("--exclusive")
    for flag, value in (("cpus-per-task", cpus), ("partition", opts.partition),
                        ("time", time_limit), ("mem", None if mem == "none" else mem), ("account", opts.account)):
        if value is not None and value != "":
            d.append(f"--{flag}={value}")
    d += [f"--output={out}/slurm/{stage}-%j.out",
          "--open-mode=append",                     # a requeued attempt continues the same log
          "--requeue",
          f"--signal=B:USR1@{warn}",                # B: only this script; it forwards (see below)
          f"--chdir={Path.cwd()}"]
    d += opts.sbatch_args
    for x in d:   # the last line of defence: nothing rendered may end an #SBATCH line early
        if re.search(r"[\r\n]", x):
            raise CompTError(f"sbatch option {x!r}: contains a line break")
    fill = {
        "directives": "\n".join(f"#SBATCH {x}" for x in d),
        "python": shlex.quote(opts.python),
        "spec": shlex.quote(str(spec.source)),
        "out": shlex.quote(str(out)),
        "stage": shlex.quote(stage),
        "nproc_per_node": str(nproc),
        "warn_seconds": str(warn),
        "exit_preempted": str(EXIT_PREEMPTED),
        "srun_gpus": f"--gpus-per-node={opts.gpus_per_node}" if opts.gpus_per_node else "",
        "env": "\n".join(f"export {k}={shlex.quote(v)}" for k, _, v in (e.partition("=") for e in opts.env)),
    }
    text = TEMPLATE.read_text()
    for k, v in fill.items():
        text = text.replace("{{" + k + "}}", v)
    left = re.findall(r"\{\{(\w+)\}\}", text)
    assert not left, f"unfilled template placeholders: {left}"
    return text


def stage_names(spec, baselines: bool = False) -> list[str]:
    return [s.name for s in spec.stages] + ([s.name for s in spec.baselines] if baselines else [])


def write_scripts(spec, out: Path, opts: SlurmOptions, baselines: bool = False) -> dict[str, Path]:
    out = Path(out).resolve()
    if spec.source is None:
        raise CompTError("the chain spec must come from a file (the jobs re-read it)")
    _check(spec, opts, out)
    texts = {name: render_stage(spec, name, out, opts) for name in stage_names(spec, baselines)}  # all or none
    (out / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM will not create the log dir
    paths = {}
    for name, text in texts.items():
        p = out / "slurm" / f"{name}.sbatch"
        p.write_text(text)
        p.chmod(0o755)
        paths[name] = p
    return paths


# ---------------------------------------------------------------- talking to SLURM

def _slurm(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise CompTError(f"{args[0]}: not found; is this a SLURM login node?") from None


def job_info(job_id: str | None) -> dict | None:
    """What SLURM knows of a job ({} keys JobState, Reason, ...), None if unknown. `scontrol` first
    (all fields), then `squeue` (live jobs), then `sacct` (finished jobs scontrol has forgotten)."""
    if not job_id:
        return None
    r = _slurm("scontrol", "show", "job", "-o", str(job_id))
    if r.returncode == 0 and "JobState=" in r.stdout:
        info: dict[str, str] = {}
        for tok in r.stdout.split():
            k, _, v = tok.partition("=")
            info.setdefault(k, v)
        return info
    q = _slurm_optional("squeue", "-h", "-j", str(job_id), "-o", "%T|%r")
    if q is not None and q.returncode == 0 and q.stdout.strip():
        state, _, reason = q.stdout.strip().splitlines()[0].partition("|")
        return {"JobState": state.strip(), "Reason": reason.strip() or "None"}
    q = _slurm_optional("sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,ExitCode")
    if q is not None and q.returncode == 0 and q.stdout.strip():
        state, _, code = q.stdout.strip().splitlines()[0].partition("|")
        # sacct says e.g. "CANCELLED by 0"
        return {"JobState": state.split()[0] if state.strip() else "UNKNOWN", "ExitCode": code, "Reason": "None"}
    return None


def _slurm_optional(*args: str) -> subprocess.CompletedProcess | None:
    """A query some clusters lack (no accounting: sacct fails); None instead of an error."""
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None


def _alive(info: dict | None) -> TypeGuard[dict]:
    return bool(info and info.get("JobState") in ACTIVE_STATES and info.get("Reason") != NEVER)


def submit(spec, out: Path, scripts: dict[str, Path], log=print) -> dict[str, str | None]:
    """Submit the stages in chain order, each `--dependency=afterok:<previous job>`; returns
    {stage: job id or None when skipped as done}. Baselines (if scripted) go without dependencies."""
    out = Path(out).resolve()
    m = Manifest(out)
    m.init(spec)
    jobs: dict[str, str | None] = {}
    prev = None
    resubmitted = False   # once a chain stage is (re)submitted, later ones must follow the new job
    for name in scripts:
        chain = spec.is_chain_stage(name)
        rec = m.stage(name)
        if rec.get("status") == "done":
            log(f"{name}: done, skipped")
            jobs[name] = None
            prev = None if chain else prev
            continue
        # Whatever the manifest says (a SIGTERM'd attempt may have written "failed" while SLURM requeues
        # it), a recorded job that is still queued or running is never submitted a second time.
        info = job_info(rec.get("job_id"))
        if _alive(info) and not (chain and resubmitted):
            log(f"{name}: job {rec['job_id']} already {info['JobState'].lower()}, kept")
            jobs[name] = rec["job_id"]
            prev = rec["job_id"] if chain else prev
            continue
        if info and info.get("JobState") in ACTIVE_STATES:
            # Pending forever (its dependency failed), or waiting on a job replaced above: clear it.
            _slurm("scancel", str(rec["job_id"]))
            log(f"{name}: cancelled stale job {rec['job_id']}")
        cmd = ["sbatch", "--parsable"]
        if chain and prev:
            cmd.append(f"--dependency=afterok:{prev}")
        r = _slurm(*cmd, str(scripts[name]))
        if r.returncode != 0:
            raise CompTError(f"sbatch failed for stage {name}: {r.stderr.strip() or r.stdout.strip()}")
        job = r.stdout.strip().split(";")[0]   # --parsable prints "jobid[;cluster]"
        m.update_stage(name, status="submitted", job_id=job, error=None,
                       slurm_script=str(scripts[name].relative_to(out)))
        after = f" (after job {prev})" if chain and prev else ""
        log(f"{name}: submitted job {job}{after}")
        jobs[name] = job
        prev = job if chain else prev
        resubmitted = resubmitted or chain
    return jobs


def status_lines(spec, out: Path) -> list[str]:
    """One line per stage: manifest status, job, SLURM's view, error. A stage pending on a dependency
    that can never be satisfied is reported as never started, naming the stage that failed."""
    m = Manifest(out).read().get("stages", {})
    lines, failed = [], None
    for s in spec.stages + spec.baselines:
        rec = m.get(s.name, {})
        st, job = rec.get("status", "pending"), rec.get("job_id")
        info = job_info(job) if job else None
        slurm = f"{info['JobState']}" + (f" ({info['Reason']})" if info.get("Reason", "None") != "None" else "") \
            if info else ("-" if not job else "gone from scontrol")
        line = f"{s.name:<16} {st:<10} job {job or '-':<8} slurm {slurm}"
        if st == "failed":
            failed = failed or s.name
            line += f"  error: {rec.get('error') or '?'}"
        elif info and info.get("Reason") == NEVER:
            line += f"  never started: its dependency failed (stage {failed or '?'})"
        lines.append(line)
    return lines
