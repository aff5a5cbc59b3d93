"""Training one stage: DeepSpeed config, loop, objective, checkpoints, metrics."""
