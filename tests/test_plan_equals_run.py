"""The stage plan is what the run does. Each check compares the plan with something it did not
compute: the module a family really builds and grows, the export a user loads, the steps the loop
logged; `plan --gpus` fixes are checked by re-planning with the fix applied."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from compt_scale.chain.memory_plan import memory_rows
from compt_scale.chain.plan import plan_stage
from compt_scale.chain.resolve import resolve
from compt_scale.config import load_chain, parse_chain
from compt_scale.families import get_family
from compt_scale.grow import grow_state
from compt_scale.grow.ops import DEPTH_OPS, WIDTH_OPS
from compt_scale.train import memory
from conftest import REPO, TINY_DATA, read_metrics, run_cli, write_spec


def unique_params(model: torch.nn.Module) -> int:
    """Parameters as the built module holds them: a tied tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _grown_spec(model: str, width_op: str, depth_op: str, grow_to: dict):
    return resolve(parse_chain({"name": "g", "data": dict(TINY_DATA), "growth": {"width": width_op, "depth": depth_op},
                                "stages": [{"name": "a", "model": model, "tokens": 128},
                                           {"name": "b", "grow_to": grow_to, "tokens": 128}]}))


# Every operator pair at 2x width + 2x depth, and the factor combinations for the pairs the README uses.
MATRIX = [(w, d, {"width": "2x", "depth": "2x"}) for w, d in itertools.product(WIDTH_OPS, DEPTH_OPS)] + \
         [(w, d, g) for w, d in (("clone", "zero"), ("insert", "duplicate"))
          for g in ({"depth": "2x"}, {"width": "2x"}, {"width": "2x", "depth": "3x"})]


@pytest.mark.parametrize("model", ["gpt2-xs", "llama-xs"])   # tied, untied
def test_plan_counts_the_model_the_growth_builds(model):
    fam = get_family("hf_decoder")
    torch.manual_seed(0)
    checked = 0
    for width_op, depth_op, grow_to in MATRIX:
        spec = _grown_spec(model, width_op, depth_op, grow_to)
        plan = plan_stage(spec, "b", 1)
        src_model = fam.build(plan_stage(spec, "a", 1).student, 0)
        student = fam.build(plan.student, 1)
        grown, report = grow_state(src_model.state_dict(), src_model.config, plan.student, student.state_dict(),
                                   width=width_op, depth=depth_op)
        student.load_state_dict(grown)
        where = f"{model} {width_op}+{depth_op} {grow_to}"
        assert plan.params == unique_params(student), where
        # the config says what was done: the planned config's tie flag is the built module's
        assert bool(getattr(plan.student, "tie_word_embeddings", False)) == tied(student), where
        # clone unties only when the width grows; a depth-only growth keeps a tied model tied
        widened = "width" in grow_to
        if model == "gpt2-xs":
            assert tied(student) == (not (width_op == "clone" and widened)), where
            assert report["untied_embeddings"] == (width_op == "clone" and widened), where
        checked += 1
    assert checked == len(MATRIX)


def test_every_repo_spec_plans_the_modules_it_builds():
    """configs/*.yaml: each stage's planned parameters are those of the module built from its
    planned config (on the meta device: the paper's ViT-L costs no memory)."""
    specs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(specs) >= 3
    for path in specs:
        spec = resolve(load_chain(path))
        fam = get_family(spec.family)
        for st in spec.stages + spec.baselines:
            plan = plan_stage(spec, st.name)
            with torch.device("meta"):
                built = fam.build(plan.student, 0)
            assert plan.params == unique_params(built), f"{path.name}: {st.name}"
            assert plan.steps * plan.samples_per_step * fam.tokens_per_sample(spec) >= plan.tokens


def test_tied_depth_growth_run_matches_its_plan(tmp_path, tiny_data):
    """The 18.3 case, run for real: a tied model grown in depth with clone + zero stays tied, and the
    export holds exactly the planned parameters; the loop ran the planned steps."""
    spec = write_spec(tmp_path / "tied.yaml", [{"name": "a", "model": "gpt2-xs", "tokens": 2 * 4 * 32},
                                               {"name": "b", "grow_to": {"depth": "2x"}, "tokens": 2 * 4 * 32}],
                      data_dir=tiny_data, growth={"width": "clone", "depth": "zero"}, train={"eval_every": 2})
    out = tmp_path / "out"
    run_cli("chain", spec, "--out", out, "--no-baselines")
    spec_obj = resolve(load_chain(spec))
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    for name in ("a", "b"):
        plan = plan_stage(spec_obj, name, 1)
        export = AutoModelForCausalLM.from_pretrained(out / name / "model")
        assert unique_params(export) == plan.params == manifest[name]["params"]
        assert tied(export) and export.config.tie_word_embeddings
        steps = [r["step"] for r in read_metrics(out / name) if "loss" in r]
        assert max(steps) == plan.steps == manifest[name]["steps"]
        assert manifest[name]["tokens"] == plan.steps * plan.samples_per_step * 32
        assert manifest[name]["macs"] == plan.cost()["macs"]
    growth = json.loads((out / "b" / "growth.json").read_text())
    assert growth["untied_embeddings"] is False and growth["config_changes"] == {}


def _spec_with(path: Path, train: dict) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["train"] = {**raw.get("train", {}), **train}
    raw["data"] = {**raw.get("data", {}), "seq_len": 2048}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plan_gpus_names_a_fix_that_fits(tmp_path):
    """A stage that does not fit gets the cheapest change; applying that change to the spec makes
    the stage fit (re-planned, not trusted)."""
    gpu = 2 * memory.GIB
    spec = resolve(load_chain(_spec_with(tmp_path / "big.yaml", {"micro_batch_size": 64})))
    rows = {r["stage"]: r for r in memory_rows(spec, 1, gpu)}
    row = rows["m"]
    assert not row["fits"] and row["fix"], row
    assert row["fix"].startswith("train.micro_batch_size:")
    mb = int(row["fix"].split(":")[1].split()[0])
    fixed = resolve(load_chain(_spec_with(tmp_path / "fixed.yaml", {"micro_batch_size": mb,
                                                                    "grad_accum": 64 // mb})))
    assert {r["stage"]: r for r in memory_rows(fixed, 1, gpu)}["m"]["fits"]
    proc = run_cli("plan", tmp_path / "big.yaml", "--gpus", "1", "--gpu-mem", "2GB")
    assert "m does not fit: cheapest fix: train.micro_batch_size:" in proc.stdout
