"""A third family, defined in tests/toy_family.py and registered only through the environment
(COMPT_SCALE_FAMILIES), runs `compt-scale plan` and a 2-stage `compt-scale chain`: the package has no
line about it. Checked against what the family's code did not compute: the grown stage's first loss
against the teacher export's loss on the same batch (function preservation through the shared growth
registry), parameter counts against the loaded exports, MACs against torch's FLOP counter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from compt_scale.config import DATA_SPECS, FAMILIES_ENV, FAMILY_MODULES, load_chain, load_env_families
from compt_scale.errors import CompTError
from compt_scale.flops import human
from conftest import read_metrics, run_cli, write_spec

MODULE = "tests.toy_family"     # importable from the repo root (run_cli's cwd; `python -m pytest`)
ENV = {FAMILIES_ENV: f"toy={MODULE}"}
STEPS = {"toy-s": 3, "toy-m": 2}


@pytest.fixture
def toy(monkeypatch):
    """The toy family registered in this process too (undone after the test)."""
    import importlib
    module = importlib.import_module(MODULE)
    monkeypatch.setitem(FAMILY_MODULES, "toy", MODULE)
    monkeypatch.setitem(DATA_SPECS, "toy", module.DATA_SPEC)
    return module


def _spec(tmp_path: Path, data_dir: Path) -> Path:
    tokens_per_step = 4 * 32   # conftest TINY_TRAIN micro_batch_size x TINY_DATA seq_len, 1 rank
    return write_spec(tmp_path / "toy.yaml", [
        {"name": "toy-s", "model": "toy-s", "tokens": STEPS["toy-s"] * tokens_per_step},
        {"name": "toy-m", "model": "toy-m", "tokens": STEPS["toy-m"] * tokens_per_step},
    ], data_dir=data_dir, family="toy", growth={"width": "clone", "depth": "zero"}, ifd={"alpha": 0.5})


def _plan_table(text: str) -> dict[str, list[str]]:
    """`plan`'s rows by stage name: [model, params, ratio, tokens, steps, ...]."""
    return {ln.split()[0]: ln.split()[1:] for ln in text.splitlines() if ln.split()[:1] in (["toy-s"], ["toy-m"])}


@pytest.mark.slow
def test_toy_family_plans_and_runs_a_grown_chain(tmp_path, tiny_data, toy):
    from compt_scale.chain.planner import plan_rows
    from compt_scale.data.packed import sample_indices
    spec_path = _spec(tmp_path, tiny_data)
    # Unregistered, the family is unknown; the environment registers it in every process.
    unknown = run_cli("plan", spec_path, check=False, env={FAMILIES_ENV: ""})
    assert unknown.returncode == 2 and "spec.family: unknown family 'toy'" in unknown.stderr
    table = _plan_table(run_cli("plan", spec_path, env=ENV).stdout)
    out = tmp_path / "out"
    run_cli("chain", spec_path, "--out", out, env=ENV)
    manifest = json.loads((out / "manifest.json").read_text())["stages"]

    spec = load_chain(spec_path)
    for row in plan_rows(spec):
        rec = manifest[row["name"]]
        assert rec["status"] == "done"
        for key in ("params", "tokens", "steps", "train_macs", "teacher_macs", "macs"):
            assert row[key] == rec[key], (row["name"], key)
        assert rec["steps"] == STEPS[row["name"]]
        # what `plan` printed (a subprocess that found the family through the environment)
        printed = table[row["name"]]
        assert (printed[1], printed[3], printed[4]) == (human(rec["params"]), f"{rec['tokens']:,}", str(rec["steps"]))
        # the export: what a user loads with the toy module, no temp dirs beside it
        export = out / row["name"] / "model"
        assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
        assert not list((out / row["name"]).glob(".model.tmp-*"))
        model = toy.load_export(export)
        assert rec["params"] == sum(p.numel() for p in model.parameters())
    assert manifest["toy-m"]["teacher"] == "toy-s" and manifest["toy-m"]["teacher_macs"] > 0

    # The shared registry grew it with the toy's layout: clone width, depth `zero` (layers 2, 3 new).
    growth = json.loads((out / "toy-m" / "growth.json").read_text())
    assert growth["layout"] == "toy-mlp" and growth["width"] == "clone"
    assert growth["zeroed_layers"] == {"layers": [2, 3]}
    assert growth["sizes"]["hidden"] == [32, 64] and growth["sizes"]["layers"] == [2, 4]

    # Function preservation: the grown student's loss before its first update (step 1's task loss)
    # is the teacher export's loss on the same batch, computed here from the export alone.
    first = next(r for r in read_metrics(out / "toy-m") if r.get("step") == 1 and "task_loss" in r)
    train = toy.dataset(spec, tiny_data, "train")
    batch = train.batch(sample_indices(len(train), spec.seed, 0, 0, 1, 4, 0, 1))
    teacher = toy.load_export(out / "toy-s" / "model").eval()
    with torch.no_grad():
        teacher_loss = float(toy.losses(teacher, batch)[0])
    assert first["task_loss"] == pytest.approx(teacher_loss, rel=1e-5, abs=1e-6)
    # ... and training moved it: the export is not the teacher grown and left alone
    grown = toy.load_export(out / "toy-m" / "model").eval()
    with torch.no_grad():
        assert abs(float(toy.losses(grown, batch)[0]) - teacher_loss) > 1e-4


def test_toy_family_macs_and_params_match_the_module(toy):
    """The toy's cost formula against torch's FLOP counter, its parameter count against the module."""
    from compt_scale.config import TextDataSpec
    cfg = toy.ToyConfig(hidden_size=24, num_layers=3, vocab_size=97)
    model = toy.build(cfg, 0)
    assert toy.param_count(cfg) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    with FlopCounterMode(display=False) as counter:
        model(ids)
    assert counter.get_total_flops() == 2 * ids.numel() * toy.matmul_macs_per_token(cfg)   # 2 FLOPs per MAC

    class Spec:
        data = TextDataSpec(seq_len=8)
    macs = toy.stage_macs(cfg, None, Spec, 2)
    assert macs["train_macs"] == 3 * counter.get_total_flops() // 2 + 3 * toy.param_count(cfg)
    assert macs["teacher_macs"] == 0


@pytest.mark.parametrize("value, error", [
    ("toy", "expected name=module"),
    ("toy=", "expected name=module"),
    ("toy=no_such_module_for_compt", "cannot import no_such_module_for_compt"),
    ("toy=json", "module json has no FAMILY named 'toy'"),
    ("hf_decoder=tests.toy_family", "family 'hf_decoder' is already compt_scale.families.hf_decoder"),
])
def test_bad_families_env_is_one_line(monkeypatch, value, error):
    monkeypatch.setenv(FAMILIES_ENV, value)
    with pytest.raises(CompTError, match=error) as e:
        load_env_families()
    assert "\n" not in str(e.value) and str(e.value).startswith(FAMILIES_ENV)
    assert "toy" not in FAMILY_MODULES
