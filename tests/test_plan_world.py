"""`compt-scale plan` predicts what `stage` runs: for a rank count other than the spec's nproc
(`plan --nproc N` against a real 2-rank run's manifest) and for an HF tokenizer dir (the model's
vocabulary is the tokenizer's length, not data.vocab_size)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compt_scale.chain.planner import plan_rows
from compt_scale.chain.resolve import load_resolved as load_chain
from compt_scale.cli import main
from compt_scale.data.packed import prepare_data
from compt_scale.families import get_family
from conftest import run_cli, write_spec


def _plan_table(capsys, *args) -> dict[str, list[str]]:
    assert main(["plan", *map(str, args)]) == 0
    out = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line.split() for line in out if line.split()[:1] and line.split()[0] in ("xs", "s")}


@pytest.mark.dist
@pytest.mark.slow
def test_plan_nproc_matches_two_rank_run(tmp_path, tiny_data, capsys):
    # spec.nproc is 1; the run uses 2 ranks. 5 steps of 2 x 32 tokens on 1 rank = 3 steps on 2 (ceil).
    spec = write_spec(tmp_path / "w.yaml", [{"name": "xs", "model": "llama-xs", "tokens": 5 * 2 * 32}],
                      data_dir=tiny_data, train={"micro_batch_size": 2, "zero_stage": 1, "eval_every": 100,
                                                 "save_every": 100})
    out = tmp_path / "out"
    run_cli("chain", spec, "--out", out, "--nproc", 2, "--no-baselines")
    rec = json.loads((out / "manifest.json").read_text())["stages"]["xs"]
    assert rec["world_size"] == 2 and rec["steps"] == 3
    row = plan_rows(load_chain(spec), world=2)[0]
    assert (row["params"], row["steps"], row["macs"]) == (rec["params"], rec["steps"], rec["macs"])
    assert _plan_table(capsys, spec, "--nproc", 2)["xs"][5] == "3"
    assert _plan_table(capsys, spec)["xs"][5] == "5"          # the spec's own nproc (1)
    assert main(["plan", str(spec), "--nproc", "0"]) == 2


def test_plan_vocab_from_hf_tokenizer_dir(tmp_path, tiny_data):
    tok_dir = tiny_data / "tokenizer"      # an HF tokenizer dir (save_pretrained of the trained one)
    spec = write_spec(tmp_path / "t.yaml", [{"name": "xs", "model": "llama-xs", "tokens": 4096},
                                            {"name": "s", "model": "llama-s", "tokens": 2048}],
                      data={"tokenizer": str(tok_dir), "vocab_size": 32000})
    spec_obj = load_chain(spec)
    data_dir = prepare_data(spec_obj.data, tmp_path / "data")
    fam = get_family("hf_decoder")
    for row, stage in zip(plan_rows(spec_obj), spec_obj.stages, strict=True):
        cfg = fam.model_config(spec_obj, stage, data_dir)      # what the stage builds
        assert cfg.vocab_size == json.loads((data_dir / "meta.json").read_text())["vocab_size"] != 32000
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(cfg)
        assert row["params"] == sum(p.numel() for p in built.parameters())
