"""Impossible growth gives one-line CompTErrors; the `compt-scale grow` CLI end to end."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compt_scale.cli import main
from compt_scale.errors import CompTError
from compt_scale.families.clip import build as build_clip
from compt_scale.grow import check_growable

BASE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2}


def llama(**kw):
    return AutoConfig.for_model("llama", **{**BASE, **kw})


@pytest.mark.parametrize("tgt,width,depth,msg", [
    (dict(hidden_size=16), "insert", "duplicate", "shrinks hidden"),
    (dict(intermediate_size=40), "insert", "duplicate", "shrinks ffn"),
    (dict(num_hidden_layers=1), "insert", "stack", "shrinks layers"),
    (dict(num_key_value_heads=1, num_attention_heads=2), "insert", "duplicate", "shrinks kv"),
    (dict(intermediate_size=72), "clone", "zero", "integer ratio: ffn"),
    (dict(hidden_size=64, head_dim=16), "clone", "zero", "cannot change hd"),
    (dict(num_key_value_heads=3), "insert", "duplicate", "does not divide"),
    (dict(num_attention_heads=8, num_key_value_heads=8), "insert", "duplicate", "grouping 2 -> 1"),
    (dict(vocab_size=128), "insert", "duplicate", "vocab mismatch"),
    (dict(), "widen", "duplicate", "unknown width operator"),
    (dict(), "insert", "repeat", "unknown depth operator"),
])
def test_impossible_growth_is_one_line(tgt, width, depth, msg):
    with pytest.raises(CompTError, match=msg) as e:
        check_growable(llama(), llama(**tgt), width, depth)
    assert "\n" not in str(e.value)


def test_unsupported_architecture_lists_supported():
    bert = AutoConfig.for_model("bert")
    with pytest.raises(CompTError, match=r"no growth layout for architecture 'bert' \(supported: .*gpt2.*llama"):
        check_growable(bert, bert, "insert", "duplicate")
    with pytest.raises(CompTError, match="differs from the source"):
        check_growable(llama(), AutoConfig.for_model("mistral", **BASE), "insert", "duplicate")


def test_noise_needs_clone():
    from compt_scale.grow import grow_state
    with pytest.raises(CompTError, match="needs width 'clone'"):
        grow_state({}, llama(), llama(), {}, "insert", "duplicate", noise_snr=10.0)


def test_head_dim_growth_allowed_for_insert():
    check_growable(llama(), llama(hidden_size=64, head_dim=16), "insert", "duplicate")


@pytest.fixture
def hf_src(tmp_path):
    cfg = AutoConfig.for_model("llama", **{**BASE, "vocab_size": 4096, "hidden_size": 64, "num_attention_heads": 2,
                                           "num_key_value_heads": 2, "intermediate_size": 176})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_cli_grows_to_preset_and_output_generates(hf_src, tmp_path, capsys):
    out = tmp_path / "grown"
    rc = main(["grow", "--from", str(hf_src), "--to", "llama-s", "--width", "insert", "--depth", "duplicate",
               "--out", str(out), "--seed", "1"])
    assert rc == 0
    assert "grew llama" in capsys.readouterr().out
    report = json.loads((out / "grow_report.json").read_text())
    assert report["depth_map"]["layers"] == [0, 0, 1, 1] and report["sizes"]["hidden"] == [64, 128]
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.hidden_size == 128 and m.config.vocab_size == 4096
    assert m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("target,msg", [
    ("llama-nope", "no such preset"),
    ("gpt2-s", "differs from the source"),
    ("VOCAB_JSON", "vocab mismatch"),        # an explicit config.json keeps its own vocab_size
    ("llama-xs", None),                      # same sizes: a valid identity growth, exit 0
])
def test_cli_bad_input_one_line_exit_2(hf_src, tmp_path, capsys, target, msg):
    if target == "VOCAB_JSON":
        target = str(tmp_path / "t.json")
        (tmp_path / "t.json").write_text(json.dumps({"model_type": "llama", **BASE, "hidden_size": 128,
                                                     "num_attention_heads": 4, "num_key_value_heads": 4,
                                                     "intermediate_size": 352, "vocab_size": 4000}))
    out = tmp_path / "o"
    rc = main(["grow", "--from", str(hf_src), "--to", target, "--out", str(out), "--width", "clone", "--depth", "zero"])
    if target == "llama-xs":      # equal sizes: a valid identity growth
        assert rc == 0
        return
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("compt-scale: error:") and "\n" not in err and msg in err
    assert not out.exists()


def test_cli_missing_source_and_nonempty_out(tmp_path, hf_src, capsys):
    assert main(["grow", "--from", str(tmp_path / "nope"), "--to", "llama-s", "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    assert main(["grow", "--from", str(hf_src), "--to", "llama-s", "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "x").read_text() == "keep"


def test_cli_open_clip_clone_zero(tmp_path):
    from safetensors.torch import save_file

    def cfg(vw, tw, th, layers):
        return {"embed_dim": 16,
                "vision_cfg": {"image_size": 16, "patch_size": 8, "width": vw, "layers": layers, "head_width": 8},
                "text_cfg": {"context_length": 8, "vocab_size": 40, "width": tw, "heads": th, "layers": layers}}
    src_cfg, tgt_cfg = cfg(32, 16, 2, 1), cfg(64, 32, 4, 2)
    src = build_clip(src_cfg, 0).eval()
    save_file(src.state_dict(), str(tmp_path / "src.safetensors"))
    (tmp_path / "src.json").write_text(json.dumps(src_cfg))
    (tmp_path / "tgt.json").write_text(json.dumps(tgt_cfg))
    out = tmp_path / "clip_out"
    assert main(["grow", "--from", str(tmp_path / "src.safetensors"), "--from-config", str(tmp_path / "src.json"),
                 "--to", str(tmp_path / "tgt.json"), "--width", "clone", "--depth", "zero", "--out", str(out)]) == 0
    import open_clip
    from safetensors.torch import load_file
    cfg_out = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    grown = open_clip.CLIP(**cfg_out).eval()
    grown.load_state_dict(load_file(str(out / "open_clip_model.safetensors")))
    img = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (src.encode_image(img) - grown.encode_image(img)).abs().max() < 1e-4
    # wrong target kind for an open_clip source
    assert main(["grow", "--from", str(tmp_path / "src.safetensors"), "--from-config", str(tmp_path / "src.json"),
                 "--to", "llama-s", "--out", str(tmp_path / "x")]) == 2
