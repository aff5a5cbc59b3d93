"""The CLI's parser is torch-free: `compt-scale --help` answers without importing torch."""
import subprocess
import sys

from conftest import REPO


def test_build_parser_does_not_import_torch():
    code = "import sys, compt_scale.cli as c; c.build_parser(); assert 'torch' not in sys.modules, 'torch'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]


def test_help_exits_zero():
    r = subprocess.run([sys.executable, "-m", "compt_scale.cli", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    for cmd in ("chain", "stage", "grow", "plan", "macs", "report", "slurm", "demo", "tune-lr"):
        assert cmd in r.stdout
