"""`compt-scale slurm CHAIN.yaml --out DIR --nodes N --gpus-per-node G [--submit] [--status]`."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "slurm", help="write one sbatch job per chain stage; --submit chains them with afterok",
        description="Writes DIR/slurm/<stage>.sbatch for every chain stage (one multi-node DeepSpeed run "
                    "each). With --submit, submits them in order, each depending on its predecessor "
                    "(--dependency=afterok), prints the job ids and records them in DIR/manifest.json. "
                    "Re-running skips stages already done and keeps jobs still queued. Jobs catch "
                    "the time-limit/preemption warning (USR1), checkpoint and requeue themselves.")
    p.add_argument("spec", help="chain spec YAML")
    p.add_argument("--out", required=True, help="chain output dir (shared filesystem, seen by all nodes)")
    p.add_argument("--nodes", type=int, default=1, help="nodes per stage (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs requested per node, one rank each (0: CPU ranks, no GPU request)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per node (default: --gpus-per-node, or the spec's nproc without GPUs)")
    p.add_argument("--nodes-per-stage", default=None, metavar="NAME=N,...",
                   help="per-stage node counts (small models need fewer), e.g. s1=1,s3=4")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit per job, e.g. 12:00:00")
    p.add_argument("--time-per-stage", default=None, metavar="NAME=T,...", help="per-stage time limits")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs of the one task per node, shared by its ranks (default: 4 per GPU rank, "
                        "1 per CPU rank)")
    p.add_argument("--mem", default=None,
                   help="memory per node, e.g. 400G (default: 0 = all of the node's memory when exclusive; "
                        "'none' sends no --mem)")
    p.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                   help="whole nodes for each job (default: yes when GPUs are requested)")
    p.add_argument("--account", default=None)
    p.add_argument("--warn-seconds", type=_warn_seconds, default=300,
                   help="USR1 this many seconds before the time limit: time to write a checkpoint (default "
                        "300); 'auto': from each stage's checkpoint size (see slurm/README.md)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="export in every job, e.g. --env NCCL_SOCKET_IFNAME=ib0 (repeatable)")
    p.add_argument("--baselines", action="store_true", help="also script/submit the spec's baselines (no dependencies)")
    p.add_argument("--submit", action="store_true", help="submit the jobs (sbatch) and record their ids")
    p.add_argument("--status", action="store_true",
                   help="print each stage's manifest status and SLURM job state (never-started jobs included)")
    p.set_defaults(func=run)


def _warn_seconds(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole seconds or 'auto', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..chain.resolve import load_resolved
    from .slurm import SlurmOptions, parse_per_stage, status_lines, submit, write_scripts

    spec = load_resolved(args.spec)
    out = Path(args.out).resolve()
    if args.status and not args.submit:
        print("\n".join(status_lines(spec, out)))
        return 0
    opts = SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
        partition=args.partition, time=args.time, cpus_per_task=args.cpus_per_task, mem=args.mem,
        account=args.account, exclusive=args.exclusive, warn_seconds=args.warn_seconds,
        nodes_per_stage=parse_per_stage(args.nodes_per_stage, "nodes-per-stage", int),
        time_per_stage=parse_per_stage(args.time_per_stage, "time-per-stage"),
        sbatch_args=args.sbatch_arg, env=args.env)
    from ..files import check_out_dir
    check_out_dir(out)
    scripts = write_scripts(spec, out, opts, baselines=args.baselines)
    for name, path in scripts.items():
        print(f"{name}: wrote {path}")
    if args.submit:
        submit(spec, out, scripts)
    else:
        print(f"submit with: compt-scale slurm {args.spec} --out {args.out} ... --submit")
    if args.status:
        print("\n".join(status_lines(spec, out)))
    return 0
