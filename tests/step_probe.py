"""Run by tests/test_step_sync.py in its own process (a world of one, gloo): the trainer's step
(benchmarks/profile_step.py's Rig: loop.build_engine + step.train_step) with a teacher and IFD, bf16,
ZeRO-1, train.compile on, observed from outside:

- host reads: every `.item()` / `bool(tensor)` / `.tolist()` during three steps after a warm-up
  step, with where it came from;
- dynamo: the graphs compiled (through a counting backend that wraps aot_eager: the same tracing,
  fullgraph check and autograd as inductor, no code generation), their widths (the student's blocks
  are 64 wide, the teacher's 32), how often each ran during the three steps, graph breaks;
- the teacher's forward: grad / inference mode inside it, and whether all hidden states were asked for.

Writes a JSON of what it saw to argv[1]; the test decides.
"""
from __future__ import annotations

import collections
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def counting_backend(seen: list):
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        widths = sorted({int(t.shape[-1]) for t in example_inputs if torch.is_tensor(t) and t.dim() == 3})
        rec = {"widths": widths, "calls": 0}
        seen.append(rec)
        compiled = aot_eager(gm, example_inputs)

        def run(*args):
            rec["calls"] += 1
            return compiled(*args)
        return run
    return backend


def main(out: Path) -> None:
    import profile_step as ps

    from compt_scale.train import compile as compile_mod
    graphs: list = []
    backend = counting_backend(graphs)
    compile_mod.backend = lambda: backend
    with tempfile.TemporaryDirectory() as tmp:
        rig = ps.Rig(Path(tmp), ps.SMOKE_STUDENT, ps.SMOKE_TEACHER, ps.SMOKE, steps=5, compile_=True,
                     zero_stage=1, precision="bf16")
        teacher_calls = []

        def look(module, args, kwargs):
            teacher_calls.append({"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
                                  "hidden_states": bool(kwargs.get("output_hidden_states"))})
        rig.teacher.model.base_model.register_forward_pre_hook(look, with_kwargs=True)
        rig.step()                       # warm-up: dynamo compiles here
        for g in graphs:
            g["calls"] = 0
        reads = collections.Counter()
        originals = {n: getattr(torch.Tensor, n) for n in ("item", "__bool__", "tolist")}
        for name, orig in originals.items():
            def counted(t, *a, _orig=orig, _name=name, **k):
                frames = traceback.extract_stack()[:-1]
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-4:]))
                # CPU AdamW (torch_adam, CPU runs only) reads its host-side step counter: not a device
                # read; on CUDA the optimizer is DeepSpeed's fused Adam.
                optim = any("/torch/optim/" in f.filename for f in frames)
                reads[(_name, where, optim)] += 1
                return _orig(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        try:
            for _ in range(3):
                rig.step()
        finally:
            for name, orig in originals.items():
                setattr(torch.Tensor, name, orig)
        feats = rig.teacher.features(rig.batches.__next__()[2])
        task = float(rig.losses.task)
        rig.close()
    from torch._dynamo.utils import counters
    graph_breaks = dict(counters["graph_break"])
    # benchmarks/profile_step.py as a user runs it (tiny form, its own engine, eager), in this process.
    ps.main(["--cpu-smoke", "--setups", "student+teacher", "--out", str(out.with_suffix(".profile.json"))])
    out.write_text(json.dumps({
        "reads": [{"what": k[0], "where": k[1], "optimizer_host_step": k[2], "n": v} for k, v in reads.items()],
        "graphs": graphs, "graph_breaks": graph_breaks,
        "teacher_calls": teacher_calls, "teacher_feature_grad": [f.requires_grad or f.grad_fn is not None for f in feats],
        "last_task_loss": task}))


def cuda_main(out: Path) -> None:
    """On a GPU (tests/test_cuda.py): the same rig, bf16, ZeRO-1, train.compile auto (inductor), three
    steps after two warm-up steps under torch.cuda.set_sync_debug_mode("error"): any synchronizing
    CUDA call in the step raises."""
    import profile_step as ps
    with tempfile.TemporaryDirectory() as tmp:
        rig = ps.Rig(Path(tmp), ps.SMOKE_STUDENT, ps.SMOKE_TEACHER, dict(ps.SMOKE, seq=256), steps=6,
                     compile_="auto", zero_stage=1, precision="bf16")
        for _ in range(2):
            rig.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                rig.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        task = float(rig.losses.task)
        rig.close()
    out.write_text(json.dumps({"ok": True, "last_task_loss": task}))


if __name__ == "__main__":
    (cuda_main if sys.argv[2:] == ["cuda"] else main)(Path(sys.argv[1]))
