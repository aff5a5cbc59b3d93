"""Benchmark: grow a ~1B-parameter Llama-style checkpoint to ~4B on this CPU machine.

Two ways, each in its own process so peak RSS (VmHWM) is its own:
- stream: compt_scale.grow.grow_hf_checkpoint (tensor by tensor over safetensors shards);
- naive:  load the source with transformers, build the full target model with transformers, copy
          the grown weights into it (same registry, in memory), save_pretrained.
Both write bf16 checkpoints. `--small` uses ~60M -> ~240M for a quick check.
Writes benchmarks/results/grow.json (or --out).

    .venv/bin/python benchmarks/grow.py [--small] [--skip-naive] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {   # (source, target) Llama configs; widths x2, heads x2, depth 16 -> 18
    "full": ({"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16, "num_key_value_heads": 16,
              "num_hidden_layers": 16},
             {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
              "num_hidden_layers": 18}),
    "small": ({"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8, "num_key_value_heads": 8,
               "num_hidden_layers": 8},
              {"hidden_size": 1024, "intermediate_size": 2752, "num_attention_heads": 16, "num_key_value_heads": 16,
               "num_hidden_layers": 12}),
}
COMMON = {"vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def config(kw):
    from transformers import AutoConfig
    return AutoConfig.for_model("llama", **COMMON, **kw)


def n_params(kw) -> int:
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config(kw))
    return sum(p.numel() for p in m.parameters())


def make_source(kw, path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)   # build directly in bf16: half the memory
    AutoModelForCausalLM.from_config(config(kw)).save_pretrained(path, max_shard_size="2GB")


def _hwm() -> int:
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))


def run_stream(src: Path, tgt_kw: dict, out: Path) -> dict:
    from compt_scale.grow import grow_hf_checkpoint
    t = time.perf_counter()
    grow_hf_checkpoint(src, config(tgt_kw), out, "insert", "duplicate", seed=0, max_shard_bytes=2 << 30)
    return {"seconds": time.perf_counter() - t}


def run_naive(src: Path, tgt_kw: dict, out: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compt_scale.grow import grow_into_model
    t = time.perf_counter()
    s = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    torch.set_default_dtype(torch.bfloat16)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(config(tgt_kw))           # the student's own full init
    grow_into_model(m, s.state_dict(), AutoConfig.from_pretrained(src), config(tgt_kw), "insert", "duplicate")
    m.save_pretrained(out, max_shard_size="2GB")
    return {"seconds": time.perf_counter() - t}


def child(mode: str, src: str, size: str, out: str) -> None:
    import torch  # noqa: F401  (imports first: the baseline is what both ways pay anyway)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import compt_scale.grow  # noqa: F401
    base = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
    fn = run_stream if mode == "stream" else run_naive
    res = fn(Path(src), SIZES[size][1], Path(out))
    res["peak_rss_gb"] = _hwm() / 2**30
    res["baseline_rss_gb"] = base / 2**30      # after imports, before any growth work
    res["output_gb"] = sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) / 2**30
    print("RESULT " + json.dumps(res), flush=True)


def measure(mode: str, src: Path, size: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run([sys.executable, __file__, "--child", mode, str(src), size, str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    shutil.rmtree(out, ignore_errors=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not lines:
        return {"error": (r.stderr.strip().splitlines() or ["killed"])[-1], "returncode": r.returncode}
    return json.loads(lines[-1][7:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="~60M -> ~240M instead of ~1B -> ~4B")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--workdir", default="/tmp/compt_grow_bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grow.json"))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return 0
    import psutil
    size = "small" if a.small else "full"
    s_kw, t_kw = SIZES[size]
    work = Path(a.workdir) / size
    src = work / "src"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        make_source(s_kw, src)
    res = {"size": size, "source_params": n_params(s_kw), "target_params": n_params(t_kw), "dtype": "bfloat16",
           "width": "insert", "depth": "duplicate", "cpu_count": os.cpu_count(),
           "mem_available_gb": psutil.virtual_memory().available / 2**30}
    res["stream"] = measure("stream", src, size, work / "out_stream")
    print("stream", res["stream"], flush=True)
    if not a.skip_naive:
        res["naive"] = measure("naive", src, size, work / "out_naive")
        print("naive", res["naive"], flush=True)
        if "error" not in res["naive"]:
            res["naive_over_stream"] = {k: res["naive"][k] / res["stream"][k] for k in ("seconds", "peak_rss_gb")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
