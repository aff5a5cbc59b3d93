"""Malformed chain specs: each ends with a one-line error naming the field, exit 2, and no stage output."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from compt_scale.cli import main
from conftest import REPO, TINY_DATA, TINY_TRAIN


def base(**over):
    spec = {"name": "bad", "data": dict(TINY_DATA), "train": dict(TINY_TRAIN),
            "stages": [{"name": "a", "model": "llama-xs", "tokens": 256},
                       {"name": "b", "model": "llama-s", "tokens": 256}]}
    spec.update(over)
    return spec


def llama_json(tmp_path, name, **over):
    cfg = json.loads((REPO / "configs/models/hf_decoder/llama-s.json").read_text())
    cfg.update(over)
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def cases(tmp_path):
    def stages(*models):
        return [{"name": f"s{i}", "model": m, "tokens": 256} for i, m in enumerate(models)]
    return {
        "successor-not-larger": (base(stages=stages("llama-s", "llama-xs")), "stages[1].model"),
        "same-size-successor": (base(stages=stages("llama-s", "llama-s")), "stages[1].model"),
        "head-dim-not-divisible": (base(stages=stages("llama-xs", llama_json(tmp_path, "hd", hidden_size=130,
                                                                            num_attention_heads=4))), "stages[1].model"),
        "kv-heads-not-dividing": (base(stages=stages("llama-xs", llama_json(tmp_path, "kv", num_key_value_heads=3))),
                                  "stages[1].model"),
        "unknown-width-operator": (base(growth={"width": "stretch"}), "growth.width"),
        "unknown-depth-operator": (base(stages=[{"name": "a", "model": "llama-xs", "tokens": 256},
                                                {"name": "b", "model": "llama-s", "tokens": 256,
                                                 "growth": {"depth": "mirror"}}]), "stages[1].growth.depth"),
        "missing-data-path": (base(data={**TINY_DATA, "corpus": "files", "paths": ["nowhere/corpus.txt"]}), "data.paths"),
        "zero-budget": (base(stages=[{"name": "a", "model": "llama-xs", "tokens": 0}]), "stages[0].tokens"),
        "negative-budget": (base(stages=[{"name": "a", "model": "llama-xs", "tokens": -5}]), "stages[0].tokens"),
        "missing-budget": (base(stages=[{"name": "a", "model": "llama-xs"}]), "stages[0].tokens"),
        "wrong-vocab": (base(stages=stages("llama-xs", llama_json(tmp_path, "voc", vocab_size=1000))), "vocab"),
        "architecture-change": (base(stages=stages("llama-xs", "gpt2-s")), "stages[1].model"),
        "unknown-preset": (base(stages=stages("llama-xs", "llama-huge")), "stages[1].model"),
        "unknown-field": (base(trian={"lr": 1}), "spec.trian"),
        "duplicate-names": (base(stages=[{"name": "a", "model": "llama-xs", "tokens": 256},
                                         {"name": "a", "model": "llama-s", "tokens": 256}]), "duplicate"),
        "no-stages": (base(stages=[]), "spec.stages"),
        "negative-lr": (base(train={**TINY_TRAIN, "lr": -1}), "train.lr"),
        "bad-zero-stage": (base(train={**TINY_TRAIN, "zero_stage": 5}), "train.zero_stage"),
        "tokens-not-int": (base(stages=[{"name": "a", "model": "llama-xs", "tokens": "many"}]), "stages[0].tokens"),
        "missing-tokenizer-dir": (base(data={**TINY_DATA, "tokenizer": "no/such/tokenizer"}), "data.tokenizer"),
    }


@pytest.mark.parametrize("case", sorted(cases(__import__("pathlib").Path("/tmp")).keys()))
def test_bad_spec_is_one_line_error(case, tmp_path, capsys):
    spec, field = cases(tmp_path)[case]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    rc = main(["chain", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert field in err, err
    assert not out.exists(), "a rejected spec must create no output"


def test_yaml_syntax_error(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nstages: [\n  {name: a, model: llama-xs\n")
    rc = main(["chain", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "invalid YAML at line" in err, err
    assert not (tmp_path / "out").exists()


def test_missing_spec_file_through_the_console(tmp_path):
    """The real process: one line on stderr, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "compt_scale.cli", "chain", str(tmp_path / "nope.yaml"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"compt-scale: error: chain spec not found: {tmp_path / 'nope.yaml'}"]
