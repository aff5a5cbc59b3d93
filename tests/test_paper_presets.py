"""The paper's ViT chain as a config file: ViT-T/16 and ViT-S/16 presets (paper Table G), open_clip's
own model names as stage models, and `compt-scale plan` over the 4-model chain."""
from __future__ import annotations

import re

import open_clip
import pytest
import torch
import yaml

from compt_scale.families.clip_family import load_config, param_count
from compt_scale.resources import CHAINS, resource
from tests.conftest import run_cli

# Paper Table G, overall parameters without the 49408-token embedding table (M): ViT-T 15.10, ViT-S 43.10
PAPER_PARAMS_NO_EMBED = {"paper-vit-t-16": (15.10, 256), "paper-vit-s-16": (43.10, 384)}


def _meta_params(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in open_clip.CLIP(**cfg).parameters())


@pytest.mark.slow
def test_paper_chain_plans_with_open_clip_param_counts():
    path = resource(CHAINS, "paper-vit-chain.yaml")
    spec = yaml.safe_load(path.read_text())
    models = [s["model"] for s in spec["stages"]]
    assert models == ["paper-vit-t-16", "paper-vit-s-16", "ViT-B-16", "ViT-L-16"]
    assert load_config("ViT-B-16") == open_clip.get_model_config("ViT-B-16")   # open_clip's own name
    r = run_cli("plan", str(path))
    assert r.returncode == 0
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if re.match(r"vit-[tsbl] ", line)}
    for stage in spec["stages"]:
        n = _meta_params(load_config(stage["model"]))
        assert param_count(load_config(stage["model"])) == n
        assert rows[stage["name"]][2] == f"{n / 1e6:.2f}M", (stage, rows[stage["name"]])
    for name, (paper_m, text_width) in PAPER_PARAMS_NO_EMBED.items():
        n = _meta_params(load_config(name)) - 49408 * text_width
        assert abs(n / 1e6 - paper_m) / paper_m < 0.01, (name, n)   # within 1% of the paper's table
