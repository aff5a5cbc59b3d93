"""`demo`, `chain` and `stage` subcommands."""
from __future__ import annotations

from pathlib import Path

from ..resources import CHAINS, resource

DEMO_SPEC = resource(CHAINS, "demo.yaml")
DEMO_SPECS = {"hf_decoder": DEMO_SPEC, "open_clip": resource(CHAINS, "clip-demo.yaml")}
DEMO_ALIASES = {"decoder": "hf_decoder", "clip": "open_clip"}


def register(sub) -> None:
    p = sub.add_parser("demo", help="train the embedded default chain (+ independent baseline) on CPU")
    p.add_argument("--out", default=None, type=Path, help="default: runs/demo (decoder), runs/clip-demo (clip)")
    p.add_argument("--family", default="hf_decoder", choices=sorted(DEMO_SPECS) + sorted(DEMO_ALIASES),
                   help="decoder chain (default) or the CLIP chain (LaCLIP, zero-shot and retrieval per stage)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("chain", help="run every stage of a chain spec in order")
    p.add_argument("spec", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--resume", action="store_true", help="skip finished stages, continue interrupted ones")
    p.add_argument("--nproc", type=int, default=None, help="ranks per stage (default: the spec's nproc)")
    p.add_argument("--no-baselines", action="store_true", help="skip the independent baseline runs")
    p.set_defaults(func=cmd_chain)

    p = sub.add_parser("stage", help="run one stage (what each SLURM job runs); use under a launcher for >1 rank")
    p.add_argument("spec", type=Path)
    p.add_argument("--stage", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--resume", action="store_true", help="continue from the stage's latest checkpoint")
    p.set_defaults(func=cmd_stage)


def _chain(spec_path: Path, out: Path, resume: bool, nproc=None, baselines=True) -> int:
    from .resolve import load_resolved
    from .runner import run_chain
    spec = load_resolved(spec_path)
    run_chain(spec, spec_path, out, resume=resume, include_baselines=baselines, nproc=nproc)
    from ..report import report_table, write_report
    print(report_table(out))
    print(f"report: {write_report(out)}")
    return 0


def cmd_chain(args) -> int:
    return _chain(args.spec, args.out, args.resume, args.nproc, not args.no_baselines)


def cmd_demo(args) -> int:
    family = DEMO_ALIASES.get(args.family, args.family)
    out = args.out or Path("runs/demo" if family == "hf_decoder" else "runs/clip-demo")
    return _chain(DEMO_SPECS[family], out, args.resume)


def _refuse_if_locked(stage_dir: Path) -> None:
    """Fail fast (before torch is imported) when the stage runs elsewhere; run_stage takes the lock."""
    import os

    from .lock import busy_error, live_holder
    if os.environ.get("RANK", "0") == "0" and (holder := live_holder(stage_dir)) is not None:
        raise busy_error(stage_dir, holder)


def cmd_stage(args) -> int:
    from ..train import preemption
    preemption.install()  # first: a signal during start-up must end in a checkpoint-less exit 99 + record
    from ..files import check_out_dir
    check_out_dir(args.out)
    _refuse_if_locked(args.out / args.stage)
    from .resolve import load_resolved
    from .stage import run_stage
    spec = load_resolved(args.spec)
    run_stage(spec, args.stage, args.out, resume=args.resume)
    return 0
