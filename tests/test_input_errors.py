"""Bad inputs through the real CLI (a subprocess, as a user runs it): each ends with exit 2 and one
stderr line naming the problem, no traceback, and leaves nothing behind it should not.

CASES is also the source of the README table "Input errors" (`python tests/test_input_errors.py`
prints it from a real run of every case), so the table shows what the tool really prints.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from compt_scale.errors import CompTError
from conftest import REPO, TINY_DATA, TINY_TRAIN

PRESETS = REPO / "compt_scale" / "resources" / "models" / "hf_decoder"


def _spec(d: Path, name: str = "bad", stages=None, **top) -> Path:
    spec = {"name": name, "data": dict(TINY_DATA), "train": dict(TINY_TRAIN),
            "stages": stages or [{"name": "a", "model": "llama-xs", "tokens": 256},
                                 {"name": "b", "model": "llama-s", "tokens": 256}]}
    for k, v in top.items():
        spec[k] = {**spec[k], **v} if isinstance(spec.get(k), dict) and isinstance(v, dict) else v
    p = d / "spec.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def _yaml(d: Path, text: str) -> Path:
    p = d / "spec.yaml"
    p.write_text(text)
    return p


def _model_json(d: Path, preset: str, **over) -> str:
    cfg = json.loads((PRESETS / f"{preset}.json").read_text())
    cfg.update(over)
    p = d / f"{preset}-custom.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def _with_field(d: Path, section: str, value_yaml: str) -> Path:
    """A valid spec with one field set to a raw YAML scalar (.nan, .inf, ...): `section` is a dotted
    path such as 'ifd.alpha' or 'stages.0.tokens'."""
    text = yaml.safe_dump({"name": "bad", "data": dict(TINY_DATA), "train": dict(TINY_TRAIN),
                           "ifd": {}, "stages": [{"name": "a", "model": "llama-xs", "tokens": 256},
                                                 {"name": "b", "model": "llama-s", "tokens": 256}]},
                          sort_keys=False)
    raw = yaml.safe_load(text)
    *path, last = section.split(".")
    node = raw
    for k in path:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    node[last] = "@@VALUE@@"
    return _yaml(d, yaml.safe_dump(raw, sort_keys=False).replace("'@@VALUE@@'", value_yaml))


def _files_spec(d: Path, lines: list[str]) -> Path:
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(line + "\n" for line in lines))
    return _spec(d, data={"corpus": "files", "paths": [str(corpus)]},
                 stages=[{"name": "a", "model": "llama-xs", "tokens": 256}])


def _hf_dir(d: Path, config_text: str, weights: bytes | None = None) -> Path:
    src = d / "src"
    src.mkdir()
    (src / "config.json").write_text(config_text)
    if weights is not None:
        (src / "model.safetensors").write_bytes(weights)
    return src


def _run_dir(d: Path, manifest: str, metrics: str | None = None) -> Path:
    run = d / "run"
    (run / "a").mkdir(parents=True)
    (run / "manifest.json").write_text(manifest)
    if metrics is not None:
        (run / "a" / "metrics.jsonl").write_text(metrics)
    return run


def _truncated_teacher(d: Path) -> list:
    """Stage b of a chain whose stage a is recorded done but whose export is cut short."""
    spec = _spec(d, data={"cache_dir": os.environ["COMPT_TEST_DATA"]})
    out = d / "out"
    model = out / "a" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text((PRESETS / "llama-xs.json").read_text().replace("4096", "512"))
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (out / "manifest.json").write_text(json.dumps({"chain": "bad", "stages": {
        "a": {"status": "done", "kind": "chain", "index": 0}, "b": {"status": "pending", "kind": "chain", "index": 1}}}))
    return ["stage", spec, "--stage", "b", "--out", out]


def _taken(d: Path) -> Path:
    (d / "taken").write_text("x")
    return d / "taken"


def _out_is_file(d: Path) -> list:
    return ["chain", _spec(d), "--out", _taken(d)]


def _out_under_file(d: Path) -> list:
    (d / "taken").write_text("x")
    return ["chain", _spec(d), "--out", d / "taken" / "run"]


def _read_only_dir(d: Path) -> Path:
    """A dir no one may create entries in: mode 0555, or for root (whom modes do not bind) sysfs."""
    ro = d / "ro"
    ro.mkdir(mode=0o555)
    if not os.access(ro, os.W_OK):
        return ro
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return Path("/sys")
    pytest.skip("running as root, and /sys is writable: no read-only dir to test with")


def _grow_into_read_only(d: Path) -> list:
    src = _hf_dir(d, (PRESETS / "llama-xs.json").read_text())
    return ["grow", "--from", src, "--to", "llama-s", "--out", _read_only_dir(d) / "grown"]


def _tokenizer_not(d: Path) -> list:
    (d / "tok").mkdir()
    (d / "tok" / "notes.txt").write_text("not a tokenizer")
    return ["chain", _spec(d, data={"tokenizer": str(d / "tok")}), "--out", d / "out"]


def _cache_is_file(d: Path) -> list:
    (d / "cache").write_text("x")
    return ["chain", _spec(d, data={"cache_dir": str(d / "cache")}), "--out", d / "out"]


def _binary(d: Path, name: str) -> Path:
    p = d / name
    p.write_bytes(bytes(range(256)) * 4)
    return p


def _latin1(d: Path) -> Path:
    p = d / "spec.yaml"
    p.write_bytes("name: caf\xe9\nstages: []\n".encode("latin-1"))
    return p


def _chain(spec: Path, d: Path) -> list:
    return ["chain", spec, "--out", d / "out"]


# id -> (argv builder(tmp dir), text the one stderr line must contain)
CASES = {
    # -- the spec file itself
    "spec-not-utf8": (lambda d: _chain(_latin1(d), d), "not UTF-8"),
    "spec-is-a-directory": (lambda d: ["plan", d], "not a file"),
    "spec-nested-3000-deep": (lambda d: _chain(_yaml(d, "name: x\nstages: " + "[" * 3000 + "]" * 3000 + "\n"), d),
                              "nested too deeply"),
    "spec-name-with-newline": (lambda d: _chain(_spec(d, name="x\nexit 0"), d), "spec.name"),
    # -- non-finite numbers
    "tokens-inf": (lambda d: _chain(_with_field(d, "stages.0.tokens", ".inf"), d), "stages[0].tokens"),
    "tokens-nan": (lambda d: _chain(_with_field(d, "stages.1.tokens", ".nan"), d), "stages[1].tokens"),
    "budget-tokens-inf": (lambda d: _chain(_yaml(d, yaml.safe_dump({
        "name": "b", "data": TINY_DATA, "budget": {"baseline_tokens": 1000, "target_speedup": 1.5},
        "stages": [{"name": "a", "model": "llama-xs"}]}).replace("1000", ".inf")), d), "budget.baseline_tokens"),
    "budget-speedup-nan": (lambda d: _chain(_yaml(d, yaml.safe_dump({
        "name": "b", "data": TINY_DATA, "budget": {"baseline_tokens": 1000, "target_speedup": 1.5},
        "stages": [{"name": "a", "model": "llama-xs"}]}).replace("1.5", ".nan")), d), "budget.target_speedup"),
    "ifd-alpha-nan": (lambda d: _chain(_with_field(d, "ifd.alpha", ".nan"), d), "ifd.alpha"),
    "ifd-ratio-inf": (lambda d: _chain(_with_field(d, "ifd.ratio", ".inf"), d), "ifd.ratio"),
    "stage-ifd-alpha-string-nan": (lambda d: _chain(_with_field(d, "stages.1.ifd.alpha", "'nan'"), d),
                                   "stages[1].ifd.alpha"),
    "lr-inf": (lambda d: _chain(_with_field(d, "train.lr", ".inf"), d), "train.lr"),
    "grad-clip-nan": (lambda d: _chain(_with_field(d, "train.grad_clip", ".nan"), d), "train.grad_clip"),
    "weight-decay-string-inf": (lambda d: _chain(_with_field(d, "train.weight_decay", "'-inf'"), d),
                                "train.weight_decay"),
    "seed-inf": (lambda d: _chain(_with_field(d, "seed", ".inf"), d), "spec.seed"),
    "seed-negative": (lambda d: ["stage", _spec(d, seed=-1), "--stage", "a", "--out", d / "out"], "spec.seed"),
    # -- model limits
    "negative-hidden-size": (lambda d: _chain(_spec(d, stages=[
        {"name": "a", "model": _model_json(d, "llama-xs", hidden_size=-64), "tokens": 256}]), d), "hidden_size"),
    "seq-len-over-gpt2-positions": (lambda d: _chain(_spec(d, data={"seq_len": 1100}, stages=[
        {"name": "a", "model": "gpt2-xs", "tokens": 4096}]), d), "n_positions"),
    # -- data
    "tokenizer-dir-not-a-tokenizer": (_tokenizer_not, "data.tokenizer"),
    "cache-dir-is-a-file": (_cache_is_file, "data.cache_dir"),
    "empty-jsonl": (lambda d: ["stage", _files_spec(d, []), "--stage", "a", "--out", d / "out"], "data.paths"),
    "null-text-in-jsonl": (lambda d: ["stage", _files_spec(d, [json.dumps({"text": "hello world " * 20})] * 40
                                                            + [json.dumps({"text": None})]),
                                      "--stage", "a", "--out", d / "out"], "null"),
    "vocab-size-200000-on-a-small-corpus": (lambda d: ["stage", _spec(d, data={"vocab_size": 200000}, stages=[
        {"name": "a", "model": "llama-xs", "tokens": 256}]), "--stage", "a", "--out", d / "out"], "data.vocab_size"),
    # -- output dirs
    "out-is-a-file": (_out_is_file, "--out"),
    "out-under-a-file": (_out_under_file, "--out"),
    "stage-out-is-a-file": (lambda d: ["stage", _spec(d), "--stage", "a", "--out", _taken(d)], "--out"),
    "slurm-out-is-a-file": (lambda d: ["slurm", _spec(d), "--out", _taken(d)], "--out"),
    "grow-out-in-a-read-only-dir": (_grow_into_read_only, "--out"),
    # -- other commands
    "macs-binary-json": (lambda d: ["macs", _binary(d, "model.json")], "model.json"),
    "macs-binary-file": (lambda d: ["macs", _binary(d, "model.bin")], "model.bin"),
    "report-stage-record-not-a-mapping": (lambda d: ["report", _run_dir(d, '{"stages": {"a": 7}}')], "stages.a"),
    "report-metrics-lines-not-records": (lambda d: ["report", _run_dir(
        d, '{"stages": {"a": {"status": "done", "kind": "chain"}}}', '[1, 2]\n{"step": "x", "loss": "y"}\n')],
        "metrics.jsonl"),
    "report-manifest-values-wrong-type": (lambda d: ["report", _run_dir(
        d, '{"stages": {"a": {"status": "done", "kind": "chain", "macs": "lots", "index": "first"}}}')],
        "manifest.json"),
    "grow-corrupt-config": (lambda d: ["grow", "--from", _hf_dir(d, "{not json"), "--to", "llama-s",
                                       "--out", d / "grown"], "config.json"),
    "grow-4-byte-safetensors": (lambda d: ["grow", "--from", _hf_dir(
        d, (PRESETS / "llama-xs.json").read_text(), b"\x00\x01\x02\x03"), "--to", "llama-s", "--out", d / "grown"],
        "model.safetensors"),
    "truncated-teacher-export": (_truncated_teacher, "predecessor export"),
}


def run_case(case: str, d: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    build, _ = CASES[case]
    argv = [str(a) for a in build(d)]
    before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "compt_scale.cli", *argv], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    after = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    return proc, [p for p in after if p not in before]


# What a failing stage may leave: its manifest record (the failure, for `--status` and `report`), the
# spec copy, the manifest lock. Never a stage dir, a checkpoint, or a half-built data dir.
ALLOWED_AFTER = {"out", "out/manifest.json", "out/.manifest.lock", "out/chain.yaml", "out/.data.lock"}


@pytest.fixture(scope="module")
def data_env(tiny_data):
    os.environ["COMPT_TEST_DATA"] = str(tiny_data)
    yield


@pytest.mark.slow   # a fresh CLI process per case (imports torch): ~8 s each here
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case, tmp_path, data_env):
    proc, new = run_case(case, tmp_path)
    # torch prints this once where DeepSpeed is imported on a machine without CUDA (not our output).
    err = [ln for ln in proc.stderr.strip().splitlines() if "No CUDA runtime is found" not in ln]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert err[0].startswith("compt-scale: error: ") and CASES[case][1] in err[0], err[0]
    # A stage that fails during set-up may leave its dir empty; `chain` ignores (removes) empty ones
    # (test_empty_stage_dir_does_not_block_chain).
    left = {p for p in new if p not in ALLOWED_AFTER and not (tmp_path / p).is_dir()
            or (tmp_path / p).is_dir() and any((tmp_path / p).iterdir()) and p != "out"}
    assert not left, new


if __name__ == "__main__":   # print the README table from a real run of every case
    import tempfile
    sys.path.insert(0, str(REPO))
    from compt_scale.config import TextDataSpec
    from compt_scale.data.packed import prepare_data
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["COMPT_TEST_DATA"] = str(prepare_data(TextDataSpec(**TINY_DATA), Path(tmp) / "data"))
        print("| input | what `compt-scale` prints (exit 2) |\n|---|---|")
        for case in CASES:
            with tempfile.TemporaryDirectory() as d:
                proc, _ = run_case(case, Path(d))
                line = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"(exit {proc.returncode})"
                print(f"| {case} | `{line.replace(d, '...').replace(tmp, '...')}` |", flush=True)


def test_empty_stage_dir_does_not_block_chain(tmp_path):
    """What a stage failing in set-up leaves (an empty out/<stage>/) is no "stage output"; anything in it is."""
    from compt_scale.chain.runner import prepare_out
    from compt_scale.config import load_chain
    spec_path = _spec(tmp_path)
    spec, out = load_chain(spec_path), tmp_path / "out"
    (out / "b").mkdir(parents=True)
    prepare_out(spec, spec_path, out, resume=False)
    assert not (out / "b").exists()
    (out / "b").mkdir()
    (out / "b" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(CompTError, match="already holds stage output"):
        prepare_out(spec, spec_path, out, resume=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of permissions")
def test_unreadable_spec_and_read_only_out(tmp_path):
    spec = _spec(tmp_path)
    spec.chmod(0o000)
    from compt_scale.config import load_chain
    with pytest.raises(CompTError, match="cannot read"):
        load_chain(spec)
    spec.chmod(0o644)
    (tmp_path / "ro").mkdir(mode=0o555)
    from compt_scale.chain.runner import prepare_out
    with pytest.raises(CompTError, match="--out"):
        prepare_out(load_chain(spec), spec, tmp_path / "ro" / "out", resume=False)


def test_manifest_never_holds_a_bare_nan(tmp_path):
    from compt_scale.chain.manifest import Manifest
    m = Manifest(tmp_path)
    m.update_stage("a", status="running")
    with pytest.raises(CompTError, match="final_val_loss"):
        m.update_stage("a", status="done", final_val_loss=float("nan"))
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"]["a"]["status"] == "running"
