"""Per-GPU memory and the preset `zero_stage: auto` picks from it (train/memory.py), checked against
DeepSpeed's own estimators and hand-computed figures."""
from __future__ import annotations

import pytest

from compt_scale.train import memory
from conftest import run_cli

GB = 10**9


def test_model_states_are_deepspeeds_estimates():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    n, largest = 7_000_000_000, 500_000_000
    for gpn, nodes in ((1, 1), (8, 1), (8, 4)):
        z2 = estimate_zero2_model_states_mem_needs(n, gpn, nodes, cpu_offload=False)[1]
        assert memory.model_states(n, largest, 2, False, gpn, nodes) == z2
        assert memory.model_states(n, largest, 1, False, gpn, nodes) == z2 + 2 * n   # + full 16-bit grads
        for off in (False, True):
            z3 = estimate_zero3_model_states_mem_needs(n, largest, gpn, nodes, cpu_offload=off,
                                                       cpu_offload_params=off)[1]
            assert memory.model_states(n, largest, 3, off, gpn, nodes) == z3


def test_activation_formula_by_hand():
    # Korthikanti et al. eq. 2: s b h (34 + 5 a s / h) per layer; checkpointing keeps 2 s b h per layer + one layer.
    s, h, a, layers, b = 2048, 1024, 16, 24, 8
    per_layer = s * b * h * (34 + 5 * a * s / h)
    assert memory.activations([(s, h, a, layers)], b, False) == int(layers * per_layer)
    assert memory.activations([(s, h, a, layers)], b, True) == int(layers * 2 * s * b * h + per_layer)


def test_70b_on_32_a100_80gb_needs_no_offload():
    # Llama-2-70B-like: 80 layers, h 8192, 64 heads, vocab 32000, seq 4096, micro-batch 1, checkpointing.
    n, largest = 70_000_000_000, 32_000 * 8192
    acts = memory.activations([(4096, 8192, 64, 80)], 1, True)
    chosen = memory.choose(memory.needs(n, largest, 32, 8, acts), 80 * 2**30)
    assert chosen.preset == "zero3-large" and not chosen.offload
    # By hand: ZeRO-3 = 4 x largest + 18 n / 32 = 1.05e9 + 39.4e9 bytes; ZeRO-1/2 keep 2n = 140e9 whole.
    assert chosen.model_states == 4 * largest + 18 * n // 32


def test_1b_on_one_24gb_gpu_by_hand():
    n, gpu = 1_000_000_000, 24 * 2**30                     # 0.9 x 24 GiB = 23.19e9 bytes
    pick = lambda acts: memory.choose(memory.needs(n, 0, 1, 1, acts), gpu).preset  # noqa: E731
    assert pick(0) == "zero1-small"                        # 22e9
    assert pick(2 * GB) == "zero2-medium"                  # 24e9 > 23.19e9 >= 20e9 + 2e9
    assert pick(4 * GB) == "zero3-large"                   # ZeRO-2 24e9 too much, ZeRO-3 18e9 + 4e9 fits
    assert pick(6 * GB) == "zero3-offload-xl"              # ZeRO-3 24e9 too much; offloaded: 0 + 6e9


def test_parse_bytes():
    assert memory.parse_bytes("80GB") == 80 * 2**30 == memory.parse_bytes("80 GiB")
    assert memory.parse_bytes("512MB") == 512 * 2**20
    for bad in ("", "80 parsecs", "-3GB", "0GB"):
        with pytest.raises(ValueError):
            memory.parse_bytes(bad)


def test_plan_prints_memory_per_gpu(tmp_path):
    proc = run_cli("plan", "configs/demo.yaml", "--gpus", "32", "--gpu-mem", "80GB")
    out = proc.stdout
    assert "memory per GPU on 32 GPU(s) of 80 GiB" in out and "model states" in out and "activ.ckpt" in out
    assert out.count("zero1-small") >= 4
    bad = run_cli("plan", "configs/demo.yaml", "--gpus", "2", "--gpu-mem", "lots", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("compt-scale: error: --gpu-mem")
