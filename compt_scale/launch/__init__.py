"""Launch: DeepSpeed presets (ds_presets), SLURM sbatch rendering/submission (slurm), `compt-scale slurm`."""
