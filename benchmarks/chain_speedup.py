"""CoM-PT on real hardware: a chain of three Llama decoders on a real text corpus (the standard library's
source and docs, the corpus `make demo` builds), each also trained independently with the same recipe.

  s1  ~17M  (d=384,  6 layers,  6 heads, ffn 1024)
  s2  ~97M  (d=768, 12 layers, 12 heads, ffn 2048)   grown from s1 (insert / duplicate), IFD
  s3 ~325M  (d=1024, 24 layers, 16 heads, ffn 2816)  grown from s2, IFD
  vocab 8192 (SentencePiece trained here), seq 1024, micro-batch 16, bf16, lr 6e-4, one GPU.

Independent runs: s2-indep and s3-indep, same recipe, budget B each; the chain's first stage has no
teacher, so it is s1's independent run (budget B too). Chain budgets decrease along the chain (the
paper's rule 3): s1 B, s2 0.4 B, s3 0.2 B. Warm-up is 10% of each stage's steps.

Per model: final val loss of the chain model and of its independent run, and the chain's accumulated
MACs (every earlier chain stage, teacher forwards included, then this stage's curve) at the first
eval where its val loss reaches the independent run's final val loss (linear interpolation between
evals; None if it never does): matched-quality speedup = independent MACs / that. Family speedup =
all independent runs' MACs / the chain's total MACs.

Targets (issue 13): every chain model within 0.5% of its independent val loss; family speedup >= 3x
(paper: 5.68x for four ViTs).

Sizing: one 10-minute GPU command (benchmarks/gpu_all.sh chain), no compile (compiling five stages
would cost minutes). B = 4M tokens (--budget), ~1.1 epochs of the corpus (Python's stdlib docs and
source: ~3.7M tokens at vocab 8192). Measured on the H200 (2026-12-04): training s1 20 s, s2 14 s,
s3 11 s, s2-indep 24 s, s3-indep ~52 s (4.7 steps/s); process start-ups, evals, final checkpoints and
exports take about as long again: ~6 minutes in all. Models this size are far from converged at 4M
tokens; the result says so (independent_still_improving) rather than hide it.

--cpu-smoke: the same script with the tiny presets (llama-xs -> llama-s -> llama-m), a tiny corpus and a
few steps per stage on CPU; writes benchmarks/results/chain_speedup-cpu-smoke.json. Its losses and
speedups mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

def llama_config(vocab: int, positions: int, hidden: int, layers: int, heads: int, ffn: int) -> dict:
    """A Llama config.json (MHA, untied) of the given sizes: the benchmarks' model families."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": positions,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": ffn}


MODELS = {"s1": llama_config(8192, 2048, hidden=384, layers=6, heads=6, ffn=1024),
          "s2": llama_config(8192, 2048, hidden=768, layers=12, heads=12, ffn=2048),
          "s3": llama_config(8192, 2048, hidden=1024, layers=24, heads=16, ffn=2816)}
# Chain budgets as fractions of the independent budget B (the paper's rule 3: decreasing along the chain).
# With teacher forwards the chain spends 1/3.4 of the independent runs' MACs (`compt-scale plan` at B=4M:
# 1.80P vs 0.23P + 1.36P + 4.52P; 1/1.9 with the earlier 2/3, 5/12): the 3x target is only reachable with
# fractions about this small, and the val-loss gap says whether quality held.
CHAIN_FRACTIONS = {"s1": 1.0, "s2": 0.4, "s3": 0.2}
TARGETS = {"val_loss_rel_gap": 0.005, "family_speedup": 3.0, "family_speedup_gpu_seconds": 2.5}


def gpu_spec(work: Path, budget: int, liger: str = "auto", ifd_kernel: str = "auto") -> dict:
    paths = {}
    for name, cfg in MODELS.items():
        paths[name] = work / f"{name}.json"
        paths[name].write_text(json.dumps(cfg))
    seq, mb = 1024, 16
    evals = 10  # val points per stage, for the matched-quality interpolation

    def stage(name, tokens, model):
        steps = max(1, tokens // (seq * mb))
        return {"name": name, "model": str(paths[model]), "tokens": int(tokens),
                "train": {"eval_every": max(1, steps // evals), "warmup_steps": max(5, steps // 10)}}

    return {"name": "chain-speedup", "seed": 0,
            "data": {"corpus": "stdlib", "vocab_size": 8192, "seq_len": seq, "max_chars": 40_000_000,
                     "cache_dir": str(work / "data")},
            "train": {"micro_batch_size": mb, "grad_accum": 1, "lr": 6.0e-4,
                      "precision": "bf16", "eval_batches": 4, "save_every": 10 ** 9, "log_every": 20,
                      "compile": False, "liger": liger},
            "growth": {"width": "insert", "depth": "duplicate"}, "ifd": {"kernel": ifd_kernel},
            "stages": [stage(n, budget * CHAIN_FRACTIONS[n], n) for n in ("s1", "s2", "s3")],
            "baselines": [stage(f"{n}-indep", budget, n) for n in ("s2", "s3")]}


def smoke_spec(work: Path) -> dict:
    def stage(name, steps, model):
        return {"name": name, "model": model, "tokens": steps * 4 * 32, "train": {"eval_every": 2}}

    return {"name": "chain-speedup-smoke", "seed": 0,
            "data": {"vocab_size": 512, "seq_len": 32, "max_chars": 300_000, "cache_dir": str(work / "data")},
            "train": {"micro_batch_size": 4, "lr": 3.0e-3, "warmup_steps": 2, "eval_batches": 2,
                      "save_every": 10 ** 9, "log_every": 2},
            "stages": [stage("s1", 8, "llama-xs"), stage("s2", 6, "llama-s"), stage("s3", 4, "llama-m")],
            "baselines": [stage("s2-indep", 8, "llama-s"), stage("s3-indep", 8, "llama-m")]}


def analyse(out: Path) -> dict:
    """Per chain model: its final val loss against its independent run's, and the chain's MACs and
    GPU-seconds to reach that run's final val loss (compt_scale.quality, the report's definition; the
    GPU-seconds are each stage's own training-loop timer x ranks, train/loop.py). A model whose chain
    stage or independent run did not finish (a run cut short) is listed as such."""
    from compt_scale.quality import eval_curve, matched_quality
    from compt_scale.report import read_metrics
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    offset, offset_s, per_model, unfinished = 0.0, 0.0, {}, {}
    chain = ("s1", "s2", "s3")
    for i, name in enumerate(chain):
        indep_name = name if name == "s1" else f"{name}-indep"
        rec, indep = stages.get(name, {}), stages.get(indep_name, {})
        if rec.get("status") != "done":
            unfinished.update({n: stages.get(n, {}).get("status", "never run") for n in chain[i:]})
            break
        if indep.get("status") != "done":
            unfinished[indep_name] = indep.get("status", "never run")
        else:
            metrics = {n: read_metrics(out / n / "metrics.jsonl") for n in (name, indep_name)}
            q = matched_quality(eval_curve(metrics[name]), offset, rec["final_val_loss"], eval_curve(metrics[indep_name]),
                                indep["macs"], indep["final_val_loss"])
            per_model[name] = {
                "params": rec["params"], "chain_val_loss": rec["final_val_loss"],
                "independent_val_loss": indep["final_val_loss"], "val_loss_rel_gap": q["gap"],
                "chain_tokens": rec["tokens"], "independent_tokens": indep["tokens"],
                "chain_accumulated_macs": offset + rec["macs"], "independent_macs": indep["macs"],
                "chain_macs_to_match": q["chain_macs_to_match"], "matched_quality_speedup": q["speedup"],
                "independent_still_improving": q["baseline_improving"]}
            if rec.get("gpu_seconds") and indep.get("gpu_seconds"):
                qs = matched_quality(eval_curve(metrics[name], "gpu_seconds"), offset_s, rec["final_val_loss"],
                                     eval_curve(metrics[indep_name], "gpu_seconds"), indep["gpu_seconds"],
                                     indep["final_val_loss"])
                per_model[name].update(
                    chain_accumulated_gpu_seconds=offset_s + rec["gpu_seconds"],
                    independent_gpu_seconds=indep["gpu_seconds"], chain_gpu_seconds_to_match=qs["chain_macs_to_match"],
                    matched_quality_speedup_gpu_seconds=qs["speedup"])
        offset += rec["macs"]
        offset_s += rec.get("gpu_seconds") or 0.0
    res = {"models": per_model, "unfinished": unfinished, "chain_total_macs": offset,
           "chain_total_gpu_seconds": offset_s or None}
    if not unfinished:
        names = ["s1" if n == "s1" else f"{n}-indep" for n in per_model]
        indep_total = sum(stages[n]["macs"] for n in names)
        res.update(independent_total_macs=indep_total, family_speedup=indep_total / offset)
        indep_s = [stages[n].get("gpu_seconds") for n in names]
        if offset_s and all(indep_s):
            res.update(independent_total_gpu_seconds=sum(indep_s), family_speedup_gpu_seconds=sum(indep_s) / offset_s)
    return res


def run_cli(args: list[str], time_limit: float | None, env_defaults: dict | None = None) -> int:
    """`compt-scale ARGS` in a child; past `time_limit` seconds it gets SIGTERM (a chain forwards it to
    the running stage, which checkpoints and stops) so that what finished can be analysed."""
    # PYTHONPATH prepended, not replaced: on the GPU machine deepspeed & co. come from a `pip --target`
    # dir on it (replacing it cost the first H200 run its chain: "No module named 'deepspeed'").
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**(env_defaults or {}), **os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, "-m", "compt_scale.cli", *args], cwd=REPO, env=env)
    try:
        return proc.wait(timeout=None if time_limit is None else max(1.0, time_limit))
    except subprocess.TimeoutExpired:
        print(f"{Path(sys.argv[0]).name}: time limit reached; stopping", file=sys.stderr)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--budget", type=float, default=4e6, help="independent runs' tokens (GPU run)")
    ap.add_argument("--liger", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--ifd-kernel", choices=["auto", "triton", "reference"], default="auto")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; then stop and analyse what finished")
    ap.add_argument("--work", type=Path, default=None, help="keep the run here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("chain_speedup.py: no CUDA device; use --cpu-smoke to test the script on CPU")
    from compt_scale.config import parse_chain

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # The GPU spec is always parsed (cheap, meta-device checks): growth and sizes are validated here too.
        gpu = gpu_spec(work, int(args.budget), args.liger, args.ifd_kernel)
        parse_chain(gpu, base_dir=work)
        spec = smoke_spec(work) if args.cpu_smoke else gpu
        spec_path = work / "chain.yaml"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        t0 = time.time()
        rc = run_cli(["chain", str(spec_path), "--out", str(work / "out")], args.time_limit)
        if not (work / "out" / "manifest.json").is_file():
            sys.exit(f"chain_speedup.py: compt-scale chain exited {rc} before any stage ran")
        res = analyse(work / "out")
        models = res["models"].values()
        res.update(seconds=time.time() - t0, chain_exit_code=rc, targets=TARGETS, spec=spec,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
                   targets_met=None if res["unfinished"] else {
                       "val_loss": all(m["val_loss_rel_gap"] <= TARGETS["val_loss_rel_gap"] for m in models),
                       "family_speedup": res["family_speedup"] >= TARGETS["family_speedup"],
                       "family_speedup_gpu_seconds": (res.get("family_speedup_gpu_seconds") or 0)
                       >= TARGETS["family_speedup_gpu_seconds"]})
    out = args.out or HERE / "results" / ("chain_speedup-cpu-smoke.json" if args.cpu_smoke else "chain_speedup.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"{'model':<6} {'params':>8} {'chain val':>10} {'indep val':>10} {'gap':>7} {'chain MACs@match':>17} "
          f"{'indep MACs':>11} {'speedup':>8} {'GPU-s speedup':>13}")
    for name, m in res["models"].items():
        reach = "never" if m["chain_macs_to_match"] is None else f"{m['chain_macs_to_match']:.3e}"
        sp = "-" if m["matched_quality_speedup"] is None else f"{m['matched_quality_speedup']:.2f}x"
        sp_s = m.get("matched_quality_speedup_gpu_seconds")
        sp_s = "-" if sp_s is None else f"{sp_s:.2f}x"
        print(f"{name:<6} {m['params'] / 1e6:>7.1f}M {m['chain_val_loss']:>10.4f} {m['independent_val_loss']:>10.4f} "
              f"{100 * m['val_loss_rel_gap']:>6.2f}% {reach:>17} {m['independent_macs']:>11.3e} {sp:>8} {sp_s:>13}")
    if res["unfinished"]:
        print(f"unfinished (exit code {rc}): {res['unfinished']}; no family speedup")
    else:
        gpu_s = res.get("family_speedup_gpu_seconds")
        print(f"family speedup (independent total / chain total): MACs {res['family_speedup']:.2f}x, GPU-seconds "
              f"{'-' if gpu_s is None else f'{gpu_s:.2f}x'}; targets {TARGETS}: {res['targets_met']}; "
              f"{res['seconds']:.0f} s")
    print(f"wrote {out}")
    if rc != 0:
        sys.exit(f"chain_speedup.py: compt-scale chain exited {rc}")
    return res


if __name__ == "__main__":
    main()
