"""A profile before guessing: torch.profiler over a few training steps of the trainer's own step
(compt_scale/train/step.py, the engine built by loop.build_engine) for two setups, into JSON:

  student:        the student alone;
  student+teacher: the same student with a frozen teacher (~1/4 size) and the IFD term.

Per setup: the top ops / kernels by self time (device time on CUDA, CPU time otherwise), the time
split between the step's named ranges (teacher, student_forward, ifd, backward, optimizer; the
`record_function` ranges of step.py and objective.py: inclusive times, `ifd` lies inside
`student_forward`), wall seconds per step, and the host syncs seen in the profiled steps: on CUDA the
synchronizations torch reports (`torch.cuda.set_sync_debug_mode("warn")`) and the
cudaStreamSynchronize / cudaDeviceSynchronize / device-to-host copies in the trace; on CPU the
`.item()` / `bool(tensor)` / `.tolist()` calls (patched Tensor methods).

GPU geometry: the 374M Llama of shared/gpu/README.md (seq 2048, micro-batch 8, bf16, ZeRO-1,
train.compile on) and a 97M teacher, 3 warm-up steps (compilation) then 3 profiled steps per setup.
--cpu-smoke: tiny models on CPU, fp32, no compile; its timings mean nothing (tests/test_step_sync.py).

Usage: python benchmarks/profile_step.py [--cpu-smoke] [--setups student,student+teacher] [--out F]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

sys.path.insert(0, str(HERE))
from throughput import STUDENT, TEACHER  # noqa: E402  (the models the throughput benchmark measures)

GPU = {"seq": 2048, "mb": 8, "warmup": 3, "steps": 3}
SMOKE = {"seq": 32, "mb": 2, "warmup": 1, "steps": 2}
SMOKE_STUDENT = dict(STUDENT, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=176, vocab_size=512)
SMOKE_TEACHER = dict(SMOKE_STUDENT, hidden_size=32, intermediate_size=88)
SETUPS = ("student", "student+teacher")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def random_data(dir_: Path, vocab: int, seq: int, samples: int) -> Path:
    """A prepared-data dir in data/packed.py's layout (meta.json + token streams), random tokens."""
    dir_.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", samples), ("val", 8)):
        rng.integers(0, vocab, size=n * seq + 1, dtype=np.uint16).tofile(dir_ / f"{split}.bin")
    (dir_ / "meta.json").write_text(json.dumps({"vocab_size": vocab, "dtype": "uint16", "seq_len": seq, "eos_id": 2}))
    return dir_


class Rig:
    """An engine, its teacher and loader, built exactly as train_stage builds them, stepped by
    step.train_step. `close()` stops the loader's prefetch thread."""

    def __init__(self, work: Path, student: dict, teacher: dict | None, geo: dict, steps: int,
                 compile_: bool | str = "auto", zero_stage: int = 1, precision: str | None = None,
                 doc_mask: bool = False, alpha: float = 0.1):
        from compt_scale.config import parse_chain
        from compt_scale.data.loader import PrefetchLoader
        from compt_scale.families import get_family
        from compt_scale.train.distributed import device, init_distributed
        from compt_scale.train.ds_config import build_ds_config
        from compt_scale.train.loop import LoopConfig, build_engine
        from compt_scale.train.metrics import StepLosses
        from compt_scale.train.objective import FrozenTeacher, StudentWithIFD

        init_distributed()
        cuda = torch.cuda.is_available()
        precision = precision or ("bf16" if cuda else "fp32")
        work.mkdir(parents=True, exist_ok=True)
        s_path = work / "student.json"
        s_path.write_text(json.dumps(student))
        spec = parse_chain({
            "name": "profile", "data": {"vocab_size": student["vocab_size"], "seq_len": geo["seq"], "doc_mask": doc_mask},
            "train": {"micro_batch_size": geo["mb"], "grad_accum": 1, "lr": 3e-4, "warmup_steps": 2,
                      "precision": precision, "zero_stage": zero_stage, "compile": compile_, "log_every": 1},
            "ifd": {"alpha": alpha},
            "stages": [{"name": "s", "model": str(s_path), "tokens": steps * geo["mb"] * geo["seq"]}]}, base_dir=work)
        fam = get_family("hf_decoder")
        stage = spec.stages[0]
        train, ifd = spec.train_for(stage), spec.ifd_for(stage)
        data_dir = random_data(work / "data", student["vocab_size"], geo["seq"], steps * geo["mb"] + 16)
        cfg = fam.load_config(str(s_path))
        model = fam.build(cfg, seed=1)
        self.teacher, heads = None, None
        if teacher is not None:
            t_cfg = fam.load_config(str(self._write(work / "teacher.json", teacher)))
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            self.teacher = FrozenTeacher(fam, fam.build(t_cfg, seed=2), dtype, device())
            heads = fam.ifd_heads(cfg, t_cfg, ifd)
        n_params = sum(p.numel() for p in model.parameters())
        self.cfg = LoopConfig(stage="s", seed=0, steps=steps, family=fam, spec=spec, tokens_per_sample=geo["seq"],
                              macs_per_step=0.0, train=train, ifd=ifd, ds_config=build_ds_config(n_params, train, 1),
                              stage_dir=work / "stage", data_dir=data_dir)
        self.student_with_ifd = StudentWithIFD(fam, model, heads)
        self.engine = build_engine(self.student_with_ifd, self.teacher, self.cfg)
        self.losses = StepLosses(device(), 1)
        self.alpha = alpha
        self.loader = PrefetchLoader(fam.dataset(spec, data_dir, "train"), seed=0, start=0, steps=steps,
                                     grad_accum=1, micro_batch=geo["mb"], rank=0, world=1, device=device())
        self.batches = self.loader.__enter__()

    @staticmethod
    def _write(path: Path, cfg: dict) -> Path:
        path.write_text(json.dumps(cfg))
        return path

    def step(self) -> None:
        from compt_scale.train.step import train_step
        self.losses.start_step()
        train_step(self.engine, self.teacher, self.batches, self.alpha, self.losses, 1,
                   use_teacher=self.teacher is not None)

    def close(self) -> None:
        self.loader.__exit__(None, None, None)


class HostReads:
    """Counts `.item()` / `bool(tensor)` / `.tolist()` calls while active (the CPU view of host syncs)."""

    NAMES = ("item", "__bool__", "tolist")

    def __init__(self):
        self.counts = collections.Counter()
        self._orig = {}

    def __enter__(self):
        for name in self.NAMES:
            orig = self._orig[name] = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, _name=name, **k):
                self.counts[_name] += 1
                return _orig(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)


def _sync_all() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_setup(rig: Rig, geo: dict, top: int = 25) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from compt_scale.train.step import RANGES
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    for _ in range(geo["warmup"]):
        rig.step()
    _sync_all()
    warmup_s = time.perf_counter() - t0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings(record=True) as caught, HostReads() as reads, profile(activities=acts) as prof:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        for _ in range(geo["steps"]):
            rig.step()
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        _sync_all()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    dev_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, dev_key), reverse=True)
    ranges = {}
    for e in events:
        if e.key in RANGES:
            ranges[e.key] = {"cpu_ms": e.cpu_time_total / 1e3 / geo["steps"],
                             "device_ms": getattr(e, "device_time_total", 0.0) / 1e3 / geo["steps"], "calls": e.count}
    sync_events = {e.key: e.count for e in events if e.key in SYNC_EVENTS or "DtoH" in e.key or "Memcpy DtoH" in e.key}
    sync_warnings = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"warmup_s": warmup_s, "step_s": wall / geo["steps"], "ranges_per_step": ranges,
            "host_reads": dict(reads.counts), "sync_warnings": len(sync_warnings),
            "sync_warning_examples": sorted(set(sync_warnings))[:10], "sync_events": sync_events,
            "top_ops": [{"name": e.key, "self_ms_per_step": getattr(e, dev_key) / 1e3 / geo["steps"], "calls": e.count}
                        for e in rows[:top]]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("profile_step.py: no CUDA device; use --cpu-smoke to test the script on CPU")
    geo, student, teacher = (SMOKE, SMOKE_STUDENT, SMOKE_TEACHER) if smoke else (GPU, STUDENT, TEACHER)
    out = args.out or HERE / "results" / ("profile_step-cpu-smoke.json" if smoke else "profile_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke: timings meaningless)"
    res = {"device": device, "torch": torch.__version__, "geometry": geo, "compile": not args.no_compile,
           "setups": {}}
    for name in args.setups.split(","):
        if name not in SETUPS:
            sys.exit(f"profile_step.py: unknown setup {name!r} (choose from {', '.join(SETUPS)})")
        with tempfile.TemporaryDirectory() as tmp:
            rig = Rig(Path(tmp), student, teacher if name == "student+teacher" else None, geo,
                      steps=geo["warmup"] + geo["steps"], compile_=False if (args.no_compile or smoke) else "auto")
            try:
                res["setups"][name] = profile_setup(rig, geo)
            finally:
                rig.close()
        out.write_text(json.dumps(res, indent=2))   # after each setup: a run cut short keeps what it measured
        r = res["setups"][name]
        print(f"[{name}] {r['step_s'] * 1e3:.1f} ms/step, host reads {r['host_reads']}, sync warnings "
              f"{r['sync_warnings']}, ranges { {k: round(v['device_ms' if torch.cuda.is_available() else 'cpu_ms'], 2) for k, v in r['ranges_per_step'].items()} }",
              flush=True)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
