"""The IFD term of the CoM-PT objective: present, with gradients to the student and to T, none to the
teacher. Alpha calibration is checked against a hand-computed ratio in test_oracles.py."""
from __future__ import annotations

import torch

from compt_scale.families import hf_decoder
from compt_scale.kernels import IFDProjection
from compt_scale.train.objective import FrozenTeacher, StudentWithIFD


def tiny(preset, seed):
    return hf_decoder.build(hf_decoder.load_config(preset, vocab_size=128), seed=seed)


def test_ifd_gradients_reach_student_and_projection_not_teacher():
    teacher = FrozenTeacher(hf_decoder, tiny("llama-xs", 0), torch.float32, torch.device("cpu"))
    student = tiny("llama-s", 1)
    module = StudentWithIFD(hf_decoder, student, [IFDProjection(128, 64, init="default")])
    x = torch.randint(0, 128, (2, 16))
    y = torch.randint(0, 128, (2, 16))
    task, ifd = module((x, y), teacher.features((x, y)), alpha=0.5)
    assert ifd.item() > 0
    # The IFD term alone: its gradient flows into the student's layers and into T.
    ifd.backward()
    assert module.ifd[0].weight.grad is not None and module.ifd[0].weight.grad.abs().sum() > 0
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    # alpha scales the term linearly.
    _, ifd2 = module((x, y), teacher.features((x, y)), alpha=1.0)
    assert torch.allclose(ifd2, 2 * ifd.detach(), rtol=1e-5)


def test_without_teacher_the_objective_is_the_task_loss():
    student = tiny("llama-xs", 0)
    module = StudentWithIFD(hf_decoder, student, None)
    x = torch.randint(0, 128, (2, 16))
    task, ifd = module((x, x))
    ref = torch.nn.functional.cross_entropy(student(input_ids=x).logits.reshape(-1, 128), x.reshape(-1))
    assert ifd.item() == 0 and torch.allclose(task, ref)

