"""The bf16 matrix's chains and their runner (tests/test_dtype_matrix.py).

Each case is a two-stage chain: a first stage (scratch from a config, or an `init:` HF dir saved in
fp32 or in bf16, used as-is or trained) and a stage grown from it with clone + zero (function
preserving), IFD on or off, under one ZeRO stage. Many cases run in ONE process (1 rank) or ONE
torchrun launch (2 ranks): `python tests/dtype_matrix.py CASES.json` calls `run_stage` for every stage
of every case in turn, the code `compt-scale stage` runs, without paying the imports per stage.

The init dirs hold a briefly trained model (its loss well below a random model's), so a grown student
that did not keep its teacher's function shows it in its first loss.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": False, "initializer_range": 0.3}
SEQ, MICRO_BATCH = 32, 2
TRAIN = {"micro_batch_size": MICRO_BATCH, "eval_every": 100, "eval_batches": 1, "save_every": 100,
         "log_every": 1, "warmup_steps": 1, "lr": 1e-3}


def train_briefly(model, data_dir: Path, steps: int = 30) -> None:
    """A few fp32 AdamW steps on the prepared data: the loss leaves the random models' ~7.6 behind."""
    from compt_scale.data.packed import PackedTokens
    data = PackedTokens(data_dir, "train", SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = data.batch(torch.randint(0, len(data), (8,), generator=g).tolist())
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def save_init_dir(d: Path, tokenizer_dir: Path, dtype: torch.dtype) -> Path:
    """An HF model dir as a user has one: a tiny Llama saved in `dtype`, with the tokenizer it uses."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    raw = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **raw)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    train_briefly(model, tokenizer_dir.parent)
    model.to(dtype).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_case(work: Path, name: str, first: str, zero: int, ifd: bool, world: int, data_dir: Path,
               init_dirs: dict) -> dict:
    """One case's chain spec. first: 'scratch', or 'init-fp32'/'init-bf16' (used as-is, tokens 0), or
    'init-fp32-trained' (the init model trained 2 steps in bf16 before the growth)."""
    steps2 = 2 * MICRO_BATCH * world * SEQ
    if first == "scratch":
        (work / "tiny.json").write_text(json.dumps({**TINY_LLAMA, "vocab_size": 512}))
        stage0 = {"name": "a", "model": str(work / "tiny.json"), "tokens": steps2}
        data = {"vocab_size": 512, "seq_len": SEQ, "max_chars": 300_000, "cache_dir": str(data_dir)}
    else:
        kind = first.split("-")[1]
        stage0 = {"name": "a", "init": str(init_dirs[kind]), "tokens": steps2 if first.endswith("-trained") else 0}
        data = {"seq_len": SEQ, "max_chars": 60_000, "cache_dir": str(work / f"data-{kind}")}
    spec = {"name": name, "seed": 0, "data": {**data, "doc_mask": False},
            "train": {**TRAIN, "precision": "bf16", "zero_stage": zero},
            "ifd": {"enabled": ifd, "alpha": 0.5},
            "stages": [stage0, {"name": "b", "grow_to": {"width": "2x", "depth": "2x"}, "tokens": steps2,
                                "growth": {"width": "clone", "depth": "zero"}}]}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return {"name": name, "spec": str(path), "out": str(work / f"out-{name}"), "first": first, "zero": zero,
            "ifd": ifd, "world": world}


def run_cases(cases_file: Path) -> None:
    """Every stage of every case in this process (rank 0 prepares each out dir as `chain` does)."""
    import torch.distributed as dist

    from compt_scale.chain.resolve import load_resolved
    from compt_scale.chain.runner import prepare_out
    from compt_scale.chain.stage import run_stage
    from compt_scale.train.distributed import init_distributed
    rank, _ = init_distributed()
    for case in json.loads(Path(cases_file).read_text()):
        spec, out = load_resolved(Path(case["spec"])), Path(case["out"])
        if rank == 0:
            prepare_out(spec, Path(case["spec"]), out, resume=False)
        dist.barrier()
        for stage in spec.stages:
            run_stage(spec, stage.name, out)
        if rank == 0:
            print(f"[matrix] {case['name']}: done", flush=True)


if __name__ == "__main__":
    run_cases(Path(sys.argv[1]))
