"""train.liger and train.compile: liger falls back cleanly where it cannot run and refuses in one line
when forced; a compiled student trains the same trajectory as an eager one, a compiled teacher gives
the same features."""
from __future__ import annotations

import sys

import pytest
import torch

from compt_scale.config import parse_chain
from compt_scale.errors import CompTError
from compt_scale.families import get_family
from compt_scale.train.objective import FrozenTeacher
from compt_scale.train.speedups import liger_wanted
from conftest import run_cli, train_losses, write_spec

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")


def losses(stage_dir):
    return [loss for loss, _ in train_losses(stage_dir).values()]


@needs_cpu_only
def test_liger_auto_falls_back_on_cpu_without_importing_it():
    fam = get_family("hf_decoder")
    cfg = fam.load_config("llama-xs")
    assert fam.liger_supported(cfg)
    assert liger_wanted("auto", fam, cfg, zero_stage=1) is False
    assert liger_wanted("off", fam, cfg, zero_stage=1) is False
    assert "liger_kernel" not in sys.modules
    clip = get_family("open_clip")
    assert liger_wanted("auto", clip, clip.load_config("clip-xs"), zero_stage=1) is False


@needs_cpu_only
def test_liger_on_without_cuda_is_one_line_error():
    fam = get_family("hf_decoder")
    with pytest.raises(CompTError, match=r"^train\.liger: on, but no CUDA device") as e:
        liger_wanted("on", fam, fam.load_config("llama-xs"), zero_stage=1)
    assert "\n" not in str(e.value)
    gpt2 = fam.load_config("gpt2-xs")
    with pytest.raises(CompTError, match="'gpt2' is not a liger-supported"):
        liger_wanted("on", fam, gpt2, zero_stage=1)


def test_liger_yaml_on_off_and_bad_value(tmp_path):
    base = {"name": "x", "stages": [{"name": "a", "model": "llama-xs", "tokens": 100}]}
    # A bare YAML `on` / `off` arrives as a boolean.
    assert parse_chain({**base, "train": {"liger": True}}).train.liger == "on"
    assert parse_chain({**base, "train": {"liger": False}}).train.liger == "off"
    assert parse_chain(base).train.liger == "auto" and parse_chain(base).train.compile == "auto"
    with pytest.raises(CompTError, match=r"train\.compile: must be true, false or auto"):
        parse_chain({**base, "train": {"compile": "yes"}})
    with pytest.raises(CompTError, match=r"train\.liger: must be auto, on or off"):
        parse_chain({**base, "train": {"liger": "fast"}})


@needs_cpu_only
def test_stage_with_liger_on_exits_2_in_one_line(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "s.yaml", [{"name": "a", "model": "llama-xs", "tokens": 2 * 4 * 32}],
                      data_dir=tiny_data)
    spec.write_text(spec.read_text().replace("train:\n", "train:\n  liger: on\n", 1))
    proc = run_cli("stage", spec, "--stage", "a", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("compt-scale: error: train.liger: on, but no CUDA")


@pytest.mark.heavy
@pytest.mark.slow
def test_compiled_student_matches_eager(tmp_path, tiny_data):
    """One tiny model, 3 steps, train.compile on vs off (inductor on CPU: slow, hence tiny)."""
    runs = {}
    for compile_ in (False, True):
        spec = write_spec(tmp_path / f"c{compile_}.yaml", [{"name": "a", "model": "llama-xs", "tokens": 3 * 4 * 32}],
                          data_dir=tiny_data, train={"compile": compile_, "eval_batches": 1})
        proc = run_cli("stage", spec, "--stage", "a", "--out", tmp_path / f"o{compile_}", timeout=1800)
        assert ("torch.compile: True" in proc.stdout + proc.stderr) == compile_
        runs[compile_] = losses(tmp_path / f"o{compile_}" / "a")
    assert len(runs[False]) == 3
    # Inductor fuses and reorders float ops: equal to float32 rounding, not bitwise.
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=2e-4, atol=2e-4)


@pytest.mark.heavy
@pytest.mark.slow
def test_compiled_teacher_features_match_eager():
    fam = get_family("hf_decoder")
    model = fam.build(fam.load_config("llama-xs", vocab_size=512), seed=0)
    teacher = FrozenTeacher(fam, model, torch.float32, torch.device("cpu"))
    batch = (torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0)),)
    eager = teacher.features(batch)
    teacher.compile()
    compiled = teacher.features(batch)
    assert all(getattr(b, "_compt_compiled", False) for b in teacher.model.base_model.layers)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
