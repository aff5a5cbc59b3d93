"""The growth operator names: the one list the spec validator, the CLI and the registry share.
Torch-free, so `compt-scale --help` and spec parsing do not import torch."""
WIDTH_OPS = ("insert", "clone", "interpolate")                        # interpolate: paper App. D.1 ablation
DEPTH_OPS = ("duplicate", "stack", "zero", "constant", "interval")   # constant, interval: same ablation
