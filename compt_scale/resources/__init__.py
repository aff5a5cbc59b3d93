"""Files the package ships (model presets, DeepSpeed presets, chain specs, the sbatch template),
read through importlib.resources so a plain `pip install .` finds them, not through source paths.
The repository's top-level `configs/models`, `configs/*.yaml`, `ds_configs/` and `slurm/stage.sbatch`
are links into this folder, so there is one copy of each."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource(*parts: str) -> Path:
    """Path of a shipped file or folder (the package is installed unzipped, so this is a real path)."""
    return Path(str(files(__name__).joinpath(*parts)))


MODELS = "models"
DS_CONFIGS = "ds_configs"
CHAINS = "chains"
