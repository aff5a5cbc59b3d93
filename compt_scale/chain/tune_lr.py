"""`compt-scale tune-lr CHAIN.yaml --out DIR`: a short learning-rate sweep per model size (issue 21).

For each distinct model of the spec (its chain stages and baselines), each candidate rate trains that
model from scratch for `--steps` optimizer steps with the spec's own data and train settings (the
first stage of that model's per-stage overrides included), `train.lr` replaced by the candidate; the
best is the one with the lowest final val loss (the same val samples for every candidate). Each
candidate is an ordinary one-stage chain run by the chain runner (chain/runner.py), in
DIR/<model>/lr<lr>-<steps>steps, sharing one prepared corpus (DIR/data unless the spec sets
data.cache_dir); a finished candidate is reused when tune-lr runs again. A candidate that fails
(diverges to a NaN loss) counts as no result, not as a failed sweep.

Under `train.lr_base_width` the candidate is the base rate and the hidden matrices get the spec's
width rule on top (train/lr_rule.py). The result: DIR/tune_lr.json (every candidate's val loss, the
pick per model) and DIR/tune_lr.yaml, per-stage `train: {lr: ...}` overrides to copy into the spec;
the run's manifest then records the rate each stage trained at, and the report shows it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import yaml

from ..config import ChainSpec, StageSpec, parse_chain
from ..errors import CompTError

DEFAULT_CANDIDATES = "1e-3,2e-3,3e-3,6e-3"
DEFAULT_STEPS = 200
RESULT_JSON, RESULT_YAML = "tune_lr.json", "tune_lr.yaml"


def register(sub) -> None:
    p = sub.add_parser("tune-lr", help="short learning-rate sweep per model size of a chain spec; "
                                       "writes the best train.lr per stage (by val loss)")
    p.add_argument("spec", type=Path, metavar="CHAIN.yaml")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                   help=f"comma-separated learning rates to try (default {DEFAULT_CANDIDATES})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps per candidate (default {DEFAULT_STEPS})")
    p.add_argument("--nproc", type=int, default=None, help="ranks per run (default: the spec's nproc)")
    p.set_defaults(func=cmd_tune_lr)


def parse_candidates(text: str) -> list[float]:
    """'1e-3,3e-3' -> [0.001, 0.003], sorted and without repeats; one line for anything else."""
    try:
        rates = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise CompTError(f"--candidates: expected comma-separated learning rates, got {text!r}") from None
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise CompTError(f"--candidates: learning rates must be positive numbers, got {text!r}")
    return rates


def models_to_tune(spec: ChainSpec) -> dict[str, list[StageSpec]]:
    """Each distinct model -> the stages (chain and baselines) that train it. Stages that start from
    an `init:` model or a `grow_to:` label are not a model size trained from scratch: left out."""
    groups: dict[str, list[StageSpec]] = {}
    for s in spec.stages + spec.baselines:
        if s.init is None and not s.grow_to and s.model:
            groups.setdefault(s.model, []).append(s)
    if not groups:
        raise CompTError("tune-lr: no stage names a model: to tune (init: and grow_to: stages are not tuned)")
    return groups


def _plain(obj) -> dict:
    """A spec section as YAML-safe plain data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def candidate_spec(spec: ChainSpec, stage: StageSpec, lr: float, steps: int, nproc: int, data_dir: Path) -> dict:
    """The one-stage chain that trains `stage`'s model from scratch at `lr` for `steps` steps."""
    from .planner import tokens_per_step
    train = _plain(spec.train_for(stage))
    train.update(lr=lr, eval_every=steps, save_every=steps)
    data = _plain(spec.data)
    data["cache_dir"] = data["cache_dir"] or str(data_dir.resolve())
    return {"name": "tune-lr", "family": spec.family, "seed": spec.seed, "nproc": nproc, "data": data,
            "train": train, "stages": [{"name": "candidate", "model": stage.model,
                                        "tokens": steps * tokens_per_step(spec, stage, nproc)}]}


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/"))[-80:]


def run_candidate(raw: dict, run_dir: Path, nproc: int) -> dict:
    """Train one candidate (or reuse a finished one); its final val loss, or None and the error."""
    from .manifest import Manifest
    from .resolve import resolve
    from .runner import run_chain
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "candidate.yaml"
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    rec = Manifest(run_dir).stage("candidate") if (run_dir / "manifest.json").exists() else {}
    if rec.get("status") != "done":
        try:
            run_chain(resolve(parse_chain(raw, str(spec_path), run_dir)), spec_path, run_dir, resume=True, nproc=nproc)
        except CompTError as e:   # a diverged candidate (NaN loss) is a result: no val loss
            return {"val_loss": None, "error": str(e)}
        rec = Manifest(run_dir).stage("candidate")
    loss = rec.get("final_val_loss")
    return {"val_loss": loss if loss is not None and math.isfinite(loss) else None, "error": rec.get("error")}


def tune(spec: ChainSpec, out: Path, rates: list[float], steps: int, nproc: int) -> dict:
    """Every candidate of every model, and the pick per model (lowest final val loss)."""
    models = {}
    for model, stages in models_to_tune(spec).items():
        tried = []
        for lr in rates:
            raw = candidate_spec(spec, stages[0], lr, steps, nproc, out / "data")
            print(f"[tune-lr] {model}: lr {lr:g}, {steps} steps", flush=True)
            tried.append({"lr": lr, **run_candidate(raw, out / _slug(model) / f"lr{lr:g}-{steps}steps", nproc)})
        done = [c for c in tried if c["val_loss"] is not None]
        if not done:
            raise CompTError(f"tune-lr: every candidate of model {model} failed: {tried[0]['error']}")
        best = min(done, key=lambda c: (c["val_loss"], c["lr"]))
        models[model] = {"stages": [s.name for s in stages], "candidates": tried, "best_lr": best["lr"],
                         "best_val_loss": best["val_loss"]}
    return {"spec": spec.source, "steps": steps, "nproc": nproc, "lr_base_width": spec.train.lr_base_width,
            "models": models}


def snippet(result: dict) -> str:
    """Per-stage overrides to copy into the spec's stages:/baselines: entries."""
    lines = [f"# compt-scale tune-lr: the best train.lr per model after {result['steps']} steps from scratch "
             f"(lowest val loss); copy into the spec's stage entries"]
    for model, r in result["models"].items():
        tried = ", ".join(f"{c['lr']:g}: " + ("failed" if c["val_loss"] is None else f"{c['val_loss']:.4f}")
                          for c in r["candidates"])
        lines.append(f"# {model}: val loss per lr: {tried}")
        lr = yaml.safe_dump(r["best_lr"]).splitlines()[0]   # 1e-05 as YAML reads it back: a number
        lines += [f"- {{name: {name}, train: {{lr: {lr}}}}}" for name in r["stages"]]
    return "\n".join(lines) + "\n"


def cmd_tune_lr(args) -> int:
    from ..files import check_out_dir
    from .resolve import load_resolved
    rates = parse_candidates(args.candidates)
    if args.steps < 1:
        raise CompTError(f"--steps must be >= 1, got {args.steps}")
    if args.nproc is not None and args.nproc < 1:
        raise CompTError(f"--nproc must be >= 1, got {args.nproc}")
    spec = load_resolved(args.spec)
    check_out_dir(args.out)
    result = tune(spec, args.out, rates, args.steps, args.nproc or spec.nproc)
    (args.out / RESULT_JSON).write_text(json.dumps(result, indent=2) + "\n")
    text = snippet(result)
    (args.out / RESULT_YAML).write_text(text)
    print(text + f"tune-lr: {args.out / RESULT_JSON}")
    return 0
