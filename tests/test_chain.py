"""Chains of tiny decoders end to end through the CLI: 2 gloo ranks with ZeRO-3, 1 rank with ZeRO-0."""
from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compt_scale.chain.planner import plan_rows
from compt_scale.chain.resolve import load_resolved as load_chain
from compt_scale.data.packed import PackedTokens
from conftest import read_metrics, run_cli, write_spec

pytestmark = [pytest.mark.slow]


def check_export(stage_dir, data_dir, seq_len=32):
    """The export loads with plain transformers and gives the trained engine's logits."""
    model = AutoModelForCausalLM.from_pretrained(stage_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(stage_dir / "model")
    assert len(tok) == model.config.vocab_size
    x, _ = PackedTokens(data_dir, "val", seq_len).batch([0, 1])
    with torch.no_grad():
        logits = model(input_ids=x).logits
    engine_logits = torch.load(stage_dir / "probe_logits.pt")
    torch.testing.assert_close(logits, engine_logits, atol=1e-5, rtol=1e-5)
    return model


@pytest.mark.dist
def test_three_stage_chain_zero3_on_two_ranks(tmp_path, tiny_data):
    tok = 20 * 2 * 2 * 32  # 20 steps of micro-batch 2 on 2 ranks
    spec = write_spec(tmp_path / "z3.yaml", [
        {"name": "xs", "model": "llama-xs", "tokens": tok},
        {"name": "s", "model": "llama-s", "tokens": tok},
        {"name": "m", "model": "llama-m", "tokens": tok // 2},
    ], data_dir=tiny_data, train={"zero_stage": 3, "micro_batch_size": 2})
    out = tmp_path / "out"
    proc = run_cli("chain", spec, "--out", out, "--nproc", 2)
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert [manifest[n]["status"] for n in ("xs", "s", "m")] == ["done"] * 3
    assert all(manifest[n]["zero_stage"] == 3 and manifest[n]["world_size"] == 2 for n in ("xs", "s", "m"))
    params = [manifest[n]["params"] for n in ("xs", "s", "m")]
    assert params == sorted(params) and len(set(params)) == 3
    assert manifest["m"]["steps"] == 10 and manifest["m"]["tokens"] == tok // 2
    for name in ("xs", "s", "m"):
        check_export(out / name, tiny_data)
    # Stages after the first are grown from their predecessor and distilled from it.
    assert manifest["xs"]["teacher"] is None and manifest["xs"]["teacher_macs"] == 0
    for name, teacher in (("s", "xs"), ("m", "s")):
        assert manifest[name]["teacher"] == teacher and manifest[name]["teacher_macs"] > 0
        assert manifest[name]["alpha"] > 0
        train_lines = [r for r in read_metrics(out / name) if "loss" in r]
        assert all(r["ifd_loss"] > 0 for r in train_lines)
        assert (out / name / "growth.json").is_file()
    assert read_metrics(out / "m")[-1]["final"] is True
    assert any((out / "xs" / "tb").iterdir())
    # The chain ends with the report: the terminal table states the manifest's own figures.
    for name in ("xs", "s", "m"):
        row = next(l for l in proc.stdout.splitlines() if l.split()[:1] == [name])
        cols = row.split()
        assert int(cols[3]) == manifest[name]["params"] and int(cols[4]) == manifest[name]["tokens"]
        assert float(cols[5]) == pytest.approx(manifest[name]["macs"], rel=1e-4)
        assert float(cols[6]) == pytest.approx(manifest[name]["final_val_loss"], abs=1e-4)
    assert (out / "report.html").is_file()
    for png in ("loss_vs_macs.png", "val_loss_vs_macs.png", "stage_cost.png"):
        assert matplotlib.image.imread(out / png).shape[2] in (3, 4)
    # Re-running with --resume skips finished stages.
    again = run_cli("chain", spec, "--out", out, "--nproc", 2, "--resume")
    assert again.stdout.count("done, skipped") == 3


def test_gpt2_chain_zero0_one_rank(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "z0.yaml", [
        {"name": "a", "model": "gpt2-xs", "tokens": 15 * 4 * 32},
        {"name": "b", "model": "gpt2-s", "tokens": 10 * 4 * 32},
    ], data_dir=tiny_data, train={"zero_stage": 0}, ifd={"alpha": 0.5})
    out = tmp_path / "out"
    run_cli("chain", spec, "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert manifest["b"]["zero_stage"] == 0 and manifest["b"]["alpha"] == 0.5
    model = check_export(out / "b", tiny_data)
    assert model.config.model_type == "gpt2" and model.config.n_embd == 128
    gen = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 8)
    # GPU-seconds (the report's wall-clock axis): the stage's loop timer x ranks, rising along the
    # metrics, the final line's figure in the manifest, within the stage's own measured seconds.
    for name in ("a", "b"):
        secs = [r["gpu_seconds"] for r in read_metrics(out / name) if "gpu_seconds" in r]
        assert secs == sorted(secs) and secs[0] > 0
        assert manifest[name]["gpu_seconds"] == secs[-1] <= manifest[name]["seconds"] * manifest[name]["world_size"]
    assert "chain total GPU-seconds" in run_cli("report", out).stdout
    # `compt-scale plan` predicts exactly what the run recorded (same accounting, no drift).
    for row in plan_rows(load_chain(spec)):
        assert (row["params"], row["steps"], row["macs"]) == \
            (manifest[row["name"]]["params"], manifest[row["name"]]["steps"], manifest[row["name"]]["macs"])


def test_stage_needs_finished_predecessor(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "p.yaml", [
        {"name": "a", "model": "llama-xs", "tokens": 256}, {"name": "b", "model": "llama-s", "tokens": 256},
    ], data_dir=tiny_data)
    proc = run_cli("stage", spec, "--stage", "b", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "predecessor 'a' has no finished export" in proc.stderr.strip().splitlines()[-1]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]
    assert manifest["b"]["status"] == "failed" and "predecessor" in manifest["b"]["error"]
    assert not (tmp_path / "out" / "b" / "model").exists()
