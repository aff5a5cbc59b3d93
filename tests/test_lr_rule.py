"""The fair-baseline recipe (train/lr_rule.py: muP-style width-scaled lr) and the IFD-only variant
(growth.init: random), checked against hand-computed rates and hand-listed parameter names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compt_scale.chain.planner import format_plan, plan_rows
from compt_scale.chain.resolve import resolve
from compt_scale.config import parse_chain
from compt_scale.errors import CompTError
from compt_scale.families import hf_decoder
from compt_scale.kernels import IFDProjection
from compt_scale.train import lr_rule
from compt_scale.train.objective import StudentWithIFD
from conftest import run_cli, write_spec

RAW = {"name": "lr", "data": {"vocab_size": 256, "seq_len": 16},
       "train": {"micro_batch_size": 2, "lr": 4.0e-3, "lr_base_width": 64, "warmup_steps": 1},
       "stages": [{"name": "xs", "model": "llama-xs", "tokens": 640},      # hidden 64
                  {"name": "s", "model": "llama-s", "tokens": 320},        # hidden 128
                  {"name": "m", "model": "llama-m", "tokens": 320}],       # hidden 256
       "baselines": [{"name": "m-indep", "model": "llama-m", "tokens": 640}]}


def test_plan_applies_and_shows_the_width_rule():
    rows = {r["name"]: r for r in plan_rows(resolve(parse_chain(RAW)))}
    # by hand: 4e-3 x 64 / hidden; the embeddings/head keep 4e-3; the baseline follows the same rule
    hand = {"xs": 4e-3, "s": 2e-3, "m": 1e-3, "m-indep": 1e-3}
    for name, want in hand.items():
        assert rows[name]["lr"] == 4e-3 and rows[name]["hidden_lr"] == pytest.approx(want, rel=1e-12), name
    text = format_plan(resolve(parse_chain(RAW)))
    assert "m-indep: lr 0.004, hidden matrices 0.001 <- muP-style: hidden matrices lr x 64/256" in text
    plain = dict(RAW, train={k: v for k, v in RAW["train"].items() if k != "lr_base_width"})
    assert all(r["hidden_lr"] == 4e-3 for r in plan_rows(resolve(parse_chain(plain))))
    with pytest.raises(CompTError, match="train.lr_base_width: must be a positive integer"):
        parse_chain(dict(RAW, train=dict(RAW["train"], lr_base_width=0)))
    with pytest.raises(CompTError, match=r"stages\[1\].growth.init: must be 'grow' or 'random'"):
        parse_chain(dict(RAW, stages=[RAW["stages"][0], dict(RAW["stages"][1], growth={"init": "zeros"})]))


def test_param_groups_scale_exactly_the_hidden_matrices():
    from compt_scale.config import TrainSpec
    cfg_s, cfg_t = hf_decoder.load_config("llama-s", vocab_size=128), hf_decoder.load_config("llama-xs", vocab_size=128)
    student = hf_decoder.build(cfg_s, seed=0)
    module = StudentWithIFD(hf_decoder, student, [IFDProjection(128, 64, init="default")])
    train = TrainSpec(lr=4e-3, lr_base_width=64, weight_decay=0.1)
    groups = lr_rule.param_groups(module, train, cfg_s)
    names = {id(p): n for n, p in module.named_parameters()}
    scaled = [g for g in groups if "lr" in g]
    assert len(scaled) == 1 and scaled[0]["lr"] == pytest.approx(2e-3)
    got = sorted(names[id(p)].split(".", 1)[1] for p in scaled[0]["params"])
    # hand-listed: every attention and MLP projection of the 4 layers, and the IFD projection T
    proj = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    hand = sorted([f"model.layers.{i}.{p}.weight" for i in range(4) for p in proj] + ["0.weight"])
    assert got == hand
    base = [names[id(p)] for g in groups if "lr" not in g for p in g["params"]]
    assert "student.model.embed_tokens.weight" in base and "student.lm_head.weight" in base
    assert len(base) + len(got) == len(names)
    del cfg_t


@pytest.mark.slow
def test_run_records_and_uses_the_rule_and_random_init(tmp_path, tiny_data):
    """A real 2-stage chain: xs, then s with IFD from xs but its own random init (growth.init:
    random, the paper's "IFD only"), lr_base_width 64. The manifest holds each stage's rates, the
    optimizer state saved by DeepSpeed holds them too, and s does not start from xs's weights."""
    spec = write_spec(tmp_path / "c.yaml", [
        {"name": "a", "model": "llama-xs", "tokens": 2 * 128},
        {"name": "b", "model": "llama-s", "tokens": 128, "growth": {"init": "random"}},
    ], data_dir=tiny_data, train={"lr_base_width": 32, "save_every": 100})
    out = tmp_path / "out"
    run_cli("chain", spec, "--out", out)
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    # hand: 3e-3 x 32/64 and 3e-3 x 32/128
    assert stages["a"]["hidden_lr"] == pytest.approx(1.5e-3) and stages["b"]["hidden_lr"] == pytest.approx(7.5e-4)
    assert stages["a"]["lr"] == stages["b"]["lr"] == 3e-3 and "x 32/128" in stages["b"]["lr_rule"]
    assert stages["b"]["teacher_macs"] > 0 and stages["b"]["growth"]["init"] == "random"
    assert not (out / "b" / "growth.json").exists()
    optim = next((out / "b" / "checkpoints").glob("global_step*/*optim_states.pt"))
    state = torch.load(optim, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    groups = state.get("base_optimizer_state", state).get("param_groups") or state["param_groups"]
    assert sorted(g["initial_lr"] for g in groups) == pytest.approx([7.5e-4, 3e-3, 3e-3])
    # "random": one step at lr <= 3e-3 moves a weight by ~3e-3 at most; a grown s would hold xs's
    # embedding in its leading 64 columns to within that, a random one differs by ~N(0, 0.02).
    from safetensors.torch import load_file
    emb_a = load_file(Path(out / "a" / "model" / "model.safetensors"))["model.embed_tokens.weight"]
    emb_b = load_file(Path(out / "b" / "model" / "model.safetensors"))["model.embed_tokens.weight"]
    assert (emb_b[:, :64] - emb_a).abs().max() > 0.02
