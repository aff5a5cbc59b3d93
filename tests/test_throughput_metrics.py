"""Tokens/s and MFU in metrics.jsonl, the MFU convention against the GPU README's peer figures, and the
loop's deferred non-finite check (no host sync per micro-batch) still naming the exact step."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from compt_scale.families import get_family
from compt_scale.train.metrics import mfu, peak_flops
from conftest import run_cli, write_spec

# The 374M Llama of shared/gpu/README.md, with its measured peer figure (77.6K tokens/s = 22.3% MFU
# on an H100 SXM, 989 TFLOP/s dense bf16).
LLAMA_374M = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "num_key_value_heads": 16, "intermediate_size": 2816, "vocab_size": 32000,
              "tie_word_embeddings": False, "max_position_embeddings": 2048}


def records(stage_dir):
    return [json.loads(l) for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_decoder_flops_per_token_reproduces_readme_mfu(tmp_path):
    path = tmp_path / "llama374m.json"
    path.write_text(json.dumps(LLAMA_374M))
    fam = get_family("hf_decoder")
    cfg = fam.load_config(str(path))
    spec = SimpleNamespace(data=SimpleNamespace(seq_len=2048))
    # Hand count: per layer 4 d^2 (attention) + 3 d ffn (SwiGLU) + 2 d (norms); + 2 vocab d + d.
    d, f, L, V = 1024, 2816, 24, 32000
    n = L * (4 * d * d + 3 * d * f + 2 * d) + 2 * V * d + d
    assert fam.flops_per_token(cfg, spec) == 6 * n + 12 * L * d * 2048
    assert mfu(fam.flops_per_token(cfg, spec), 77.6e3, 989e12) == pytest.approx(0.223, abs=5e-4)
    # Two ranks each at the same speed: the same MFU.
    assert mfu(fam.flops_per_token(cfg, spec), 2 * 77.6e3, 989e12, world=2) == pytest.approx(0.223, abs=5e-4)


def test_clip_flops_per_token_is_six_times_forward_macs():
    fam = get_family("open_clip")
    cfg = fam.load_config("clip-xs") if "clip-xs" in fam.preset_names() else fam.load_config(fam.preset_names()[0])
    from compt_scale.flops import clip_macs
    assert fam.flops_per_token(cfg, None) == 6 * clip_macs(cfg, captions=1)["forward_per_sample"]


def test_no_peak_on_cpu():
    assert peak_flops(torch.device("cpu")) is None
    assert mfu(1e9, 1e5, None) is None


def test_metrics_carry_tokens_per_s_and_null_mfu_on_cpu(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "m.yaml", [{"name": "a", "model": "llama-xs", "tokens": 6 * 4 * 32}],
                      data_dir=tiny_data, train={"log_every": 2, "eval_every": 3, "save_every": 100})
    run_cli("stage", spec, "--stage", "a", "--out", tmp_path / "o")
    train = [r for r in records(tmp_path / "o" / "a") if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 4, 6]
    for r in train:
        assert r["tokens_per_s"] > 0 and r["mfu"] is None
    assert any("val_loss" in r and r["step"] == 3 for r in records(tmp_path / "o" / "a"))


@pytest.mark.slow
def test_nan_between_checks_is_reported_at_its_exact_step(tmp_path, tiny_data):
    """The loss is read back only at log/eval/save steps; a NaN in between must still be named at the
    step it happened, and no checkpoint may be written at or after it."""
    def run(out, every):
        spec = write_spec(tmp_path / f"n{every}.yaml", [{"name": "a", "model": "llama-xs", "tokens": 30 * 4 * 32}],
                          data_dir=tiny_data, train={"lr": 1.0e15, "warmup_steps": 3, "log_every": every,
                                                     "save_every": every, "eval_every": 1000})
        proc = run_cli("stage", spec, "--stage", "a", "--out", out, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert "loss is not finite at step" in line, line
        return int(line.split("at step ")[1].split()[0])

    exact = run(tmp_path / "every", 1)          # checked at every step: the reference
    deferred = run(tmp_path / "deferred", 4)    # checked every 4th step only
    # Checks of the deferred run: step 1 (first log) and step 4; the NaN step must lie strictly between.
    assert 1 < exact < 4, f"the NaN must fall between two deferred checks (it came at step {exact})"
    assert deferred == exact
    ckpts = tmp_path / "deferred" / "a" / "checkpoints"
    saved = [int(p.name.removeprefix("global_step")) for p in ckpts.glob("global_step*")] if ckpts.exists() else []
    assert all(s < exact for s in saved), (saved, exact)  # step 4's checkpoint was never written
