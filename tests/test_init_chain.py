"""Chains that start from a user's saved Hugging Face model (`init:`), through `compt-scale chain`.

The init model has a padded vocab (tokenizer 300 tokens, embedding 320 rows) and tied embeddings; it
is used as-is (`tokens: 0`) and the next stage is grown with clone + zero, which is function
preserving: the grown student's first training loss must equal the init model's loss on the same
batch, computed here with plain transformers (the oracle). Under ZeRO-3 no rank may hold the student
whole while it is built and grown, and the sharded export must reproduce the engine's logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from compt_scale.data.packed import PackedTokens
from conftest import TINY_TRAIN, first_batch_loss, run_cli

TEXT = Path(json.__file__).read_text() + Path(yaml.__file__).read_text()
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}   # train-mode loss = eval loss
ARCH = {
    "qwen2": ({"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
               "num_hidden_layers": 2, "max_position_embeddings": 128},
              {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 4,
               "num_hidden_layers": 4, "max_position_embeddings": 128}),
    "gpt2": ({"n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 64, "n_positions": 128, **NO_DROPOUT},
             {"n_embd": 64, "n_layer": 4, "n_head": 4, "n_inner": 128, "n_positions": 128, **NO_DROPOUT}),
}


def save_init_model(d: Path, arch: str, vocab: int = 320, n_tokens: int = 300) -> Path:
    """A tied-embedding model with `vocab` rows and a BPE tokenizer of `n_tokens` tokens, as HF saves them."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=n_tokens, special_tokens=["<unk>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    assert len(hf_tok) == n_tokens
    cfg = AutoConfig.for_model(arch, vocab_size=vocab, tie_word_embeddings=True, eos_token_id=1, bos_token_id=1,
                               **ARCH[arch][0])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    hf_tok.save_pretrained(d)
    return d


def write_chain(tmp_path: Path, init: Path, arch: str, train: dict, tokens: int = 3 * 4 * 32) -> Path:
    big = {"model_type": arch, "tie_word_embeddings": True, "vocab_size": 320, **ARCH[arch][1]}
    (tmp_path / "big.json").write_text(json.dumps(big))
    spec = {"name": "from-init", "seed": 0,
            "data": {"seq_len": 32, "max_chars": 60_000, "cache_dir": str(tmp_path / "data")},
            "train": {**TINY_TRAIN, "micro_batch_size": 2, **train},
            "ifd": {"alpha": 0.5},
            "stages": [{"name": "base", "init": str(init), "tokens": 0},
                       {"name": "big", "model": str(tmp_path / "big.json"), "tokens": tokens,
                        "growth": {"width": "clone", "depth": "zero"}}]}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def check_export_matches_engine(stage_dir: Path, data_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(stage_dir / "model", dtype=torch.float32).eval()
    x, _ = PackedTokens(data_dir, "val", 32).batch([0, 1])
    with torch.no_grad():
        logits = model(input_ids=x).logits
    torch.testing.assert_close(logits, torch.load(stage_dir / "probe_logits.pt"), atol=1e-5, rtol=1e-5)
    return model


@pytest.mark.slow
@pytest.mark.dist
def test_chain_from_padded_tied_qwen2_zero3_two_ranks(tmp_path):
    init = save_init_model(tmp_path / "my-qwen2", "qwen2")
    spec = write_chain(tmp_path, init, "qwen2", {"zero_stage": 3, "export_shard_bytes": 40_000})
    out = tmp_path / "out"
    run_cli("chain", spec, "--out", out, "--nproc", 2)
    man = json.loads((out / "manifest.json").read_text())["stages"]
    assert man["base"]["status"] == man["big"]["status"] == "done"
    assert man["base"]["steps"] == 0 and man["base"]["teacher"] is None
    assert man["base"]["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(init).parameters())
    assert man["base"]["final_val_loss"] > 0
    # Used as-is: the export holds the init weights byte for byte.
    assert (out / "base" / "model" / "model.safetensors").read_bytes() == (init / "model.safetensors").read_bytes()
    # Function preserved through the real stage path (tied embeddings untied by clone, padded vocab kept).
    first = json.loads((out / "big" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert first["task_loss"] == pytest.approx(first_batch_loss(init, tmp_path / "data", 2, 2, 32), abs=2e-5)
    # No rank held a student parameter whole while it was built and grown; each held about half.
    for rank in (0, 1):
        mem = json.loads((out / "big" / "memory" / f"rank{rank}.json").read_text())
        for phase in ("built", "grown"):
            assert mem[phase]["params_held_whole"] == 0, (rank, phase, mem[phase])
            assert mem[phase]["local_numel"] <= 0.55 * mem[phase]["total_numel"], (rank, phase, mem[phase])
        # The ZeRO-3 buffers benchmarks/memory.py names, read from the engine: half the student per
        # rank (+ the IFD projection, ~1%, + padding) in fp32, DeepSpeed's master copy of it (its own
        # tensor even in fp32), its gradients and 2 Adam states.
        bufs, half = mem["trained"]["zero3_buffers"], man["big"]["params"] / 2
        assert 4 * half <= bufs["params_partition"] <= 4 * half * 1.02, bufs
        assert bufs["master_fp32_partition"] == bufs["grads_partition"] == bufs["params_partition"], bufs
        assert bufs["adam_states_fp32"] == 2 * bufs["params_partition"], bufs
    # The sharded export (several shards + index) reloads with plain transformers = the engine's logits.
    model = check_export_matches_engine(out / "big", tmp_path / "data")
    index = json.loads((out / "big" / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert model.config.vocab_size == 320 and model.config.tie_word_embeddings is False
    n_tok = len(AutoTokenizer.from_pretrained(init))   # 300 trained + what transformers adds for qwen2
    assert len(AutoTokenizer.from_pretrained(out / "big" / "model")) == n_tok < 320


@pytest.mark.slow
def test_chain_from_tied_gpt2_clone_preserves_loss_zero0(tmp_path):
    init = save_init_model(tmp_path / "my-gpt2", "gpt2")
    spec = write_chain(tmp_path, init, "gpt2", {"zero_stage": 0})
    out = tmp_path / "out"
    run_cli("chain", spec, "--out", out)
    first = json.loads((out / "big" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["task_loss"] == pytest.approx(first_batch_loss(init, tmp_path / "data", 1, 2, 32), abs=2e-5)
    model = check_export_matches_engine(out / "big", tmp_path / "data")
    assert (out / "big" / "model" / "model.safetensors").is_file()   # one shard at the default size
    assert model.config.vocab_size == 320


def test_tokenizer_larger_than_init_embedding_is_one_line(tmp_path):
    init = save_init_model(tmp_path / "small-vocab", "qwen2", vocab=280, n_tokens=300)
    spec = write_chain(tmp_path, init, "qwen2", {})
    out = tmp_path / "out"
    proc = run_cli("chain", spec, "--out", out, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    n_tok = len(AutoTokenizer.from_pretrained(init))
    assert len(lines) == 1 and f"{n_tok} tokens" in lines[0] and "vocab_size 280" in lines[0], lines
    assert not (tmp_path / "data").exists() and not out.exists()
