"""`train.zero_init_residual` (train/init_rule.py): which tensors it zeroes, checked against the
architectures' own module classes (not the layouts the code reads), what that does to the network
(every residual block is the identity at step 0), that `plan` shows it per stage, and that a real
stage does it to a bf16 ZeRO-3 student partitioned over 2 ranks.

The 2-rank test launches this file under torch.distributed.run; the worker is `_worker` below.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from compt_scale.chain.planner import format_plan, plan_rows
from compt_scale.chain.resolve import resolve
from compt_scale.config import parse_chain
from compt_scale.errors import CompTError
from compt_scale.train import init_rule
from conftest import run_ranks

RAW = {"name": "init", "data": {"vocab_size": 256, "seq_len": 16},
       "train": {"micro_batch_size": 2, "zero_init_residual": True, "zero_stage": 3, "precision": "bf16"},
       "stages": [{"name": "xs", "model": "llama-xs", "tokens": 640},
                  {"name": "s", "model": "llama-s", "tokens": 320},
                  {"name": "m-ifd-only", "model": "llama-m", "tokens": 320, "growth": {"init": "random"}}],
       "baselines": [{"name": "s-indep", "model": "llama-s", "tokens": 640}]}


def _hand_listed(model: torch.nn.Module) -> set[str]:
    """Residual output projections found by the architectures' own classes: Llama's attention o_proj
    and MLP down_proj, GPT-2's attention and MLP c_proj, open_clip's attention out_proj and MLP c_proj."""
    wanted = {"LlamaAttention": ["o_proj"], "LlamaMLP": ["down_proj"], "GPT2Attention": ["c_proj"],
              "GPT2MLP": ["c_proj"], "ResidualAttentionBlock": ["attn.out_proj", "mlp.c_proj"]}
    names = set()
    for mod_name, mod in model.named_modules():
        for child in wanted.get(type(mod).__name__, []):
            sub = mod.get_submodule(child)
            names.update(f"{mod_name}.{child}.{p}" for p, _ in sub.named_parameters())
    return names


def _models():
    from compt_scale.families import clip_family, hf_decoder
    for name in ("llama-xs", "gpt2-xs"):
        cfg = hf_decoder.load_config(name, vocab_size=128)
        yield name, cfg, lambda cfg=cfg: hf_decoder.build(cfg, seed=3)
    cfg = clip_family.load_config("clip-xs")
    yield "clip-xs", cfg, lambda: clip_family.build(cfg, seed=3)


@pytest.mark.parametrize("name", ["llama-xs", "gpt2-xs", "clip-xs"])
def test_exactly_the_residual_outputs_are_zeroed(name):
    _, cfg, build = next(m for m in _models() if m[0] == name)
    model, reference = build(), build()
    zeroed = init_rule.zero_residual_outputs(model, cfg)
    hand = _hand_listed(model)
    assert len(hand) >= 4 and set(zeroed) == hand
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if n in hand:
            assert torch.count_nonzero(p) == 0, n
            assert "bias" in n or torch.count_nonzero(ref[n]) > 0, n   # the default init was not zero
        else:
            assert torch.equal(p, ref[n]), n     # nothing else touched


def test_every_llama_block_starts_as_the_identity():
    from compt_scale.families import hf_decoder
    cfg = hf_decoder.load_config("llama-s", vocab_size=128)
    model = hf_decoder.build(cfg, seed=0).eval()
    init_rule.zero_residual_outputs(model, cfg)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    embedded = model.get_input_embeddings()(ids)
    assert len(hidden) == cfg.num_hidden_layers + 1
    for h in hidden[:-1]:            # the output of every layer but the last (HF norms the last)
        torch.testing.assert_close(h, embedded, rtol=0, atol=0)
    torch.testing.assert_close(hidden[-1], model.model.norm(embedded))


def test_plan_shows_how_each_student_starts():
    spec = resolve(parse_chain(RAW))
    init = {r["name"]: r["init"] for r in plan_rows(spec)}
    zeroed = "the family's default init, residual output projections zeroed (train.zero_init_residual)"
    # growth.init: random (IFD only) keeps the student's own init: it is zeroed like a baseline's
    assert init == {"xs": zeroed, "s": "grown from xs", "m-ifd-only": zeroed, "s-indep": zeroed}
    text = format_plan(spec)
    assert f"s-indep: init <- {zeroed}" in text and "s: init <- grown from xs" in text
    plain = dict(RAW, train={k: v for k, v in RAW["train"].items() if k != "zero_init_residual"})
    assert {r["init"] for r in plan_rows(resolve(parse_chain(plain)))} == {"the family's default init",
                                                                          "grown from xs"}
    with pytest.raises(CompTError, match="train.zero_init_residual"):
        parse_chain(dict(RAW, train=dict(RAW["train"], zero_init_residual="yes")))


@pytest.mark.slow
@pytest.mark.dist
def test_a_bf16_zero3_stage_zeroes_its_partitioned_student(tmp_path):
    run_ranks(Path(__file__), tmp_path)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["partitioned"] and res["dtype"] == "torch.bfloat16", res
    assert res["zeroed"] == res["hand"] and len(res["hand"]) == 2 * 2, res   # llama-xs: 2 layers x (o, down)
    assert res["nonzero_in_zeroed"] == 0 and res["nonzero_elsewhere"] > 0, res


def _worker(out_dir: str) -> None:
    import deepspeed

    from compt_scale.chain import stage
    from compt_scale.chain.plan import plan_stage
    from compt_scale.families import get_family

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    spec = resolve(parse_chain(RAW))
    plan = plan_stage(spec, "xs", 2)
    ds_config = plan.fresh_ds_config()
    assert ds_config["zero_optimization"]["stage"] == 3 and ds_config["bf16"]["enabled"]
    student, _, _ = stage._materialize(get_family(spec.family), plan, ds_config, Path(out_dir) / "xs", rank)
    params = dict(student.named_parameters())
    partitioned = all(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in params.values())
    hand = _hand_listed(student)
    in_zeroed = elsewhere = 0
    for n, p in params.items():
        with deepspeed.zero.GatheredParameters([p]):
            nonzero = int(torch.count_nonzero(p.data))
        in_zeroed, elsewhere = (in_zeroed + nonzero, elsewhere) if n in hand else (in_zeroed, elsewhere + nonzero)
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps({
            "partitioned": partitioned, "dtype": str(next(iter(params.values())).dtype),
            "zeroed": sorted(init_rule.residual_output_names(student, plan.student)), "hand": sorted(hand),
            "nonzero_in_zeroed": in_zeroed, "nonzero_elsewhere": elsewhere}))
    torch.distributed.barrier()


if __name__ == "__main__":
    _worker(sys.argv[1])
