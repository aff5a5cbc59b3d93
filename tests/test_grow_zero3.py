"""Growth into a ZeRO-3 partitioned model inside a DeepSpeed engine: 2 CPU ranks (gloo), one
parameter gathered at a time; the result must equal the in-memory registry's grow_state.

The test launches this file itself under torch.distributed.run; the worker is `_worker` below.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.dist]

COMMON = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "tie_word_embeddings": False}
SRC = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
       "num_hidden_layers": 2}
TGT = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8, "num_key_value_heads": 4,
       "num_hidden_layers": 4}


def test_zero3_two_ranks_matches_grow_state(tmp_path):
    run_ranks(Path(__file__), tmp_path)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["partitioned"], res          # parameters really were ZeRO-3 shards
    assert res["n_params"] > 30
    assert res["max_param_diff"] == 0.0, res
    assert res["max_logit_diff"] < 1e-4, res   # clone + zero: the engine's forward equals the source


def _worker(out_dir: str) -> None:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    from compt_scale.grow import grow_into_model, grow_state

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    s_cfg = AutoConfig.for_model("llama", **COMMON, **SRC)
    t_cfg = AutoConfig.for_model("llama", **COMMON, **TGT)
    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_config(s_cfg).float().eval()
    torch.manual_seed(1)     # same seed on every rank: the same student init everywhere
    tgt = AutoModelForCausalLM.from_config(t_cfg).float()
    student = {k: v.clone() for k, v in tgt.state_dict().items()}
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=tgt, config=ds_cfg,
                                      optimizer=torch.optim.SGD(tgt.parameters(), lr=0.0))
    params = dict(engine.module.named_parameters())
    partitioned = all(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in params.values())
    grow_into_model(engine.module, src.state_dict() if rank == 0 else {}, s_cfg, t_cfg, "clone", "zero")
    ref, _ = grow_state(src.state_dict(), s_cfg, t_cfg, student, "clone", "zero")
    diff = 0.0
    for k, p in params.items():
        with deepspeed.zero.GatheredParameters([p]):
            diff = max(diff, (p.data - ref[k]).abs().max().item())
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    engine.module.eval()
    with torch.no_grad():
        logit_diff = (engine.module(ids).logits - src(ids).logits).abs().max().item()
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps({
            "partitioned": partitioned, "n_params": len(params), "max_param_diff": diff,
            "max_logit_diff": logit_diff}))
    torch.distributed.barrier()


if __name__ == "__main__":
    _worker(sys.argv[1])
