"""`compt-scale macs` finds a preset of either family, reads config files, and rejects bad input with
one line and exit 2. The decoder's parameter count is checked against a hand count."""
import json

import pytest

from compt_scale.cli import main
from compt_scale.resources import MODELS, resource


def _macs(capsys, *args):
    rc = main(["macs", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_macs_decoder_preset(capsys):
    rc, out, err = _macs(capsys, "llama-xs", "--seq-len", "64")
    assert rc == 0, err
    c = json.loads((resource(MODELS, "hf_decoder") / "llama-xs.json").read_text())
    h, f, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"])
    hd = h // c["num_attention_heads"]
    # q, o (h x h), k, v (h x kv*hd), gate/up/down (3 h f), 2 norms per layer; embeddings; final norm
    assert "llama" in out
    params = v * h * (1 if c.get("tie_word_embeddings") else 2) + n * (2 * h * h + 2 * h * kv * hd + 3 * h * f
                                                                      + 2 * h) + h
    assert f"params         {params:,} " in out


def test_macs_clip_preset(capsys):
    rc, out, err = _macs(capsys, "clip-s")
    assert rc == 0, err
    assert "CLIP" in out and "captions" in out


def test_macs_config_json_paths(capsys, tmp_path):
    dec = tmp_path / "config.json"
    dec.write_text((resource(MODELS, "hf_decoder") / "gpt2-xs.json").read_text())
    rc, out, err = _macs(capsys, dec, "--seq-len", "32")
    assert rc == 0, err
    assert "gpt2" in out
    clip = tmp_path / "my_clip.json"
    clip.write_text(json.dumps({"model_cfg": json.loads((resource(MODELS, "open_clip") / "clip-xs.json").read_text())}))
    rc, out, err = _macs(capsys, clip)
    assert rc == 0, err
    assert "CLIP" in out


@pytest.mark.parametrize("content", ["{not json", json.dumps({"hidden_size": 8})])
def test_macs_bad_file_one_line_exit_2(capsys, tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    rc, out, err = _macs(capsys, bad)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
