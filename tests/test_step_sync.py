"""The trainer's step as the GPU runs it, checked on CPU (issue 20, items 1-4):

- no host sync: three real steps (teacher + IFD, bf16, ZeRO-1, compiled blocks) make no `.item()`,
  `bool(tensor)` or `.tolist()` call (patched Tensor methods; the only exception is CPU AdamW's
  host-side step counter, a CPU-only optimizer);
- compiled what runs: dynamo compiled the student's blocks (width 64) fullgraph and their graphs ran
  once per block per step; no graph break anywhere;
- the teacher at its FLOP share: its forward runs under inference_mode, asks for no
  output_hidden_states, and its features carry no autograd graph;
- causal attention: SDPA called with is_causal=True and no mask (student loss, teacher features),
  for Llama and GPT-2; with document masking on CPU the dense block-diagonal mask as before.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compt_scale.families import get_family
from compt_scale.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_makes_no_host_reads_and_runs_compiled_blocks(tmp_path):
    out = tmp_path / "probe.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "step_probe.py"), str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    seen = json.loads(out.read_text())
    device_reads = [r for r in seen["reads"] if not r["optimizer_host_step"]]
    assert device_reads == [], device_reads
    assert all(r["what"] == "item" for r in seen["reads"])     # CPU AdamW's step count, nothing else
    student = [g for g in seen["graphs"] if 64 in g["widths"]]
    teacher = [g for g in seen["graphs"] if 32 in g["widths"] and 64 not in g["widths"]]
    assert student and teacher, seen["graphs"]
    # 2 blocks x 3 steps through the student's compiled graphs (at most one recompile after the first
    # block: dynamo marks the changed input dynamic), and the teacher's blocks too.
    assert sum(g["calls"] for g in student) == 2 * 3 and len(student) <= 2, student
    assert sum(g["calls"] for g in teacher) >= 2 * 3, teacher
    assert seen["graph_breaks"] == {}
    assert seen["teacher_calls"] and all(c == {"grad": False, "inference": True, "hidden_states": False}
                                         for c in seen["teacher_calls"])
    assert seen["teacher_feature_grad"] == [False]
    assert math.isfinite(seen["last_task_loss"])
    # benchmarks/profile_step.py --cpu-smoke (run by the probe): every range of the step timed, the
    # IFD range inside the student's forward, host reads counted, top ops listed.
    prof = json.loads(out.with_suffix(".profile.json").read_text())["setups"]["student+teacher"]
    ranges = prof["ranges_per_step"]
    assert set(ranges) == {"teacher", "student_forward", "ifd", "backward", "optimizer"}
    assert all(r["cpu_ms"] > 0 and r["calls"] == 2 for r in ranges.values())   # 2 profiled steps
    assert ranges["ifd"]["cpu_ms"] < ranges["student_forward"]["cpu_ms"]
    assert set(prof["host_reads"]) <= {"item"} and prof["top_ops"] and prof["step_s"] > 0


class SDPASpy:
    def __init__(self, monkeypatch):
        self.calls = []
        orig = torch.nn.functional.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
            self.calls.append({"is_causal": is_causal, "mask": attn_mask})
            return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


@pytest.mark.parametrize("preset", ["llama-xs", "gpt2-xs"])
def test_attention_is_causal_sdpa_without_mask(preset, monkeypatch):
    fam = get_family("hf_decoder")
    model = fam.build(fam.load_config(preset, vocab_size=512), seed=0)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    # The oracle: the same weights through transformers' own eager attention (explicit causal mask).
    eager = fam.build(fam.load_config(preset, vocab_size=512), seed=0)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ref = eager.base_model(input_ids=x, use_cache=False).last_hidden_state
    spy = SDPASpy(monkeypatch)
    task, (hidden,) = fam.losses(model, (x, torch.roll(x, -1, 1)))
    with torch.no_grad():
        (feats,) = fam.features(model, (x,))
    n_layers = model.config.num_hidden_layers
    assert len(spy.calls) == 2 * n_layers
    assert all(c["is_causal"] is True and c["mask"] is None for c in spy.calls), spy.calls
    torch.testing.assert_close(hidden.detach(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)
    assert "compt" not in model.config.to_json_string()      # exports keep a plain config


def test_document_mask_on_cpu_is_the_dense_block_diagonal_mask(monkeypatch):
    from compt_scale.families.hf_attention import dense_document_mask
    fam = get_family("hf_decoder")
    model = fam.build(fam.load_config("llama-xs", vocab_size=512), seed=0)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    x = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    spy = SDPASpy(monkeypatch)
    with torch.no_grad():
        (feats,) = fam.features(model, (x, x, pos))
    mask = dense_document_mask(pos)[0, 0]
    expect = torch.zeros(8, 8, dtype=torch.bool)
    for a, b in ((0, 3), (3, 5), (5, 8)):          # three documents, causal inside each
        expect[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    assert torch.equal(mask, expect)
    assert all(c["is_causal"] is False and torch.equal(c["mask"][0, 0], expect) for c in spy.calls)
    # Each document's features equal those of the document run alone.
    with torch.no_grad():
        alone = fam.features(model, (x[:, 3:5],))[0]
    torch.testing.assert_close(feats[:, 3:5], alone, rtol=1e-4, atol=1e-5)


def test_teacher_placement_rule():
    from compt_scale.train.teacher_placement import replicate_teacher
    gib = 2 ** 30
    # 5% of an 80 GiB device: 4 GiB of bf16 weights = 2^31 parameters.
    assert replicate_teacher(2 ** 31, torch.bfloat16, 80 * gib)
    assert not replicate_teacher(2 ** 31 + 1, torch.bfloat16, 80 * gib)
    assert not replicate_teacher(2 ** 31, torch.float32, 80 * gib)
    if not torch.cuda.is_available():    # no device memory to decide by: partitioned
        assert not replicate_teacher(10, torch.bfloat16)
