#!/usr/bin/env bash
# Installs Debian's slurm-wlm and munge when missing (the SLURM tests start a one-node cluster).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "slurm/install-deps.sh: slurm-wlm/munge missing and not root; SLURM tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurm-wlm munge >/dev/null
