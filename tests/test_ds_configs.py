"""DeepSpeed presets: the size rule, "auto" filling, conflicts, and a real engine on CPU accepting them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compt_scale.config import TrainSpec
from compt_scale.errors import CompTError
from compt_scale.train.distributed import free_port
from compt_scale.train.ds_config import PRESET_DIR, build_ds_config, pick_preset

ROOT = Path(__file__).resolve().parents[1]


def test_memory_rule_without_a_model_shape_and_forced_stage():
    # Without a model shape: one 80 GiB GPU's model states alone (mixed-precision Adam, by hand:
    # ZeRO-1 22 B/param, ZeRO-2 20, ZeRO-3 18 + the largest layer, offload: the largest layer only).
    assert pick_preset(10_000) == "zero1-small"
    assert pick_preset(3_000_000_000) == "zero1-small"       # 66e9 B <= 0.9 x 80 GiB = 77.3e9
    assert pick_preset(3_600_000_000) == "zero2-medium"      # 79.2e9 > 77.3e9 >= 72e9
    assert pick_preset(4_100_000_000) == "zero3-large"       # ZeRO-2 82e9 too much, ZeRO-3 73.8e9 fits
    assert pick_preset(13_000_000_000) == "zero3-offload-xl"
    assert pick_preset(70_000_000_000, 1) == "zero1-small"   # forced stage wins over size
    assert pick_preset(10, 3) == "zero3-large"
    with pytest.raises(CompTError):
        pick_preset(10, 5)


def test_every_preset_is_auto_only_where_spec_fills():
    for path in sorted(PRESET_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        assert "scheduler" not in raw, path
        for world in (1, 8):
            cfg = build_ds_config(10, TrainSpec(micro_batch_size=4, grad_accum=3, ds_config=str(path)),
                                  world, cuda=True)
            assert "auto" not in json.dumps(cfg), path
            assert cfg["train_batch_size"] == 4 * 3 * world


def test_fill_from_trainspec():
    t = TrainSpec(micro_batch_size=3, grad_accum=5, lr=3e-4, weight_decay=0.05, grad_clip=0.5, precision="bf16",
                  zero_stage=2)
    cfg = build_ds_config(2_000_000_000, t, world_size=16, cuda=True)
    assert cfg["zero_optimization"]["stage"] == 2
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"],
            cfg["train_batch_size"]) == (3, 5, 3 * 5 * 16)
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True
    assert cfg["communication_data_type"] == "fp32"                 # bf16 gradients reduced in fp32
    assert "communication_data_type" not in build_ds_config(10, TrainSpec(), 1, cuda=True)
    # One rank reduces nothing: no fp32 cast of every gradient per step.
    assert "communication_data_type" not in build_ds_config(10, TrainSpec(precision="bf16"), 1, cuda=True)
    assert cfg["timers"]["throughput"]["synchronized"] is False     # DeepSpeed's timer syncs otherwise
    assert cfg["bf16"]["check_grad_overflow"] is False              # ds_patches: no read-back per step
    p = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW"
    assert (p["lr"], p["weight_decay"], p["betas"], p["eps"]) == (3e-4, 0.05, [0.9, 0.95], 1e-8)
    assert "torch_adam" not in p             # on GPUs DeepSpeed's fused Adam is used
    assert "scheduler" not in cfg and cfg["steps_per_print"] >= 10**6
    cpu = build_ds_config(2_000_000_000, t, world_size=1, cuda=False)
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    assert cpu["optimizer"]["params"]["fused"] is True      # no per-sub-group fp32 temporaries
    assert "fused" not in p
    off = build_ds_config(10**11, TrainSpec(), 1, cuda=False)["zero_optimization"]
    assert off["offload_optimizer"]["pin_memory"] is False   # no pinned memory without CUDA
    forced = build_ds_config(10**11, TrainSpec(zero_stage=0), 1, cuda=True)
    assert forced["zero_optimization"]["stage"] == 0 and "offload_param" not in forced["zero_optimization"]


def test_user_ds_config(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.8, 0.9]}},
        "scheduler": {"type": "WarmupLR", "params": {}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    cfg = build_ds_config(10, TrainSpec(micro_batch_size=2, ds_config=str(user)), 2, cuda=True)
    assert cfg["optimizer"]["params"]["betas"] == [0.8, 0.9]      # explicit keys the spec lacks stay
    assert "scheduler" not in cfg                                  # the trainer's LambdaLR drives lr
    assert "reduce_bucket_size" not in cfg["zero_optimization"]    # "auto" -> DeepSpeed default
    assert cfg["zero_optimization"]["stage"] == 2
    assert build_ds_config(10, TrainSpec(micro_batch_size=2, ds_config=str(user), zero_stage=3),
                           2, cuda=True)["zero_optimization"]["stage"] == 3
    # A number that contradicts the spec is an error naming the key, not a silent mismatch.
    with pytest.raises(CompTError, match="train_micro_batch_size_per_gpu"):
        build_ds_config(10, TrainSpec(micro_batch_size=8, ds_config=str(user)), 2, cuda=True)
    user.write_text(json.dumps({"zero_optimization": {"stage": 1, "mystery": "auto"}}))
    with pytest.raises(CompTError, match="zero_optimization.mystery"):
        build_ds_config(10, TrainSpec(ds_config=str(user)), 1, cuda=True)
    user.write_text("{not json")
    with pytest.raises(CompTError, match="invalid JSON"):
        build_ds_config(10, TrainSpec(ds_config=str(user)), 1, cuda=True)


ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, deepspeed
    from compt_scale.config import TrainSpec
    from compt_scale.train.ds_config import build_ds_config
    deepspeed.init_distributed(dist_backend="gloo")
    out = []
    for case in json.loads(sys.argv[1]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        before = [p.detach().clone() for p in model.parameters()]
        train = TrainSpec(micro_batch_size=2, grad_accum=2, **case["train"])
        cfg = build_ds_config(case["n"], train, 1)
        # The trainer's contract: lr comes from a LambdaLR built on DeepSpeed's basic optimizer.
        eng, opt, _, sched = deepspeed.initialize(
            model=model, config=cfg, model_parameters=model.parameters(),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5))
        dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
        for _ in range(2 * train.grad_accum):
            x, y = torch.randn(2, 16, dtype=dtype), torch.randn(2, 4, dtype=dtype)
            eng.backward(torch.nn.functional.mse_loss(eng(x), y))
            eng.step()
        if eng.zero_optimization_partition_weights():
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                after = [p.detach().float().clone() for p in model.parameters()]
        else:
            after = [p.detach().float().clone() for p in model.parameters()]
        moved = any(not torch.allclose(a, b.float()) for a, b in zip(after, before))
        out.append(dict(stage=eng.zero_optimization_stage(), opt=type(eng.basic_optimizer).__name__,
                        bf16=eng.bfloat16_enabled(), lr=eng.get_lr()[0], moved=moved,
                        comm=str(eng.communication_data_type), fused=eng.basic_optimizer.defaults.get("fused"),
                        global_steps=eng.global_steps))
    print("RESULT " + json.dumps(out))
""")



@pytest.mark.slow
def test_deepspeed_initialize_accepts_presets_on_cpu(tmp_path):
    """A real 1-rank gloo engine per preset: ZeRO 0/1/2/3/3+offload, fp32 and bf16, each takes steps."""
    cases = [
        {"n": 1_000, "train": {}},                        # zero1-small
        {"n": 3_600_000_000, "train": {}},                # zero2-medium (memory rule, one 80 GiB GPU)
        {"n": 4_100_000_000, "train": {}},                # zero3-large
        {"n": 100_000_000_000, "train": {}},              # zero3-offload-xl
        {"n": 1_000, "train": {"zero_stage": 0}},
        {"n": 1_000, "train": {"precision": "bf16"}},
        {"n": 4_100_000_000, "train": {"precision": "bf16"}},
    ]
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script), json.dumps(cases)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert [x["stage"] for x in res] == [1, 2, 3, 3, 0, 1, 3]
    assert [x["bf16"] for x in res] == [False] * 5 + [True, True]
    assert [x["comm"] for x in res][-2:] == ["torch.bfloat16"] * 2    # bf16 on one rank: no fp32 reduction
    for x in res:
        assert x["opt"] == "AdamW" and x["moved"] and x["global_steps"] == 2 and x["fused"] is True, x
        assert x["lr"] == pytest.approx(2e-3 * 0.5), x
