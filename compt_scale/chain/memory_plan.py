"""`compt-scale plan --gpus N --gpu-mem M`: the per-GPU memory of each stage and the DeepSpeed preset
that `train.zero_stage: auto` would pick for it on N GPUs of M bytes (train/memory.py has the terms)."""
from __future__ import annotations

from ..families import get_family
from ..train import memory
from ..train.ds_config import STAGE_PRESET
from .planner import _config, teacher_of


def memory_rows(spec, gpus: int, gpu_mem: int, gpus_per_node: int | None = None) -> list[dict]:
    fam = get_family(spec.family)
    per_node = gpus_per_node or min(gpus, 8)
    rows = []
    for i, st in enumerate(spec.stages + spec.baselines):
        cfg, train = _config(spec, st), spec.train_for(st)
        teacher = teacher_of(spec, i) if i < len(spec.stages) and spec.ifd_for(st).enabled else None
        t_params = fam.param_count(_config(spec, teacher)) if teacher is not None else 0
        towers, largest = fam.memory_shape(cfg, spec)
        acts = {ck: memory.activations(towers, train.micro_batch_size, ck) for ck in (False, True)}
        cands = memory.needs(fam.param_count(cfg), largest, gpus, per_node, acts[train.activation_checkpointing],
                             t_params)
        if train.ds_config is not None:
            chosen, why = None, f"ds_config {train.ds_config}"
        elif train.zero_stage != "auto":
            chosen = next(c for c in cands if c.preset == STAGE_PRESET[train.zero_stage])
            why = "forced by train.zero_stage"
        else:
            chosen, why = memory.choose(cands, gpu_mem), "auto: the first preset that fits"
        rows.append({"stage": st.name, "preset": chosen.preset if chosen else "-", "why": why,
                     "model_states": chosen.model_states if chosen else None,
                     "teacher": chosen.teacher if chosen else None, "activations": acts[False],
                     "activations_ckpt": acts[True], "checkpointing": train.activation_checkpointing,
                     "total": chosen.total if chosen else None,
                     "fits": chosen is not None and chosen.total <= memory.HEADROOM * gpu_mem})
    return rows


def format_memory(spec, gpus: int, gpu_mem: int, gpus_per_node: int | None = None) -> str:
    gib = lambda b: "-" if b is None else f"{b / memory.GIB:.1f}"  # noqa: E731
    head = (f"{'stage':<14}{'preset':<18}{'model states':>13}{'teacher':>9}{'activ.':>9}{'activ.ckpt':>11}"
            f"{'total':>9}  fits")
    lines = [f"memory per GPU on {gpus} GPU(s) of {gpu_mem / memory.GIB:.0f} GiB (GiB; activations per "
             f"micro-batch, 16-bit, with and without activation checkpointing; total uses the stage's "
             f"setting; fits = total <= {memory.HEADROOM:.0%} of the GPU)", head, "-" * len(head)]
    for r in memory_rows(spec, gpus, gpu_mem, gpus_per_node):
        used = "ckpt" if r["checkpointing"] else "no ckpt"
        lines.append(f"{r['stage']:<14}{r['preset']:<18}{gib(r['model_states']):>13}{gib(r['teacher']):>9}"
                     f"{gib(r['activations']):>9}{gib(r['activations_ckpt']):>11}{gib(r['total']):>9}  "
                     f"{'yes' if r['fits'] else 'NO'} ({used}; {r['why']})")
    return "\n".join(lines)
