"""Independent oracles for numbers the code computes: the LR schedule, alpha calibration and the
planner's costs, each against values worked out by hand here (not by calling the code's formula)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from compt_scale.chain.planner import plan_rows
from compt_scale.chain.resolve import resolve
from compt_scale.config import TrainSpec, parse_chain
from compt_scale.families import hf_decoder
from compt_scale.kernels import IFDProjection
from compt_scale.train.loop import lr_lambda
from compt_scale.train.objective import FrozenTeacher, StudentWithIFD, calibrate_alpha


def test_lr_schedule_hand_values():
    # warmup 2, 10 steps, floor 0.1: linear warmup (step+1)/2, then 0.1 + 0.45 (1 + cos(pi p)),
    # p = (step - 2) / 8. cos(pi/4) = 0.70710678..., cos(pi/2) = 0, cos(3pi/4) = -0.70710678...
    t = TrainSpec(warmup_steps=2, min_lr_ratio=0.1, lr=1e-3)
    hand = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.1 + 0.45 * 1.7071067811865476, 6: 0.55,
            8: 0.1 + 0.45 * 0.2928932188134524, 10: 0.1, 13: 0.1}
    f = lr_lambda(t, 10)
    for step, want in hand.items():
        assert f(step) == pytest.approx(want, abs=1e-12), step
    # and what the optimizer actually sees through torch's LambdaLR
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    seen = []
    for _ in range(11):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(5e-4) and seen[6] == pytest.approx(5.5e-4) and seen[10] == pytest.approx(1e-4)


def test_alpha_is_the_hand_computed_loss_ratio():
    cfg_t = hf_decoder.load_config("llama-xs", vocab_size=128)
    cfg_s = hf_decoder.load_config("llama-s", vocab_size=128)
    teacher_model, student = hf_decoder.build(cfg_t, seed=0), hf_decoder.build(cfg_s, seed=1)
    head = IFDProjection(cfg_s.hidden_size, cfg_t.hidden_size, init="default")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g))
               for _ in range(3)]
    # by hand: cross entropy of the student's logits, and the mean squared error of T(final hidden
    # state) against the teacher's final hidden state, summed over the batches
    task_sum = ifd_sum = 0.0
    with torch.no_grad():
        for x, y in batches:
            out = student(input_ids=x, output_hidden_states=True)
            task_sum += F.cross_entropy(out.logits.reshape(-1, 128), y.reshape(-1)).item()
            f_t = teacher_model.model(input_ids=x).last_hidden_state
            f_s = out.hidden_states[-1]
            ifd_sum += ((f_s @ head.weight.T + head.bias - f_t) ** 2).mean().item()
    teacher = FrozenTeacher(hf_decoder, teacher_model, torch.float32, torch.device("cpu"))
    alpha = calibrate_alpha(StudentWithIFD(hf_decoder, student, [head]), teacher, batches, ratio=0.1)
    assert alpha == pytest.approx(0.1 * task_sum / ifd_sum, rel=1e-5)


def test_planner_costs_hand_computed(tmp_path):
    # Llama, hidden 32, ffn 64, 4 heads (MHA), 2 layers, vocab 256 (untied), seq_len 16.
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 64,
           "tie_word_embeddings": False, "vocab_size": 256}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    raw = {"name": "t", "data": {"vocab_size": 256, "seq_len": 16},
           "train": {"micro_batch_size": 2, "grad_accum": 3, "warmup_steps": 1},
           "stages": [{"name": "a", "model": str(tmp_path / "tiny.json"), "tokens": 10 * 96}]}
    row = plan_rows(resolve(parse_chain(raw)))[0]
    # params: embed 256x32, per layer q,k,v,o 4x32x32 + gate,up,down 3x32x64 + 2 norms x 32, final
    # norm 32, lm_head 256x32
    params = 8192 + 2 * (4096 + 6144 + 64) + 32 + 8192
    assert row["params"] == params == 37024
    # forward MACs/token: per layer 4x32x32 + 3x32x64 weights, attention QK^T + AV = 2 x 16 x 32,
    # plus lm_head 32 x 256; backward = 2 x forward + 0.5 x attention (fused SDPA recomputes QK^T)
    attention = 2 * (2 * 16 * 32)
    forward = 2 * (4096 + 6144) + attention + 8192
    backward = 2 * forward + attention // 2
    steps = 10                       # 960 tokens / (2 x 3 sequences x 16 tokens) per step
    assert row["steps"] == steps
    # training: 960 x (30,720 + 62,464) = 89,456,640, AdamW 10 steps x 3 x 37,024 = 1,110,720
    assert row["train_macs"] == 960 * (forward + backward) + steps * 3 * params == 90_567_360
    assert row["macs"] == row["train_macs"] and row["teacher_macs"] == 0
