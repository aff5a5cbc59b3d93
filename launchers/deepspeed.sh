#!/usr/bin/env bash
# Run one chain stage on this machine with N processes (one per GPU), launched by DeepSpeed's launcher.
#
#   NPROC=2 launchers/deepspeed.sh configs/demo.yaml --stage s --out runs/demo [--resume]
#
# Same arguments as launchers/torchrun.sh / `compt-scale stage`. NPROC defaults to the number of
# GPUs, or 1 without GPUs (DeepSpeed then runs CPU ranks with gloo). MASTER_PORT defaults to a free
# port so several runs can share a machine. --no_local_rank: the stage reads LOCAL_RANK from the
# environment instead of a --local_rank argument.
#
# Differences from torchrun.sh: DeepSpeed's launcher forwards SIGINT/SIGTERM but not SIGUSR1, and on
# a failure it reports the failing rank's exit code. For preemptible runs (SLURM) use torchrun.sh /
# slurm/stage.sbatch, which pass SIGUSR1 on and keep exit code 99.
# Extra launcher options: DEEPSPEED_ARGS="--include localhost:0,1" (space-separated).
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PORT=${MASTER_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# shellcheck disable=SC2086
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$PORT" --no_local_rank \
  ${DEEPSPEED_ARGS:-} --module compt_scale.cli stage "$@"
