"""Every registered family honours the Family contract the runner, planner and report rely on:
the same calls, checked against the real libraries (parameter counts against the built module,
feature widths against the forward's tensors, exports against open_clip/transformers loaders)."""
from __future__ import annotations

import math

import pytest
import torch

from compt_scale.config import parse_chain
from compt_scale.families import DATA_SPECS, FAMILIES, get_family
from compt_scale.families.base import Family

SPECS = {
    "hf_decoder": {"name": "c", "data": {"corpus": "stdlib", "vocab_size": 512, "seq_len": 16,
                                         "max_chars": 60_000},
                   "stages": [{"name": "a", "model": "llama-xs", "tokens": 64},
                              {"name": "b", "model": "llama-s", "tokens": 64}]},
    "open_clip": {"name": "c", "family": "open_clip", "data": {"corpus": "shapes", "num_samples": 32},
                  "stages": [{"name": "a", "model": "clip-xs", "tokens": 64},
                             {"name": "b", "model": "clip-s", "tokens": 64}]},
}


def test_every_family_is_registered_with_a_spec_and_data_section():
    assert set(FAMILIES) == set(SPECS) == set(DATA_SPECS)
    for name in FAMILIES:
        fam = get_family(name)
        assert isinstance(fam, Family) and fam.name == name
        assert fam.preset_names(), name


def test_family_options_are_rejected_for_the_other_family():
    from compt_scale.errors import CompTError
    with pytest.raises(CompTError, match="data.image_size: unknown field"):
        parse_chain({**SPECS["hf_decoder"], "data": {"image_size": 32}})
    with pytest.raises(CompTError, match="data.seq_len: unknown field"):
        parse_chain({**SPECS["open_clip"], "data": {"seq_len": 32}})


@pytest.mark.parametrize("name", sorted(SPECS))
def test_family_contract(name, tmp_path):
    spec = parse_chain(SPECS[name], base_dir=tmp_path)
    fam = get_family(spec.family)
    data_dir = fam.prepare(spec, tmp_path / "data")
    small, large = (fam.model_config(spec, s, data_dir) for s in spec.stages)
    model = fam.build(small, 0)
    # Parameter counts come from configs (planner) and must equal the real module's.
    assert fam.param_count(small) == sum(p.numel() for p in model.parameters())
    assert fam.param_count(fam.plan_config(spec, spec.stages[1])) == sum(
        p.numel() for p in fam.build(large, 0).parameters())
    # The same seed gives the same init (every rank builds the same student).
    again = fam.build(small, 0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                strict=True))

    train = fam.dataset(spec, data_dir, "train")
    assert len(train) > 4 and len(fam.dataset(spec, data_dir, "val")) > 0
    batch = train.batch([0, 1, 2, 3])
    task, feats = fam.losses(model, batch)
    assert task.dim() == 0 and math.isfinite(task.item())
    dims = fam.feature_dims(fam.config_of(model))
    assert [f.shape[-1] for f in feats] == dims
    with torch.no_grad():
        teacher_feats = fam.features(model, batch)
    assert [f.shape for f in teacher_feats] == [f.shape for f in feats]
    task.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    # The memory planner's view of the model: its largest parameter is the built module's.
    towers, largest = fam.memory_shape(small, spec)
    assert largest == max(p.numel() for p in model.parameters())
    assert towers and all(len(t) == 4 and min(t) > 0 for t in towers)

    macs = fam.stage_macs(large, small, spec, 8)
    assert macs["macs"] == macs["train_macs"] + macs["teacher_macs"] > 0
    assert fam.stage_macs(large, None, spec, 8)["teacher_macs"] == 0
    assert fam.tokens_per_sample(spec) >= 1

    out = tmp_path / "export"
    fam.io.export(model, None, torch.float32, data_dir, out, 2**30)   # the trainer's own export path
    loaded = fam.load_export(out)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(fam.probe(loaded, batch), fam.probe(model, batch), atol=1e-5, rtol=1e-5)
    assert fam.config_of(loaded) is not None


def test_prepare_reports_an_impossible_vocab_in_one_line(tmp_path):
    """SentencePiece needs at least one piece per distinct character of the corpus."""
    from compt_scale.errors import CompTError
    raw = {**SPECS["hf_decoder"], "data": {**SPECS["hf_decoder"]["data"], "vocab_size": 300}}
    spec = parse_chain(raw, base_dir=tmp_path)
    with pytest.raises(CompTError, match=r"data.vocab_size 300: SentencePiece cannot train") as e:
        get_family(spec.family).prepare(spec, tmp_path / "data")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
