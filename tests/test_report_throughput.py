"""The report's tokens/s and MFU columns: median of the logged windows, start-up window left out."""
from __future__ import annotations

import json

from compt_scale.report import report_table, write_report


def test_throughput_columns(tmp_path):
    stages = {"a": {"kind": "chain", "index": 0, "status": "done", "params": 10, "tokens": 100, "macs": 1e9,
                    "final_val_loss": 3.0},
              "old": {"kind": "baseline", "index": 0, "status": "done", "params": 10, "tokens": 100, "macs": 2e9,
                      "final_val_loss": 3.1}}
    (tmp_path / "manifest.json").write_text(json.dumps({"chain": "t", "stages": stages}))
    # Window 1 includes start-up (slow); the others give tokens/s 5000, 7000, 6000 and MFU .40 .50 .45.
    lines = [{"step": s, "loss": 4.0, "tokens_per_s": tps, "mfu": m}
             for s, tps, m in ((1, 100.0, 0.01), (10, 5000.0, 0.40), (20, 7000.0, 0.50), (30, 6000.0, 0.45))]
    lines.append({"step": 30, "val_loss": 3.0})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # A run logged before these fields existed (and a CPU run's null MFU) shows "-".
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 4.0, "mfu": None}) + "\n")
    table = report_table(tmp_path).splitlines()
    assert table[0].split()[-2:] == ["tokens/s", "MFU"]
    row = {line.split()[0]: line.split() for line in table[2:4]}
    assert row["a"][-2:] == ["6.00K", "45.0%"]
    assert row["old"][-2:] == ["-", "-"]
    assert "<th>MFU</th>" in write_report(tmp_path).read_text()
