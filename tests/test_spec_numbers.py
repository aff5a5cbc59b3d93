"""Numbers as users write them, and every chain spec the docs show, through the real loader and `plan`.

YAML 1.1 (PyYAML) hands `2e9`, `2.0e9` and `1.5e10` over as strings; a spec field takes them (and
`1_000_000`, `.5`) when the value is exact for the field, and anything else stays a one-line error.
The expected values below are Python literals written by hand, not the loader's own arithmetic.
"""
from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig

from compt_scale.cli import main
from compt_scale.config import load_chain
from compt_scale.errors import CompTError
from compt_scale.grow.targets import derive_config
from compt_scale.grow_cli import parse_overrides
from conftest import REPO

SPEC = """name: numbers
seed: {seed}
data: {{vocab_size: {vocab}, seq_len: {seq_len}, max_chars: 3.0e5, val_fraction: .05}}
train: {{micro_batch_size: 4.0e0, grad_accum: 2.0e0, lr: 3e-4, warmup_steps: 1_0, zero_stage: 2.0e0}}
ifd: {{alpha: {{schedule: linear, start: 1e-1, end: 5e-2}}}}
stages:
  - {{name: a, model: llama-xs, tokens: {tokens}}}
  - {{name: b, model: llama-s, tokens: 1000}}
"""


def _load(tmp_path: Path, seed="1e1", vocab="5.12e2", seq_len="32", tokens="1000"):
    p = tmp_path / "spec.yaml"
    p.write_text(SPEC.format(seed=seed, vocab=vocab, seq_len=seq_len, tokens=tokens))
    return load_chain(p)


@pytest.mark.parametrize("written,expected", [
    ("2e9", 2_000_000_000), ("2.0e9", 2_000_000_000), ("1.5e10", 15_000_000_000), ("1_000_000", 1_000_000),
    ("2.0e+9", 2_000_000_000), ("'3e3'", 3000), ("1.000000000000000001e18", 1_000_000_000_000_000_001),
])
def test_integer_field_takes_yaml_float_forms(tmp_path, written, expected):
    tokens = _load(tmp_path, tokens=written).stages[0].tokens
    assert tokens == expected and type(tokens) is int


@pytest.mark.parametrize("written,bad", [("2.5", "2.5"), ("2.5e0", "2.5e0"), ("abc", "abc"), ("1e400", "1e400"),
                                         ("true", "True"), ("'1.5.2'", "1.5.2")])
def test_integer_field_rejects_what_is_not_a_whole_number(tmp_path, written, bad):
    with pytest.raises(CompTError) as e:
        _load(tmp_path, tokens=written)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("stages[0].tokens:") and bad in msg, msg


def test_every_numeric_section_reads_the_same_forms(tmp_path):
    spec = _load(tmp_path)
    train = spec.train_for(spec.stages[1])
    assert (train.micro_batch_size, train.grad_accum, train.warmup_steps, train.zero_stage) == (4, 2, 10, 2)
    assert all(type(v) is int for v in (train.micro_batch_size, train.grad_accum, train.zero_stage, spec.seed))
    assert train.lr == 0.0003 and spec.data.val_fraction == 0.05
    assert (spec.data.max_chars, spec.data.vocab_size, spec.seed) == (300_000, 512, 10)
    assert spec.ifd.alpha == {"schedule": "linear", "start": 0.1, "end": 0.05}
    for kw, msg in [({"seq_len": "32.5"}, "data.seq_len: expected an integer, got 32.5"),
                    ({"vocab": "'5.12e1x'"}, "data.vocab_size: expected an integer, got '5.12e1x'"),
                    ({"seed": "-1"}, "spec.seed: must be in 0..4294967295, got -1"),
                    ({"seed": "2**32"}, "spec.seed: expected an integer, got '2**32'")]:
        with pytest.raises(CompTError) as e:
            _load(tmp_path, **kw)
        assert str(e.value) == msg


def test_grow_to_and_grow_set_values_are_typed_like_the_source_config():
    src = AutoConfig.for_model("llama", vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=176, num_hidden_layers=2)
    got = derive_config(src, {"hidden_size": "1.28e2", "num_hidden_layers": 4.0, "initializer_range": "5e-2"})
    assert (got.hidden_size, got.num_hidden_layers, got.num_attention_heads, got.initializer_range) == (128, 4, 8, 0.05)
    assert type(got.hidden_size) is int and type(got.num_hidden_layers) is int
    got = derive_config(src, {"width": "2.0e0", **parse_overrides(["intermediate_size=3.52e2", "rms_norm_eps=1e-5"])})
    assert (got.hidden_size, got.intermediate_size, got.rms_norm_eps) == (128, 352, 1e-5)
    for bad, msg in [({"hidden_size": 96.5}, "hidden_size: expected an integer, got 96.5"),
                     ({"hidden_size": "abc"}, "hidden_size: expected an integer, got 'abc'"),
                     ({"num_hidden_layers": 0}, "num_hidden_layers: must be a positive integer, got 0"),
                     (parse_overrides(["num_hidden_layers=2.5"]), "num_hidden_layers: expected an integer, got 2.5"),
                     (parse_overrides(["initializer_range=fast"]), "initializer_range: expected a number, got 'fast'"),
                     (parse_overrides(["tie_word_embeddings=1"]), "tie_word_embeddings: expected true/false")]:
        with pytest.raises(CompTError) as e:
            derive_config(src, bad)
        assert msg in str(e.value) and "\n" not in str(e.value), (bad, str(e.value))


# ---------------------------------------------------------------- the docs' own chain specs

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```ya?ml[^\n]*\n(.*?)^```", re.S | re.M)


def doc_chain_specs() -> list[tuple[str, str]]:
    """(where, YAML text) of every fenced YAML block in the docs that is a chain spec (has stages:)."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            raw = yaml.safe_load(m.group(1))
            if isinstance(raw, dict) and "stages" in raw:
                found.append((f"{doc.relative_to(REPO)}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
    return found


def _path_fields(raw: dict) -> list[tuple[str, str]]:
    """(role, path) of every field of a spec that names a file or dir."""
    data = raw.get("data") or {}
    out = [("corpus", p) for p in data.get("paths") or []]
    if data.get("tokenizer") not in (None, "train", "auto"):
        out.append(("tokenizer", data["tokenizer"]))
    for st in (raw.get("stages") or []) + (raw.get("baselines") or []):
        if st.get("init"):
            out.append(("init", st["init"]))
        model = str(st.get("model") or "")
        if model.endswith(".json") or "/" in model:
            out.append(("model", model))
    return out


def _make_fixture(role: str, target: Path, raw: dict, init_dir: Path) -> None:
    """A tiny stand-in for what the doc's placeholder path names."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    data = raw.get("data") or {}
    if role == "corpus" and target.suffix in (".jsonl", ".txt"):
        lines = [f"document {i}: the chain grows a small model into a larger one." for i in range(50)]
        field = data.get("text_field", "text")
        target.write_text("".join((json.dumps({field: ln}) if target.suffix == ".jsonl" else ln) + "\n"
                                  for ln in lines))
    elif role in ("init", "tokenizer"):
        target.symlink_to(init_dir, target_is_directory=True)
    elif role == "model":   # the largest llama preset: larger than any preset stage before it
        cfg = json.loads((REPO / "configs/models/hf_decoder/llama-l.json").read_text())
        target.write_text(json.dumps({**cfg, "vocab_size": data.get("vocab_size", 4096)}))
    else:
        raise AssertionError(f"no test fixture for {role} {target}: add one to tests/test_spec_numbers.py")


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    from test_init_chain import save_init_model
    return save_init_model(tmp_path_factory.mktemp("init") / "tiny-qwen2", "qwen2")


def test_doc_specs_are_found():
    found = doc_chain_specs()
    assert len(found) >= 2 and all(w.startswith("README.md") for w, _ in found[:2]), found


@pytest.mark.parametrize("where,text", doc_chain_specs(), ids=[w for w, _ in doc_chain_specs()])
def test_doc_chain_spec_plans(where, text, tmp_path, init_dir, capsys):
    """Each spec as written (placeholder paths -> tiny fixtures) goes through `compt-scale plan`."""
    raw = yaml.safe_load(text)
    for role, path in _path_fields(raw):
        if Path(path).is_absolute():   # /models/my-model -> <tmp>/abs/models/my-model
            target = tmp_path / "abs" / path.lstrip("/")
            text = text.replace(path, str(target))
        else:                          # relative paths resolve against the spec's dir
            target = tmp_path / path
        _make_fixture(role, target, raw, init_dir)
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    rc = main(["plan", str(spec)])
    out, err = capsys.readouterr()
    assert rc == 0, f"{where}: {err}"
    for st in raw["stages"] + (raw.get("baselines") or []):
        assert re.search(rf"^{re.escape(st['name'])}\s", out, re.M), (st["name"], out)
        if st.get("tokens"):   # the budget as written, read exactly (Decimal: '2.0e9' -> 2,000,000,000)
            assert f" {int(Decimal(str(st['tokens']))):,} " in out, (st["tokens"], out)

