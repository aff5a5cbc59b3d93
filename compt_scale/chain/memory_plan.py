"""`compt-scale plan --gpus N --gpu-mem M`: the per-GPU memory of each stage and the DeepSpeed preset
that `train.zero_stage: auto` would pick for it on N GPUs of M bytes (train/memory.py has the terms),
read from the stages' plans; a stage that does not fit gets the cheapest change that makes it fit."""
from __future__ import annotations

import dataclasses
from typing import TypeGuard

from ..families import get_family
from ..train import memory
from ..train.ds_config import STAGE_PRESET
from .plan import StagePlan, memory_needs, plan_stage
from .planner import with_budgets


def _chosen(plan: StagePlan, needs: list[memory.Need], gpu_mem: int) -> tuple[memory.Need | None, str]:
    train = plan.train
    if train.ds_config is not None:
        return None, f"ds_config {train.ds_config}"
    if isinstance(train.zero_stage, int):   # 0-3 (validated by config.py), else "auto"
        return next(c for c in needs if c.preset == STAGE_PRESET[train.zero_stage]), "forced by train.zero_stage"
    return memory.choose(needs, gpu_mem), "auto: the first preset that fits"


def _fits(need: memory.Need | None, gpu_mem: int) -> TypeGuard[memory.Need]:
    return need is not None and need.total <= memory.HEADROOM * gpu_mem


def _needs_with(spec, plan: StagePlan, gpus: int, per_node: int, **train_changes) -> list[memory.Need]:
    train = dataclasses.replace(plan.train, **train_changes)
    return memory_needs(get_family(spec.family), spec, train, plan.student, plan.teacher_params, plan.params,
                        gpus, per_node)


def cheapest_fix(spec, plan: StagePlan, gpus: int, gpu_mem: int, per_node: int) -> str | None:
    """The cheapest change that makes a stage fit, tried in order of what it costs: a smaller
    micro-batch (the same global batch through more accumulation: no extra compute), activation
    checkpointing (~1/3 more compute), the next ZeRO preset (more communication, offload last), then
    more GPUs. None when nothing tried fits."""
    train, fix_total = plan.train, lambda n: f"{n.total / memory.GIB:.1f} GiB"
    forced = train.zero_stage != "auto" or train.ds_config is not None
    mb = train.micro_batch_size
    while mb > 1:
        mb //= 2
        need, _ = _chosen(plan, _needs_with(spec, plan, gpus, per_node, micro_batch_size=mb), gpu_mem)
        if _fits(need, gpu_mem):
            return (f"train.micro_batch_size: {mb} with grad_accum: {train.grad_accum * train.micro_batch_size // mb}"
                    f" (the same global batch; {fix_total(need)})")
    if not train.activation_checkpointing:
        need, _ = _chosen(plan, _needs_with(spec, plan, gpus, per_node, activation_checkpointing=True), gpu_mem)
        if _fits(need, gpu_mem):
            return f"train.activation_checkpointing: true ({fix_total(need)})"
    if forced:
        fitting = next((n for n in _needs_with(spec, plan, gpus, per_node) if _fits(n, gpu_mem)), None)
        if fitting is not None:
            return f"train.zero_stage: auto (picks {fitting.preset}, {fix_total(fitting)})"
    for more in (gpus * k for k in (2, 4, 8, 16, 32)):
        need, _ = _chosen(plan, _needs_with(spec, plan, more, min(more, per_node)), gpu_mem)
        if _fits(need, gpu_mem):
            return f"--gpus {more} ({need.preset}, {fix_total(need)})"
    return None


def memory_rows(spec, gpus: int, gpu_mem: int, gpus_per_node: int | None = None) -> list[dict]:
    fam = get_family(spec.family)
    spec = with_budgets(spec)
    per_node = gpus_per_node or min(gpus, 8)
    rows = []
    for st in spec.stages + spec.baselines:
        plan = plan_stage(spec, st.name, gpus, gpus_per_node=per_node)
        towers, _ = fam.memory_shape(plan.student, spec)
        acts = {ck: memory.activations(towers, plan.train.micro_batch_size, ck) for ck in (False, True)}
        chosen, why = _chosen(plan, list(plan.memory), gpu_mem)
        fits = _fits(chosen, gpu_mem)
        rows.append({"stage": st.name, "preset": chosen.preset if chosen else "-", "why": why,
                     "model_states": chosen.model_states if chosen else None,
                     "teacher": chosen.teacher if chosen else None, "activations": acts[False],
                     "activations_ckpt": acts[True], "checkpointing": plan.train.activation_checkpointing,
                     "total": chosen.total if chosen else None, "fits": fits,
                     "fix": None if fits or chosen is None else cheapest_fix(spec, plan, gpus, gpu_mem, per_node)})
    return rows


def format_memory(spec, gpus: int, gpu_mem: int, gpus_per_node: int | None = None) -> str:
    gib = lambda b: "-" if b is None else f"{b / memory.GIB:.1f}"  # noqa: E731
    head = (f"{'stage':<14}{'preset':<18}{'model states':>13}{'teacher':>9}{'activ.':>9}{'activ.ckpt':>11}"
            f"{'total':>9}  fits")
    lines = [f"memory per GPU on {gpus} GPU(s) of {gpu_mem / memory.GIB:.0f} GiB (GiB; activations per "
             f"micro-batch, 16-bit, with and without activation checkpointing; total uses the stage's "
             f"setting; fits = total <= {memory.HEADROOM:.0%} of the GPU)", head, "-" * len(head)]
    fixes = []
    for r in memory_rows(spec, gpus, gpu_mem, gpus_per_node):
        used = "ckpt" if r["checkpointing"] else "no ckpt"
        lines.append(f"{r['stage']:<14}{r['preset']:<18}{gib(r['model_states']):>13}{gib(r['teacher']):>9}"
                     f"{gib(r['activations']):>9}{gib(r['activations_ckpt']):>11}{gib(r['total']):>9}  "
                     f"{'yes' if r['fits'] else 'NO'} ({used}; {r['why']})")
        if r["total"] is not None and not r["fits"]:
            fixes.append(f"{r['stage']} does not fit: " + (f"cheapest fix: {r['fix']}" if r["fix"] else
                                                            "no single change tried (micro-batch, activation "
                                                            "checkpointing, preset, up to 32x the GPUs) fits"))
    return "\n".join(lines + fixes)
