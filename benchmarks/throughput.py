"""Trainer throughput, side by side in one run: the 374M Llama of shared/gpu/README.md (d=1024, 24
layers, 16 heads, ffn 2816, vocab 32000, seq 2048, micro-batch 8, bf16, one GPU) trained by

  (a) hand-wired: HF LlamaForCausalLM + DeepSpeed ZeRO-1 (bf16, its default fused Adam), the loss from
      `model(input_ids, labels=...)`, a loss print every 10 steps - written plainly, as a user would;
  (b) the compt-scale trainer (`train_stage`), no teacher: bf16, train.compile, train.liger auto, the
      prefetching loader, no host syncs in the step;
  (c) the same with a frozen teacher of ~1/4 the size (d=512, 20 layers, ~97M) and IFD (alpha 0.1).

Each setup runs in its own process (clean peak-memory figures, no state shared between engines).
Reported per setup: tokens/s (median over the log windows after the warm-up steps, so start-up and
compilation are left out), MFU (project convention: (6 N + 12 L d seq) x tokens/s / 989e12 on an
H100/H200, student FLOPs only) and peak allocated GPU memory.

Targets (issue 13): (b) >= 50% MFU and >= 2x (a)'s tokens/s; (c)'s time per token at most (b)'s x
(1 + teacher-forward FLOP share + 0.05), the share being the teacher's forward FLOPs over the
student's training FLOPs per token.

Sizing for the GPU: 40 steps per setup (15 warm-up, then 5 log windows of 5 steps; ~650K tokens),
plus start-up (~20 s) and torch.compile (~1 min for (b); (c) reuses inductor's cache for the student):
about 3 minutes in all when DeepSpeed's fused Adam is already built (measured on the H200: 38 + 72 + 89 s).
Data are random tokens: throughput does not depend on them, and no tokenizer has to be trained first.

--cpu-smoke: a tiny model on CPU (fp32, no compile) through the same three code paths, a few steps;
writes benchmarks/results/throughput-cpu-smoke.json. Its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

STUDENT = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
           "num_key_value_heads": 16, "intermediate_size": 2816, "vocab_size": 32000,
           "max_position_embeddings": 2048, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
TEACHER = dict(STUDENT, hidden_size=512, num_hidden_layers=20, num_attention_heads=8, num_key_value_heads=8,
               intermediate_size=1408)
GPU = {"seq": 2048, "mb": 8, "steps": 40, "warmup": 15, "log_every": 5}
SMOKE = {"seq": 64, "mb": 2, "steps": 6, "warmup": 2, "log_every": 2}
SMOKE_STUDENT = dict(STUDENT, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=176, vocab_size=512)
SMOKE_TEACHER = dict(SMOKE_STUDENT, hidden_size=32, intermediate_size=88)
TARGETS = {"b_mfu": 0.50, "b_over_a": 2.0, "c_overhead_slack": 0.05}


def geometry(smoke: bool):
    return (SMOKE, SMOKE_STUDENT, SMOKE_TEACHER) if smoke else (GPU, STUDENT, TEACHER)


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def random_data(dir_: Path, vocab: int, seq: int, samples: int) -> Path:
    """A prepared-data dir in data/packed.py's layout (meta.json + token streams), random tokens."""
    dir_.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", samples), ("val", 8)):
        rng.integers(0, vocab, size=n * seq + 1, dtype=np.uint16).tofile(dir_ / f"{split}.bin")
    (dir_ / "meta.json").write_text(json.dumps({"vocab_size": vocab, "dtype": "uint16", "seq_len": seq,
                                                "eos_id": 2}))
    return dir_


def peak_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


# ------------------------------------------------------------------ (a) hand-wired HF + DeepSpeed

def run_hand_wired(smoke: bool, work: Path) -> dict:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    geo, student, _ = geometry(smoke)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    cfg = AutoConfig.for_model(**student)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    ds_config = {"train_micro_batch_size_per_gpu": geo["mb"], "gradient_accumulation_steps": 1,
                 "gradient_clipping": 1.0, "bf16": {"enabled": cuda}, "zero_optimization": {"stage": 1},
                 "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.1, **({} if cuda else {"torch_adam": True})}}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    dev = engine.device
    tokens_per_step = geo["mb"] * geo["seq"]
    data = torch.randint(0, student["vocab_size"], (geo["steps"], geo["mb"], geo["seq"] + 1))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = None
    for step in range(geo["steps"]):
        if step == geo["warmup"]:
            sync()
            t0 = time.perf_counter()
        batch = data[step].to(dev)
        loss = engine(input_ids=batch[:, :-1], labels=batch[:, 1:]).loss
        engine.backward(loss)
        engine.step()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    sync()
    rate = (geo["steps"] - geo["warmup"]) * tokens_per_step / (time.perf_counter() - t0)
    return {"tokens_per_s": rate, "peak_bytes": peak_bytes()}


# ------------------------------------------------------------------ (b), (c) the compt-scale trainer

def run_trainer(smoke: bool, work: Path, with_teacher: bool, liger: str = "auto", compile_: bool = True,
                ifd_kernel: str = "auto") -> dict:
    from compt_scale.config import parse_chain
    from compt_scale.families import get_family
    from compt_scale.kernels import IFDProjection
    from compt_scale.train.distributed import device, init_distributed
    from compt_scale.train.ds_config import build_ds_config
    from compt_scale.train.loop import LoopConfig, train_stage
    from compt_scale.train.objective import FrozenTeacher, StudentWithIFD

    geo, student, teacher = geometry(smoke)
    cuda = torch.cuda.is_available()
    init_distributed()
    s_path = write_config(student, work / "student.json")
    spec = parse_chain({
        "name": "throughput", "data": {"vocab_size": student["vocab_size"], "seq_len": geo["seq"],
                                                       "doc_mask": False},  # (a) masks nothing either
        "train": {"micro_batch_size": geo["mb"], "grad_accum": 1, "lr": 3e-4, "warmup_steps": 10,
                  "precision": "bf16" if cuda else "fp32", "zero_stage": 1,
                  "compile": compile_ and cuda and not smoke,
                  "liger": liger, "log_every": geo["log_every"], "eval_every": 10 ** 9, "save_every": 10 ** 9,
                  "eval_batches": 1},
        "ifd": {"alpha": 0.1},
        "stages": [{"name": "s", "model": str(s_path), "tokens": geo["steps"] * geo["mb"] * geo["seq"]}]},
        base_dir=work)
    fam = get_family("hf_decoder")
    stage = spec.stages[0]
    train, ifd = spec.train_for(stage), spec.ifd_for(stage)
    data_dir = random_data(work / "data", student["vocab_size"], geo["seq"], geo["steps"] * geo["mb"] + 16)
    cfg = fam.load_config(str(s_path))
    model = fam.build(cfg, seed=1)
    t_obj, heads, t_cfg = None, None, None
    if with_teacher:
        t_cfg = fam.load_config(str(write_config(teacher, work / "teacher.json")))
        t_obj = FrozenTeacher(fam, fam.build(t_cfg, seed=2), torch.bfloat16 if cuda else torch.float32, device())
        heads = [IFDProjection(d_s, d_t, impl=ifd_kernel) for d_s, d_t in
                 zip(fam.feature_dims(cfg), fam.feature_dims(t_cfg), strict=True)]
    n_params = sum(p.numel() for p in model.parameters())
    macs = fam.stage_macs(cfg, t_cfg, spec, geo["mb"])
    loop_cfg = LoopConfig(stage="s", seed=0, steps=geo["steps"], family=fam, spec=spec, tokens_per_sample=geo["seq"],
                          macs_per_step=macs["macs"], train=train, ifd=ifd,
                          ds_config=build_ds_config(n_params, train, 1), stage_dir=work / "stage", data_dir=data_dir)
    (work / "stage").mkdir(parents=True, exist_ok=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_stage(StudentWithIFD(fam, model, heads), t_obj, loop_cfg)
    recs = [json.loads(l) for l in (work / "stage" / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in recs if "tokens_per_s" in r and r["step"] > geo["warmup"]]
    from compt_scale.train.speedups import liger_wanted
    liger_used = liger_wanted(train.liger, fam, cfg, 1)
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
            "windows": [r["tokens_per_s"] for r in windows], "peak_bytes": peak_bytes(),
            "compile": train.compile, "liger": liger_used, "final_loss": recs[-2].get("loss") if len(recs) > 1 else None}


# ------------------------------------------------------------------ driver

def flops_per_token(cfg: dict, seq: int) -> tuple[float, int]:
    from compt_scale.families import get_family
    fam = get_family("hf_decoder")
    from transformers import AutoConfig
    c = AutoConfig.for_model(**cfg)
    n = fam.param_count(c)
    return 6 * n + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq, n


def targets_met(results: dict, share: float) -> dict:
    ok = lambda k: "tokens_per_s" in results.get(k, {})  # noqa: E731
    checks = {}
    if ok("b"):
        checks["b_mfu"] = None if results["b"]["mfu"] is None else results["b"]["mfu"] >= TARGETS["b_mfu"]
    if ok("a") and ok("b"):
        checks["b_over_a"] = results["b"]["tokens_per_s"] / results["a"]["tokens_per_s"]
        checks["b_over_a_met"] = checks["b_over_a"] >= TARGETS["b_over_a"]
    if ok("b") and ok("c"):
        checks["c_time_over_b"] = results["b"]["tokens_per_s"] / results["c"]["tokens_per_s"]
        checks["c_allowed"] = 1 + share + TARGETS["c_overhead_slack"]
        checks["c_met"] = checks["c_time_over_b"] <= checks["c_allowed"]
    return checks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--setup", choices=["a", "b", "c"], help=argparse.SUPPRESS)  # one setup, in a child
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--liger", choices=["auto", "on", "off"], default="auto", help="train.liger for (b), (c)")
    ap.add_argument("--setups", default="abc", help="which setups to run, e.g. bc")
    ap.add_argument("--ifd-kernel", choices=["auto", "triton", "reference"], default="auto", help="for (c)")
    ap.add_argument("--no-compile", action="store_true", help="train.compile off for (b), (c)")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("throughput.py: no CUDA device; use --cpu-smoke to test the script on CPU")
    if args.setup:  # child process: one setup
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            res = (run_hand_wired(smoke, work) if args.setup == "a" else
                   run_trainer(smoke, work, args.setup == "c", args.liger, not args.no_compile, args.ifd_kernel))
        args.json.write_text(json.dumps(res))
        return res

    from compt_scale.train.distributed import free_port
    from compt_scale.train.metrics import mfu, peak_flops
    geo, student, teacher = geometry(smoke)
    peak = peak_flops()
    fpt, n_student = flops_per_token(student, geo["seq"])
    t_fpt, n_teacher = flops_per_token(teacher, geo["seq"])
    share = (t_fpt / 3) / fpt  # teacher forward (1/3 of its 6N + 12 L d s) over the student's training
    names = {"a": "hand-wired HF + DeepSpeed ZeRO-1", "b": "compt-scale, no teacher",
             "c": f"compt-scale + teacher ({n_teacher / 1e6:.0f}M) + IFD"}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke: timings meaningless)"
    out = args.out or HERE / "results" / ("throughput-cpu-smoke.json" if smoke else "throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results, checks = {}, {}
    for key in args.setups:
        t0 = time.time()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            env = dict(os.environ, MASTER_PORT=str(free_port()))
            cmd = ([sys.executable, __file__, "--setup", key, "--json", f.name, "--liger", args.liger,
                    "--ifd-kernel", args.ifd_kernel]
                   + (["--cpu-smoke"] if smoke else []) + (["--no-compile"] if args.no_compile else []))
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                results[key] = {"error": (p.stdout[-1500:] + p.stderr[-3000:])}
                print(f"({key}) failed:\n{results[key]['error']}", file=sys.stderr)
            else:
                results[key] = json.loads(Path(f.name).read_text())
                results[key]["mfu"] = mfu(fpt, results[key]["tokens_per_s"], peak)
        results[key].update(setup=names[key], wall_s=time.time() - t0)
        print(f"({key}) done in {time.time() - t0:.0f} s", flush=True)
        checks = targets_met(results, share)
        # Written after every setup: a run cut short still leaves what it measured.
        out.write_text(json.dumps({
            "device": device, "torch": torch.__version__, "geometry": geo, "student_params": n_student,
            "teacher_params": n_teacher, "flops_per_token": fpt, "teacher_forward_share": share,
            "peak_flops": peak, "liger": args.liger, "ifd_kernel": args.ifd_kernel, "compile": not args.no_compile,
            "targets": TARGETS, "checks": checks, "results": results}, indent=2))
    print(f"# {device}, student {n_student / 1e6:.0f}M, seq {geo['seq']}, micro-batch {geo['mb']}")
    print(f"{'setup':<44} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9}")
    for key in args.setups:
        r = results.get(key, {})
        if "tokens_per_s" not in r:
            print(f"({key}) {names[key]:<40} failed")
            continue
        m = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        g = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 30:.1f}"
        print(f"({key}) {names[key]:<40} {r['tokens_per_s']:>10.0f} {m:>7} {g:>9}")
    print(f"targets {TARGETS}; checks {checks}")
    print(f"wrote {out}")
    return json.loads(out.read_text())


if __name__ == "__main__":
    main()
