#!/usr/bin/env bash
# Run one chain stage on this machine with N processes (one per GPU), launched by torchrun.
#
#   NPROC=2 launchers/torchrun.sh configs/demo.yaml --stage s --out runs/demo [--resume]
#
# Arguments after the spec are those of `compt-scale stage`. NPROC defaults to the number of GPUs
# (nvidia-smi -L), or 1 without GPUs (CPU ranks use gloo). A whole chain on one machine is
# `compt-scale chain SPEC --out DIR --nproc N`, which launches each stage like this itself.
#
# It runs torchrun through compt_scale.launch.torchrun, which forwards SIGUSR1 to the workers and
# keeps their exit code 99: `kill -USR1 <pid of this script>` makes the stage checkpoint and exit 99,
# and the same command with --resume continues it. --standalone picks a free rendezvous port, so
# several runs can share a machine.
# Extra torchrun options: TORCHRUN_ARGS="--master_port 29600" (space-separated).
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# exec: signals sent to this script's pid reach the launcher directly.
# shellcheck disable=SC2086
exec "$PY" -m compt_scale.launch.torchrun --standalone --nproc_per_node "$NPROC" ${TORCHRUN_ARGS:-} \
  -m compt_scale.cli stage "$@"
