"""Launch: SLURM sbatch rendering/submission (slurm), `compt-scale slurm`."""
