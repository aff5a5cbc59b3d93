"""`python -m compt_scale.launch.jobstate OUT STAGE --status S [--job-id J] [--error E] [--unless a,b]`:
the batch script's way to write the chain manifest (the same locked, atomic Manifest the stage uses).

--unless skips the status/error change when the stage's record already has one of those statuses:
the stage's own "failed" with its real error beats the batch script's generic "died without
recording" note, and a requeued job that finds its stage "done" must not flip it back to "running".
The job id is always recorded.
"""
from __future__ import annotations

import argparse
import sys

from ..chain.manifest import STATUSES, Manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compt_scale.launch.jobstate")
    p.add_argument("out")
    p.add_argument("stage")
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--job-id", default="")
    p.add_argument("--error")
    p.add_argument("--unless", default="", help="comma-separated statuses that are left alone")
    a = p.parse_args(argv)
    m = Manifest(a.out)
    fields = {"job_id": a.job_id} if a.job_id else {}
    keep = {s for s in a.unless.split(",") if s}
    if a.status and m.stage(a.stage).get("status") not in keep:
        fields["status"] = a.status
        if a.error is not None:
            fields["error"] = a.error
        elif a.status in ("running", "done"):
            fields["error"] = None  # a resumed/finished stage no longer carries an old error
    if fields:
        m.update_stage(a.stage, **fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
