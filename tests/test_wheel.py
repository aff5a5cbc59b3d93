"""The project installs as a plain (non-editable) wheel: built here, installed with --no-deps into a
temporary venv that sees this venv's site-packages, and run from an unrelated directory, it finds
its shipped presets and chain specs through importlib.resources."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from compt_scale.resources import CHAINS, resource
from conftest import REPO


@pytest.mark.slow
def test_wheel_installs_and_runs_from_elsewhere(tmp_path):
    build = tmp_path / "build-src"   # a copy: building must not leave build/ or *.egg-info in the repo
    shutil.copytree(REPO, build, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(build)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("compt_scale-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)
    py, exe = venv / "bin" / "python", venv / "bin" / "compt-scale"
    # The test venv's packages (torch, transformers, ...) as a plain path entry: a .pth line does not run
    # the .pth files inside it, so this checkout's editable-install finder stays out.
    site_dir, = (venv / "lib").glob("python3*/site-packages")
    (site_dir / "test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spec = elsewhere / "my-chain.yaml"
    shutil.copy(resource(CHAINS, "demo.yaml"), spec)
    # No PYTHONPATH and no editable finder of this checkout: only the installed wheel can answer.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = subprocess.run([str(py), "-c", "import compt_scale; print(compt_scale.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve()), where.stdout
    for args in (["plan", str(spec)], ["macs", "llama-s"], ["macs", "clip-s"]):
        r = subprocess.run([str(exe), *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
        assert "params" in r.stdout
