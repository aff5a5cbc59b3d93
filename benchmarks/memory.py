"""Benchmark: host memory per rank of a ZeRO-3 stage that grows a ~200M student from a ~30M teacher.

A chain through `compt-scale chain` on CPU (gloo, fp32 or `--precision bf16`): stage `base` is a saved ~30M Llama-style HF
dir used as-is (`init:`, `tokens: 0`), stage `big` (~210M) is grown from it (insert + duplicate) and
trained a few steps with IFD against it, ZeRO-3, then exported. Run once on 2 ranks and once on 1.
Per rank, from the stage's own records (<out>/big/memory/rank<r>.json, VmHWM of each phase):

    figure        = (peak RSS after training - peak RSS after imports) / (16 bytes x student params)
    export_extra  = rank 0's peak after the export - its peak after training, against one largest
                    parameter + one export shard (the target).
    attribution   = that training peak split into DeepSpeed's ZeRO-3 buffers (bytes read from the
                    engine's tensors: 16-bit and fp32 partitions, Adam states, gradient partition,
                    reduce buckets, one sub-group's fp32 gradient and the state-init buffer, both
                    alive at the first step's peak), the partitioned teacher, and the rest.

Writes benchmarks/results/memory.json (fp32) or memory-bf16.json (or --out). `--size small` (~55M
student, ~8M teacher) is the same figure where the host has no ~12 GB free for the ~200M one;
`--nproc 2` runs the 2-rank half alone.

    .venv/bin/python benchmarks/memory.py [--steps 2] [--workdir DIR] [--precision bf16] [--size small]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"vocab_size": 4096, "tie_word_embeddings": False, "max_position_embeddings": 256, "bos_token_id": 1,
          "eos_token_id": 1}
TEACHER = {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 8,
           "num_hidden_layers": 8}
STUDENT = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 16,
           "num_hidden_layers": 16}
SIZES = {"200m": (TEACHER, STUDENT),
         "small": ({**TEACHER, "hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4,
                    "num_key_value_heads": 4},
                   {**STUDENT, "hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8,
                    "num_key_value_heads": 8})}
SHARD_BYTES = 200 * 2**20


def make_teacher(d: Path, teacher: dict) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = (Path(json.__file__).read_text() + Path(yaml.__file__).read_text())
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **COMMON, **teacher)).save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(d)


def attribute(net_peak: int, buffers: dict, teacher_partition: int) -> dict:
    """The training-step peak of one rank split into what holds it: DeepSpeed's ZeRO-3 buffers (sizes
    read from the engine's tensors, chain/memory_log.zero3_buffers), the partitioned teacher, and the
    rest (activations, gathered parameters, communication buffers, allocator)."""
    if not buffers:
        return {}
    named = {k: v for k, v in buffers.items() if k != "sub_groups"}
    named["teacher_partition"] = teacher_partition
    return {**{f"{k}_bytes": v for k, v in named.items()}, "sub_groups": buffers["sub_groups"],
            "named_total_bytes": sum(named.values()), "rest_bytes": net_peak - sum(named.values())}


def run(work: Path, nproc: int, steps: int, precision: str, student: dict) -> dict:
    out = work / f"out-{nproc}"
    shutil.rmtree(out, ignore_errors=True)
    (work / "student.json").write_text(json.dumps({"model_type": "llama", **COMMON, **student}))
    mb, seq = 1, 32
    spec = {"name": "memory", "seed": 0,
            "data": {"seq_len": seq, "max_chars": 200_000, "cache_dir": str(work / "data")},
            "train": {"zero_stage": 3, "precision": precision, "micro_batch_size": mb, "eval_every": 1000, "eval_batches": 1,
                      "save_every": 1000, "log_every": 1, "warmup_steps": 1, "export_shard_bytes": SHARD_BYTES},
            "ifd": {"alpha": 0.1},
            "stages": [{"name": "base", "init": str(work / "teacher"), "tokens": 0},
                       {"name": "big", "model": str(work / "student.json"), "tokens": steps * mb * nproc * seq}]}
    (work / "chain.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    # Prepended, not replaced: packages installed with `pip --target` (the GPU machine) stay importable.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "compt_scale.cli", "chain", str(work / "chain.yaml"), "--out", str(out),
                    "--nproc", str(nproc)], check=True, env=env, cwd=ROOT)
    man = json.loads((out / "manifest.json").read_text())["stages"]["big"]
    params = man["params"]
    state = 16 * params
    teacher_partition = json.loads((out / "manifest.json").read_text())["stages"]["base"]["params"] * (
        2 if precision == "bf16" else 4) // nproc
    ranks = []
    for r in range(nproc):
        m = json.loads((out / "big" / "memory" / f"rank{r}.json").read_text())
        base = m["start"]["peak_rss"]
        ranks.append({"rank": r, "import_baseline_bytes": base,
                      **{f"{ph}_net_bytes": m[ph]["peak_rss"] - base for ph in ("built", "grown", "trained", "exported")},
                      "figure": round((m["trained"]["peak_rss"] - base) / state, 3),
                      "params_held_whole_after_growth": m["grown"]["params_held_whole"],
                      "attribution": attribute(m["trained"]["peak_rss"] - base, m["trained"].get("zero3_buffers", {}),
                                               teacher_partition)})
    from safetensors import safe_open
    largest = 0
    for f in (out / "big" / "model").glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict: no __iter__)
                t = sf.get_slice(k)
                n = 2 if t.get_dtype() == "BF16" else 4
                for s in t.get_shape():
                    n *= s
                largest = max(largest, n)
    return {"nproc": nproc, "student_params": params, "student_state_bytes": state, "steps": man["steps"],
            "ranks": ranks, "figure_max": max(r["figure"] for r in ranks),
            "export_extra_rank0_bytes": ranks[0]["exported_net_bytes"] - ranks[0]["trained_net_bytes"],
            "export_target_bytes": largest + SHARD_BYTES}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--size", choices=sorted(SIZES), default="200m")
    ap.add_argument("--nproc", type=int, choices=(1, 2), default=None, help="one run only (default: 2 then 1)")
    args = ap.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / ("memory.json" if args.precision == "fp32" else
                                                         f"memory-{args.precision}.json")
    teacher, student = SIZES[args.size]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="compt-memory-"))
    if not (work / "teacher" / "config.json").is_file():
        make_teacher(work / "teacher", teacher)
    runs = {n: run(work, n, args.steps, args.precision, student) for n in ([args.nproc] if args.nproc else [2, 1])}
    res = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "backend": f"gloo, CPU, {args.precision}, ZeRO-3", "teacher": teacher, "student": student,
           **{("two_ranks" if n == 2 else "one_rank"): r for n, r in runs.items()},
           "targets": {"figure_two_ranks": "<= 0.65", "cut_1_to_2_ranks": ">= 0.40",
                       "export_extra_rank0": "<= largest param + one shard"}}
    if len(runs) == 2:
        res["cut_1_to_2_ranks"] = round(1 - runs[2]["figure_max"] / runs[1]["figure_max"], 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({f"figure_{n}": r["figure_max"] for n, r in runs.items()} | {
        f"export_extra_MB_{n}": r["export_extra_rank0_bytes"] / 2**20 for n, r in runs.items()}))


if __name__ == "__main__":
    main()
